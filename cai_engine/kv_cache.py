"""Paged KV cache: one preallocated [num_blocks, block_size, n_kv, head_dim] pair per layer, addressed by
the slots the C++ BlockManager hands out, and attention that reads it through block tables.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dataclasses import dataclass

from .config import ModelConfig
from .ops.backend import choose_backend


@dataclass(slots=True)
class PagedBatch:
    """One engine step: the new tokens of several sequences, flattened, and where their KV lives."""
    cache: "PagedKVCache"
    slots: torch.Tensor          # [T] slot of every new token
    block_tables: torch.Tensor   # [B, max_blocks] int32
    context_lens: torch.Tensor   # [B] tokens with KV after this step (cached + new)
    query_lens: list[int]        # new tokens per sequence, in order


def blocks_for_budget(config: ModelConfig, budget_bytes: int, block_size: int, dtype: torch.dtype) -> int:
    per_block = 2 * config.num_hidden_layers * block_size * config.num_key_value_heads * config.head_dim
    per_block *= torch.tensor([], dtype=dtype).element_size()
    blocks = budget_bytes // per_block
    if blocks < 1:
        raise ValueError(f"KV budget of {budget_bytes} bytes holds no block of {per_block} bytes")
    return int(blocks)


class PagedKVCache:
    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device):
        shape = (num_blocks, block_size, config.num_key_value_heads, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.block_size = block_size

    def store(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write K/V rows [T, n_kv, D] into their slots (block * block_size + offset)."""
        self.k[layer].view(-1, *k.shape[1:]).index_copy_(0, slots, k.to(self.k[layer].dtype))
        self.v[layer].view(-1, *v.shape[1:]).index_copy_(0, slots, v.to(self.v[layer].dtype))

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy whole blocks (src -> dst) in every layer: the KV side of a copy-on-write fork."""
        if not pairs:
            return
        src = torch.tensor([p[0] for p in pairs], device=self.k[0].device)
        dst = torch.tensor([p[1] for p in pairs], device=self.k[0].device)
        for cache in self.k + self.v:
            cache[dst] = cache[src]


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` positions of one sequence as [length, n_kv, D]."""
    n_blocks = -(-length // cache.shape[1])
    return cache[block_table[:n_blocks].long()].flatten(0, 1)[:length]


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    context_lens: torch.Tensor, query_lens: list[int], scale: float | None = None) -> torch.Tensor:
    """Attention of each sequence's newest `query_lens[b]` tokens over its whole cached context.

    q [sum(query_lens), H, D] (sequences concatenated); returns the same shape. Decode batches (every
    query_len 1) on CUDA go through the Triton split-K kernel; everything else gathers the blocks and
    runs SDPA, causal within the new tokens.
    """
    H, D = q.shape[1], q.shape[2]
    scale = scale if scale is not None else D ** -0.5
    if all(n == 1 for n in query_lens):
        backend = choose_backend(q)
        if backend == "triton":
            from .kernels.paged_attention import paged_decode
            return paged_decode(q, k_cache, v_cache, block_tables, context_lens.to(torch.int32), scale)
        if backend == "native" and q.dtype == k_cache.dtype == torch.float32:
            from . import _native
            out = torch.empty_like(q)
            _native.paged_decode(q.detach().contiguous().numpy(), k_cache.numpy(), v_cache.numpy(),
                                 block_tables.to(torch.int32).numpy(), context_lens.to(torch.int32).numpy(), scale,
                                 out.numpy())
            return out
    out = torch.empty_like(q)
    lens = context_lens.tolist()
    start = 0
    for b, (n_q, n_ctx) in enumerate(zip(query_lens, lens)):
        k = gather_kv(k_cache, block_tables[b], n_ctx).transpose(0, 1)   # [n_kv, ctx, D]
        v = gather_kv(v_cache, block_tables[b], n_ctx).transpose(0, 1)
        qb = q[start:start + n_q].transpose(0, 1)                       # [H, n_q, D]
        mask = None
        if n_q > 1:  # new token i sits at position n_ctx - n_q + i and sees everything up to it
            mask = torch.ones(n_q, n_ctx, dtype=torch.bool, device=q.device).tril(n_ctx - n_q)
        o = F.scaled_dot_product_attention(qb, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=scale,
                                           enable_gqa=True)
        out[start:start + n_q] = o.transpose(0, 1)
        start += n_q
    return out
