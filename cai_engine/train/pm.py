"""Preference-model trainer: comparisons JSONL in, a reward model (HF *ForSequenceClassification) out.

Prefix-shared encoding by default (each prompt encoded once for its K responses), the soft-label pairwise
loss with every prompt counting once, evaluation (pairwise accuracy and the expected calibration error of
the soft labels) before each checkpoint; the loop (accumulation, schedule, bf16-mixed, checkpoints, exact
resume) is the shared one in `loop.py`.
"""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..data.comparisons import Comparison, read_comparisons
from ..model.heads import RewardModel, pack_separate, pack_shared
from ..model.tokenizer import Tokenizer
from ..ops import pairwise_pm_loss
from .config import ConfigError, PMSection, RunConfig
from .loop import (MicroBatchResult, TrainSummary, TrainTask, preflight, run_training,
                   seed_everything, stage_settings)
from .precision import Precision


@dataclass(slots=True)
class TokenizedGroup:
    prompt: list[int]
    responses: list[list[int]]
    pairs: list[tuple[int, int]]
    probs: list[float]


def tokenize(comparisons: Sequence[Comparison], tokenizer: Tokenizer, settings: PMSection) -> list[TokenizedGroup]:
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    out = []
    for c in comparisons:
        prompt = tokenizer.encode(c.prompt)[-settings.max_prompt_tokens:]  # keep the end of a long conversation
        responses = [tokenizer.encode(r, add_special_tokens=False)[: settings.max_response_tokens - len(eos)] + eos
                     for r in c.responses]
        out.append(TokenizedGroup(prompt, responses, list(c.pairs), list(c.probs)))
    return out


def collate(groups: Sequence[TokenizedGroup], pad_id: int, shared: bool):
    pack = pack_shared if shared else pack_separate
    batch = pack([(g.prompt, g.responses) for g in groups], pad_id)
    pairs, probs, group_ids, offset = [], [], [], 0
    for gi, g in enumerate(groups):
        pairs += [(offset + a, offset + b) for a, b in g.pairs]
        probs += g.probs
        group_ids += [gi] * len(g.pairs)
        offset += len(g.responses)
    return (batch, torch.tensor(pairs, dtype=torch.long).reshape(-1, 2), torch.tensor(probs, dtype=torch.float32),
            torch.tensor(group_ids, dtype=torch.long))


def group_loss(model, groups: Sequence[TokenizedGroup], pad_id: int, settings: PMSection, device):
    """Mean loss over the groups (each prompt counts once) and the pairwise metrics."""
    batch, pairs, probs, group = collate(groups, pad_id, settings.prefix_sharing)
    rewards = model(batch.to(device))
    loss, metrics = pairwise_pm_loss(rewards, pairs.to(device), prob=probs.to(device), group=group.to(device),
                                     center_coef=settings.center_coef, reduction="group_mean",
                                     num_groups=len(groups))
    return loss, metrics, rewards, pairs, probs, int(batch.attention_mask.sum())


@torch.no_grad()
def evaluate(model: RewardModel, groups: Sequence[TokenizedGroup], pad_id: int, settings: PMSection, device,
             precision: Precision, bins: int = 10) -> dict:
    predictions, labels, loss_sum = [], [], 0.0
    for i in range(0, len(groups), settings.batch_groups):
        chunk = groups[i:i + settings.batch_groups]
        with precision.autocast(device):
            loss, _, rewards, pairs, probs, _ = group_loss(model, chunk, pad_id, settings, device)
        loss_sum += float(loss) * len(chunk)
        rewards = rewards.float().cpu()
        predictions.append(torch.sigmoid(rewards[pairs[:, 0]] - rewards[pairs[:, 1]]))
        labels.append(probs)
    return {"loss": loss_sum / max(1, len(groups)),
            **calibration(torch.cat(predictions), torch.cat(labels), bins)}


