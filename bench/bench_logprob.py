"""Fused token log-prob benchmark: ours (with entropy) vs dense, F.linear_cross_entropy, cut-cross-entropy
and the GEMM floor, every variant timed in its own process.

    python bench/bench_logprob.py                     # CPU: N=4096, d=576, V=49152, bf16, 2 threads
    python bench/bench_logprob.py --dtype float32     # the same shape in fp32
    python bench/bench_logprob.py --gpu               # CUDA: N=8192, d=4096, V=128256, bf16 (+ Liger)
Prints, per variant: median wall time over --rounds fresh processes (each the median of --repeats runs) and
its CPU seconds (all threads: steadier than wall time on a shared machine), peak
memory beyond the inputs (another fresh process), and the max |error| of its log-probs against float64
computed on the same (bf16-rounded) inputs; ratios against cut-cross-entropy and the GEMM floor.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_line, measure_peak_here, peak_extra_memory, sync, table  # noqa: E402

from cai_engine.ops import token_logprobs  # noqa: E402

OURS = "cai_engine (logp+entropy)"
OURS_FP32_PATH = "cai_engine, bf16 converted to fp32 (CAI_ENGINE_BF16_KERNELS=0)"
OURS_VECTORS = "cai_engine on VDPBF16PS vectors, no AMX (CAI_ENGINE_AMX=0)"  # what AVX512-BF16-only CPUs run
DENSE = "dense (logp+entropy)"
LINEAR_CE = "F.linear_cross_entropy"
CCE = "cut-cross-entropy torch_compile"
LIGER = "liger fused linear CE"
FLOOR = "GEMM floor (3 GEMMs of the shape)"


def inputs(n, d, v, dtype, device, grad):
    g = torch.Generator(device="cpu").manual_seed(0)
    h = (torch.randn(n, d, generator=g)).to(device, dtype).requires_grad_(grad)
    w = (torch.randn(v, d, generator=g) * (2.0 / d ** 0.5)).to(device, dtype).requires_grad_(grad)
    y = torch.randint(0, v, (n,), generator=g).to(device)
    return h, w, y


def logprob_fns(h, w, y) -> dict:
    """Per variant: a function returning (per-token log-probs, loss to differentiate)."""
    def ours():
        logp, ent = token_logprobs(h, w, y, return_entropy=True)
        return logp, -(logp.mean() + 0.01 * ent.mean())

    def dense():
        logp_all = torch.log_softmax(F.linear(h, w).float(), -1)
        logp = logp_all.gather(-1, y[:, None]).squeeze(-1)
        ent = -(logp_all.exp() * logp_all).sum(-1)
        return logp, -(logp.mean() + 0.01 * ent.mean())

    def linear_ce():
        nll = F.linear_cross_entropy(h, w, y, reduction="none", options=torch.nn.LinearCrossEntropyOptions())
        return -nll, nll.mean()

    def cce():
        from cut_cross_entropy import linear_cross_entropy
        nll = linear_cross_entropy(h, w, y, reduction="none", impl="torch_compile")
        return -nll, nll.mean()

    out = {OURS: ours, OURS_VECTORS: ours, OURS_FP32_PATH: ours, DENSE: dense}
    if hasattr(F, "linear_cross_entropy"):
        out[LINEAR_CE] = linear_ce
    if h.is_cuda:
        def liger():
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
            nll = liger_fused_linear_cross_entropy(h, w, y, reduction="none")
            return -nll, nll.mean()
        out[LIGER] = liger
    out[CCE] = cce
    return out


def step_fn(name, h, w, y, backward: bool):
    if name == FLOOR:  # what any exact method must pay: the logits GEMM forward, dh and dW backward
        z = (h.detach() @ w.detach().T)

        def floor():
            with torch.no_grad():
                torch.mm(h, w.T)
                if backward:
                    torch.mm(z, w)
                    torch.mm(z.T, h)
        return floor
    fn = logprob_fns(h, w, y)[name]

    def step():
        if backward:
            fn()[1].backward()
            h.grad = w.grad = None
        else:
            with torch.no_grad():
                fn()
    return step


def variant_env(name: str) -> dict[str, str]:
    return {OURS_FP32_PATH: {"CAI_ENGINE_BF16_KERNELS": "0"}, OURS_VECTORS: {"CAI_ENGINE_AMX": "0"}}.get(name, {})


def reference_logprobs(h, w, y, rows: int = 256) -> torch.Tensor:
    """float64 log-probs on the given (already rounded) inputs, a few rows at a time."""
    wd = w.detach().cpu().double()
    out = torch.empty(h.shape[0], dtype=torch.float64)
    for i in range(0, h.shape[0], rows):
        z = h[i:i + rows].detach().cpu().double() @ wd.T
        out[i:i + rows] = torch.log_softmax(z, -1).gather(-1, y[i:i + rows].cpu()[:, None]).squeeze(-1)
    return out


def child(args, shape, device, dtype) -> None:
    """One variant in this process: its median time, and (forward) its log-probs' max error vs float64."""
    name, mode = args.child
    backward = mode == "fwd+bwd"
    h, w, y = inputs(*shape, dtype, device, backward and name != FLOOR)
    step = step_fn(name, h, w, y, backward)
    step()  # warm-up (compilation, allocator, thread pools)
    wall, cpu = [], []
    for _ in range(args.repeats):
        gc.collect()
        sync(device)
        w0, c0 = time.perf_counter(), time.process_time()
        step()
        sync(device)
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    # CPU seconds (all threads) beside wall time: on a shared machine they move less with other load
    result = {"time": statistics.median(wall), "cpu": statistics.median(cpu)}
    if name != FLOOR and args.reference:
        with torch.no_grad():
            logp = logprob_fns(h, w, y)[name]()[0]
        ref = torch.load(args.reference)
        result["err"] = (logp.detach().cpu().double() - ref).abs().max().item()
    print(json.dumps(result))


