"""Decode attention of one engine step, per layer, on the CPU: the CAI sampling workload's shape (32 sequences behind a
shared 1,504-token prefix with 112 tokens of their own, the embedded default's 9 query heads, 3 KV heads, head_dim 64,
16-token blocks), the layers' caches read in turn as the engine reads them (30 layers' worth, so no cache level holds
them between calls).

Compares the engine's native kernels for the cache's dtype with the paths they replaced, in one process, round-robin:
fp32 on AVX2 (csrc/attention_f32.cpp) against the gathered torch GEMMs (shared prefix) and `paged_decode`'s generic
loop (own blocks). Reported per part: the median per-layer time of each path and the ratio; and the memory floor of
each part (its K and V bytes at the bandwidth `--bandwidth` GB/s, default measured here by a large copy).
Run: `python bench/bench_decode_attention.py`.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import machine_line, median_times  # noqa: E402

from cai_engine.ops import paged_attention as paged  # noqa: E402


def copy_bandwidth() -> float:
    """GB/s of a 256 MiB tensor copy (read + write), median of 5: what streaming memory costs here."""
    src = torch.empty(64 << 20)
    dst = torch.empty_like(src)
    seconds = median_times({"copy": lambda: dst.copy_(src)}, 5)["copy"]
    return 2 * src.numel() * 4 / seconds / 1e9


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sequences", type=int, default=32)
    p.add_argument("--prefix-blocks", type=int, default=94)
    p.add_argument("--own-tokens", type=int, default=112)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--bandwidth", type=float, default=None)
    args = p.parse_args()
    B, H, KV, D, BS = args.sequences, 9, 3, 64, 16
    own_blocks = -(-args.own_tokens // BS)
    n_blocks = args.prefix_blocks + B * own_blocks
    g = torch.Generator().manual_seed(0)
    caches = [(torch.randn(n_blocks, BS, KV, D, generator=g), torch.randn(n_blocks, BS, KV, D, generator=g))
              for _ in range(args.layers)]
    prefix = torch.arange(args.prefix_blocks)
    scattered = torch.randperm(B * own_blocks, generator=g) + args.prefix_blocks  # own blocks anywhere in the cache
    tables = torch.stack([torch.cat([prefix, scattered[b * own_blocks:(b + 1) * own_blocks]])
                          for b in range(B)]).int()
    lens = torch.full((B,), args.prefix_blocks * BS + args.own_tokens, dtype=torch.int32)
    q, scale = torch.randn(B, H, D, generator=g), D ** -0.5

    def per_layer(kernels: bool, part: str):
        def run():
            paged.f32_kernel_preferred = (lambda: True) if kernels else (lambda: False)
            for k, v in caches:
                if part == "prefix":
                    paged._prefix_partial(q, k, v, prefix, scale)
                elif part == "own":
                    paged.decode_attention(q, k, v, tables, lens, scale, first_block=args.prefix_blocks)
                else:
                    paged.decode_attention(q, k, v, tables, lens, scale, shared_blocks=args.prefix_blocks)
        return run

    bandwidth = args.bandwidth or copy_bandwidth()
    row_bytes = 2 * KV * D * 4  # a token's K and V, every head
    floor_bytes = {"prefix": args.prefix_blocks * BS * row_bytes, "own": B * args.own_tokens * row_bytes}
    floor_bytes["cascade"] = floor_bytes["prefix"] + floor_bytes["own"]
    print(f"# decode attention per layer, fp32 cache, {B} sequences x ({args.prefix_blocks * BS} shared + "
          f"{args.own_tokens} own tokens), {args.layers} layers' caches in turn, on {machine_line('cpu')}; "
          f"memory {bandwidth:.1f} GB/s (copy)")
    print("\n| part | before ms | AVX2 kernels ms | speed-up | memory floor ms |\n|---|---|---|---|---|")
    for part in ("prefix", "own", "cascade"):
        times = median_times({"before": per_layer(False, part), "kernels": per_layer(True, part)}, args.repeats)
        before, ours = (times[name] / args.layers * 1e3 for name in ("before", "kernels"))
        print(f"| {part} | {before:.3f} | {ours:.3f} | {before / ours:.2f}x | "
              f"{floor_bytes[part] / bandwidth / 1e6:.3f} |", flush=True)


if __name__ == "__main__":
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX"):
        sys.exit("bench_decode_attention: needs an x86 CPU with AVX2")
    main()
