"""Preference-model benchmarks.

1. PM training throughput (comparisons/s, forward+backward) on the embedded default with 256-token
   prompts and 64-token responses, K=2 and K=4: prefix-shared packing vs the same trainer encoding
   every response with its own copy of the prompt ("separate"), and, for K > 2, vs a chosen/rejected
   trainer that encodes both sides of every comparison ("per-comparison").
2. The loss op alone: 65,536 groups of K=4 (all 6 pairs each), group_mean, forward+backward, against a
   straightforward torch implementation.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_line, median_times, table  # noqa: E402

from cai_engine import DEFAULT_MODEL  # noqa: E402
from cai_engine.ops import pairs_from_ranking, pairwise_pm_loss  # noqa: E402
from cai_engine.ops.pm_loss import pairwise_pm_loss_reference  # noqa: E402
from cai_engine.model.heads import RewardModel, pack_separate, pack_shared  # noqa: E402


def training_throughput(k: int, groups: int, prompt_len: int, resp_len: int, repeats: int, model: RewardModel):
    g = torch.Generator().manual_seed(k)
    vocab = model.config.vocab_size
    data = [(torch.randint(100, vocab, (prompt_len,), generator=g).tolist(),
             [torch.randint(100, vocab, (resp_len,), generator=g).tolist() for _ in range(k)]) for _ in range(groups)]
    pairs, prob, group = pairs_from_ranking([list(range(k))] * groups)
    device = model.backbone.device

    def make_step(pack, step_pairs, step_prob, step_group):
        batch = pack(data, 0).to(device)
        args = (step_pairs.to(device), step_prob.to(device), step_group.to(device))

        def fn():
            rewards = model(batch)
            loss, _ = pairwise_pm_loss(rewards, args[0], prob=args[1], group=args[2], reduction="group_mean",
                                       num_groups=groups)
            loss.backward()
            model.zero_grad(set_to_none=True)
        return fn

    step = lambda pack: make_step(pack, pairs, prob, group)
    n_pairs = k * (k - 1) // 2
    expanded = torch.arange(groups * n_pairs)
    step_pairs = lambda pack: make_step(pack, torch.stack([2 * expanded, 2 * expanded + 1], 1), prob,
                                        expanded // n_pairs)

    def per_comparison(groups_, pad_id):
        """A chosen/rejected trainer: every comparison is its own pair of (prompt + response) rows."""
        a, b = torch.triu_indices(k, k, 1).tolist()
        return pack_separate([(p_, [rs[i], rs[j]]) for p_, rs in groups_ for i, j in zip(a, b)], pad_id)

    fns = {"prefix-shared": step(pack_shared), "separate": step(pack_separate)}
    if k > 2:  # with K=2 the per-comparison layout is the separate one
        fns["per-comparison"] = step_pairs(per_comparison)
    times = median_times(fns, repeats, str(device))
    comparisons = len(pairs)
    return {name: {"time": t, "mem": None, "comparisons_per_s": comparisons / t} for name, t in times.items()}


def loss_kernel(groups: int, k: int, repeats: int, device: str):
    pairs, prob, group = pairs_from_ranking([list(range(k))] * groups)
    prob = torch.rand(prob.shape, generator=torch.Generator().manual_seed(0))
    rewards = torch.randn(groups * k, device=device, requires_grad=True)
    pairs, prob, group = pairs.to(device), prob.to(device), group.to(device)
    weight, margin = torch.ones_like(prob), torch.zeros_like(prob)

    def ours():
        loss, _ = pairwise_pm_loss(rewards, pairs, prob=prob, group=group, reduction="group_mean", num_groups=groups)
        loss.backward()

    def plain_torch():
        pairwise_pm_loss_reference(rewards, pairs, prob, weight, margin, group, groups, 0.0, "group_mean").backward()

    times = median_times({"cai_engine": ours, "torch": plain_torch}, repeats, device)
    return {name: {"time": t, "mem": None} for name, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--groups", type=int, default=1, help="prompts per training step")
    p.add_argument("--skip-training", action="store_true")
    args = p.parse_args()
    device = "cuda" if args.gpu else "cpu"
    print(f"# preference model on {machine_line(device)}")
    if not args.skip_training:
        model, _ = RewardModel.load(DEFAULT_MODEL, device=device)
        model.train()
        for k in (2, 4):
            rows = training_throughput(k, args.groups, 256, 64, args.repeats, model)
            print(table(f"PM fwd+bwd, {DEFAULT_MODEL}, {args.groups} prompt(s) x K={k}, 256-token prompts, "
                        f"64-token responses (median of {args.repeats})", rows,
                        ["separate"] + (["per-comparison"] if k > 2 else [])))
            for name, r in rows.items():
                print(f"- {name}: {r['comparisons_per_s']:.3f} comparisons/s")
            for base in ("separate", "per-comparison"):
                if base in rows:
                    print(f"- speed-up of prefix sharing over {base}: "
                          f"{rows[base]['time'] / rows['prefix-shared']['time']:.2f}x")
            print()
    rows = loss_kernel(65536, 4, max(5, args.repeats), device)
    print(table("pairwise_pm_loss fwd+bwd, 65,536 groups x K=4 (393,216 pairs), group_mean", rows, ["torch"]))


if __name__ == "__main__":
    main()
