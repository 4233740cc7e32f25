"""The whole pipeline in one command: critique -> sft -> feedback -> pm -> rl (-> report), one run folder.

Each stage is `stages.run_stage`: it checks its part of the config against its folder's `stage.json`,
resumes where a killed run stopped, and writes `done.json` when its outputs are complete. Here we decide,
before anything runs, what each stage will do:

- new: never started -> run;
- interrupted with this config -> resume (inside the stage: last whole record, or last checkpoint);
- finished with this config -> skip;
- finished or started with another config, or a stage before it is run again -> rerun: the old folder moves
  to `<run>/superseded/` (nothing is deleted), so outputs of two configs never mix.

The plan printed at start gives each stage's work (prompts, tokens to generate, optimizer steps) and a
time estimate from a throughput model calibrated on bench_sampler and bench_e2e, scaled to the machine's class
(see `estimate_seconds`, `machine_speed`).
"""
from __future__ import annotations

import errno
import functools
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..data.prompts import load_prompts
from ..model.loading import parameter_count
from ..ops.backend import cpu_flags
from ..errors import CheckpointError
from ..io import read_json
from .config import RunConfig, stage_key
from .distributed import barrier, is_main
from .precision import resolve_device, resolve_precision
from .stages import STAGES, run_stage, stage_status

model_parameters = functools.lru_cache(maxsize=8)(parameter_count)  # the plan asks twice; a GGUF header takes ~3 s


@dataclass(slots=True)
class Workload:
    """What one stage will do, counted from the config before anything runs (upper bounds for generation)."""
    prompts: int = 0
    generated_tokens: int = 0   # sampled by the engine (at most: answers may stop early)
    scored_tokens: int = 0      # teacher-forced forward passes without gradients (feedback, PM scores)
    trained_tokens: int = 0     # forward + backward through the trained model(s)
    steps: int = 0              # optimizer steps
    model_loads: int = 0
    concurrency: int = 1        # sequences sampled at once (the engine's batch)


@dataclass(slots=True)
class StagePlan:
    stage: str
    action: str                 # run, resume, skip, rerun
    reason: str
    work: Workload
    seconds: float              # estimate


# Typical token counts of the built-in prompts and of a chat template around them (measured on the embedded
# default's tokenizer; only used for estimates).
PROMPT_TOKENS = 48
FEW_SHOT_TOKENS = 600

# Throughput of the embedded default (135M parameters) on the 2-core CPU of bench/RESULTS.md, tokens/s, fitted to
# bench_e2e's stage times at 24e70da (232 s for the default preset; the constants of 9088a29 planned 602 s).
# Sampling: the rate of c concurrent sequences is modelled as SAMPLE_RATE_ONE * c / (1 + (c - 1) /
# SAMPLE_HALF_BATCH) (the shape bench_sampler measured at batch 1 and 32), scaled to the critique stage (pure
# generation, 16 at a time). Scoring (teacher-forced, no gradients) from the feedback and report stages, training
# from SFT and PM. Other models scale by their parameter count; CUDA by an uncalibrated factor.
SAMPLE_RATE_ONE = 42.5
SAMPLE_HALF_BATCH = 30.0
SCORE_RATE = 6000.0
TRAIN_RATE = 700.0
LOAD_SECONDS = 4.0
CUDA_SPEEDUP = 30.0
# Those rates are a 2-vCPU Sapphire Rapids VM's (AMX tiles). On a 2-vCPU AMD Zen 4 (AVX512-BF16, no AMX) the
# default preset took 422 s against the 226 s they plan (386834f, bench/RESULTS.md; each stage 1.5-2.2x): its
# bf16 GEMMs run at a fifth of AMX's rate, the memory-bound rest at about the same speed.
NO_AMX_SLOWDOWN = 1.87
# On a 2-vCPU AMD Zen 3 (AVX2, no bf16 units, where `auto` trains and samples in fp32) it took 1,887 s against
# the same 226 s (bench/RESULTS.md): its fp32 GEMMs run at a third of Zen 4's bf16 rate, its sampling slower still.
FP32_AVX2_SLOWDOWN = 8.35
REFERENCE_PARAMETERS = 135e6
FLOOR_PARAMETERS = 20e6  # below this, per-token overheads dominate: a tiny model is not faster than this


