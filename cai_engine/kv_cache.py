"""Paged KV cache: one preallocated [num_blocks, block_size, n_kv, head_dim] pair per layer, addressed by
the slots the C++ BlockManager hands out, and attention that reads it through block tables.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dataclasses import dataclass, field

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
    plan: dict = field(default_factory=dict)  # attention metadata built by the first layer, reused by the rest


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


MIN_SHARED_BLOCKS = 4  # below this, reading the shared prefix once per sequence costs little


def common_prefix_blocks(block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int) -> int:
    """How many leading blocks every sequence of the batch shares (the same physical blocks)."""
    full = int(context_lens.min()) // block_size
    same = (block_tables[:, :full] == block_tables[:1, :full]).all(0)
    return full if bool(same.all()) else int(same.long().cumprod(0).sum())


def cascade_plan(block_tables, context_lens, query_lens, shared_blocks: int, bs: int) -> dict:
    """Index tensors for cascade_attention; the same for every layer of a step."""
    B, device = len(query_lens), block_tables.device
    Lp = shared_blocks * bs
    lens = context_lens.tolist()
    Qm, Ls = max(query_lens), max(n - Lp for n in lens)
    pos = Lp + torch.arange(Ls, device=device)                           # suffix key positions
    table = block_tables.long()
    slots = table.gather(1, (pos // bs).clamp_max(table.shape[1] - 1)[None].expand(B, -1)) * bs + pos % bs
    n_ctx = context_lens.to(device).long()
    slots = torch.where(pos[None] < n_ctx[:, None], slots, 0)            # padding reads slot 0, masked below
    q_len = torch.tensor(query_lens, device=device)
    row = torch.repeat_interleave(torch.arange(B, device=device), q_len)
    col = torch.arange(int(q_len.sum()), device=device) - torch.repeat_interleave(q_len.cumsum(0) - q_len, q_len)
    qpos = torch.zeros(B, Qm, dtype=torch.long, device=device)          # padded rows: position 0, discarded
    qpos[row, col] = (n_ctx - q_len)[row] + col
    plan = {"prefix": table[0, :shared_blocks], "suffix_slots": slots, "q_index": row * Qm + col, "B": B, "Qm": Qm,
            "hide_suffix": ~(pos[None, None, :] <= qpos[:, :, None])[None, :, None]}
    if int(qpos.min()) < Lp:  # a sequence still filling the shared prefix: causal within it
        plan["hide_prefix"] = ~(torch.arange(Lp, device=device) <= qpos[:, :, None])[None, :, None]
    return plan


def cascade_attention(q, k_cache, v_cache, plan: dict, scale: float) -> torch.Tensor:
    """Attention for a batch whose sequences share their first blocks (a few-shot prefix, n samples):
    the shared keys are read once and scored for every query of the batch in one GEMM, each sequence's
    own suffix in a padded batch, and one softmax spans both.
    """
    (H, D), n_kv = q.shape[1:], k_cache.shape[2]
    G, B, Qm = H // n_kv, plan["B"], plan["Qm"]
    kp = k_cache[plan["prefix"]].flatten(0, 1).to(q.dtype)           # [Lp, n_kv, D]
    vp = v_cache[plan["prefix"]].flatten(0, 1).to(q.dtype)
    Lp = kp.shape[0]
    ks = k_cache.view(-1, n_kv, D)[plan["suffix_slots"]].to(q.dtype)  # [B, Ls, n_kv, D]
    vs = v_cache.view(-1, n_kv, D)[plan["suffix_slots"]].to(q.dtype)
    qpad = q.new_zeros(B * Qm, H, D)
    qpad[plan["q_index"]] = q
    qg = qpad.view(B, Qm, n_kv, G, D).permute(2, 0, 3, 1, 4)        # [n_kv, B, G, Qm, D]
    s_pre = (qg.reshape(n_kv, -1, D) @ kp.permute(1, 2, 0)).view(n_kv, B, G, Qm, Lp).mul_(scale)
    s_suf = torch.einsum("kbgqd,blkd->kbgql", qg, ks).mul_(scale)
    if "hide_prefix" in plan:
        s_pre.masked_fill_(plan["hide_prefix"], float("-inf"))
    s_suf.masked_fill_(plan["hide_suffix"], float("-inf"))
    # one softmax over [prefix | suffix] without concatenating the two score tensors
    m = torch.maximum(s_pre.amax(-1, keepdim=True), s_suf.amax(-1, keepdim=True))
    p_pre, p_suf = s_pre.sub_(m).exp_(), s_suf.sub_(m).exp_()
    denom = p_pre.sum(-1, keepdim=True) + p_suf.sum(-1, keepdim=True)
    out = (p_pre.reshape(n_kv, -1, Lp) @ vp.transpose(0, 1)).view(n_kv, B, G, Qm, D)
    out = (out + torch.einsum("kbgql,blkd->kbgqd", p_suf, vs)) / denom
    return out.permute(1, 3, 0, 2, 4).reshape(B * Qm, H, D)[plan["q_index"]]


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` positions of one sequence as [length, n_kv, D]."""
    n_blocks = -(-length // cache.shape[1])
    return cache[block_table[:n_blocks].long()].flatten(0, 1)[:length]


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    context_lens: torch.Tensor, query_lens: list[int], scale: float | None = None,
                    plan: dict | None = None) -> torch.Tensor:
    """Attention of each sequence's newest `query_lens[b]` tokens over its whole cached context.

    q [sum(query_lens), H, D] (sequences concatenated); returns the same shape. Decode batches (every
    query_len 1) on CUDA go through the Triton split-K kernel; everything else gathers the blocks and
    runs SDPA, causal within the new tokens.
    """
    H, D = q.shape[1], q.shape[2]
    scale = scale if scale is not None else D ** -0.5
    plan = {} if plan is None else plan
    if "shared" not in plan:
        multi = len(query_lens) > 1
        plan["shared"] = common_prefix_blocks(block_tables, context_lens, k_cache.shape[1]) if multi else 0
    if plan["shared"] >= MIN_SHARED_BLOCKS:
        if "cascade" not in plan:
            plan["cascade"] = cascade_plan(block_tables, context_lens, query_lens, plan["shared"], k_cache.shape[1])
        return cascade_attention(q, k_cache, v_cache, plan["cascade"], scale)
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
