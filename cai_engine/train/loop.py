"""The one trainer loop every trainer (PM, SFT, RL) runs on.

A trainer hands the loop a `TrainTask`: its model (fp32 master weights), how many examples there are, and a
function that turns a list of example indices into a summed loss. The loop owns everything else: the data
order (a seeded permutation per epoch, so the position in the data is just the step number), gradient
accumulation, clipping, the warmup + cosine/constant schedule, bf16-mixed autocast, evaluation, metrics,
checkpoints, and exact resume: kill the process at any moment, run the same command again, and the final
weights are bit-identical to an uninterrupted run's.
"""
from __future__ import annotations

import math
import random
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..io import append_jsonl, atomic_write_json, read_json, read_jsonl
from ..model.decoder import Transformer
from . import checkpoints as ckpt
from .allocator import retain_freed_memory
from .config import CheckpointSection, OptimizerSection, RunConfig, diff, stage_key
from .distributed import (all_reduce_sum, barrier, gradient_sync, is_main, is_sharded, rank, shard_optimizer_state,
                          whole_optimizer_state, whole_weights, world_size, wrap_model)
from .optim import lr_factor, make_optimizer, scale_and_clip_
from .precision import Precision, resolve_device, resolve_precision


class TrainingError(RuntimeError):
    """The stage cannot go on (a non-finite loss or gradient, a config that does not match its checkpoint);
    the message names the step and the batch or the keys. The last good checkpoint is left untouched."""


@dataclass(slots=True)
class MicroBatchResult:
    loss: torch.Tensor                 # summed over what `weight` counts; the loop calls backward() on it
    weight: float                      # examples (or tokens) the loss sums over: the step divides by the total
    tokens: int = 0                    # tokens processed, for tokens/s
    metrics: dict[str, float] = field(default_factory=dict)  # sums over the micro-batch, averaged by weight


@dataclass(slots=True)
class TrainTask:
    name: str                                                   # the stage, for logs and metrics
    model: torch.nn.Module                                      # trainable, fp32 master weights
    num_examples: int
    micro_batch: int                                            # examples per micro-batch
    grad_accum: int                                             # micro-batches per optimizer step
    epochs: int
    lr: float                                                   # peak learning rate
    loss: Callable[[torch.nn.Module, list[int]], MicroBatchResult]
    export: Callable[[torch.nn.Module, Path], None]             # write the final model (HF layout) into a folder
    evaluate: Callable[[torch.nn.Module], dict[str, Any]] | None = None
    eval_every: int = 0                                         # optimizer steps; 0 = at the end of each epoch
    # Several optimizer steps on one batch (PPO's epochs of minibatches over one rollout): the batch's examples
    # go to `plan(step, update, examples)`, which returns that update's micro-batches (lists the loss takes).
    updates_per_batch: int = 1
    plan: Callable[[int, int, list[int]], list[list[int]]] | None = None
    # Extra state a checkpoint must hold for exact resume (a rollout buffer, an adaptive coefficient).
    state: Callable[[], dict[str, torch.Tensor]] | None = None
    load_state: Callable[[dict[str, torch.Tensor]], None] | None = None

    @property
    def steps_per_epoch(self) -> int:
        # every example is used every epoch: the last batch of an epoch may hold fewer
        batches = max(1, math.ceil(self.num_examples / (self.micro_batch * self.grad_accum)))
        return batches * self.updates_per_batch

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs


@dataclass(slots=True)
class LoopSettings:
    stage_dir: Path
    device: torch.device
    precision: Precision
    optimizer: OptimizerSection
    checkpoint: CheckpointSection
    seed: int
    config: dict[str, Any]              # the resolved config this stage depends on (compared on resume)
    parallel: str = "ddp"               # under torchrun: ddp or fsdp (run.parallel); checkpoints are the same either way
    activation_checkpointing: bool = False  # recompute each decoder layer in backward (run.activation_checkpointing)
    allow_config_change: bool = False   # resume even though `config` differs from the checkpoint's
    progress: bool = True
    checked: bool = False               # preflight done (trainers call it before loading anything)


