"""cai_engine's fused kernels inside other trainers: transformers models and TRL, one call.

    from cai_engine.integrations import patch_transformers
    patch_transformers()            # Llama/Mistral/Qwen2 (SmolLM) causal LMs, any model's SDPA attention and
                                    # TRL's fused LM head use our ops

or `patch(model)` for one model. transformers and TRL are imported only when these are called; neither is a
run-time dependency of cai_engine.
"""
from __future__ import annotations

from .causal_lm import SUPPORTED, causal_lm_loss, patch, unpatch
from .scores import selective_logprobs, sequence_scores, token_values


def patch_transformers() -> None:
    """Fused loss for every supported causal LM class (instances made before or after this call), our fused RMSNorm
    and SwiGLU in their decoders while training, our attention wherever a model runs SDPA, and TRL's fused LM head
    (used by its SFT/DPO/GRPO/RLOO/KTO trainers) routed through the same log-prob op when TRL is installed."""
    from .attention import patch_attention_globally
    from .causal_lm import patch_classes
    from .layers import patch_layer_classes
    from .trl_head import patch_trl
    patch_classes()
    patch_layer_classes()
    patch_attention_globally()
    patch_trl()


def unpatch_transformers() -> None:
    """Undo patch_transformers (tests and benchmarks compare against the unpatched run)."""
    from .attention import unpatch_attention_globally
    from .causal_lm import unpatch_classes
    from .layers import unpatch_layer_classes
    from .trl_head import unpatch_trl
    unpatch_classes()
    unpatch_layer_classes()
    unpatch_attention_globally()
    try:
        unpatch_trl()
    except ImportError:
        pass


__all__ = ["SUPPORTED", "causal_lm_loss", "patch", "patch_transformers", "selective_logprobs", "sequence_scores",
           "token_values", "unpatch", "unpatch_transformers"]