def calibration(pred: torch.Tensor, label: torch.Tensor, bins: int = 10) -> dict:
    """Pairwise accuracy on decisive labels, and expected calibration error of predicted P(i beats j)."""
    decisive = label != 0.5
    correct = ((pred > 0.5) == (label > 0.5)) & decisive
    accuracy = float(correct.sum() / decisive.sum().clamp_min(1))
    which = (pred * bins).long().clamp_(0, bins - 1)
    ece = 0.0
    for b in range(bins):
        selected = which == b
        if selected.any():
            ece += float(selected.float().mean() * (pred[selected].mean() - label[selected].mean()).abs())
    return {"accuracy": accuracy, "ece": ece, "pairs": int(label.numel())}


def split_eval(comparisons: list[Comparison], settings: PMSection, seed: int):
    if settings.eval_data:
        return comparisons, read_comparisons(settings.eval_data)
    order = list(range(len(comparisons)))
    random.Random(seed).shuffle(order)
    n_eval = int(round(len(comparisons) * settings.eval_fraction)) if len(comparisons) > 1 else 0
    if settings.eval_fraction and n_eval >= len(comparisons):
        n_eval = len(comparisons) - 1
    held = set(order[:n_eval])
    return [c for i, c in enumerate(comparisons) if i not in held], [comparisons[i] for i in sorted(held)]



def check_inputs(settings: PMSection) -> None:
    for key in ("data", "eval_data"):
        path = getattr(settings, key)
        if path and not Path(path).is_file():
            raise ConfigError(f"pm.{key} = {path!r}: file not found"
                              + (" (run the feedback stage first, or give --data FILE)" if key == "data" else ""))


def train_pm(config: RunConfig, *, allow_config_change: bool = False, log: Callable[[str], None] = print,
             progress: bool = True) -> TrainSummary:
    settings = config.pm
    if not settings.data:  # the feedback stage's output
        settings = dataclasses.replace(settings, data=str(Path(config.run.dir) / "feedback" / "comparisons.jsonl"))
    check_inputs(settings)
    loop = stage_settings(config, "pm", allow_config_change=allow_config_change, progress=progress)
    device, precision = loop.device, loop.precision
    finished = preflight(loop, log)
    if finished is not None:
        return finished
    train_data, eval_data = split_eval(read_comparisons(settings.data), settings, config.run.seed)
    n_pairs = sum(len(c.pairs) for c in train_data)
    log(f"data: {settings.data}: {len(train_data)} train prompts ({n_pairs} pairs), {len(eval_data)} held out"
        + (f" from {settings.eval_data}" if settings.eval_data else f" ({settings.eval_fraction:.0%} split)"))
    init = settings.init or config.model.name
    log(f"loading {init} ...")
    seed_everything(config.run.seed)  # a new score head is drawn from the seeded RNG
    model, tokenizer = RewardModel.load(init, dtype=torch.float32, device=device)  # fp32 masters
    log(f"loaded {init}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters on {device}")
    train_groups, eval_groups = tokenize(train_data, tokenizer, settings), tokenize(eval_data, tokenizer, settings)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0

    def loss(trained, indices: list[int]) -> MicroBatchResult:
        groups = [train_groups[i] for i in indices]
        mean, metrics, _, _, _, tokens = group_loss(trained, groups, pad, settings, device)
        n = len(groups)
        return MicroBatchResult(mean * n, n, tokens, {"accuracy": float(metrics["accuracy"]) * n,
                                                      "margin": float(metrics["margin"]) * n})

    task = TrainTask(
        name="pm", model=model, num_examples=len(train_groups), micro_batch=settings.batch_groups,
        grad_accum=settings.grad_accum, epochs=settings.epochs, lr=settings.lr, loss=loss,
        export=lambda m, d: m.save(d, tokenizer),
        evaluate=(lambda m: evaluate(m, eval_groups, pad, settings, device, precision)) if eval_groups else None,
        eval_every=settings.eval_every)
    return run_training(task, loop, log)