def stage_settings(config: RunConfig, stage: str, *, allow_config_change: bool = False,
                   progress: bool = True) -> LoopSettings:
    """The loop settings of one training stage of a run: device and precision resolved, and the part of the
    config its results depend on (model, precision, optimizer, the stage's section, the seed), which a
    resume compares with the checkpoint's."""
    device = resolve_device(config.run.device)
    key = stage_key(config, stage)
    return LoopSettings(stage_dir=Path(config.run.dir) / stage, device=device,
                        precision=resolve_precision(config.precision.mode, device), optimizer=config.optimizer,
                        checkpoint=config.checkpoint, seed=config.run.seed, config=key, parallel=config.run.parallel,
                        activation_checkpointing=config.run.activation_checkpointing,
                        allow_config_change=allow_config_change, progress=progress)


@dataclass(slots=True)
class TrainSummary:
    steps: int
    seconds: float
    final: Path
    history: list[dict[str, Any]]
    resumed_from: Path | None
    already_finished: bool = False


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_order(num_examples: int, seed: int, epoch: int) -> list[int]:
    order = list(range(num_examples))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def step_micro_batches(task: TrainTask, order: list[int], step: int, step_in_epoch: int) -> list[list[int]]:
    """This rank's micro-batches for one optimizer step (ranks take the step's examples in turn)."""
    per_batch = task.micro_batch * task.grad_accum
    batch, update = divmod(step_in_epoch, task.updates_per_batch)
    examples = order[batch * per_batch:(batch + 1) * per_batch]
    if task.plan is not None:
        return task.plan(step, update, examples)
    examples = examples[rank()::world_size()]
    return [examples[i:i + task.micro_batch] for i in range(0, len(examples), task.micro_batch)]


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def disk_plan(task: TrainTask, settings: LoopSettings) -> str:
    """How much disk the stage's checkpoints and final model will take, for the plan printed at start."""
    params = sum(p.numel() for p in task.model.parameters())
    trainable = sum(p.numel() for p in task.model.parameters() if p.requires_grad)
    each = params * 4 + trainable * 12  # the HF export + fp32 masters + two fp32 Adam moments
    kept = min(settings.checkpoint.keep, 1 + (task.total_steps // settings.checkpoint.every
                                               if settings.checkpoint.every else 0))
    final = params * 4
    return (f"{kept} checkpoint(s) of {each / 1e9:.2f} GB kept at once + final model {final / 1e9:.2f} GB "
            f"= {(kept * each + final) / 1e9:.2f} GB at most")


