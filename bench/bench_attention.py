"""Training attention, forward + backward, bf16: ops.attention (torch's fused CPU forward, our backward) against
torch's `F.scaled_dot_product_attention` (the same forward, torch's CPU flash backward) at the decoder shapes of
the embedded default (9 query heads, 3 KV heads, head_dim 64).

Shapes: the PM step of `bench_train.py` (4 rows of a 256-token prompt + two 64-token responses, each response
hidden from the other), a causal SFT-like batch, and one long row (few (batch, KV head) pairs: the key blocks split
between threads). Reported per shape: median fwd+bwd time of each (round-robin runs), the ratio, the backward alone,
and a floor for our backward: its tile matmuls' flops (the tiles the mask leaves) at this machine's bf16 GEMM rate,
measured in the same run on a [1536 x 576] x [576 x 1536] torch.mm. Run: `python bench/bench_attention.py`.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_line, median_times  # noqa: E402

from cai_engine.ops.attention import attention  # noqa: E402

H, KV, D = 9, 3, 64


def pm_mask(B: int, prompt: int, response: int) -> torch.Tensor:
    T = prompt + 2 * response
    allow = torch.ones(T, T, dtype=torch.bool).tril()
    allow[prompt + response:, prompt:prompt + response] = False
    return torch.zeros(1, 1, T, T).masked_fill_(~allow, float("-inf")).bfloat16().expand(B, 1, T, T)


def gemm_rate(repeats: int) -> float:
    a, b = torch.randn(1536, 576).bfloat16(), torch.randn(576, 1536).bfloat16()
    seconds = median_times({"mm": lambda: a @ b}, repeats)["mm"]
    return 2 * 1536 * 576 * 1536 / seconds


def visible_tiles(B: int, T: int, mask: torch.Tensor | None) -> int:
    blocks = -(-T // 32)
    allow = torch.ones(T, T, dtype=torch.bool).tril() if mask is None else mask[:, 0].isfinite()
    padded = torch.zeros(allow.shape[0] if mask is not None else 1, blocks * 32, blocks * 32, dtype=torch.bool)
    padded[:, :T, :T] = allow
    per_row = padded.view(-1, blocks, 32, blocks, 32).any(4).any(2).sum()
    return int(per_row) * (1 if mask is not None else B) * H


def run_shape(name: str, B: int, T: int, mask: torch.Tensor | None, repeats: int, rate: float) -> str:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, T, H, D, generator=g).bfloat16().transpose(1, 2).requires_grad_()
    k = torch.randn(B, T, KV, D, generator=g).bfloat16().transpose(1, 2).requires_grad_()
    v = torch.randn(B, T, KV, D, generator=g).bfloat16().transpose(1, 2).requires_grad_()
    grad = torch.randn(B, T, H, D, generator=g).bfloat16().transpose(1, 2)
    causal = mask is None
    ours = lambda: attention(q, k, v, mask=mask, causal=causal)
    torchs = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
    both = median_times({"ours": lambda: torch.autograd.grad(ours(), (q, k, v), grad),
                         "torch": lambda: torch.autograd.grad(torchs(), (q, k, v), grad)}, repeats)
    outs = {"ours": ours(), "torch": torchs()}
    backward = median_times({n: (lambda o=o: torch.autograd.grad(o, (q, k, v), grad, retain_graph=True))
                             for n, o in outs.items()}, repeats)
    floor = visible_tiles(B, T, mask) * 5 * 2 * 32 * 32 * D / rate  # S, dP, dV, dK, dQ per visible tile
    return (f"| {name} | {B} x {T} | {both['ours'] * 1e3:.2f} | {both['torch'] * 1e3:.2f} | "
            f"{both['torch'] / both['ours']:.2f}x | {backward['ours'] * 1e3:.2f} | {backward['torch'] * 1e3:.2f} | "
            f"{backward['ours'] / floor:.1f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    rate = gemm_rate(args.repeats)
    print(f"# training attention, bf16: {machine_line('cpu')}; bf16 GEMM rate {rate / 1e12:.2f} TFLOP/s; "
          f"median of {args.repeats}")
    print("| shape | B x T | ours fwd+bwd ms | torch fwd+bwd ms | speed-up | ours bwd ms | torch bwd ms | "
          "ours bwd / floor |")
    print("|---|---|---|---|---|---|---|---|")
    start = time.perf_counter()
    for name, B, T, mask in (("PM step (K=2, shared prompt)", 4, 384, pm_mask(4, 256, 64)),
                             ("causal batch", 8, 256, None),
                             ("one long row", 1, 1024, None)):
        print(run_shape(name, B, T, mask, args.repeats, rate), flush=True)
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
