"""Training linear layers under bf16-mixed: ops.projection (autocast's forward and input gradient, the weight
gradient from our AMX tile kernel, in fp32) against autocast's `nn.Linear` (three oneDNN bf16 GEMMs, the weight
gradient in bf16, then cast to the fp32 master's dtype), at the embedded default's seven projection shapes.

Tokens per call: a PPO micro-batch of `bench_rl.py` (8 rows x 174 tokens) and a PM step of `bench_train.py`
(4 rows x 384). Reported per weight shape: the weight gradient alone (ours into fp32 against torch's mm + cast) with
its TFLOP/s, one layer's forward + backward both ways, and a floor: the three GEMMs' flops at this machine's
forward GEMM rate (oneDNN, [tokens x in] x [in x out], measured in the same run). All medians of round-robin runs
on warm caches: in a whole model the operands come from memory and every figure is slower (bench_rl.py, bench_train.py).
Run: `python bench/bench_projection.py`.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_line, median_times  # noqa: E402

from cai_engine import _native  # noqa: E402
from cai_engine.ops import projection as projection_mod  # noqa: E402
from cai_engine.ops.backend import as_buffer  # noqa: E402
from cai_engine.ops.projection import project  # noqa: E402
from cai_engine.train.allocator import retain_freed_memory  # noqa: E402

# (name, in features, out features) of one SmolLM2-135M layer
SHAPES = (("q / o", 576, 576), ("k / v", 576, 192), ("gate / up", 576, 1536), ("down", 1536, 576))


def run_shape(name: str, tokens: int, fan_in: int, fan_out: int, repeats: int) -> str:
    torch.manual_seed(0)
    layer = nn.Linear(fan_in, fan_out, bias=False)
    x = torch.randn(tokens, fan_in).bfloat16().requires_grad_()
    grad = torch.randn(tokens, fan_out).bfloat16()
    out = torch.empty(fan_out, fan_in)
    weight = layer.weight.detach().bfloat16()
    gemm_flops = 2 * tokens * fan_in * fan_out

    def ours_grad() -> None:
        _native.linear_weight_grad_bf16(as_buffer(grad), as_buffer(x), out.numpy())

    def torch_grad() -> None:
        (grad.t() @ x.detach()).float()

    def step(forward):
        def run() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = forward(x, layer)
            torch.autograd.grad(y, (x, layer.weight), grad)
        return run

    times = median_times({"ours dW": ours_grad, "torch dW": torch_grad, "ours": step(project),
                          "torch": step(lambda x, layer: layer(x)),
                          "forward GEMM": lambda: F.linear(x.detach(), weight)}, repeats)
    floor = 3 * times["forward GEMM"]
    return (f"| {name} | {tokens} x {fan_in} -> {fan_out} | {times['ours dW'] * 1e3:.2f} "
            f"({gemm_flops / times['ours dW'] / 1e12:.2f}) | {times['torch dW'] * 1e3:.2f} "
            f"({gemm_flops / times['torch dW'] / 1e12:.2f}) | {times['torch dW'] / times['ours dW']:.2f}x | "
            f"{times['ours'] * 1e3:.2f} | {times['torch'] * 1e3:.2f} | {times['torch'] / times['ours']:.2f}x | "
            f"{times['ours'] / floor:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    if not _native.bf16_kernels_available():
        sys.exit("bench_projection: this CPU has no AVX512-BF16: training uses autocast's nn.Linear")
    dispatched = projection_mod.kernel_preferred()
    projection_mod.kernel_preferred = lambda: True  # "ours" below always takes the kernel, dispatched here or not
    retain_freed_memory()  # as every training stage does: freed blocks reused, not page-faulted in again
    print(f"# training linear layers, bf16-mixed: {machine_line('cpu')}; median of {args.repeats}; "
          f"{'AMX tiles' if _native.amx_available() else 'VDPBF16PS vectors'}, "
          f"{'dispatched' if dispatched else 'not dispatched'} by ops.projection on this CPU")
    print("| weight | tokens x in -> out | ours dW ms (TFLOP/s) | torch dW + cast ms (TFLOP/s) | dW speed-up | "
          "ours fwd+bwd ms | autocast fwd+bwd ms | speed-up | ours / 3 forward GEMMs |")
    print("|---|---|---|---|---|---|---|---|---|")
    start = time.perf_counter()
    for tokens in (8 * 174, 4 * 384):
        for name, fan_in, fan_out in SHAPES:
            print(run_shape(name, tokens, fan_in, fan_out, args.repeats), flush=True)
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
