"""attention: the decoder's causal or masked self-attention while training, with our backward on CPU.

The forward is torch's fused CPU kernel (flash attention, which also returns each row's log-sum-exp); torch's CPU
backward of it takes 5-6x the forward's time in bf16 (15 ms against 2.5 ms per SmolLM2 layer at 4 x 384 tokens:
more than all the layer's matmuls). Under bf16 on CPUs with AVX512-BF16 the backward is ours
(`csrc/attention_backward.cpp`: probabilities recomputed per 32 x 32 tile from the log-sum-exp, every product on
AMX tiles with fp32 accumulation, tiles the mask hides skipped). Everywhere else (fp32, CUDA, where torch's
flash / cuDNN kernels are already fused both ways, no grad, or CAI_ENGINE_BACKEND=torch) this is
`F.scaled_dot_product_attention`, which is also the reference the tests hold ours to.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .backend import as_buffer, choose_backend, needs_autograd


def attention_reference(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, causal: bool = False,
                        scale: float | None = None) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True)


@functools.cache
def _bf16_kernels() -> bool:
    from .. import _native
    return bool(_native.bf16_kernels_available())


def _native_fits(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool) -> bool:
    B, H, T, D = q.shape
    if not (q.dtype == k.dtype == v.dtype == torch.bfloat16 and k.shape == v.shape and k.shape[0] == B
            and H % k.shape[1] == 0 and D % 32 == 0 and D <= 256):
        return False
    if causal and k.shape[2] != T:  # SDPA's is_causal is top-left aligned when S != T; the kernel's is not
        return False
    if mask is not None and not (mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[0] in (1, B)
                                 and mask.dtype in (torch.bfloat16, torch.float32, torch.bool)):
        return False
    return _bf16_kernels()


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, causal: bool = False,
              scale: float | None = None) -> Tensor:
    """softmax(scale q k^T + mask) v for q [B, H, T, D] and k, v [B, KV, S, D] (grouped-query: H a multiple of KV):
    [B, H, T, D]. mask: [B or 1, 1, T, S], additive or bool (True = may attend); causal: key s <= query t."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if (choose_backend(q) != "native" or not needs_autograd(q, k, v)
            or not _native_fits(q, k, v, mask, causal)):
        return attention_reference(q, k, v, mask, causal, scale)
    if mask is not None:
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
        mask = mask.expand(mask.shape[0], 1, q.shape[2], k.shape[2])
    out, _ = _attention_op(q, k, v, mask, causal, scale)
    return out


@functools.cache
def _flash_takes_groups() -> bool:
    """Whether this torch's CPU flash kernel takes fewer KV heads than query heads (recent releases do)."""
    q, kv = torch.zeros(1, 2, 1, 32, dtype=torch.bfloat16), torch.zeros(1, 1, 1, 32, dtype=torch.bfloat16)
    try:
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, kv, kv, 0.0, False)
    except RuntimeError:
        return False
    return True


def _forward(q, k, v, mask, causal, scale):
    groups = q.shape[1] // k.shape[1]
    if groups > 1 and not _flash_takes_groups():
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=mask,
                                                                       scale=scale)


@torch.library.custom_op("cai_engine::attention", mutates_args=())
def _attention_op(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool,
                  scale: float) -> tuple[Tensor, Tensor]:
    out, lse = _forward(q, k, v, mask, causal, scale)
    return out, lse


@_attention_op.register_fake
def _(q, k, v, mask, causal, scale):
    B, H, T, D = q.shape
    return (q.new_empty(B, T, H, D).transpose(1, 2),
            q.new_empty(B, T, H, dtype=torch.float32).transpose(1, 2))


def _setup_context(ctx, inputs, output):
    q, k, v, mask, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask)
    ctx.causal, ctx.scale = causal, scale


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, mask = ctx.saved_tensors
    # the kernel's layouts: [B, T, heads, D] rows (the projections' own, so these are views, not copies)
    rows = lambda t: t.transpose(1, 2).to(torch.bfloat16).contiguous()
    q_rows, k_rows, v_rows, out_rows, grad_rows = (rows(t) for t in (q, k, v, out, grad_out))
    grad_q, grad_k, grad_v = torch.empty_like(q_rows), torch.empty_like(k_rows), torch.empty_like(v_rows)
    mask_rows = None
    if mask is not None:
        mask_rows = (mask[:1] if mask.stride(0) == 0 else mask)[:, 0].contiguous()
    from .. import _native
    _native.attention_backward_bf16(
        as_buffer(q_rows), as_buffer(k_rows), as_buffer(v_rows), as_buffer(out_rows), as_buffer(grad_rows),
        lse.transpose(1, 2).float().contiguous().numpy(), None if mask_rows is None else as_buffer(mask_rows),
        ctx.causal, ctx.scale, as_buffer(grad_q), as_buffer(grad_k), as_buffer(grad_v))
    return grad_q.transpose(1, 2), grad_k.transpose(1, 2), grad_v.transpose(1, 2), None, None, None


_attention_op.register_autograd(_backward, setup_context=_setup_context)