def run_training(task: TrainTask, settings: LoopSettings, log: Callable[[str], None] = print) -> TrainSummary:
    finished = preflight(settings, log)
    if finished is not None:
        return finished
    stage_dir = settings.stage_dir
    metrics_path, summary_path, final_dir = stage_dir / "metrics.jsonl", stage_dir / "summary.json", stage_dir / "final"

    seed_everything(settings.seed)
    model = task.model
    model.train()
    for module in model.modules():  # every decoder the task trains (a policy and its critic alike)
        if isinstance(module, Transformer):
            module.activation_checkpointing = settings.activation_checkpointing
    step, history, resumed_from = 0, [], ckpt.latest(stage_dir)
    if resumed_from is not None:  # into the whole model, before FSDP2 shards it (or DDP copies rank 0's)
        ckpt.load_weights(model, resumed_from)
    trained = wrap_model(model, settings.device, settings.parallel)
    # after the wrap: FSDP2 replaces the parameters by their shards, which the optimizer must hold
    optimizer = make_optimizer(model.parameters(), settings.optimizer, lr=task.lr, device=settings.device)
    if resumed_from is not None:
        state = ckpt.load_training_state(resumed_from, optimizer=optimizer)
        shard_optimizer_state(optimizer)
        if task.load_state is not None:
            task.load_state(ckpt.load_extra(resumed_from))
        step, history = state["step"], state["history"]
        if state["total_steps"] != task.total_steps and not settings.allow_config_change:
            raise TrainingError(f"{resumed_from}: planned {state['total_steps']} steps, now {task.total_steps} "
                                "(the data changed); rerun with --resume-with-new-config to continue anyway")
        log(f"resuming {task.name} from {resumed_from.name} (step {step} of {task.total_steps})")
    if is_main():  # drop the metrics of steps after the checkpoint (they will be redone) and any torn line
        read_jsonl(metrics_path, keep=lambda record: record.get("step", 0) <= step)
    log(f"plan: {task.total_steps} steps ({task.epochs} epoch(s) x {task.steps_per_epoch}) of "
        f"{task.micro_batch} x {task.grad_accum} examples, {task.num_examples} examples; "
        f"checkpoint {'every ' + str(settings.checkpoint.every) + ' steps' if settings.checkpoint.every else 'at the end'}"
        f"; disk: {disk_plan(task, settings)}")

    params = [p for p in model.parameters() if p.requires_grad]
    sharded = is_sharded(model)
    bar = _progress(task, step, settings)
    start = time.perf_counter()

    def save_checkpoint() -> None:
        # under FSDP2 every rank joins the gathers; the files are a single process's either way
        optimizer_state = whole_optimizer_state(optimizer) if is_sharded(model) else None
        with whole_weights(model):
            if is_main():
                state = {"step": step, "total_steps": task.total_steps, "history": history, "config": settings.config}
                extra = task.state() if task.state is not None else None

                def write(directory: Path) -> None:
                    task.export(model, directory)  # a Hugging Face folder: any checkpoint loads and evaluates
                    ckpt.save_training_state(directory, model=model, optimizer=optimizer, state=state, extra=extra,
                                             optimizer_state=optimizer_state)
                ckpt.write_folder(stage_dir, f"{ckpt.PREFIX}{step}", write)
                ckpt.prune(stage_dir, settings.checkpoint.keep)
        barrier()

    try:
        while step < task.total_steps:
            epoch, step_in_epoch = divmod(step, task.steps_per_epoch)
            order = epoch_order(task.num_examples, settings.seed, epoch)
            lr = task.lr * lr_factor(step, schedule=settings.optimizer.schedule,
                                     warmup_steps=settings.optimizer.warmup_steps, total_steps=task.total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            tick = time.perf_counter()
            loss_sum, weight, tokens, examples, sums = 0.0, 0.0, 0, 0, {}
            micro_batches, dummy = step_micro_batches(task, order, step, step_in_epoch), False
            if not micro_batches:  # a rank left without examples still joins the gradient all-reduce, at weight 0
                micro_batches, dummy = [[order[0]]], True
            for index, micro in enumerate(micro_batches):
                # only the last backward of the step reduces gradients over the ranks (every rank makes exactly one)
                with gradient_sync(trained, model, last=index == len(micro_batches) - 1):
                    with settings.precision.autocast(settings.device):
                        result = task.loss(trained, micro)
                    if dummy:
                        result = MicroBatchResult(result.loss * 0.0, 0.0, 0, {k: 0.0 for k in result.metrics})
                    value = float(result.loss.detach())
                    if not math.isfinite(value):
                        raise TrainingError(f"{task.name} step {step + 1}: the loss is {value} on the micro-batch "
                                            f"of examples {micro}; stopped without writing a checkpoint "
                                            f"(the last good one is kept; try a lower lr)")
                    result.loss.backward()
                loss_sum, weight, tokens = loss_sum + value, weight + result.weight, tokens + result.tokens
                examples += 0 if dummy else len(micro)
                for key, v in result.metrics.items():
                    sums[key] = sums.get(key, 0.0) + float(v)
            total_weight = all_reduce_sum(weight)
            scale = world_size() / max(total_weight, 1e-12)  # DDP averages over ranks; we want the sum / weight
            max_norm = settings.optimizer.max_grad_norm or float("inf")
            grad_norm = scale_and_clip_(optimizer, params, scale, max_norm, sharded)
            if not math.isfinite(grad_norm):
                raise TrainingError(f"{task.name} step {step + 1}: the gradient norm is {grad_norm} on the batch of "
                                    f"examples {sum(micro_batches, [])}; stopped without writing a checkpoint "
                                    "(the last good one is kept; try a lower lr)")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            seconds = time.perf_counter() - tick
            record = {"step": step, "epoch": epoch + (step_in_epoch + 1) / task.steps_per_epoch,
                      "loss": all_reduce_sum(loss_sum) / max(total_weight, 1e-12), "lr": lr, "grad_norm": grad_norm,
                      **{k: all_reduce_sum(v) / max(total_weight, 1e-12) for k, v in sums.items()},
                      "examples": int(all_reduce_sum(examples)), "tokens": int(all_reduce_sum(tokens)), "tokens_per_s": all_reduce_sum(tokens) / seconds,
                      "seconds": seconds, "peak_memory_mb": peak_memory_mb(settings.device)}
            end_of_epoch = step % task.steps_per_epoch == 0
            if task.evaluate is not None and ((task.eval_every and step % task.eval_every == 0)
                                              or (not task.eval_every and end_of_epoch)
                                              or step == task.total_steps):
                model.eval()
                result_eval = {"step": step, "epoch": step / task.steps_per_epoch, **task.evaluate(model)}
                model.train()
                # evaluation comes before the checkpoint of the same step, so a resume keeps its history
                if not history or history[-1]["step"] != step:
                    history.append(result_eval)
                record["eval"] = result_eval
                _write(bar, log, f"eval at step {step}: " + ", ".join(
                    f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in result_eval.items()
                    if k not in ("step",)))
            if is_main():
                append_jsonl(metrics_path, record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}")
            if step == task.total_steps or (settings.checkpoint.every and step % settings.checkpoint.every == 0):
                save_checkpoint()
    finally:
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - start
    with whole_weights(model):
        if is_main():
            ckpt.write_folder(stage_dir, "final", lambda d: task.export(model, d))
    if is_main():
        summary = {"finished": True, "steps": step, "seconds": elapsed, "history": history,
                   "config": settings.config}
        atomic_write_json(summary_path, summary)
    barrier()
    return TrainSummary(step, elapsed, final_dir, history, resumed_from)


def preflight(settings: LoopSettings, log: Callable[[str], None] = print) -> TrainSummary | None:
    """What a trainer checks before it loads anything: leftovers of killed writes are removed; a stage that
    finished with this config is not run again (its summary is returned); a run folder made with another
    config is refused, naming the keys that differ, unless the change is allowed on purpose."""
    if settings.checked:
        return None
    settings.checked = True
    stage_dir = settings.stage_dir
    if is_main():
        stage_dir.mkdir(parents=True, exist_ok=True)
        for path in ckpt.clean_stale(stage_dir):
            log(f"removed {path.name}, left by an interrupted write")
    summary_path, final_dir = stage_dir / "summary.json", stage_dir / "final"
    if not (summary_path.is_file() and final_dir.is_dir()):
        last = ckpt.latest(stage_dir)
        if last is not None:
            _check_config(ckpt.read_state(last).get("config", {}), settings, f"checkpoint {last}", log)
        _start(settings, log)
        return None
    summary = read_json(summary_path)
    if not summary.get("finished"):
        return None
    _check_config(summary.get("config", {}), settings, f"finished run in {summary_path.parent}", log)
    if diff(summary.get("config", {}), settings.config):  # allowed on purpose: go on from the last checkpoint
        _start(settings, log)
        return None
    log(f"{summary_path.parent} already finished with this config ({summary['steps']} steps): nothing to do")
    return TrainSummary(summary["steps"], 0.0, final_dir, summary["history"], None, already_finished=True)


def _start(settings: LoopSettings, log: Callable[[str], None]) -> None:
    """The stage will run: say in what precision, and keep freed memory in the process from here on."""
    log(f"precision: {settings.precision.mode} ({settings.precision.reason})")
    log(retain_freed_memory())


def _check_config(saved: dict, settings: LoopSettings, what: str, log) -> None:
    changed = diff(saved, settings.config)
    if not changed:
        return
    if not settings.allow_config_change:
        raise TrainingError(f"the {what} was made with another config: {'; '.join(changed)}. Use another run "
                            "folder, or --resume-with-new-config to go on with the new values on purpose")
    log(f"continuing the {what} with a changed config (on purpose): {'; '.join(changed)}")


def _progress(task: TrainTask, step: int, settings: LoopSettings):
    if not settings.progress or not is_main():
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress bars are a convenience, never a reason to fail
        return None
    return tqdm(total=task.total_steps, initial=step, desc=task.name, unit="step", dynamic_ncols=True)


def _write(bar, log, line: str) -> None:
    if bar is not None and log is print:
        bar.write(line)
    else:
        log(line)
