"""PM training on the embedded default: our trainer in fp32 and bf16-mixed against TRL's RewardTrainer.

Same model (SmolLM2-135M-Instruct), same data (256-token prompts, 64-token responses, K=2 and K=4
responses per prompt), same batch (4 prompts per optimizer step: 4 comparisons at K=2, 24 at K=4). TRL
trains on chosen/rejected pairs, so at K=4 it sees each prompt's 6 pairs as 12 rows; we encode each prompt
once with its 4 responses. TRL runs in bf16 autocast (`bf16=True`), its best setting on this CPU, with the
gradient checkpointing its RewardConfig turns on by default; we run without and with (`+ac`) ours. Our trainer
keeps freed memory for reuse (cai_engine/train/allocator.py); TRL runs with glibc's defaults and with the same
setting (`trl+retain`), and each ratio takes its better run.

Every variant runs in its own process: the median step time after warm-up steps (forward, backward and
the optimizer step), comparisons/s, and the process's peak RSS. Run: `python bench/bench_train.py`
(`--steps N` measured steps, `--warmup N`, `--k 2,4`).
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

PROMPT_TOKENS, RESPONSE_TOKENS, PROMPTS_PER_STEP = 256, 64, 4


def make_data(path: Path, k: int, n_prompts: int, seed: int = 0) -> None:
    """Texts that tokenize to about 256 / 64 tokens: random common words (one token each, space-led)."""
    text = word_text(seed)
    with open(path, "w") as f:
        for _ in range(n_prompts):
            f.write(json.dumps({"prompt": text(PROMPT_TOKENS), "responses": [text(RESPONSE_TOKENS - 1) for _ in range(k)],
                                "ranking": list(range(k))}) + "\n")


def run_ours(data: Path, variant: str, warmup: int, out: Path) -> dict:
    from cai_engine.train.config import resolve
    from cai_engine.train.pm import train_pm
    precision, _, recompute = variant.partition("+")  # "bf16-mixed+ac": with activation checkpointing
    config = resolve(overrides=[f"pm.data={data}", f"run.dir={out}", "pm.eval_fraction=0", f"precision.mode={precision}",
                                f"run.activation_checkpointing={'true' if recompute == 'ac' else 'false'}",
                                "pm.batch_groups=4", "pm.lr=1e-5", "pm.max_prompt_tokens=512", "checkpoint.keep=1"])
    train_pm(config, log=lambda _: None, progress=False)
    records = [json.loads(line) for line in open(out / "pm" / "metrics.jsonl")]
    measured = records[warmup:]
    return {"step_s": statistics.median(r["seconds"] for r in measured),
            "tokens_per_step": statistics.median(r["tokens"] for r in measured),
            "peak_rss_mib": measured[-1]["peak_memory_mb"]}


def run_trl(data: Path, k: int, warmup: int, steps: int, out: Path) -> dict:
    import torch
    import transformers
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    model_dir = out / "hf"
    hf_copy_of_default(model_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1,
                                                                            torch_dtype=torch.float32)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    rows = []
    for line in open(data):
        record = json.loads(line)
        for a in range(k):
            for b in range(a + 1, k):
                rows.append({"prompt": record["prompt"], "chosen": " " + record["responses"][a],
                             "rejected": " " + record["responses"][b]})
    times: list[float] = []

    pairs_per_step = PROMPTS_PER_STEP * k * (k - 1) // 2
    config = RewardConfig(output_dir=str(out / "trl"), per_device_train_batch_size=pairs_per_step,
                          max_steps=warmup + steps, bf16=True, use_cpu=True, learning_rate=1e-5, save_strategy="no",
                          report_to=[], logging_steps=1000, max_length=1024, dataloader_num_workers=0,
                          disable_tqdm=True, seed=0)
    trainer = RewardTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                            processing_class=tokenizer, callbacks=[trainer_step_timer(times)])
    trainer.train()
    return {"step_s": statistics.median(times[warmup:]), "tokens_per_step": None,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def child(args) -> None:
    out = Path(args.out)
    if args.variant.startswith("trl"):
        result = run_trl(Path(args.data), int(args.k), args.warmup, args.steps, out)
    else:
        result = run_ours(Path(args.data), args.variant, args.warmup, out)
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", default="2,4", help="responses per prompt, comma-separated")
    parser.add_argument("--steps", type=int, default=5, help="measured optimizer steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="steps run before measuring")
    parser.add_argument("--variants", default="fp32,bf16-mixed,bf16-mixed+ac,trl,trl+retain",
                        help="fp32, bf16-mixed, bf16-mixed+ac (activation checkpointing, as TRL does by default), trl, "
                             "trl+retain (glibc's allocator set as our trainer sets it)")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        return child(args)
    print(f"# PM training: {machine_line('cpu')}; {PROMPTS_PER_STEP} prompts/step, {PROMPT_TOKENS}-token prompts, "
          f"{RESPONSE_TOKENS}-token responses; median of {args.steps} steps after {args.warmup} warm-up")
    print("| K | trainer | s/step | comparisons/s | peak RSS MiB | vs our fp32 | vs TRL bf16 (its fastest) | "
          "memory vs TRL (its smallest) |")
    print("|---|---|---|---|---|---|---|---|")
    for k in [int(x) for x in args.k.split(",")]:
        results = {}
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "data.jsonl"
            make_data(data, k, PROMPTS_PER_STEP * (args.steps + args.warmup))
            for variant in args.variants.split(","):
                out = Path(tmp) / variant
                proc = subprocess.run([sys.executable, __file__, "--variant", variant, "--data", str(data), "--out",
                                       str(out), "--k", str(k), "--steps", str(args.steps), "--warmup",
                                       str(args.warmup)], capture_output=True, text=True,
                                      env=variant_env(variant))
                if proc.returncode:
                    print(f"| {k} | {variant} | failed: {proc.stderr.strip().splitlines()[-1]} |", flush=True)
                    continue
                results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
        comparisons = PROMPTS_PER_STEP * k * (k - 1) // 2
        trl_time, trl_memory = peer_best(results, "trl", "step_s")  # TRL at its best setting for each ratio
        for variant, r in results.items():
            name = {"fp32": "cai_engine fp32", "bf16-mixed": "cai_engine bf16-mixed",
                    "bf16-mixed+ac": "cai_engine bf16-mixed + activation checkpointing",
                    "trl": "TRL RewardTrainer bf16 (its default gradient checkpointing)",
                    "trl+retain": "TRL RewardTrainer bf16, glibc allocator as ours"}[variant]
            vs_fp32 = f"{results['fp32']['step_s'] / r['step_s']:.2f}x" if "fp32" in results else "-"
            vs_trl = f"{trl_time / r['step_s']:.2f}x" if trl_time else "-"
            mem = f"{r['peak_rss_mib'] / trl_memory:.2f}x" if trl_memory else "-"
            print(f"| {k} | {name} | {r['step_s']:.2f} | {comparisons / r['step_s']:.2f} | {r['peak_rss_mib']:.0f} | "
                  f"{vs_fp32} | {vs_trl} | {mem} |", flush=True)


if __name__ == "__main__":
    main()
