"""pairwise_pm_loss: soft-label pairwise preference-model loss over a flat batch of responses.

Per pair (i, j) with P(i beats j) = p, margin m, weight w and gap d = r_i - r_j:
    loss = -(p log sigmoid(d - m) + (1 - p) log sigmoid(-d - m))      (softplus form: stable for any gap)
Reductions: "mean" (weighted by w), "sum", "none" (per pair), "group_mean" (every group counts once,
InstructGPT's K-wise loss). Gradients are computed with the loss, in one pass over all pairs.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .backend import as_numpy, choose_backend

REDUCTIONS = ("mean", "sum", "none", "group_mean")


def pairwise_pm_loss_reference(rewards, pairs, prob, weight, margin, group, num_groups, center_coef=0.0,
                               reduction="mean"):
    d = rewards[pairs[:, 0]] - rewards[pairs[:, 1]]
    pair_loss = prob * F.softplus(margin - d) + (1 - prob) * F.softplus(d + margin)
    weighted = weight * pair_loss
    if reduction == "none":
        return weighted
    if reduction == "sum":
        loss = weighted.sum()
    elif reduction == "mean":
        loss = weighted.sum() / weight.sum().clamp_min(1e-30)
    else:
        gw = rewards.new_zeros(num_groups).index_add(0, group, weight)
        gl = rewards.new_zeros(num_groups).index_add(0, group, weighted)
        valid = gw > 0
        loss = torch.where(valid, gl / gw.clamp_min(1e-30), 0).sum() / valid.sum().clamp_min(1)
    if center_coef:
        loss = loss + center_coef * rewards.square().mean()
    return loss


STATS = ("weight", "loss", "pairs", "agree", "decisive", "margin")  # rows of the per-group sums


def _pair_pass(rewards, pairs, prob, weight, margin, group, num_groups, backend):
    R, P = rewards.shape[0], pairs.shape[0]
    f32 = dict(dtype=torch.float32, device=rewards.device)
    out = dict(pair_loss=torch.empty(P, **f32), pair_grad=torch.empty(P, **f32), resp_grad=torch.empty(R, **f32),
               group_stats=torch.empty(len(STATS), num_groups, **f32),
               resp_group=torch.empty(R, dtype=torch.int64, device=rewards.device))
    args = (rewards.float().contiguous(), pairs.contiguous(), prob, weight, margin, group)
    if backend == "native":
        from .. import _native
        _native.pm_pairs(*map(as_numpy, args), **{k: as_numpy(v) for k, v in out.items()})
    else:
        from ..kernels import pm_loss as tk
        tk.pm_pairs(*args, **out)
    return out


@torch.library.custom_op("cai_engine::pairwise_pm_loss", mutates_args=())
def _pm_loss_op(rewards: Tensor, pairs: Tensor, prob: Tensor, weight: Tensor, margin: Tensor, group: Tensor,
                num_groups: int, center_coef: float, reduction: str,
                backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, saved gradient, per-group sums): the saved gradient is d loss / d rewards for scalar
    reductions, and w * dloss/dgap per pair for "none"."""
    s = _pair_pass(rewards, pairs, prob, weight, margin, group, num_groups, backend)
    stats = s["group_stats"]
    if reduction == "none":
        return weight * s["pair_loss"], weight * s["pair_grad"], stats
    gw, gl, grad = stats[0], stats[1], s["resp_grad"]
    if reduction == "sum":
        loss = gl.sum()
    elif reduction == "mean":
        total = gw.sum().clamp_min(1e-30)
        loss, grad = gl.sum() / total, grad / total
    else:
        valid = gw > 0
        n = valid.sum().clamp_min(1)
        loss = torch.where(valid, gl / gw.clamp_min(1e-30), 0).sum() / n
        grad = torch.where(valid[s["resp_group"]], grad / (gw[s["resp_group"]].clamp_min(1e-30) * n), 0)
    if center_coef:
        r = rewards.float()
        loss = loss + center_coef * r.square().mean()
        grad = grad + (2 * center_coef / r.shape[0]) * r
    return loss, grad, stats


@_pm_loss_op.register_fake
def _(rewards, pairs, prob, weight, margin, group, num_groups, center_coef, reduction, backend):
    stats = prob.new_empty(len(STATS), num_groups)
    if reduction == "none":
        return prob.new_empty(pairs.shape[0]), prob.new_empty(pairs.shape[0]), stats
    return prob.new_empty(()), prob.new_empty(rewards.shape[0]), stats


