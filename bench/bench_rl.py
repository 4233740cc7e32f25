"""One RL iteration on the embedded default: our RLOO and PPO against TRL's RLOOTrainer, all bf16.

A rollout batch of 16 prompts x 2 samples, 128 new tokens (sampled to the end: EOS ignored, so every variant
generates the same 4,096 tokens), reward = a preference model made from the same checkpoint (a fresh score
head), KL penalty to the frozen initial policy. TRL 1.16 ships no PPO trainer, so our PPO iteration (value
model = a critic initialised from the PM; 2 epochs x 2 minibatches, 4 optimizer steps) is compared with
TRL's RLOO iteration on the same batch, as is our RLOO iteration (1 optimizer step). Every variant runs in
its own process: the median iteration time after warm-up iterations, split into generation and training,
and the process's peak RSS. Our trainers keep freed memory for reuse (cai_engine/train/allocator.py); TRL runs
both with glibc's defaults and with the same setting, and each ratio takes its better run. Run: `python bench/bench_rl.py [--iterations N --warmup N]`.
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
from common import hf_copy_of_default, machine_line, peer_best, trainer_step_timer, variant_env  # noqa: E402

PROMPTS, SAMPLES, NEW_TOKENS = 16, 2, 128


def prompts_file(path: Path, n: int) -> None:
    from cai_engine.data.prompts import builtin_prompts
    with open(path, "w") as f:
        for p in builtin_prompts("train")[:n]:
            f.write(json.dumps({"id": p.id, "prompt": p.text}) + "\n")


def run_ours(algorithm: str, prompts: Path, pm: Path, warmup: int, out: Path) -> dict:
    from cai_engine.engine import SamplingParams
    from cai_engine.train.config import resolve
    from cai_engine.train.rl import train_rl
    # every answer runs to max_new_tokens, as TRL's do with its EOS off: the same tokens to generate
    original = SamplingParams.__init__

    def no_eos(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.ignore_eos = True
    SamplingParams.__init__ = no_eos
    algorithm, *flags = algorithm.split("+")  # "rloo+ac": with activation checkpointing; "+unshared": see NAMES
    algorithm, _, value_model = algorithm.partition("-")  # "ppo-head": the value head on the policy's trunk
    sets = [f"rl.prompts={prompts}", f"run.dir={out}", f"rl.reward_model={pm}", f"rl.algorithm={algorithm}",
            f"run.activation_checkpointing={'true' if 'ac' in flags else 'false'}",
            f"rl.share_prompts={'false' if 'unshared' in flags else 'true'}",
            f"rl.value_model={value_model or 'critic'}",
            f"rl.prompts_per_batch={PROMPTS}", f"rl.samples_per_prompt={SAMPLES}", f"rl.max_new_tokens={NEW_TOKENS}",
            "precision.mode=bf16-mixed", "checkpoint.keep=1", "rl.kv_cache_mb=256"]
    sets += [f"rl.micro_rows={flag[4:]}" for flag in flags if flag.startswith("rows")]  # "+rows8": 8-row micro-batches
    if algorithm == "rloo":
        sets += ["rl.epochs_per_batch=1", "rl.minibatches=1"]
    config = resolve(overrides=sets)
    train_rl(config, log=lambda _: None, progress=False)
    records = [json.loads(line) for line in open(out / "rl" / "metrics.jsonl")]
    per_iteration = (config.rl.epochs_per_batch * config.rl.minibatches)
    iterations = [records[i:i + per_iteration] for i in range(0, len(records), per_iteration)][warmup:]
    total = [sum(r["seconds"] for r in it) for it in iterations]
    generation = [it[0]["generation_s"] for it in iterations]
    return {"iteration_s": statistics.median(total), "generation_s": statistics.median(generation),
            "peak_rss_mib": records[-1]["peak_memory_mb"], "iterations": len(iterations)}


def run_trl(prompts: Path, pm: Path, warmup: int, iterations: int, out: Path) -> dict:
    import torch
    import transformers
    from datasets import Dataset
    from trl import RLOOConfig, RLOOTrainer

    hf_copy_of_default(out / "hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(out / "hf")
    tokenizer.padding_side = "left"
    policy = transformers.AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32)
    reward = transformers.AutoModelForSequenceClassification.from_pretrained(pm, num_labels=1, dtype=torch.bfloat16)
    reward_tokenizer = transformers.AutoTokenizer.from_pretrained(pm)
    rows = [{"prompt": [{"role": "user", "content": json.loads(line)["prompt"]}]} for line in open(prompts)]
    times: list[float] = []

    config = RLOOConfig(output_dir=str(out / "trl"), per_device_train_batch_size=PROMPTS * SAMPLES,
                        num_generations=SAMPLES, max_completion_length=NEW_TOKENS, max_steps=warmup + iterations,
                        bf16=True, use_cpu=True, learning_rate=1e-6, save_strategy="no", report_to=[],
                        logging_steps=1000, disable_tqdm=True, seed=0, beta=0.05,
                        generation_kwargs={"min_new_tokens": NEW_TOKENS})
    trainer = RLOOTrainer(model=policy, reward_funcs=reward, args=config, train_dataset=Dataset.from_list(rows),
                          processing_class=tokenizer, reward_processing_classes=reward_tokenizer, callbacks=[trainer_step_timer(times)])
    trainer.train()
    return {"iteration_s": statistics.median(times[warmup:]), "generation_s": None,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "iterations": len(times)}


NAMES = {"rloo": "cai_engine RLOO (1 step)", "ppo": "cai_engine PPO (critic, 4 steps)",
         "ppo-head": "cai_engine PPO (value head, 4 steps)", "trl": "TRL RLOOTrainer (its default gradient checkpointing)",
         "ac": "activation checkpointing", "unshared": "one row per answer (rl.share_prompts=false)",
         "retain": "glibc allocator as ours (MALLOC_MMAP_MAX_=0, no trimming)"}


def variant_name(variant: str) -> str:
    base, *flags = variant.split("+")
    return " + ".join([NAMES[base], *(NAMES.get(flag) or f"{flag[4:]}-row micro-batches" for flag in flags)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--variants", default="rloo,rloo+ac,ppo,ppo+ac,ppo-head+ac,trl,trl+retain",
                        help="rloo, ppo (a critic from the PM), ppo-head (a value head on the policy); +ac: with "
                             "activation checkpointing, as TRL does by default; +rowsN: N-row micro-batches (rl.micro_rows); +unshared: each answer its own row "
                             "(the prompt run once per answer); trl, and trl+retain (with glibc's allocator set as "
                             "our trainers set it: see common.RETAIN_FREED_MEMORY)")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--prompts", help=argparse.SUPPRESS)
    parser.add_argument("--pm", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        out = Path(args.out)
        result = (run_trl(Path(args.prompts), Path(args.pm), args.warmup, args.iterations, out)
                  if args.variant.startswith("trl")
                  else run_ours(args.variant, Path(args.prompts), Path(args.pm), args.warmup, out))
        print(json.dumps(result))
        return
    print(f"# RL iteration: {machine_line('cpu')}; {PROMPTS} prompts x {SAMPLES} samples, {NEW_TOKENS} new tokens; "
          f"median of {args.iterations} iterations after {args.warmup} warm-up")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prompts_file(tmp / "prompts.jsonl", PROMPTS * (args.iterations + args.warmup))
        import torch
        from cai_engine.model.heads import RewardModel
        torch.manual_seed(0)
        pm, tok = RewardModel.load("smollm2-135m-instruct")
        pm.save(tmp / "pm", tok)
        del pm
        for variant in args.variants.split(","):
            proc = subprocess.run([sys.executable, __file__, "--variant", variant, "--prompts", str(tmp / "prompts.jsonl"),
                                   "--pm", str(tmp / "pm"), "--out", str(tmp / variant), "--iterations",
                                   str(args.iterations), "--warmup", str(args.warmup)], capture_output=True, text=True,
                                  env=variant_env(variant))
            if proc.returncode:
                print(f"{variant} failed: {proc.stderr.strip().splitlines()[-1]}", flush=True)
                continue
            results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    print("| trainer | s/iteration | generation s | training s | peak RSS MiB | speed vs TRL RLOO (its fastest) | "
          "memory vs TRL (its smallest) |")
    print("|---|---|---|---|---|---|---|")
    trl_time, trl_memory = peer_best(results, "trl", "iteration_s")  # TRL at its best setting for each ratio
    for variant, r in results.items():
        gen = "-" if r["generation_s"] is None else f"{r['generation_s']:.1f}"
        train = "-" if r["generation_s"] is None else f"{r['iteration_s'] - r['generation_s']:.1f}"
        vs = f"{trl_time / r['iteration_s']:.2f}x" if trl_time else "-"
        mem = f"{r['peak_rss_mib'] / trl_memory:.2f}x" if trl_memory else "-"
        print(f"| {variant_name(variant)} | {r['iteration_s']:.1f} | {gen} | {train} | {r['peak_rss_mib']:.0f} | {vs} | {mem} |")


if __name__ == "__main__":
    main()
