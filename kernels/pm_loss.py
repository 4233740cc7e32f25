"""Triton kernel for the pairwise preference-model loss: every pair in one launch.

Each program takes a block of pairs, computes the soft-label loss and its derivative with respect to
the reward gap, and accumulates per-response gradient sums and per-group weight / loss / pair counts
with atomics; the caller turns those sums into its reduction with elementwise ops (no host sync).
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _softplus(x):
    return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _sigmoid(x):
    e = tl.exp(-tl.abs(x))  # never overflows, whatever the gap
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _pm_pairs_kernel(r_ptr, pairs_ptr, prob_ptr, w_ptr, m_ptr, g_ptr, pl_ptr, pg_ptr, rg_ptr, st_ptr, rgp_ptr, P, G,
                     BLOCK: tl.constexpr):
    k = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = k < P
    i = tl.load(pairs_ptr + 2 * k, mask=mask, other=0)
    j = tl.load(pairs_ptr + 2 * k + 1, mask=mask, other=0)
    d = tl.load(r_ptr + i, mask=mask, other=0.0).to(tl.float32) - tl.load(r_ptr + j, mask=mask, other=0.0).to(tl.float32)
    p = tl.load(prob_ptr + k, mask=mask, other=0.0)
    w = tl.load(w_ptr + k, mask=mask, other=0.0)
    m = tl.load(m_ptr + k, mask=mask, other=0.0)
    g = tl.load(g_ptr + k, mask=mask, other=0)
    loss = p * _softplus(m - d) + (1.0 - p) * _softplus(d + m)
    grad = -p * _sigmoid(m - d) + (1.0 - p) * _sigmoid(d + m)
    tl.store(pl_ptr + k, loss, mask=mask)
    tl.store(pg_ptr + k, grad, mask=mask)
    tl.atomic_add(rg_ptr + i, w * grad, mask=mask)
    tl.atomic_add(rg_ptr + j, -w * grad, mask=mask)
    # group_stats rows: weight, weighted loss, pairs, agreeing, decisive, label-oriented margin
    decisive = tl.where(p != 0.5, 1.0, 0.0)
    agree = tl.where(d == 0, 0.5, tl.where((d > 0) == (p > 0.5), 1.0, 0.0)) * decisive
    tl.atomic_add(st_ptr + g, w, mask=mask)
    tl.atomic_add(st_ptr + G + g, w * loss, mask=mask)
    tl.atomic_add(st_ptr + 2 * G + g, tl.where(mask, 1.0, 0.0), mask=mask)
    tl.atomic_add(st_ptr + 3 * G + g, agree, mask=mask)
    tl.atomic_add(st_ptr + 4 * G + g, decisive, mask=mask)
    tl.atomic_add(st_ptr + 5 * G + g, (2.0 * p - 1.0) * d, mask=mask)
    tl.store(rgp_ptr + i, g, mask=mask)
    tl.store(rgp_ptr + j, g, mask=mask)


def pm_pairs(rewards, pairs, prob, weight, margin, group, pair_loss, pair_grad, resp_grad, group_stats, resp_group):
    P = pairs.shape[0]
    for t in (resp_grad, group_stats, resp_group):
        t.zero_()
    if P == 0:
        return
    block = 1024 if rewards.is_cuda else 64
    _pm_pairs_kernel[(triton.cdiv(P, block),)](rewards, pairs, prob, weight, margin, group, pair_loss, pair_grad,
                                               resp_grad, group_stats, resp_group, P, group_stats.shape[1],
                                               BLOCK=block)