def _setup_context(ctx, inputs, output):
    rewards, pairs, *_, reduction, _backend = inputs
    ctx.save_for_backward(pairs, output[1])
    ctx.reduction, ctx.n, ctx.dtype = reduction, rewards.shape[0], rewards.dtype


def _backward(ctx, grad_loss, _grad, _stats):
    pairs, saved = ctx.saved_tensors
    if ctx.reduction == "none":
        g = grad_loss.float() * saved
        dr = saved.new_zeros(ctx.n).index_add_(0, pairs[:, 0], g).index_add_(0, pairs[:, 1], -g)
    else:
        dr = grad_loss.float() * saved
    return dr.to(ctx.dtype), None, None, None, None, None, None, None, None, None


_pm_loss_op.register_autograd(_backward, setup_context=_setup_context)


@torch.no_grad()
def pm_metrics(rewards: Tensor, pairs: Tensor, prob: Tensor, group: Tensor, num_groups: int) -> dict[str, Tensor]:
    """Metrics with plain torch ops (the torch backend's path; the kernels produce the same sums)."""
    d = (rewards[pairs[:, 0]] - rewards[pairs[:, 1]]).float()
    decisive = (prob != 0.5).float()
    agree = torch.where(d == 0, 0.5, ((d > 0) == (prob > 0.5)).float()) * decisive
    columns = {"pairs": torch.ones_like(d), "agree": agree, "decisive": decisive, "margin": (2 * prob - 1) * d}
    stats = d.new_zeros(len(STATS), num_groups)
    for name, values in columns.items():
        stats[STATS.index(name)].index_add_(0, group, values)
    return metrics_from_stats(stats)


def metrics_from_stats(stats: Tensor) -> dict[str, Tensor]:
    """Pairwise accuracy against the labels (ties in the label are not scored) and label-oriented margins."""
    s = dict(zip(STATS, stats))
    return {
        "accuracy": s["agree"].sum() / s["decisive"].sum().clamp_min(1),
        "margin": s["margin"].sum() / s["pairs"].sum().clamp_min(1),
        "group_accuracy": s["agree"] / s["decisive"],   # NaN where no decisive pair
        "group_margin": s["margin"] / s["pairs"],       # NaN where no pair
        "group_pairs": s["pairs"],
    }


def pairwise_pm_loss(rewards: Tensor, pairs: Tensor, *, prob: Optional[Tensor] = None,
                     weight: Optional[Tensor] = None, margin: Optional[Tensor] = None,
                     group: Optional[Tensor] = None, center_coef: float = 0.0, reduction: str = "mean",
                     num_groups: Optional[int] = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss over all pairs of a flat batch of rewards, and per-group metrics.

    rewards [R]; pairs [P, 2] indices into rewards ("i is compared with j"); prob [P] = P(i beats j)
    (default 1); weight, margin [P]; group [P] the prompt of each pair (ids in [0, num_groups);
    num_groups defaults to group.max() + 1, which costs one host sync on a GPU).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}: expected one of {REDUCTIONS}")
    if rewards.dim() != 1:
        raise ValueError(f"rewards: expected [R], got shape {tuple(rewards.shape)}")
    if pairs.dim() != 2 or pairs.shape[1] != 2:
        raise ValueError(f"pairs: expected [P, 2], got shape {tuple(pairs.shape)}")
    P = pairs.shape[0]
    f32 = dict(dtype=torch.float32, device=rewards.device)

    def per_pair(t, name, default):
        if t is None:
            return torch.full((P,), default, **f32)
        if t.shape != (P,):
            raise ValueError(f"{name}: expected [{P}] (one per pair), got shape {tuple(t.shape)}")
        return t.to(**f32).contiguous()

    prob, weight, margin = per_pair(prob, "prob", 1.0), per_pair(weight, "weight", 1.0), per_pair(margin, "margin", 0.0)
    if group is None:
        if reduction == "group_mean":
            raise ValueError('reduction="group_mean" needs group (the prompt each pair belongs to)')
        group = torch.zeros(P, dtype=torch.int64, device=rewards.device)
    elif group.shape != (P,):
        raise ValueError(f"group: expected [{P}] (one per pair), got shape {tuple(group.shape)}")
    group = group.long().contiguous()
    pairs = pairs.long()
    if num_groups is None:
        num_groups = int(group.max()) + 1 if P else 1
    if reduction == "none" and center_coef:
        raise ValueError('center_coef applies to a scalar loss; use reduction="mean", "sum" or "group_mean"')
    backend = choose_backend(rewards)
    if backend == "torch":
        if not rewards.is_cuda:  # the reference has no range checks of its own
            _check_ranges(rewards, pairs, prob, group, num_groups)
        loss = pairwise_pm_loss_reference(rewards.float() if rewards.dtype != torch.float64 else rewards, pairs,
                                          prob, weight, margin, group, num_groups, center_coef, reduction)
        return loss, pm_metrics(rewards.detach(), pairs, prob, group, num_groups)
    loss, _, stats = _pm_loss_op(rewards, pairs, prob, weight, margin, group, int(num_groups), float(center_coef),
                                 reduction, backend)
    return loss, metrics_from_stats(stats.detach())


