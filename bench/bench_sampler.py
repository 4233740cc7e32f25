"""Sampling-engine throughput against transformers' `generate` on the same weights, same run.

    python bench/bench_sampler.py            # CPU, fp32, the embedded default
    python bench/bench_sampler.py --gpu      # CUDA, bf16, adds a batch-256 run

Workloads: batch 1 greedy (64 new tokens); batch 8 and 32 sampled (T=1, top-p 0.9, 64-token prompts,
64 new tokens); CAI-shaped: one ~1,500-token shared few-shot prefix + 32 different conversations,
128 new tokens each (the peer has to re-encode the prefix for every conversation).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_line, median_times  # noqa: E402

from cai_engine import DEFAULT_MODEL, LLM, SamplingParams, load_model  # noqa: E402
from cai_engine.model.loading import embedded_model_path  # noqa: E402


def workloads(tok, vocab: int, gpu: bool):
    g = torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(100, vocab, (n,), generator=g).tolist()
    chat = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Tell me a long story about a dragon."}]),
                      add_special_tokens=False)
    shared = rand(1500)
    out = {
        "batch 1 greedy": ([chat], dict(temperature=0.0, max_tokens=64)),
        "batch 8 sampled": ([rand(64) for _ in range(8)], dict(temperature=1.0, top_p=0.9, max_tokens=64)),
        "batch 32 sampled": ([rand(64) for _ in range(32)], dict(temperature=1.0, top_p=0.9, max_tokens=64)),
        "CAI shared prefix x32": ([shared + rand(48) for _ in range(32)],
                                  dict(temperature=1.0, top_p=0.9, max_tokens=128)),
    }
    if gpu:
        out["batch 256 sampled"] = ([rand(64) for _ in range(256)], dict(temperature=1.0, top_p=0.9, max_tokens=64))
    return out


def hf_generate(hf, prompts, kw, device):
    """Left-padded batch through transformers' generate: the usual way to batch it."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    sample = kw["temperature"] > 0
    extra = dict(do_sample=True, temperature=kw["temperature"], top_p=kw.get("top_p", 1.0)) if sample else \
        dict(do_sample=False)
    with torch.no_grad():
        hf.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=kw["max_tokens"],
                    min_new_tokens=kw["max_tokens"], pad_token_id=0, **extra)


def gemm_floor(model, batch: int, device, repeats: int = 5) -> float:
    """Seconds per decode step spent in the weight GEMMs alone (every projection and the LM head, no
    attention, no overhead): what any engine running these fp32 weights at this batch size must pay."""
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)] + [model.lm_head]
    inputs = {w.shape[1]: torch.randn(batch, w.shape[1], device=device, dtype=w.dtype) for w in weights}

    def step():
        with torch.no_grad():
            for w in weights:
                torch.nn.functional.linear(inputs[w.shape[1]], w)

    return median_times({"floor": step}, repeats, device)["floor"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", nargs="*", help="workload names to run")
    p.add_argument("--no-peer", action="store_true")
    args = p.parse_args()
    device = "cuda" if args.gpu else "cpu"
    dtype = torch.bfloat16 if args.gpu else torch.float32
    model, tok = load_model(DEFAULT_MODEL, device=device, dtype=dtype)
    llm = LLM(model, tok, kv_cache_bytes=(8 << 30) if args.gpu else (1 << 30))
    hf = None
    if not args.no_peer:
        import transformers
        path = embedded_model_path()
        hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                               dtype=dtype).to(device).eval()
    print(f"# sampling engine vs transformers generate, {DEFAULT_MODEL} {dtype} on {machine_line(device)}")
    print("\n| workload | new tokens | cai_engine tok/s | transformers tok/s | speed-up |\n|---|---|---|---|---|")
    for name, (prompts, kw) in workloads(tok, model.config.vocab_size, args.gpu).items():
        if args.only and name not in args.only:
            continue
        params = SamplingParams(seed=0, ignore_eos=True, **kw)
        new_tokens = len(prompts) * kw["max_tokens"]

        def ours():
            llm.reset_prefix_cache()  # every run re-encodes the shared prefix once, as a fresh job would
            llm.generate(prompts, params, progress=False)

        fns = {"ours": ours}
        if hf is not None:
            fns["peer"] = lambda: hf_generate(hf, prompts, kw, device)
        times = median_times(fns, args.repeats, device)
        ours_tps = new_tokens / times["ours"]
        peer = f"{new_tokens / times['peer']:.1f}" if "peer" in times else "-"
        speed = f"{times['peer'] / times['ours']:.2f}x" if "peer" in times else "-"
        print(f"| {name} | {new_tokens} | {ours_tps:.1f} | {peer} | {speed} |", flush=True)
    for batch in (1, 32):
        t = gemm_floor(model, batch, device)
        print(f"\ndecode-step GEMM floor at batch {batch}: {t * 1e3:.1f} ms (at most {batch / t:.1f} tok/s from "
              f"decode alone, whatever the engine)", end="")
    print(f"\nprefix-cache hit tokens {llm.blocks.hit_tokens} of {llm.blocks.queried_tokens} queried; "
          f"preemptions {llm.preemptions}")


if __name__ == "__main__":
    main()
