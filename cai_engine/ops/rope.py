"""Rotary position embedding (rotate-half layout): the decoder's rotation (`rope`: training and evaluation, with its
gradient) and the engine step's rotation fused with its KV-cache write (`rope_store_`). Native on CPU: one pass over
the rows instead of eight tensor ops each way per layer and tensor (a tenth of a bf16 training step's time went to
them), and scattered copies for the cache; both in fp32 arithmetic from fp32 cos / sin with one rounding, with the
same row rotation, so a token's rotated q and k carry the same bits in training, evaluation and the engine. The
torch composition (`apply_rope`, in fp32) elsewhere."""
from __future__ import annotations

import torch
from torch import Tensor

from .backend import as_buffer, as_numpy, choose_backend, needs_autograd

CACHE_DTYPES = (torch.float32, torch.bfloat16)


def apply_rope(x: Tensor, cos: Tensor, sin_signed: Tensor) -> Tensor:
    """x * cos + rotate_half(x) * sin, with rotate_half(x) * sin = roll(x, D/2) * [-sin_lo, sin_hi]."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin_signed)


def rope(x: Tensor, cos: Tensor, sin_signed: Tensor) -> Tensor:
    """x [B, heads, T, D] rotated by cos / sin_signed [B, T, D] (float32; see apply_rope), in x's dtype."""
    if choose_backend(x) != "native" or x.dtype not in CACHE_DTYPES or cos.dtype != torch.float32:
        return apply_rope(x.float(), cos[:, None], sin_signed[:, None]).to(x.dtype)
    # the kernel's rows: [B, T, heads, D], the projections' own layout (a view here, not a copy)
    args = (x.transpose(1, 2).contiguous(), cos.contiguous(), sin_signed.contiguous())
    out = _rope_op(*args) if needs_autograd(x) else _rotate(*args, inverse=False)
    return out.transpose(1, 2)


def _rotate(rows: Tensor, cos: Tensor, sin_signed: Tensor, inverse: bool) -> Tensor:
    from .. import _native
    out = torch.empty_like(rows)
    flat = lambda t: as_buffer(t.view(-1, *t.shape[-2:]))
    _native.rope_rows(flat(rows), as_numpy(cos.view(-1, cos.shape[-1])), as_numpy(sin_signed.view(-1, cos.shape[-1])),
                      flat(out), inverse)
    return out


@torch.library.custom_op("cai_engine::rope", mutates_args=())
def _rope_op(rows: Tensor, cos: Tensor, sin_signed: Tensor) -> Tensor:
    return _rotate(rows, cos, sin_signed, inverse=False)


@_rope_op.register_fake
def _(rows, cos, sin_signed):
    return torch.empty_like(rows)


def _setup_context(ctx, inputs, output):
    _, cos, sin_signed = inputs
    ctx.save_for_backward(cos, sin_signed)


def _backward(ctx, grad):
    cos, sin_signed = ctx.saved_tensors
    return _rotate(grad.contiguous(), cos, sin_signed, inverse=True), None, None  # rotated back by the same angle


_rope_op.register_autograd(_backward, setup_context=_setup_context)


def rope_store_(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin_signed: Tensor, k_cache: Tensor,
                v_cache: Tensor, slots: Tensor) -> tuple[Tensor, Tensor]:
    """Rotate q [T, H, D] and k [T, KV, D] by cos / sin_signed [T, D] (float32), write k and v to rows `slots` [T]
    of the caches [blocks, block_size, KV, D]; returns the rotated (q, k), in the dtype they came in."""
    tensors = (q, k, v, k_cache, v_cache)
    if (choose_backend(q) == "native" and all(t.dtype in CACHE_DTYPES and t.is_contiguous() for t in tensors)
            and cos.dtype == sin_signed.dtype == torch.float32):
        from .. import _native
        _native.rope_store(*(as_buffer(t) for t in (q, k, v)), as_numpy(cos.contiguous()),
                           as_numpy(sin_signed.contiguous()), as_buffer(k_cache), as_buffer(v_cache),
                           as_numpy(slots.to(torch.int64)))
        return q, k
    cos, sin_signed = cos[:, None], sin_signed[:, None]
    q = apply_rope(q.float(), cos, sin_signed).to(q.dtype)
    k = apply_rope(k.float(), cos, sin_signed).to(k.dtype)
    for cache, rows in ((k_cache, k), (v_cache, v)):
        cache.view(-1, *rows.shape[1:]).index_copy_(0, slots, rows.to(cache.dtype))
    return q, k
