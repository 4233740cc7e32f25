"""SL-CAI critique -> revision loop: the engine (`run_critique`) against the same loop written with
transformers `generate` (batched, left-padded, no prefix reuse), same weights, same dtype, same run.

    flock /tmp/cai-bench.lock python bench/bench_critique.py      # 32 prompts, 2 rounds, 96 new tokens, bf16

The peer replays exactly the requests our loop sent (the same token ids, round by round, batched the same
way), and each of its `generate` calls produces as many new tokens as the longest output our engine
produced in that call: a padded batch runs until its longest row stops, so this is the work a
transformers version of the loop does for the same transcripts. Only the peer's `generate` calls are
timed (none of its request building), ours is the whole `run_critique` call.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_line  # noqa: E402

from cai_engine import DEFAULT_MODEL, LLM, load_model  # noqa: E402
from cai_engine.cai import Constitution, CritiqueConfig, run_critique  # noqa: E402
from cai_engine.cai.critique import few_shot_prefix  # noqa: E402
from cai_engine.data.prompts import builtin_prompts  # noqa: E402
from cai_engine.model.loading import embedded_model_path  # noqa: E402


def bench_prompts(count: int):
    train = builtin_prompts("train")
    red = [p for p in train if p.kind == "red-team"]
    helpful = [p for p in train if p.kind == "helpful"]
    return (red[: count - count // 2] + helpful[: count // 2])[:count]


def run_ours(llm, tok, constitution, prompts, config):
    """One whole loop from a cold prefix cache; returns (seconds, stats, calls) where calls holds each
    generate call's token-id requests and the longest output it produced."""
    calls = []
    generate = llm.generate

    def spy(requests, params):
        outs = generate(requests, params)
        calls.append(([llm.encode_prompt(r) for r in requests], max(len(o.outputs[0].token_ids) for o in outs)))
        return outs

    llm.generate = spy
    llm.reset_prefix_cache()
    with tempfile.TemporaryDirectory() as d:
        start = time.perf_counter()
        stats = run_critique(llm, tok, constitution, prompts, config, os.path.join(d, "r.jsonl"), log=lambda m: None,
                             model_name=DEFAULT_MODEL)
        seconds = time.perf_counter() - start
    del llm.generate
    return seconds, stats, calls


def run_peer(hf, calls, config, pad_id: int) -> float:
    total = 0.0
    for requests, longest in calls:
        width = max(map(len, requests))
        ids = torch.full((len(requests), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(requests):
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
        start = time.perf_counter()
        with torch.no_grad():
            hf.generate(ids, attention_mask=mask, do_sample=True, temperature=config.temperature, top_p=config.top_p,
                        max_new_tokens=longest, min_new_tokens=longest, pad_token_id=pad_id)
        total += time.perf_counter() - start
    return total


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--no-peer", action="store_true")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    model, tok = load_model(DEFAULT_MODEL, dtype=dtype)
    llm = LLM(model, tok, kv_cache_bytes=2 << 30)
    constitution = Constitution.load("")
    prompts = bench_prompts(args.prompts)
    config = CritiqueConfig(rounds=args.rounds, max_new_tokens=args.max_new_tokens, seed=0, batch_size=len(prompts))
    hf = None
    if not args.no_peer:
        import transformers
        path = embedded_model_path()
        hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype).eval()
    ours_times, peer_times = [], []
    for _ in range(args.repeats):   # alternate ours and the peer so machine noise hits both alike
        seconds, stats, calls = run_ours(llm, tok, constitution, prompts, config)
        ours_times.append(seconds)
        if hf is not None:
            peer_times.append(run_peer(hf, calls, config, tok.pad_id if tok.pad_id is not None else 0))
        print(f"run: ours {seconds:.1f}s" + (f", transformers {peer_times[-1]:.1f}s" if hf is not None else ""),
              flush=True)
    ours = statistics.median(ours_times)
    prefix_tokens = len(tok.encode(few_shot_prefix(constitution)))
    print(f"\n# critique loop, {DEFAULT_MODEL} {args.dtype}, {len(prompts)} prompts x {args.rounds} rounds, "
          f"{args.max_new_tokens} new tokens max, {machine_line('cpu')}, median of {args.repeats}")
    print(f"few-shot prefix {prefix_tokens} tokens; {stats.generations} generations in {len(calls)} engine calls, "
          f"{stats.generated_tokens} tokens generated, {stats.prompt_tokens} prompt tokens")
    print(f"prefix-cache hit rate: {100 * stats.prefix_hit_rate:.1f}% of prompt tokens "
          f"({stats.prefix_hit_tokens} / {stats.prompt_tokens})")
    print("\n| impl | wall s | generated tok/s | speed-up |\n|---|---|---|---|")
    print(f"| cai_engine run_critique | {ours:.1f} | {stats.generated_tokens / ours:.1f} | - |")
    if peer_times:
        peer = statistics.median(peer_times)
        peer_tokens = sum(len(r) * n for r, n in calls)
        print(f"| transformers generate loop | {peer:.1f} | {stats.generated_tokens / peer:.1f} "
              f"(pads to {peer_tokens}) | {peer / ours:.2f}x |")


if __name__ == "__main__":
    main()