def workload(config: RunConfig, stage: str, num_prompts: int) -> Workload:
    """Counts from the config: `num_prompts` is the size of the stage's prompt set before its limit."""
    def limited(limit: int) -> int:
        return min(limit, num_prompts) if limit else num_prompts

    if stage == "critique":
        s = config.critique
        n = limited(s.limit)
        generations = n * (1 + s.rounds * (1 if s.revise_only else 2))
        return Workload(prompts=n, generated_tokens=generations * s.max_new_tokens, model_loads=1,
                        concurrency=min(s.batch_size, n))
    if stage == "sft":
        s = config.sft
        n = limited(config.critique.limit) * (config.critique.rounds if s.targets == "all" else 1)
        tokens = (n - round(n * s.eval_fraction)) * (PROMPT_TOKENS + config.critique.max_new_tokens)
        per_step = s.max_seq_len * s.batch_rows * s.grad_accum
        return Workload(prompts=n, trained_tokens=tokens * s.epochs, model_loads=1,
                        steps=s.epochs * max(1, math.ceil(tokens / per_step)))
    if stage == "feedback":
        s = config.feedback
        n = limited(s.limit)
        questions = n * s.principles_per_pair * (2 if s.position_swap else 1)
        per_question = PROMPT_TOKENS + 2 * s.max_new_tokens + 64  # the few-shot prefix is shared, scored once
        return Workload(prompts=n, generated_tokens=2 * n * s.max_new_tokens, model_loads=2,
                        scored_tokens=questions * per_question + FEW_SHOT_TOKENS, concurrency=2 * n)
    if stage == "pm":
        s = config.pm
        pairs = limited(config.feedback.limit)
        n = pairs - round(pairs * s.eval_fraction)
        tokens = n * (PROMPT_TOKENS + 2 * config.feedback.max_new_tokens)
        return Workload(prompts=n, trained_tokens=tokens * s.epochs, model_loads=1,
                        steps=s.epochs * max(1, math.ceil(n / (s.batch_groups * s.grad_accum))))
    if stage == "rl":
        s = config.rl
        n = limited(s.limit)
        answers = s.epochs * n * s.samples_per_prompt
        tokens = answers * (PROMPT_TOKENS + s.max_new_tokens)
        batches = s.epochs * math.ceil(n / s.prompts_per_batch)
        # per rollout: the reference and the PM score (no gradients); the policy (+ critic) trains
        critic = 2 if s.algorithm == "ppo" and s.value_model == "critic" else 1
        return Workload(prompts=n, generated_tokens=answers * s.max_new_tokens, scored_tokens=2 * tokens,
                        trained_tokens=critic * tokens * s.epochs_per_batch, model_loads=3,
                        steps=batches * s.epochs_per_batch * s.minibatches,
                        concurrency=min(n, s.prompts_per_batch) * s.samples_per_prompt)
    if stage == "report":
        s = config.report
        n = num_prompts if not s.limit else min(num_prompts, 2 * s.limit)
        return Workload(prompts=n, generated_tokens=3 * n * s.max_new_tokens, model_loads=5,
                        scored_tokens=3 * n * (PROMPT_TOKENS + s.max_new_tokens)
                        + 2 * 2 * n * (PROMPT_TOKENS + 2 * s.max_new_tokens), concurrency=min(s.batch_size, n))
    raise ValueError(f"unknown stage {stage!r}")


