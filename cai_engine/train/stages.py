"""The stage runner: each stage of the pipeline as one function of the resolved run config.

critique -> sft -> feedback -> pm -> rl, each writing `<run.dir>/<stage>/` and reading only the files the
stages before it wrote (see PIPELINE.md). The training stages run on the trainer loop; the generation
stages (critique, feedback) append whole records to JSONL and resume after the last one; under torchrun each
rank takes a block of the prompts and rank 0 gathers them in order (`shards.py`). A stage folder made with
another config is refused, naming the keys, unless the change is allowed on purpose.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ..cai import Constitution, CritiqueConfig, run_critique
from ..cai.critique import hh_prompt
from ..cai.feedback import FeedbackConfig, label_pairs
from ..data.prompts import Prompt, load_prompts
from ..engine import LLM, SamplingParams
from ..io import atomic_write_json, atomic_write_text, read_json, read_jsonl
from ..model.loading import load_model
from .config import ConfigError, RunConfig, diff, stage_key
from .distributed import barrier, is_main, world_size
from .precision import resolve_device, sampler_dtype
from .shards import gather, open_shards

STAGES = ("critique", "sft", "feedback", "pm", "rl", "report")


def stage_prompts(path: str, limit: int) -> list[Prompt]:
    prompts = load_prompts(path, split="train")
    return prompts[:limit] if limit else prompts


def check_stage_config(stage_dir: Path, key: dict[str, Any], allow_change: bool, log) -> None:
    """A stage remembers the config its outputs were made with (`stage.json`); another one is refused."""
    path = stage_dir / "stage.json"
    if has_outputs(stage_dir):
        changed = diff(read_json(path)["config"], key)
        if changed and not allow_change:
            raise ConfigError(f"{stage_dir} was made with another config: {'; '.join(changed)}. Use another run "
                              "folder, or --resume-with-new-config to go on with the new values on purpose")
        if changed:
            log(f"{stage_dir}: continuing with a changed config (on purpose): {'; '.join(changed)}")
    barrier()  # every rank has compared the old key before rank 0 replaces it
    if is_main():
        stage_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {"config": key})
    barrier()


def has_outputs(stage_dir: Path) -> bool:
    """Whether a stage wrote anything beyond its `stage.json` (a start that failed on bad input did not)."""
    return (stage_dir / "stage.json").is_file() and any(p.name != "stage.json" for p in stage_dir.iterdir())


def stage_status(run_dir: Path, stage: str, key: dict[str, Any]) -> tuple[str, list[str]]:
    """"new" (nothing written yet), "finished" / "interrupted" (with this config), or "changed" (with the keys)."""
    stage_dir = run_dir / stage
    if not has_outputs(stage_dir):
        return "new", []
    changed = diff(read_json(stage_dir / "stage.json")["config"], key)
    if changed:
        return "changed", changed
    return ("finished" if (stage_dir / "done.json").is_file() else "interrupted"), []


def run_critique_stage(config: RunConfig, *, log: Callable[[str], None], progress: bool = False) -> str:
    s = config.critique
    stage_dir = Path(config.run.dir) / "critique"
    device = resolve_device(config.run.device)
    dtype = sampler_dtype(config.precision.mode, device)
    constitution = Constitution.load(s.constitution)
    prompts = stage_prompts(s.prompts, s.limit)
    out = stage_dir / "revisions.jsonl"
    shards = open_shards(out, [p.id for p in prompts], key_of=lambda record: record["id"])
    if shards.finished:
        return f"critique: all {len(prompts)} prompts already there; records at {out}"
    mine = prompts[shards.items.start:shards.items.stop]
    log(f"critique: {len(prompts)} prompts" + (f" ({len(mine)} per rank)" if shards.world > 1 else "")
        + f", {s.rounds} rounds, constitution {constitution.source or 'ours'}; loading {config.model.name} ...")
    model, tokenizer = load_model(config.model.name, dtype=torch.float32, device=device)
    llm = LLM(model, tokenizer, dtype=dtype, kv_cache_bytes=s.kv_cache_mb << 20)
    settings = CritiqueConfig(rounds=s.rounds, max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                              top_p=s.top_p, seed=config.run.seed, limit=0, revise_only=s.revise_only,
                              few_shot=s.few_shot, batch_size=s.batch_size)
    stats = run_critique(llm, tokenizer, constitution, mine, settings, shards.path,
                         log=lambda m: log(f"critique: {m['prompts_done']}/{m['prompts_total']} prompts"
                                           + (" on rank 0" if shards.world > 1 else "")
                                           + f", prefix-cache hit rate {m['prefix_hit_rate']:.0%}"),
                         model_name=config.model.name, progress=progress and is_main())
    gather(shards)
    ranks = f" on rank 0 of {shards.world}" if shards.world > 1 else ""
    return (f"critique: {stats.prompts} prompts done{ranks} ({stats.skipped} already there), prefix-cache hit rate "
            f"{stats.prefix_hit_rate:.0%}; records at {out}")


def sample_pairs(config: RunConfig, prompts: list[Prompt], log, progress: bool = False) -> list[tuple[str, str, str]]:
    """Two answers per prompt from the SL-CAI model (sharing the prompt's KV blocks), seeded per prompt; under
    torchrun each rank samples its block of the prompts and rank 0 gathers them (`train/shards.py`)."""
    run_dir = Path(config.run.dir)
    path = run_dir / "feedback" / "pairs.jsonl"
    shards = open_shards(path, [hh_prompt(p) for p in prompts], key_of=lambda record: record["prompt"])
    if not shards.complete():  # the pairs of a block are written at once: a shard is whole or absent
        sample_block(config, prompts[shards.items.start:shards.items.stop], shards.path, len(prompts), log,
                     progress=progress and is_main())
    gather(shards)
    return [(d["prompt"], d["responses"][0], d["responses"][1]) for d in read_jsonl(path)]


def sample_block(config: RunConfig, prompts: list[Prompt], path: Path, total: int, log,
                 progress: bool = False) -> None:
    s = config.feedback
    run_dir = Path(config.run.dir)
    policy = s.policy or (str(run_dir / "sft" / "final") if (run_dir / "sft" / "final").is_dir() else config.model.name)
    device = resolve_device(config.run.device)
    log(f"feedback: sampling 2 answers to each of {total} prompts from {policy} ...")
    model, tokenizer = load_model(policy, dtype=torch.float32, device=device)
    llm = LLM(model, tokenizer, dtype=sampler_dtype(config.precision.mode, device), kv_cache_bytes=s.kv_cache_mb << 20)
    params = [SamplingParams(n=2, temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_new_tokens,
                             seed=int.from_bytes(hashlib.sha256(f"{config.run.seed}/{p.id}".encode()).digest()[:7],
                                                 "little")) for p in prompts]
    outputs = llm.generate([p.messages() for p in prompts], params, progress=progress) if prompts else []
    lines = []
    for p, out in zip(prompts, outputs):
        if out.error:
            raise ConfigError(f"feedback: prompt {p.id!r}: {out.error}")
        answers = [c.text.strip() or "(no answer)" for c in out.outputs]
        lines.append({"id": p.id, "prompt": hh_prompt(p), "responses": answers})
    atomic_write_text(path, "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))


def run_feedback_stage(config: RunConfig, *, log: Callable[[str], None], progress: bool) -> str:
    s = config.feedback
    stage_dir = Path(config.run.dir) / "feedback"
    device = resolve_device(config.run.device)
    constitution = Constitution.load(config.critique.constitution)
    prompts = stage_prompts(s.prompts, s.limit)
    pairs = sample_pairs(config, prompts, log, progress)
    out = stage_dir / "comparisons.jsonl"
    shards = open_shards(out, [tuple(pair) for pair in pairs],
                         key_of=lambda record: (record["prompt"], *record["responses"]), unit=s.batch_pairs)
    if shards.finished:
        return f"feedback: all {len(pairs)} pairs already labelled; comparisons at {out}"
    judge = s.feedback_model or config.model.name
    log(f"feedback: judging {len(pairs)} pairs with {judge} ({s.principles_per_pair} principles each"
        + (", both orders" if s.position_swap else "") + (f", {world_size()} ranks" if shards.world > 1 else "") + ")")
    model, tokenizer = load_model(judge, dtype=sampler_dtype(config.precision.mode, device), device=device)
    principles = [(p.id, p.instruction) for p in constitution.comparison_principles]
    few_shot = "".join(e.prompt + e.corrects[0] + "\n\n" for e in constitution.comparison_few_shot)
    settings = FeedbackConfig(principles_per_pair=s.principles_per_pair, position_swap=s.position_swap,
                              chain_of_thought=s.chain_of_thought, clamp_low=s.clamp_low, clamp_high=s.clamp_high,
                              chat_template=s.chat_template, seed=config.run.seed, batch_pairs=s.batch_pairs)
    mine = shards.items
    result = label_pairs(model, tokenizer, pairs[mine.start:mine.stop], principles, few_shot, shards.path, settings,
                         progress=progress and is_main(), first_index=mine.start)
    gather(shards)
    ranks = f" on rank 0 of {shards.world}" if shards.world > 1 else ""
    return (f"feedback: {result['written']} pairs labelled{ranks} ({result['skipped']} already there); "
            f"comparisons at {out}")


def run_stage(stage: str, config: RunConfig, *, allow_config_change: bool, progress: bool,
              log: Callable[[str], None]) -> str:
    """Run one stage: its config checked against the folder's, the work (resumed where it stopped), then
    `done.json` (with the summary line and the seconds) once its outputs are complete."""
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}: expected one of {', '.join(STAGES)}")
    stage_dir = Path(config.run.dir) / stage
    check_stage_config(stage_dir, stage_key(config, stage), allow_config_change, log)
    if is_main():  # the stage is running again (resumed, or on with a changed config): not done until it ends
        (stage_dir / "done.json").unlink(missing_ok=True)
    start = time.perf_counter()
    summary = _STAGE_RUNNERS[stage](config, allow_config_change=allow_config_change, progress=progress, log=log)
    if is_main():
        if (stage_dir / "metrics.jsonl").is_file():  # the training curves, viewable while later stages run
            from .tensorboard_events import write_tensorboard
            write_tensorboard(config.run.dir)
        atomic_write_json(stage_dir / "done.json", {"summary": summary, "seconds": round(time.perf_counter() - start, 2)})
    barrier()
    return summary


def _critique(config: RunConfig, *, allow_config_change: bool, progress: bool, log) -> str:
    return run_critique_stage(config, log=log, progress=progress)


def _feedback(config: RunConfig, *, allow_config_change: bool, progress: bool, log) -> str:
    return run_feedback_stage(config, log=log, progress=progress)


def _sft(config: RunConfig, *, allow_config_change: bool, progress: bool, log) -> str:
    from .sft import train_sft
    summary = train_sft(config, allow_config_change=allow_config_change, progress=progress, log=log)
    if summary.already_finished:
        return f"sft: already finished; model at {summary.final}"
    last = summary.history[-1] if summary.history else {}
    return (f"sft: {summary.steps} steps in {summary.seconds:.1f}s"
            + (f", held-out loss {last['loss']:.4f}" if last else "") + f"; model at {summary.final}")


def _pm(config: RunConfig, *, allow_config_change: bool, progress: bool, log) -> str:
    from .pm import train_pm
    summary = train_pm(config, allow_config_change=allow_config_change, progress=progress, log=log)
    if summary.already_finished:
        return f"pm: already finished; model at {summary.final}"
    last = summary.history[-1] if summary.history else {}
    scores = f", eval accuracy {last['accuracy']:.3f}, ECE {last['ece']:.3f}" if last else ""
    return f"pm: {summary.steps} steps in {summary.seconds:.1f}s{scores}; model at {summary.final}"


def _rl(config: RunConfig, *, allow_config_change: bool, progress: bool, log) -> str:
    from .rl import train_rl
    summary = train_rl(config, allow_config_change=allow_config_change, progress=progress, log=log)
    if summary.already_finished:
        return f"rl: already finished; policy at {summary.final}"
    return f"rl: {summary.steps} optimizer steps in {summary.seconds:.1f}s; policy at {summary.final}"


def _report(config: RunConfig, *, allow_config_change: bool, progress: bool, log) -> str:
    if not is_main():  # under torchrun the report is rank 0's alone (not sharded); the others wait at the barrier
        return "report: written by rank 0"
    from .report import run_report_stage
    return run_report_stage(config, allow_config_change=allow_config_change, progress=progress, log=log)


_STAGE_RUNNERS = {"critique": _critique, "sft": _sft, "feedback": _feedback, "pm": _pm, "rl": _rl,
                  "report": _report}
