"""Rotary position embedding (rotate-half layout): the decoder's torch rotation, and the engine step's rotation
fused with its KV-cache write (native on CPU: one pass over the step's new rows instead of eight tensor ops and two
scattered copies per layer; fp32 arithmetic, one rounding)."""
from __future__ import annotations

import torch
from torch import Tensor

from .backend import as_buffer, as_numpy, choose_backend

CACHE_DTYPES = (torch.float32, torch.bfloat16)


def apply_rope(x: Tensor, cos: Tensor, sin_signed: Tensor) -> Tensor:
    """x * cos + rotate_half(x) * sin, with rotate_half(x) * sin = roll(x, D/2) * [-sin_lo, sin_hi]."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin_signed)


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