def machine_speed(device: torch.device, precision_mode: str) -> tuple[float, str]:
    """This machine's speed against the calibration VM's (the rates above), and what the figure rests on."""
    if device.type == "cuda":
        return CUDA_SPEEDUP, f"CPU calibration x{CUDA_SPEEDUP:g}, not GPU-calibrated"
    flags = cpu_flags()
    bf16_units = flags is not None and bool({"amx_bf16", "avx512_bf16"} & flags)
    if resolve_precision(precision_mode, device).mode == "fp32":
        if flags is not None and not bf16_units:
            return 1 / FP32_AVX2_SLOWDOWN, "calibrated on a 2-vCPU AMD Zen 3 in fp32, no bf16 units"
        return 1 / FP32_AVX2_SLOWDOWN, "fp32: not calibrated on this CPU, a 2-vCPU AMD Zen 3's fp32 figures"
    if bf16_units and "amx_bf16" in flags:
        return 1.0, "calibrated on a 2-vCPU Sapphire Rapids, AMX"
    if bf16_units:
        return 1 / NO_AMX_SLOWDOWN, "calibrated on a 2-vCPU AMD Zen 4, AVX512-BF16"
    # bf16 asked for where oneDNN emulates it: its GEMMs run at a fifth of fp32's there
    return 1 / FP32_AVX2_SLOWDOWN, "bf16 on a CPU without bf16 units: not calibrated, expect several times longer"


def estimate_seconds(work: Workload, parameters: int, speed: float) -> float:
    """Seconds for a stage's work with a model of `parameters`, on a machine `speed` times the calibration VM's."""
    scale = max(parameters, FLOOR_PARAMETERS) / REFERENCE_PARAMETERS
    c = max(work.concurrency, 1)
    sample_rate = SAMPLE_RATE_ONE * c / (1 + (c - 1) / SAMPLE_HALF_BATCH)
    compute = (work.generated_tokens / sample_rate + work.scored_tokens / SCORE_RATE
               + work.trained_tokens / TRAIN_RATE)
    return (compute * scale + work.model_loads * LOAD_SECONDS * max(scale, 0.3)) / speed


def stage_prompt_count(config: RunConfig, stage: str) -> int:
    path = {"critique": config.critique.prompts, "sft": config.critique.prompts, "feedback": config.feedback.prompts,
            "pm": config.feedback.prompts, "rl": config.rl.prompts}.get(stage)
    if stage == "report":
        return len(load_prompts(config.report.prompts, split="held-out"))
    return len(load_prompts(path or "", split="train"))


# models a stage reads besides model.name, when set (empty = an earlier stage's output or model.name)
MODEL_KEYS = {"feedback": ("feedback.policy", "feedback.feedback_model"), "pm": ("pm.init",),
              "rl": ("rl.policy", "rl.reward_model")}


def check_models(config: RunConfig, stages: list[str]) -> None:
    """Every model the selected stages name must load, checked before the first stage starts."""
    model_parameters(config.model.name)
    for stage in stages:
        for key in MODEL_KEYS.get(stage, ()):
            section, name = key.split(".")
            value = getattr(getattr(config, section), name)
            if value:
                try:
                    model_parameters(value)
                except CheckpointError as e:
                    raise CheckpointError(f"{key}: {e}") from None


def plan_pipeline(config: RunConfig, stages: list[str]) -> list[StagePlan]:
    check_models(config, stages)
    run_dir = Path(config.run.dir)
    device = resolve_device(config.run.device)
    parameters = model_parameters(config.model.name)
    speed, _ = machine_speed(device, config.precision.mode)
    plans, earlier_reruns = [], []
    for stage in stages:
        status, changed = stage_status(run_dir, stage, stage_key(config, stage))
        if status == "new":
            action, reason = "run", "not started"
        elif changed:
            action, reason = "rerun", "config changed: " + "; ".join(changed)
        elif earlier_reruns:
            action, reason = "rerun", f"{earlier_reruns[0]} runs again, so its outputs change"
        elif status == "finished":
            action, reason = "skip", "finished with this config"
        else:
            action, reason = "resume", "interrupted: goes on from its last record or checkpoint"
        if action in ("run", "rerun", "resume"):
            earlier_reruns.append(stage)
        work = workload(config, stage, stage_prompt_count(config, stage))
        seconds = 0.0 if action == "skip" else estimate_seconds(work, parameters, speed)
        plans.append(StagePlan(stage, action, reason, work, seconds))
    return plans


