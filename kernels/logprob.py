"""Triton kernels for the fused log-prob / entropy / KL ops.

Forward kernels tile tokens x vocab, computing each logits tile from hidden states and the LM head
with an online max / sum-exp (and sum p*z for entropy, sum p*(z - z_ref) for KL) in fp32; only
per-token statistics reach memory. Backward kernels recompute one [rows, V] chunk of logits and turn
it into d(loss)/d(logits) for the caller's GEMMs; the chunk is all that ever exists.
"""
import os

import torch
import triton
import triton.language as tl


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, D, stride_h, stride_w, inv_temp,
                 HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                 PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_mask = dd < D
        h = tl.load(h_ptr + rows[:, None] * stride_h + dd[None, :], mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None] * stride_w + dd[None, :], mask=col_mask[:, None] & d_mask[None, :], other=0.0)
        if UPCAST:
            h, w = h.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return tl.where(col_mask[None, :], acc * inv_temp, float("-inf"))


@triton.jit
def _logprob_fwd_kernel(h_ptr, w_ptr, b_ptr, labels_ptr, logp_ptr, lse_ptr, ent_ptr, N, V, D, stride_h, stride_w,
                        inv_temp, ignore_index, HAS_BIAS: tl.constexpr, WITH_ENTROPY: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    labels = tl.load(labels_ptr + rows, mask=row_mask, other=ignore_index)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    u = tl.zeros((BLOCK_N,), tl.float32)   # sum exp(z - m) * (z - m)
    z_label = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_mask, cols < V, D, stride_h, stride_w, inv_temp,
                         HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, PRECISION, UPCAST)
        m_new = tl.maximum(m, tl.max(z, 1))
        alpha = tl.exp(m - m_new)
        d = z - m_new[:, None]
        e = tl.exp(d)
        if WITH_ENTROPY:
            shift = tl.where(s > 0, m - m_new, 0.0)
            u = alpha * (u + shift * s) + tl.sum(e * tl.where(e > 0, d, 0.0), 1)
        s = s * alpha + tl.sum(e, 1)
        z_label += tl.sum(tl.where(cols[None, :] == labels[:, None], z, 0.0), 1)
        m = m_new
    log_s = tl.log(s)
    lse = m + log_s
    ignored = labels == ignore_index
    tl.store(lse_ptr + rows, lse, mask=row_mask)
    tl.store(logp_ptr + rows, tl.where(ignored, 0.0, z_label - lse), mask=row_mask)
    if WITH_ENTROPY:
        tl.store(ent_ptr + rows, tl.where(ignored, 0.0, log_s - u / s), mask=row_mask)


