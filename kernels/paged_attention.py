"""Triton paged-attention decode: one new query token per sequence against its KV blocks.

Grid (sequence, KV head, split): each program takes the query heads that share one KV head (GQA), walks
its share of the sequence's blocks through the block table with an online softmax, and writes a partial
result; a second kernel merges the splits (split-K keeps long contexts parallel).
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _decode_split_kernel(q_ptr, k_ptr, v_ptr, table_ptr, lens_ptr, out_ptr, m_ptr, l_ptr, scale,
                         stride_qb, stride_qh, stride_kb, stride_ks, stride_kh, stride_tb, stride_ob, stride_oh,
                         stride_os, stride_mb, stride_mh, blocks_per_split, first_block,
                         GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    ctx_len = tl.load(lens_ptr + seq)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    g_mask = g < GROUP
    d_mask = d < HEAD_DIM
    heads = kv_head * GROUP + g
    q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
    m = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), tl.float32)
    first = first_block + split * blocks_per_split
    n_blocks = tl.cdiv(ctx_len, BLOCK_SIZE)
    last = tl.minimum(first + blocks_per_split, n_blocks)
    s = tl.arange(0, BLOCK_SIZE)
    for i in range(first, last):
        block = tl.load(table_ptr + seq * stride_tb + i)
        pos = i * BLOCK_SIZE + s
        s_mask = pos < ctx_len
        kv_off = block * stride_kb + s[:, None] * stride_ks + kv_head * stride_kh + d[None, :]
        kv_mask = s_mask[:, None] & d_mask[None, :]
        k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
        scores = tl.sum(q[:, None, :] * k[None, :, :], 2) * scale          # [G, BLOCK_SIZE]
        scores = tl.where(s_mask[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], 1)
        m = m_new
    out_off = seq * stride_ob + heads[:, None] * stride_oh + split * stride_os + d[None, :]
    tl.store(out_ptr + out_off, acc, mask=g_mask[:, None] & d_mask[None, :])
    stat_off = seq * stride_mb + heads * stride_mh + split
    tl.store(m_ptr + stat_off, m, mask=g_mask)
    tl.store(l_ptr + stat_off, l, mask=g_mask)


@triton.jit
def _merge_splits_kernel(part_ptr, m_ptr, l_ptr, out_ptr, lse_ptr, n_splits, stride_pb, stride_ph, stride_ps,
                         stride_mb, stride_mh, stride_ob, stride_oh, stride_lb, HEAD_DIM: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    sp = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    sp_mask = sp < n_splits
    m = tl.load(m_ptr + seq * stride_mb + head * stride_mh + sp, mask=sp_mask, other=float("-inf"))
    l = tl.load(l_ptr + seq * stride_mb + head * stride_mh + sp, mask=sp_mask, other=0.0)
    m_all = tl.max(m, 0)
    m_all = tl.where(m_all > float("-inf"), m_all, 0.0)  # no keys at all: keep exp() finite
    w = tl.where(l > 0, tl.exp(m - m_all), 0.0)
    part = tl.load(part_ptr + seq * stride_pb + head * stride_ph + sp[:, None] * stride_ps + d[None, :],
                   mask=sp_mask[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
    total = tl.sum(l * w, 0)
    # no keys at all (every block skipped): an empty partial, weight 0 when merged with another
    safe = tl.where(total > 0, total, 1.0)
    out = tl.sum(part * w[:, None], 0) / safe
    tl.store(out_ptr + seq * stride_ob + head * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)
    tl.store(lse_ptr + seq * stride_lb + head, tl.where(total > 0, m_all + tl.log(safe), float("-inf")))


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, scale: float, blocks_per_split: int | None = None, first_block: int = 0,
                 return_lse: bool = False, out_dtype: torch.dtype | None = None):
    """q [B, H, D]; caches [num_blocks, block_size, n_kv, D]; block_tables [B, max_blocks] int32; -> [B, H, D].

    first_block skips each sequence's leading blocks (cascade attention scores a shared prefix apart);
    return_lse also returns the [B, H] log-sum-exp of the scores, to merge with another partial;
    out_dtype (default q's) lets a cascade keep the partial in float32 until it is merged. K/V may be
    bf16: they are widened to float32 on load, and scores, softmax and accumulators are float32.
    """
    B, H, D = q.shape
    _, block_size, n_kv, _ = k_cache.shape
    group = H // n_kv
    max_blocks = max(1, block_tables.shape[1] - first_block)
    if blocks_per_split is None:  # enough programs to fill the GPU on small batches
        blocks_per_split = max(1, triton.cdiv(max_blocks, max(1, 256 // max(1, B * n_kv))))
    n_splits = triton.cdiv(max_blocks, blocks_per_split)
    f32 = dict(dtype=torch.float32, device=q.device)
    part = torch.empty(B, H, n_splits, D, **f32)
    m = torch.empty(B, H, n_splits, **f32)
    l = torch.empty(B, H, n_splits, **f32)
    block_d = triton.next_power_of_2(D)
    _decode_split_kernel[(B, n_kv, n_splits)](
        q, k_cache, v_cache, block_tables, context_lens, part, m, l, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        part.stride(0), part.stride(1), part.stride(2), m.stride(0), m.stride(1), blocks_per_split, first_block,
        GROUP=group, BLOCK_G=triton.next_power_of_2(group), BLOCK_SIZE=block_size, HEAD_DIM=D, BLOCK_D=block_d)
    out = torch.empty(q.shape, dtype=out_dtype or q.dtype, device=q.device)
    lse = torch.empty(B, H, **f32)
    _merge_splits_kernel[(B, H)](part, m, l, out, lse, n_splits, part.stride(0), part.stride(1), part.stride(2),
                                 m.stride(0), m.stride(1), out.stride(0), out.stride(1), lse.stride(0), HEAD_DIM=D,
                                 BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(n_splits))
    return (out, lse) if return_lse else out