def describe_plan(config: RunConfig, plans: list[StagePlan]) -> str:
    device = resolve_device(config.run.device)
    lines = [f"plan: run folder {config.run.dir}, model {config.model.name} "
             f"({model_parameters(config.model.name) / 1e6:.1f}M parameters), device {device}, seed {config.run.seed}"]
    for p in plans:
        w = p.work
        parts = [f"{w.prompts} prompts" if w.prompts else ""]
        if w.generated_tokens:
            parts.append(f"<= {w.generated_tokens:,} tokens to generate")
        if w.scored_tokens:
            parts.append(f"~{w.scored_tokens:,} tokens to score")
        if w.steps:
            parts.append(f"~{w.steps} optimizer steps over ~{w.trained_tokens:,} tokens")
        work = ", ".join(x for x in parts if x)
        when = "-" if p.action == "skip" else _duration(p.seconds)
        lines.append(f"  {p.stage:<9} {p.action:<7} {when:>8}  {work}  ({p.reason})")
    total = sum(p.seconds for p in plans)
    _, basis = machine_speed(device, config.precision.mode)
    lines.append(f"  total ~{_duration(total)} (estimates {basis}; generation lengths are upper bounds)")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f}s"
    return f"{seconds / 60:.1f}min"


def disk_needed(config: RunConfig, plans: list[StagePlan], parameters: int) -> int:
    """Bytes the training stages still to run will write at most: kept checkpoints (the HF export, fp32
    masters, two Adam moments) and the final fp32 model; the generation stages' JSONL is small beside them."""
    total = 0
    for plan in plans:
        if plan.action == "skip" or plan.stage not in ("sft", "pm", "rl"):
            continue
        every = config.checkpoint.every
        kept = min(config.checkpoint.keep, 1 + (plan.work.steps // every if every else 0))
        models = 2 if plan.stage == "rl" and config.rl.value_model == "critic" else 1
        total += models * parameters * (kept * 16 + 4)
    return total


def check_disk(config: RunConfig, plans: list[StagePlan], parameters: int) -> None:
    """Refuse before any work when the run folder's disk cannot hold what the plan will write."""
    folder = Path(config.run.dir).resolve()
    while not folder.exists():
        folder = folder.parent
    need, free = disk_needed(config, plans, parameters), shutil.disk_usage(folder).free
    if need > free:
        raise OSError(errno.ENOSPC, f"{config.run.dir}: the plan writes up to {need / 1e9:.2f} GB of checkpoints "
                                    f"and models, and {folder} has {free / 1e9:.2f} GB free (lower "
                                    "checkpoint.keep, or use another --run-dir)")


def supersede(stage_dir: Path, log: Callable[[str], None]) -> None:
    """Move a stale stage folder to `<run>/superseded/<stage>-<time>/`: never deleted, never mixed."""
    if not stage_dir.exists():
        return
    target = stage_dir.parent / "superseded" / f"{stage_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    target.parent.mkdir(parents=True, exist_ok=True)
    while target.exists():
        target = target.with_name(target.name + "+")
    os.rename(stage_dir, target)
    log(f"{stage_dir.name}: the old outputs moved to {target}")


def run_pipeline(config: RunConfig, stages: list[str], *, dry_run: bool, progress: bool,
                 log: Callable[[str], None]) -> list[StagePlan]:
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"--stages: unknown stage {unknown[0]!r}; expected some of {','.join(STAGES)}")
    stages = [s for s in STAGES if s in stages]  # always in pipeline order
    plans = plan_pipeline(config, stages)
    log(describe_plan(config, plans))
    check_disk(config, plans, model_parameters(config.model.name))
    if dry_run:
        return plans
    run_dir = Path(config.run.dir)
    for index, plan in enumerate(plans, 1):
        prefix = f"[{index}/{len(plans)}] {plan.stage}"
        if plan.action == "skip":
            log(f"{prefix}: skipped, {read_json(run_dir / plan.stage / 'done.json')['summary']}")
            continue
        if plan.action == "rerun":
            log(f"{prefix}: runs again ({plan.reason})")
            if is_main():
                supersede(run_dir / plan.stage, log)
            barrier()
        else:
            log(f"{prefix}: {'resuming' if plan.action == 'resume' else 'starting'} (estimate {_duration(plan.seconds)})")
        start = time.perf_counter()
        summary = run_stage(plan.stage, config, allow_config_change=False, progress=progress, log=log)
        log(f"{prefix} done in {_duration(time.perf_counter() - start)}: {summary}")
    return plans
