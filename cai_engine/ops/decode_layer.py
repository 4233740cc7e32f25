"""One decoder layer of a sampling-engine decode step in one native call (CPU; csrc/decode_layer.cpp): the kernels the
layer otherwise reaches one Python call at a time (ops.linear with its fused norm and residual, ops.rope.rope_store_,
the paged / cascade attention), chained in C++. At a decode step's few rows the Python between those calls cost as
much as their arithmetic (measured: 12-16 ms of a 27-52 ms bf16 step). Two precisions, as the engine samples: bf16
weights and KV cache on AMX tiles, float32 ones on AVX2 where the engine samples in fp32 (ops.linear's fp32 kernel
and ops.paged_attention's fp32 kernels). Applies when every sequence of the step decodes one token, they form one
attention group (none, or all, sharing leading blocks) and there are at most as many as the linear kernels take;
other steps take the per-op path, which computes the same thing."""
from __future__ import annotations

import torch
from torch import Tensor

from .backend import as_buffer, choose_backend, needs_autograd
from . import linear as linear_kernels  # by module: which kernels a CPU prefers is looked up at each step
from .paged_attention import PagedBatch, step_plan


def fusable(x: Tensor, paged: PagedBatch, heads: int, intermediate_size: int) -> bool:
    """Whether this step's layers can run as one call each (x [T, d], the step's residual stream)."""
    k_cache = paged.cache.k[0]
    n_kv, head_dim = k_cache.shape[2], k_cache.shape[3]
    if x.device.type != "cpu" or choose_backend(x) != "native" or needs_autograd(x) or x.dtype != k_cache.dtype:
        return False
    # at most as many rows as the linear kernels take: beyond that torch's GEMMs win (ops.linear)
    if x.dtype == torch.bfloat16:
        ok = (linear_kernels.tiles_preferred() and x.shape[0] <= linear_kernels.MAX_ROWS and k_cache.shape[1] == 16
              and head_dim % 32 == 0 and x.shape[1] % 32 == 0 and heads // n_kv <= 32)
    else:
        ok = (x.dtype == torch.float32 and linear_kernels.f32_kernel_preferred()
              and x.shape[0] <= linear_kernels.MAX_ROWS_F32 and head_dim % 16 == 0 and x.shape[1] % 8 == 0
              and intermediate_size % 8 == 0 and heads // n_kv <= 48)
    if not ok:
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
    k_cache, v_cache = paged.cache.k[layer], paged.cache.v[layer]
    params = _views(weights + biases + [input_norm, post_norm], paged.cache.weight_views[layer])
    _native.decode_layer(as_buffer(x), params[:7], params[7:10], params[10], params[11], float(eps), cos_np, sin_np,
                         as_buffer(k_cache), as_buffer(v_cache), slots, tables, lens, plan["decode"][0][2], heads,
                         k_cache.shape[3] ** -0.5)
    return x


def _views(tensors: list[Tensor | None], held: dict) -> list:
    """Zero-copy numpy views of a layer's weights, kept by the engine (its cache object, per layer) under their
    storage addresses: every step would otherwise rebuild the same twelve views. A view stays valid while its
    storage lives and the weights change in place (optimizer steps, update_weights), so nothing goes stale; new
    storage (a reload) has new addresses. The engine owns them, so they go when it goes."""
    key = tuple(0 if t is None else t.data_ptr() for t in tensors)
    if held.get("key") != key:
        held["key"], held["views"] = key, [None if t is None else as_buffer(t) for t in tensors]
    return held["views"]