def measure_memory(args, shape, device, dtype) -> None:
    name, mode = args.measure_memory
    backward = mode == "fwd+bwd"

    def setup():
        h, w, y = inputs(*shape, dtype, device, backward and name != FLOOR)
        return step_fn(name, h, w, y, backward)
    print(json.dumps({"peak_bytes": measure_peak_here(setup, device)}))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--n", type=int)
    p.add_argument("--d", type=int)
    p.add_argument("--v", type=int)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per process (after a warm-up)")
    p.add_argument("--rounds", type=int, default=3, help="fresh processes per variant")
    p.add_argument("--modes", nargs="+", default=["fwd+bwd"], choices=["fwd", "fwd+bwd"])
    p.add_argument("--only", nargs="+", help="run only these variants (names as printed)")
    p.add_argument("--json", help="also write the figures here")
    p.add_argument("--child", nargs=2, metavar=("IMPL", "MODE"), help=argparse.SUPPRESS)
    p.add_argument("--reference", help=argparse.SUPPRESS)
    p.add_argument("--measure-memory", nargs=2, metavar=("IMPL", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = "cuda" if args.gpu else "cpu"
    shape = (args.n or (8192 if args.gpu else 4096), args.d or (4096 if args.gpu else 576),
             args.v or (128256 if args.gpu else 49152))
    dtype = getattr(torch, args.dtype)
    if args.child:
        return child(args, shape, device, dtype)
    if args.measure_memory:
        return measure_memory(args, shape, device, dtype)

    n, d, v = shape
    common_args = ["--n", str(n), "--d", str(d), "--v", str(v), "--dtype", args.dtype, "--threads",
                   str(args.threads), "--repeats", str(args.repeats)] + (["--gpu"] if args.gpu else [])
    h, w, y = inputs(n, d, v, dtype, device, False)
    names = [k for k in logprob_fns(h, w, y)
             if not (k in (OURS_FP32_PATH, OURS_VECTORS) and (dtype != torch.bfloat16 or h.is_cuda))] + [FLOOR]
    if args.only:
        names = [k for k in names if k in args.only]
    print(f"# token log-prob: N={n} d={d} V={v} {dtype}, {args.threads} threads, on {machine_line(device)}")
    with tempfile.TemporaryDirectory() as tmp:
        ref_path = os.path.join(tmp, "reference.pt")
        torch.save(reference_logprobs(h, w, y), ref_path)
        del h, w, y
        results = {}
        for mode in args.modes:
            times: dict[str, list[float]] = {k: [] for k in names}
            cpu: dict[str, list[float]] = {k: [] for k in names}
            errs: dict[str, float] = {}
            for _ in range(args.rounds):
                for name in names:  # round-robin over fresh processes, so machine noise hits all alike
                    out = subprocess.run([sys.executable, __file__, *common_args, "--child", name, mode,
                                          "--reference", ref_path], capture_output=True, text=True,
                                         env=dict(os.environ, PYTHONUNBUFFERED="1", **variant_env(name)))
                    if out.returncode != 0:
                        print(f"{name}: failed ({out.stderr.strip().splitlines()[-1:]}), left out", file=sys.stderr)
                        continue
                    r = json.loads(out.stdout.strip().splitlines()[-1])
                    times[name].append(r["time"])
                    cpu[name].append(r["cpu"])
                    if "err" in r:
                        errs[name] = r["err"]
            rows = {}
            for name in names:
                if not times[name]:
                    continue
                mem = None if name == FLOOR else peak_extra_memory(
                    __file__, common_args + ["--measure-memory", name, mode], variant_env(name))
                rows[name] = {"time": statistics.median(times[name]), "times": times[name], "mem": mem,
                              "cpu": statistics.median(cpu[name]), "err": errs.get(name)}
            results[mode] = rows
            baselines = [b for b in (CCE, FLOOR, DENSE) if b in rows]
            print(table(f"{mode} (median of {args.rounds} processes x {args.repeats} runs)", rows, baselines))
            print()
            print("CPU seconds (all threads), median: " + ", ".join(f"{k}: {r['cpu']:.3f}" for k, r in rows.items()))
            print()
            print("max |log-prob error| vs float64 on the same inputs: " + ", ".join(
                f"{k}: {r['err']:.2e}" for k, r in rows.items() if r["err"] is not None))
            print()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": [n, d, v], "dtype": str(dtype), "threads": args.threads,
                       "machine": machine_line(device), **results}, f, indent=2)


if __name__ == "__main__":
    main()
