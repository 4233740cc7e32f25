"""Sampling-engine throughput against transformers' `generate` on the same weights, same run.

    python bench/bench_sampler.py                    # CPU, bf16 (both sides), the embedded default
    python bench/bench_sampler.py --dtype float32    # the old fp32 comparison
    python bench/bench_sampler.py --gpu              # CUDA, bf16, adds a batch-256 run

Workloads: batch 1 greedy (64 new tokens); batch 8 and 32 sampled (T=1, top-p 0.9, 64-token prompts,
64 new tokens); CAI-shaped: one ~1,500-token shared few-shot prefix + 32 different conversations,
128 new tokens each (the peer has to re-encode the prefix for every conversation).

Each workload also gets its GEMM floor: the time of every weight GEMM of the steps our engine ran for it
(the projections at each step's token count, the LM head at each step's sequence count), measured
alone at the same dtype with the faster of torch's GEMM and our linear op, and our time as a multiple of it.
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
from cai_engine.ops.linear import linear  # noqa: E402


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


def gemm_time(weights: list[torch.Tensor], rows: int, device, repeats: int = 3) -> float:
    """Seconds for `rows` input rows through every weight in `weights` (one GEMM each), nothing else: the faster
    of torch's GEMM (oneDNN / cuBLAS) and our engine's linear op (the AMX tile kernel at decode row counts)."""
    inputs = {w.shape[1]: torch.randn(rows, w.shape[1], device=device, dtype=w.dtype) for w in weights}

    def run(op):
        def go():
            with torch.no_grad():
                for w in weights:
                    op(inputs[w.shape[1]], w)
        return go

    return min(median_times({"torch": run(torch.nn.functional.linear), "ours": run(linear)}, repeats, device).values())


def step_shapes(llm, prompts, params) -> list[tuple[int, int]]:
    """(tokens, sequences) of every step the engine runs for this job (one untimed run, recorded)."""
    shapes, forward = [], llm.model.forward

    def recording(*args, paged=None, **kwargs):
        shapes.append((sum(paged.query_lens), len(paged.query_lens)))
        return forward(*args, paged=paged, **kwargs)

    llm.model.forward = recording
    try:
        llm.reset_prefix_cache()
        llm.generate(prompts, params, progress=False)
    finally:
        del llm.model.forward
    return shapes


def gemm_floor(model, shapes: list[tuple[int, int]], device, cache: dict) -> float:
    """Seconds of weight GEMMs in these steps: the layers' projections at each step's token count and the
    LM head at its sequence count (an upper bound on the rows that sample: a mid-prefill chunk does not)."""
    layers = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    total = 0.0
    for weights, rows in [(layers, t) for t, _ in shapes] + [([model.lm_head], s) for _, s in shapes]:
        key = (len(weights), rows)
        if key not in cache:
            cache[key] = gemm_time(weights, rows, device)
        total += cache[key]
    return total


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", nargs="*", help="workload names to run")
    p.add_argument("--no-peer", action="store_true")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = p.parse_args()
    device = "cuda" if args.gpu else "cpu"
    dtype = getattr(torch, args.dtype)
    model, tok = load_model(DEFAULT_MODEL, device=device, dtype=dtype)
    llm = LLM(model, tok, dtype=dtype, kv_cache_bytes=(8 << 30) if args.gpu else (1 << 30))
    hf = None
    if not args.no_peer:
        import transformers
        path = embedded_model_path()
        hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                               dtype=dtype).to(device).eval()
    print(f"# sampling engine vs transformers generate, {DEFAULT_MODEL} {dtype} on {machine_line(device)}")
    print("\n| workload | new tokens | cai_engine tok/s | transformers tok/s | speed-up | GEMM floor s | ours / floor |"
          "\n|---|---|---|---|---|---|---|")
    floors: dict = {}
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
        floor = gemm_floor(llm.model, step_shapes(llm, prompts, params), device, floors)
        print(f"| {name} | {new_tokens} | {ours_tps:.1f} | {peer} | {speed} | {floor:.3f} | "
              f"{times['ours'] / floor:.2f}x |", flush=True)
    print(f"\nprefix-cache hit tokens {llm.blocks.hit_tokens} of {llm.blocks.queried_tokens} queried; "
          f"preemptions {llm.preemptions}")


if __name__ == "__main__":
    main()
