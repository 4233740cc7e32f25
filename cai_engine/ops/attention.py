"""attention: the decoder's causal or masked self-attention (training and evaluation), ours in bf16 on CPU.

Torch's CPU flash backward takes 5-6x its forward's time in bf16 (15 ms against 2.5 ms per SmolLM2 layer at
4 x 384 tokens: more than all the layer's matmuls). Under bf16 on CPUs with AVX512-BF16 both directions are ours
(`csrc/dense_attention.cpp`): the forward an online softmax over 32 x 32 tiles that also returns each row's
log-sum-exp; the backward recomputes the probabilities per tile from it; every product on AMX tiles with fp32
accumulation, tiles the mask hides skipped. Everywhere else (fp32, CUDA, where torch's flash / cuDNN kernels are
already fused both ways, or CAI_ENGINE_BACKEND=torch) this is `F.scaled_dot_product_attention`, which is also the
reference the tests hold ours to.
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
                                 and mask.dtype in (torch.bfloat16, torch.float32, torch.bool)
                                 and not mask.requires_grad):  # a learned bias wants its gradient: SDPA gives it
        return False
    return _bf16_kernels()


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, causal: bool = False,
              scale: float | None = None) -> Tensor:
    """softmax(scale q k^T + mask) v for q [B, H, T, D] and k, v [B, KV, S, D] (grouped-query: H a multiple of KV):
    [B, H, T, D]. mask: [B or 1, 1, T, S], additive or bool (True = may attend); causal: key s <= query t."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if choose_backend(q) != "native" or not _native_fits(q, k, v, mask, causal):
        return attention_reference(q, k, v, mask, causal, scale)
    if mask is not None:
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
        mask = mask.expand(mask.shape[0], 1, q.shape[2], k.shape[2])
    # without autograd (evaluation, reference models) the same kernel directly: the same bits as in training
    out, _ = (_attention_op if needs_autograd(q, k, v) else _forward)(q, k, v, mask, causal, scale)
    return out


def _rows(t: Tensor) -> Tensor:
    """[B, heads, T, D] as the kernels' [B, T, heads, D] rows: the projections' own layout, so a view, not a copy."""
    return t.transpose(1, 2).to(torch.bfloat16).contiguous()


def _mask_rows(mask: Tensor | None):
    if mask is None:
        return None
    return as_buffer((mask[:1] if mask.stride(0) == 0 else mask)[:, 0].contiguous())


def _forward(q, k, v, mask, causal, scale):
    from .. import _native
    B, H, T, D = q.shape
    out = torch.empty(B, T, H, D, dtype=torch.bfloat16)
    lse = torch.empty(B, T, H, dtype=torch.float32)
    _native.attention_forward_bf16(as_buffer(_rows(q)), as_buffer(_rows(k)), as_buffer(_rows(v)), _mask_rows(mask),
                                   causal, scale, as_buffer(out), lse.numpy())
    return out.transpose(1, 2), lse.transpose(1, 2)


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
    q_rows, k_rows, v_rows = _rows(q), _rows(k), _rows(v)
    grad_q, grad_k, grad_v = torch.empty_like(q_rows), torch.empty_like(k_rows), torch.empty_like(v_rows)
    from .. import _native
    _native.attention_backward_bf16(
        as_buffer(q_rows), as_buffer(k_rows), as_buffer(v_rows), as_buffer(_rows(out)), as_buffer(_rows(grad_out)),
        lse.transpose(1, 2).contiguous().numpy(), _mask_rows(mask), ctx.causal, ctx.scale, as_buffer(grad_q),
        as_buffer(grad_k), as_buffer(grad_v))
    return grad_q.transpose(1, 2), grad_k.transpose(1, 2), grad_v.transpose(1, 2), None, None, None


_attention_op.register_autograd(_backward, setup_context=_setup_context)
