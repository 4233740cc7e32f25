"""SFT on the embedded default: our trainer (bf16-mixed) against TRL's SFTTrainer (bf16) on the same data.

Same model (SmolLM2-135M-Instruct), same examples (chat prompts of about 200 tokens, answers of about 100,
loss on the answer only), same examples per optimizer step (8), both bf16 on this CPU. We pack examples into
rows of 1024 tokens with segment ids; TRL pads each batch (`packing=False`, its completion-only loss).
Throughput counts real (non-padding) tokens. Every variant runs in its own process: the median step time
after warm-up steps and the process's peak RSS. Our trainer keeps freed memory for reuse
(cai_engine/train/allocator.py); TRL runs with glibc's defaults and with the same setting (`trl+retain`), and each
ratio takes its better run. Run: `python bench/bench_sft.py [--steps N --warmup N]`.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import hf_copy_of_default, machine_line, peer_best, trainer_step_timer, variant_env, word_text  # noqa: E402

PROMPT_WORDS, ANSWER_WORDS, EXAMPLES_PER_STEP = 200, 100, 8


def make_data(path: Path, n: int, seed: int = 0) -> None:
    text = word_text(seed)
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"b{i}", "prompt": text(PROMPT_WORDS), "final": text(ANSWER_WORDS),
                                "flags": {}}) + "\n")


def run_ours(data: Path, warmup: int, out: Path, recompute: bool = False) -> dict:
    from cai_engine.train.config import resolve
    from cai_engine.train.sft import train_sft
    config = resolve(overrides=[f"sft.data={data}", f"run.dir={out}", "sft.eval_fraction=0", "sft.max_seq_len=1024",
                                "sft.batch_rows=3", "sft.lr=1e-5", "checkpoint.keep=1", "precision.mode=bf16-mixed",
                                f"run.activation_checkpointing={str(recompute).lower()}"])
    train_sft(config, log=lambda _: None, progress=False)
    records = [json.loads(line) for line in open(out / "sft" / "metrics.jsonl")]
    measured = records[warmup:]
    # the loop's examples are packed rows: count real tokens instead (the trainer logs them per step)
    return {"step_s": statistics.median(r["seconds"] for r in measured),
            "tokens_per_step": statistics.median(r["tokens"] for r in measured),
            "peak_rss_mib": measured[-1]["peak_memory_mb"], "steps": len(records)}


def run_trl(data: Path, warmup: int, steps: int, out: Path) -> dict:
    import torch
    import transformers
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    hf_copy_of_default(out / "hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(out / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32)
    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "completion": [{"role": "assistant", "content": r["final"]}]} for r in map(json.loads, open(data))]
    times: list[float] = []

    config = SFTConfig(output_dir=str(out / "trl"), per_device_train_batch_size=EXAMPLES_PER_STEP,
                       max_steps=warmup + steps, bf16=True, use_cpu=True, learning_rate=1e-5, save_strategy="no",
                       report_to=[], logging_steps=1000, max_length=1024, packing=False, disable_tqdm=True, seed=0,
                       dataloader_num_workers=0)
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         callbacks=[trainer_step_timer(times)])
    trainer.train()
    return {"step_s": statistics.median(times[warmup:]), "tokens_per_step": None,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "steps": len(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--variants", default="ours,ours+ac,trl,trl+retain",
                        help="ours, ours+ac (activation checkpointing, as TRL does by default), trl, trl+retain "
                             "(glibc's allocator set as our trainer sets it)")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        out = Path(args.out)
        result = run_trl(Path(args.data), args.warmup, args.steps, out) if args.variant.startswith("trl") else \
            run_ours(Path(args.data), args.warmup, out, recompute=args.variant == "ours+ac")
        print(json.dumps(result))
        return
    print(f"# SFT: {machine_line('cpu')}; about {PROMPT_WORDS}-token prompts and {ANSWER_WORDS}-token answers; "
          f"median of {args.steps} steps after {args.warmup} warm-up")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "revisions.jsonl"
        n = EXAMPLES_PER_STEP * (args.steps + args.warmup)
        make_data(data, n)
        from cai_engine import load_model
        _, tok = load_model("smollm2-135m-instruct")
        real_tokens = 0
        for r in map(json.loads, open(data)):
            text = tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True)
            real_tokens += len(tok.encode(text, add_special_tokens=False)) + len(tok.encode(r["final"])) + 1
        per_example = real_tokens / n
        results = {}
        for variant in args.variants.split(","):
            proc = subprocess.run([sys.executable, __file__, "--variant", variant, "--data", str(data), "--out",
                                   str(Path(tmp) / variant), "--steps", str(args.steps), "--warmup", str(args.warmup)],
                                  capture_output=True, text=True, env=variant_env(variant))
            if proc.returncode:
                print(f"{variant} failed: {proc.stderr.strip().splitlines()[-1]}")
                continue
            results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    print("| trainer | s/step | real tokens/step | real tokens/s | peak RSS MiB | tokens/s vs TRL (its fastest) | "
          "memory vs TRL (its smallest) |")
    print("|---|---|---|---|---|---|---|")
    for r in results.values():  # TRL takes EXAMPLES_PER_STEP whole examples a step
        r["tokens_per_step"] = r["tokens_per_step"] or EXAMPLES_PER_STEP * per_example
    for r in results.values():
        r["seconds_per_token"] = r["step_s"] / r["tokens_per_step"]
    rate = lambda r: 1 / r["seconds_per_token"]
    trl_time, trl_memory = peer_best(results, "trl", "seconds_per_token")  # TRL at its best setting for each ratio
    for variant, r in results.items():
        name = {"ours": "cai_engine bf16-mixed (packed)",
                "ours+ac": "cai_engine bf16-mixed (packed) + activation checkpointing",
                "trl": "TRL SFTTrainer bf16 (padded; its default gradient checkpointing)",
                "trl+retain": "TRL SFTTrainer bf16, glibc allocator as ours"}[variant]
        vs = f"{rate(r) * trl_time:.2f}x" if trl_time else "-"
        mem = f"{r['peak_rss_mib'] / trl_memory:.2f}x" if trl_memory else "-"
        print(f"| {name} | {r['step_s']:.2f} | {r['tokens_per_step']:.0f} | {rate(r):.0f} | {r['peak_rss_mib']:.0f} | "
              f"{vs} | {mem} |")


if __name__ == "__main__":
    main()
