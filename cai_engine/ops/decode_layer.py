"""One decoder layer of a sampling-engine decode step in one native call (CPU, bf16 weights and KV cache, AMX tiles;
csrc/decode_layer.cpp): the kernels the layer otherwise reaches one Python call at a time (ops.linear with its fused
norm and residual, ops.rope.rope_store_, the tile paged / cascade attention), chained in C++. At a decode step's
few rows the Python between those calls cost as much as their arithmetic (measured: 12-16 ms of a 27-52 ms step).
Applies when every sequence of the step decodes one token and they form one attention group (none, or all,
sharing leading blocks); other steps take the per-op path, which computes the same thing."""
from __future__ import annotations

import torch
from torch import Tensor

from .backend import as_buffer, choose_backend, needs_autograd
from .linear import _tiles_preferred
from .paged_attention import PagedBatch, step_plan


def fusable(x: Tensor, paged: PagedBatch, heads: int) -> bool:
    """Whether this step's layers can run as one call each (x [T, d], the step's residual stream)."""
    k_cache = paged.cache.k[0]
    n_kv, head_dim = k_cache.shape[2], k_cache.shape[3]
    if not (x.dtype == k_cache.dtype == torch.bfloat16 and _tiles_preferred() and x.device.type == "cpu"
            and k_cache.shape[1] == 16 and head_dim % 32 == 0 and x.shape[1] % 32 == 0 and heads // n_kv <= 32
            and choose_backend(x) == "native" and not needs_autograd(x)):
        return False
    return step_plan(paged, k_cache.shape[1])["all_decode"]


def decode_layer_(x: Tensor, weights: list[Tensor], biases: list[Tensor | None], input_norm: Tensor,
                  post_norm: Tensor, eps: float, cos: Tensor, sin_signed: Tensor, paged: PagedBatch, layer: int,
                  heads: int) -> Tensor:
    """x [T, d] + the layer (q, k, v, o, gate, up, down weights; q/k/v biases), in place; returns x.
    Call only where fusable() said yes for this step."""
    from .. import _native
    plan = step_plan(paged, paged.cache.block_size)
    if "buffers" not in plan:  # the step's constants, as the kernel takes them, once for every layer
        plan["buffers"] = (cos.contiguous().numpy(), sin_signed.contiguous().numpy(), paged.slots.to(torch.int64).numpy(),
                           paged.block_tables.to(torch.int32).numpy(), paged.context_lens.to(torch.int32).numpy())
    cos_np, sin_np, slots, tables, lens = plan["buffers"]
    shared = plan["decode"][0][2]
    floats = lambda t: None if t is None else t.detach().to(torch.float32, copy=True).numpy()
    _native.decode_layer(as_buffer(x), [as_buffer(w) for w in weights], [floats(b) for b in biases],
                         floats(input_norm), floats(post_norm), float(eps), cos_np, sin_np,
                         as_buffer(paged.cache.k[layer]), as_buffer(paged.cache.v[layer]), slots, tables, lens,
                         shared, heads, paged.cache.k[layer].shape[3] ** -0.5)
    return x
