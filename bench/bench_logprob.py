"""Fused token log-prob benchmark: ours (with entropy) vs dense, F.linear_cross_entropy and Liger (GPU).

    python bench/bench_logprob.py                 # CPU: N=4096, d=576, V=49152, fp32
    python bench/bench_logprob.py --gpu           # CUDA: N=8192, d=4096, V=128256, bf16
Prints median-of-N times, peak memory beyond the inputs (fresh process per measurement) and ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_line, measure_peak_here, median_times, peak_extra_memory, table  # noqa: E402

from cai_engine.ops import token_logprobs  # noqa: E402


def inputs(n, d, v, dtype, device, grad):
    g = torch.Generator(device="cpu").manual_seed(0)
    h = (torch.randn(n, d, generator=g)).to(device, dtype).requires_grad_(grad)
    w = (torch.randn(v, d, generator=g) * (2.0 / d ** 0.5)).to(device, dtype).requires_grad_(grad)
    y = torch.randint(0, v, (n,), generator=g).to(device)
    return h, w, y


def impls(h, w, y, backward: bool) -> dict:
    def run(loss_fn):
        def fn():
            if backward:
                loss_fn().backward()
                h.grad = w.grad = None
            else:
                with torch.no_grad():
                    loss_fn()
        return fn

    def ours():
        logp, ent = token_logprobs(h, w, y, return_entropy=True)
        return -(logp.mean() + 0.01 * ent.mean())

    def dense():
        logits = F.linear(h, w).float()
        return -torch.log_softmax(logits, -1).gather(-1, y[:, None]).mean()

    def linear_ce():
        return F.linear_cross_entropy(h, w, y, options=torch.nn.LinearCrossEntropyOptions())

    out = {"cai_engine (logp+entropy)": run(ours), "dense": run(dense), "F.linear_cross_entropy": run(linear_ce)}
    if h.is_cuda:
        try:
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
            out["liger fused linear CE"] = run(lambda: liger_fused_linear_cross_entropy(h, w, y))
        except ImportError:
            pass
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--n", type=int)
    p.add_argument("--d", type=int)
    p.add_argument("--v", type=int)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", help="also write the figures here")
    p.add_argument("--measure-memory", nargs=2, metavar=("IMPL", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    device = "cuda" if args.gpu else "cpu"
    n, d, v = (args.n or (8192 if args.gpu else 4096), args.d or (4096 if args.gpu else 576),
               args.v or (128256 if args.gpu else 49152))
    dtype = torch.bfloat16 if args.gpu else torch.float32
    shape = ["--n", str(n), "--d", str(d), "--v", str(v)] + (["--gpu"] if args.gpu else [])

    if args.measure_memory:
        name, mode = args.measure_memory
        backward = mode == "fwd+bwd"

        def setup():
            h, w, y = inputs(n, d, v, dtype, device, backward)
            return impls(h, w, y, backward)[name]
        print(json.dumps({"peak_bytes": measure_peak_here(setup, device)}))
        return

    print(f"# token log-prob: N={n} d={d} V={v} {dtype} on {machine_line(device)}")
    results = {}
    for mode in ("fwd", "fwd+bwd"):
        backward = mode == "fwd+bwd"
        h, w, y = inputs(n, d, v, dtype, device, backward)
        fns = impls(h, w, y, backward)
        times = median_times(fns, args.repeats, device)
        del h, w, y, fns
        rows = {}
        for name, t in times.items():
            mem = peak_extra_memory(__file__, shape + ["--measure-memory", name, mode])
            rows[name] = {"time": t, "mem": mem}
        results[mode] = rows
        print(table(f"{mode} (median of {args.repeats})", rows, ["dense", "F.linear_cross_entropy"]
                    + (["liger fused linear CE"] if "liger fused linear CE" in rows else [])))
        print()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": [n, d, v], "dtype": str(dtype), "machine": machine_line(device), **results}, f, indent=2)


if __name__ == "__main__":
    main()
