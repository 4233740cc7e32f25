"""Paged KV cache: one preallocated [num_blocks, block_size, n_kv, head_dim] pair per layer, addressed by
the slots the C++ BlockManager hands out (attention over it lives in `cai_engine.ops.paged_attention`).
"""
from __future__ import annotations

import torch

from ..model.config import ModelConfig


def blocks_for_budget(config: ModelConfig, budget_bytes: int, block_size: int, dtype: torch.dtype) -> int:
    per_block = 2 * config.num_hidden_layers * block_size * config.num_key_value_heads * config.head_dim
    per_block *= torch.tensor([], dtype=dtype).element_size()
    blocks = budget_bytes // per_block
    if blocks < 1:
        raise ValueError(f"KV budget of {budget_bytes} bytes holds no block of {per_block} bytes")
    return int(blocks)


class PagedKVCache:
    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device):
        self.shape = (num_blocks, block_size, config.num_key_value_heads, config.head_dim)
        self.layers, self.dtype, self.device = config.num_hidden_layers, dtype, device
        self.block_size = block_size
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        # per layer, the fused decode layer's numpy views of that layer's weights (ops.decode_layer), kept here so
        # they live exactly as long as this engine's cache
        self.weight_views: list[dict] = [{} for _ in range(self.layers)]
        self.allocate()

    def allocate(self) -> None:
        """(Re)create the per-layer K/V tensors (zeros: a fresh cache holds no KV)."""
        if not self.k:
            self.k = [torch.zeros(self.shape, dtype=self.dtype, device=self.device) for _ in range(self.layers)]
            self.v = [torch.zeros(self.shape, dtype=self.dtype, device=self.device) for _ in range(self.layers)]

    def release(self) -> None:
        """Drop the K/V tensors so their memory goes back (to the OS on CPU, to the allocator on CUDA)."""
        self.k, self.v = [], []
        if torch.device(self.device).type == "cuda":
            torch.cuda.empty_cache()

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