def _check_ranges(rewards, pairs, prob, group, num_groups):
    R = rewards.shape[0]
    if pairs.numel() and (pairs.min() < 0 or pairs.max() >= R):
        raise ValueError(f"pairs: indices must be in [0, {R})")
    if group.numel() and (group.min() < 0 or group.max() >= num_groups):
        raise ValueError(f"group: ids must be in [0, {num_groups})")
    if ((prob < 0) | (prob > 1)).any():
        raise ValueError("prob: every value must be a probability in [0, 1]")


# ---------------------------------------------------------------- building pairs

def pairs_from_ranking(ranks: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor, Tensor]:
    """All K(K-1)/2 pairs of each prompt's responses, from their ranks (0 = best; equal ranks are ties).

    Responses are laid out flat, prompt after prompt. Returns (pairs, prob, group).
    """
    sizes = torch.tensor([len(r) for r in ranks], dtype=torch.int64)
    offsets = torch.cumsum(sizes, 0) - sizes
    flat = torch.tensor([x for r in ranks for x in r], dtype=torch.int64)
    pairs, prob, group = [], [], []
    for k in sizes.unique().tolist():  # every prompt with K responses shares one pair template
        ids = (sizes == k).nonzero().squeeze(1)
        a, b = torch.triu_indices(k, k, 1)
        first, second = offsets[ids, None] + a, offsets[ids, None] + b
        ra, rb = flat[first], flat[second]
        pairs.append(torch.stack([first, second], -1).reshape(-1, 2))
        prob.append(torch.where(ra < rb, 1.0, torch.where(ra > rb, 0.0, 0.5)).reshape(-1))
        group.append(ids[:, None].expand_as(first).reshape(-1))
    if not pairs:
        return torch.zeros(0, 2, dtype=torch.int64), torch.zeros(0), torch.zeros(0, dtype=torch.int64)
    group = torch.cat(group)
    order = torch.argsort(group, stable=True)
    return torch.cat(pairs)[order], torch.cat(prob)[order].float(), group[order]


def pairs_from_soft_matrix(matrices: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Pairs from K x K matrices of soft preferences M[a, b] = P(a beats b) (M[a, b] + M[b, a] = 1)."""
    pairs, prob, group, offset = [], [], [], 0
    for g, m in enumerate(matrices):
        m = torch.as_tensor(m, dtype=torch.float32)
        k = m.shape[0]
        if m.shape != (k, k):
            raise ValueError(f"matrices[{g}]: expected a square K x K matrix, got shape {tuple(m.shape)}")
        if not torch.allclose(m + m.T, torch.ones_like(m), atol=1e-4):
            raise ValueError(f"matrices[{g}]: M[a, b] + M[b, a] must be 1 for every pair")
        for a in range(k):
            for b in range(a + 1, k):
                pairs.append((offset + a, offset + b))
                prob.append(float(m[a, b]))
                group.append(g)
        offset += k
    return _as_tensors(pairs, prob, group)


def pairs_from_chosen_rejected(n: int) -> tuple[Tensor, Tensor, Tensor]:
    """n comparisons laid out [chosen_0, rejected_0, chosen_1, ...]: pair (2k, 2k+1), prob 1, group k."""
    idx = torch.arange(n)
    return torch.stack([2 * idx, 2 * idx + 1], 1), torch.ones(n), idx


def _as_tensors(pairs, prob, group):
    return (torch.tensor(pairs, dtype=torch.int64).reshape(-1, 2), torch.tensor(prob, dtype=torch.float32),
            torch.tensor(group, dtype=torch.int64))