@triton.jit
def _logprob_dz_kernel(h_ptr, w_ptr, b_ptr, labels_ptr, lse_ptr, ent_ptr, glp_ptr, gent_ptr, dz_ptr, N, V, D,
                       stride_h, stride_w, stride_dz, inv_temp, HAS_BIAS: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask, col_mask = rows < N, cols < V
    z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, D, stride_h, stride_w, inv_temp,
                     HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, PRECISION, UPCAST)
    labels = tl.load(labels_ptr + rows, mask=row_mask, other=-1)  # relative to this block of columns
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    mean_z = lse - tl.load(ent_ptr + rows, mask=row_mask, other=0.0)
    g_lp = tl.load(glp_ptr + rows, mask=row_mask, other=0.0)
    g_ent = tl.load(gent_ptr + rows, mask=row_mask, other=0.0)
    p = tl.exp(z - lse[:, None])
    centered = tl.where(col_mask[None, :], z - mean_z[:, None], 0.0)
    dz = -p * (g_lp[:, None] + g_ent[:, None] * centered)
    dz = tl.where(cols[None, :] == labels[:, None], dz + g_lp[:, None], dz) * inv_temp
    tl.store(dz_ptr + rows[:, None] * stride_dz + cols[None, :], dz.to(dz_ptr.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _kl_fwd_kernel(h_ptr, w_ptr, b_ptr, rh_ptr, rw_ptr, rb_ptr, kl_ptr, lse_ptr, md_ptr, N, V, D, RD, stride_h,
                   stride_w, stride_rh, stride_rw, inv_temp, HAS_BIAS: tl.constexpr, HAS_REF_BIAS: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    mz = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    mr = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    sz = tl.zeros((BLOCK_N,), tl.float32)
    sr = tl.zeros((BLOCK_N,), tl.float32)
    w = tl.zeros((BLOCK_N,), tl.float32)   # sum exp(z - mz) * (z - r)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, D, stride_h, stride_w, inv_temp,
                         HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, PRECISION, UPCAST)
        r = _logits_tile(rh_ptr, rw_ptr, rb_ptr, rows, cols, row_mask, col_mask, RD, stride_rh, stride_rw, inv_temp,
                         HAS_REF_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, PRECISION, UPCAST)
        mz_new = tl.maximum(mz, tl.max(z, 1))
        mr_new = tl.maximum(mr, tl.max(r, 1))
        az = tl.exp(mz - mz_new)
        ez = tl.exp(z - mz_new[:, None])
        diff = tl.where(col_mask[None, :], z, 0.0) - tl.where(col_mask[None, :], r, 0.0)
        w = w * az + tl.sum(ez * diff, 1)
        sz = sz * az + tl.sum(ez, 1)
        sr = sr * tl.exp(mr - mr_new) + tl.sum(tl.exp(r - mr_new[:, None]), 1)
        mz, mr = mz_new, mr_new
    lse_z = mz + tl.log(sz)
    mean_diff = w / sz
    tl.store(lse_ptr + rows, lse_z, mask=row_mask)
    tl.store(md_ptr + rows, mean_diff, mask=row_mask)
    tl.store(kl_ptr + rows, mean_diff - lse_z + mr + tl.log(sr), mask=row_mask)


@triton.jit
def _kl_dz_kernel(h_ptr, w_ptr, b_ptr, rh_ptr, rw_ptr, rb_ptr, lse_ptr, md_ptr, g_ptr, dz_ptr, N, V, D, RD, stride_h,
                  stride_w, stride_rh, stride_rw, stride_dz, inv_temp, HAS_BIAS: tl.constexpr,
                  HAS_REF_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                  PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask, col_mask = rows < N, cols < V
    z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, D, stride_h, stride_w, inv_temp,
                     HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, PRECISION, UPCAST)
    r = _logits_tile(rh_ptr, rw_ptr, rb_ptr, rows, cols, row_mask, col_mask, RD, stride_rh, stride_rw, inv_temp,
                     HAS_REF_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, PRECISION, UPCAST)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    md = tl.load(md_ptr + rows, mask=row_mask, other=0.0)
    g = tl.load(g_ptr + rows, mask=row_mask, other=0.0)
    diff = tl.where(col_mask[None, :], z, 0.0) - tl.where(col_mask[None, :], r, 0.0)
    dz = g[:, None] * tl.exp(z - lse[:, None]) * (diff - md[:, None]) * inv_temp
    tl.store(dz_ptr + rows[:, None] * stride_dz + cols[None, :], dz.to(dz_ptr.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


def _config(h: torch.Tensor) -> dict:
    precision = "ieee" if h.dtype == torch.float32 else "tf32"
    if h.is_cuda:
        return dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=64, PRECISION=precision, UPCAST=False, num_warps=8, num_stages=3)
    # TRITON_INTERPRET on CPU tensors: its tl.dot reads bf16 operands as raw bits, so upcast them first.
    return dict(BLOCK_N=16, BLOCK_V=64, BLOCK_D=32, PRECISION=precision, UPCAST=os.environ.get("TRITON_INTERPRET") == "1")


def _dummy(h: torch.Tensor, b):
    return b if b is not None else h


def logprob_forward(h, w, b, labels, inv_temp: float, ignore_index: int, with_entropy: bool):
    N, D = h.shape
    V = w.shape[0]
    logp = torch.empty(N, dtype=torch.float32, device=h.device)
    lse = torch.empty_like(logp)
    ent = torch.zeros_like(logp) if not with_entropy else torch.empty_like(logp)
    cfg = _config(h)
    grid = (triton.cdiv(N, cfg["BLOCK_N"]),)
    _logprob_fwd_kernel[grid](h, w, _dummy(h, b), labels, logp, lse, ent, N, V, D, h.stride(0), w.stride(0),
                              inv_temp, ignore_index, HAS_BIAS=b is not None, WITH_ENTROPY=with_entropy, **cfg)
    return logp, ent, lse


def logprob_dz(h, w, b, labels, lse, ent, g_lp, g_ent, inv_temp: float, out: torch.Tensor):
    """d(loss)/d(logits) for rows h against the vocabulary block w (labels relative to that block)."""
    N, D = h.shape
    V = w.shape[0]
    cfg = _config(h)
    grid = (triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(V, cfg["BLOCK_V"]))
    _logprob_dz_kernel[grid](h, w, _dummy(h, b), labels, lse, ent, g_lp, g_ent, out, N, V, D, h.stride(0),
                             w.stride(0), out.stride(0), inv_temp, HAS_BIAS=b is not None, **cfg)
    return out


def kl_forward(h, w, b, rh, rw, rb, inv_temp: float):
    N, D = h.shape
    V = w.shape[0]
    kl = torch.empty(N, dtype=torch.float32, device=h.device)
    lse, md = torch.empty_like(kl), torch.empty_like(kl)
    cfg = _config(h)
    grid = (triton.cdiv(N, cfg["BLOCK_N"]),)
    _kl_fwd_kernel[grid](h, w, _dummy(h, b), rh, rw, _dummy(h, rb), kl, lse, md, N, V, D, rh.shape[1], h.stride(0), w.stride(0),
                         rh.stride(0), rw.stride(0), inv_temp, HAS_BIAS=b is not None, HAS_REF_BIAS=rb is not None,
                         **cfg)
    return kl, lse, md


def kl_dz(h, w, b, rh, rw, rb, lse, md, g, inv_temp: float, out: torch.Tensor):
    N, D = h.shape
    V = w.shape[0]
    cfg = _config(h)
    grid = (triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(V, cfg["BLOCK_V"]))
    _kl_dz_kernel[grid](h, w, _dummy(h, b), rh, rw, _dummy(h, rb), lse, md, g, out, N, V, D, rh.shape[1], h.stride(0),
                        w.stride(0), rh.stride(0), rw.stride(0), out.stride(0), inv_temp, HAS_BIAS=b is not None,
                        HAS_REF_BIAS=rb is not None, **cfg)
    return out
