"""Our attention (`ops.attention`) inside transformers models, where they would run SDPA.

Registered with transformers' attention interface as "cai_engine" (SDPA's masks): `patch(model)` switches one
model from "sdpa" to it, `patch_transformers()` puts it in place of "sdpa" for every model. Calls our kernels
where they apply (bf16 on CPUs with AVX512-BF16: torch's CPU flash backward is 5-6x its forward there) and
transformers' own SDPA function for everything else (dropout, position biases, soft-capping, attention sinks, a
causal prefill behind a cache, fp32, CUDA), so a patched model computes what it computed before, up to rounding.
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops.attention import attention

NAME = "cai_engine"
ORIGINAL_IMPLEMENTATION = "_cai_engine_attention_was"  # on a patched model's config: the implementation it replaced
_replaced_sdpa = None  # transformers' "sdpa" entry while patch_transformers holds its place


def attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: query [B, H, T, D], key / value [B, KV, S, D] -> ([B, T, H, D], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    special = dropout or kwargs.get("output_attentions") or any(
        kwargs.get(name) is not None for name in ("position_bias", "softcap", "s_aux"))
    causal = query.shape[2] > 1 and attention_mask is None and (
        is_causal if is_causal is not None else getattr(module, "is_causal", True))
    if special or (causal and key.shape[2] != query.shape[2]):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    out = attention(query, key, value, mask=attention_mask, causal=bool(causal), scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def patch_attention(model: nn.Module) -> bool:
    """One model (its config and its submodules') from "sdpa" to ours; False when it runs another implementation."""
    config = model.config
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    register()
    model.set_attn_implementation(NAME)
    setattr(config, ORIGINAL_IMPLEMENTATION, "sdpa")
    return True


def unpatch_attention(model: nn.Module) -> None:
    config = model.config
    if hasattr(config, ORIGINAL_IMPLEMENTATION):
        model.set_attn_implementation(config.__dict__.pop(ORIGINAL_IMPLEMENTATION))


def patch_attention_globally() -> None:
    """Ours in place of transformers' "sdpa" entry: every model made before or after that runs SDPA."""
    global _replaced_sdpa
    from transformers import AttentionInterface
    if _replaced_sdpa is None:
        _replaced_sdpa = AttentionInterface._global_mapping["sdpa"]
        AttentionInterface.register("sdpa", attention_forward)


def unpatch_attention_globally() -> None:
    global _replaced_sdpa
    from transformers import AttentionInterface
    if _replaced_sdpa is not None:
        AttentionInterface.register("sdpa", _replaced_sdpa)
        _replaced_sdpa = None
