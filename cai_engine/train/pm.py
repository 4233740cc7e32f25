"""Preference-model trainer: JSONL comparisons in, a reward model (HF layout + head) out.

Prefix-shared encoding by default (each prompt encoded once for its K responses), soft-label pairwise
loss with every prompt counting once (group_mean), AdamW (or bitsandbytes 8-bit AdamW on CUDA),
gradient accumulation, cosine or constant schedule, evaluation each epoch (pairwise accuracy and the
expected calibration error of the soft labels), atomic checkpoints every N steps, resume.
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Sequence

import torch

from ..io import atomic_write_json
from ..model.loading import DEFAULT_MODEL
from ..ops import pairwise_pm_loss
from ..data.comparisons import Comparison, read_comparisons
from ..model.heads import PackedBatch, RewardModel, pack_separate, pack_shared
from ..model.tokenizer import Tokenizer
from .optim import (latest_checkpoint, load_optimizer, make_optimizer, make_schedule, read_trainer_state,
                    save_optimizer, write_checkpoint)


@dataclass(slots=True)
class PMConfig:
    data: str = ""
    output_dir: str = "runs/pm"
    model: str = DEFAULT_MODEL
    eval_data: str | None = None
    eval_fraction: float = 0.1
    epochs: int = 1
    batch_groups: int = 4            # prompts per micro-batch
    grad_accum: int = 1
    lr: float = 1e-5
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup_steps: int = 0
    optimizer: str = "adamw"
    max_grad_norm: float = 1.0
    center_coef: float = 0.0
    max_prompt_tokens: int = 1024
    max_response_tokens: int = 512
    prefix_sharing: bool = True
    checkpoint_every: int = 0        # optimizer steps; 0 = only at the end
    seed: int = 0
    device: str | None = None
    dtype: str | None = None
    resume: bool = True


@dataclass(slots=True)
class TokenizedGroup:
    prompt: list[int]
    responses: list[list[int]]
    pairs: list[tuple[int, int]]
    probs: list[float]


def tokenize(comps: Sequence[Comparison], tok: Tokenizer, cfg: PMConfig) -> list[TokenizedGroup]:
    eos = [tok.eos_id] if tok.eos_id is not None else []
    out = []
    for c in comps:
        prompt = tok.encode(c.prompt)[-cfg.max_prompt_tokens:]  # keep the end of a long conversation
        responses = [tok.encode(r, add_special_tokens=False)[: cfg.max_response_tokens - len(eos)] + eos
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


def pm_step_loss(model: RewardModel, groups, pad_id: int, cfg: PMConfig, device):
    batch, pairs, probs, group = collate(groups, pad_id, cfg.prefix_sharing)
    rewards = model(batch.to(device))
    return pairwise_pm_loss(rewards, pairs.to(device), prob=probs.to(device), group=group.to(device),
                            center_coef=cfg.center_coef, reduction="group_mean", num_groups=len(groups))


@torch.no_grad()
def evaluate(model: RewardModel, groups: Sequence[TokenizedGroup], pad_id: int, cfg: PMConfig, device,
             bins: int = 10) -> dict:
    model.eval()
    preds, labels, losses = [], [], []
    for i in range(0, len(groups), cfg.batch_groups):
        chunk = groups[i:i + cfg.batch_groups]
        batch, pairs, probs, group = collate(chunk, pad_id, cfg.prefix_sharing)
        rewards = model(batch.to(device)).cpu()
        loss, _ = pairwise_pm_loss(rewards, pairs, prob=probs, group=group, reduction="group_mean",
                                   num_groups=len(chunk))
        losses.append(float(loss) * len(chunk))
        preds.append(torch.sigmoid(rewards[pairs[:, 0]] - rewards[pairs[:, 1]]))
        labels.append(probs)
    model.train()
    pred, label = torch.cat(preds), torch.cat(labels)
    return {"loss": sum(losses) / max(1, len(groups)), **calibration(pred, label, bins)}


def calibration(pred: torch.Tensor, label: torch.Tensor, bins: int = 10) -> dict:
    """Pairwise accuracy on decisive labels, and expected calibration error of predicted P(i beats j)."""
    decisive = label != 0.5
    correct = ((pred > 0.5) == (label > 0.5)) & decisive
    accuracy = float(correct.sum() / decisive.sum().clamp_min(1))
    which = (pred * bins).long().clamp_(0, bins - 1)
    ece = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            ece += float(sel.float().mean() * (pred[sel].mean() - label[sel].mean()).abs())
    return {"accuracy": accuracy, "ece": ece, "pairs": int(label.numel())}


def split_eval(comps: list[Comparison], cfg: PMConfig) -> tuple[list[Comparison], list[Comparison]]:
    if cfg.eval_data:
        return comps, read_comparisons(cfg.eval_data)
    order = list(range(len(comps)))
    random.Random(cfg.seed).shuffle(order)
    n_eval = int(round(len(comps) * cfg.eval_fraction)) if len(comps) > 1 else 0
    held = set(order[:n_eval])
    return [c for i, c in enumerate(comps) if i not in held], [comps[i] for i in sorted(held)]


def train_pm(cfg: PMConfig, log=print) -> dict:
    if not cfg.data:
        raise ValueError("PMConfig.data: a JSONL file of comparisons is required")
    torch.manual_seed(cfg.seed)
    out = Path(cfg.output_dir)
    train_comps, eval_comps = split_eval(read_comparisons(cfg.data), cfg)
    resume_from = latest_checkpoint(out) if cfg.resume else None
    dtype = getattr(torch, cfg.dtype) if cfg.dtype else None
    model, tok = RewardModel.load(resume_from or cfg.model, dtype=dtype, device=cfg.device)
    device = model.backbone.device
    model.train()
    train_groups, eval_groups = tokenize(train_comps, tok, cfg), tokenize(eval_comps, tok, cfg)
    steps_per_epoch = max(1, len(train_groups) // (cfg.batch_groups * cfg.grad_accum))
    total_steps = steps_per_epoch * cfg.epochs
    opt = make_optimizer(model.parameters(), name=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay,
                         device=device)
    step, history = 0, []
    if resume_from is not None:
        state = read_trainer_state(resume_from)
        load_optimizer(opt, resume_from)
        step, history = state["step"], state["history"]
        log(f"resumed from {resume_from} at step {step}")
    sched = make_schedule(opt, name=cfg.schedule, warmup_steps=cfg.warmup_steps, total_steps=total_steps,
                          last_step=step - 1)

    def checkpoint(name: str) -> Path:
        def write(d: Path):
            model.save(d, tok)
            save_optimizer(opt, d)
            atomic_write_json(d / "trainer_state.json", {"step": step, "history": history, "config": asdict(cfg)})
        return write_checkpoint(out, name, write)

    pad = tok.pad_id if tok.pad_id is not None else 0
    micro = cfg.batch_groups
    start = time.perf_counter()
    for epoch in range(step // steps_per_epoch, cfg.epochs):
        order = list(range(len(train_groups)))
        random.Random(cfg.seed + epoch).shuffle(order)
        for s in range(step - epoch * steps_per_epoch, steps_per_epoch):
            metrics = []
            for a in range(cfg.grad_accum):
                first = (s * cfg.grad_accum + a) * micro
                groups = [train_groups[i] for i in order[first:first + micro]]
                loss, m = pm_step_loss(model, groups, pad, cfg, device)
                (loss / cfg.grad_accum).backward()
                metrics.append((float(loss.detach()), float(m["accuracy"])))
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            loss_v = sum(x for x, _ in metrics) / len(metrics)
            acc_v = sum(y for _, y in metrics) / len(metrics)
            log(f"step {step}/{total_steps} loss {loss_v:.4f} acc {acc_v:.3f} lr {sched.get_last_lr()[0]:.2e}")
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total_steps:
                checkpoint(f"checkpoint-{step}")
        if eval_groups:
            result = {"epoch": epoch + 1, "step": step, **evaluate(model, eval_groups, pad, cfg, device)}
            history.append(result)
            log(f"eval epoch {epoch + 1}: " + json.dumps(result))
    checkpoint(f"checkpoint-{step}")
    final = checkpoint("final")
    elapsed = time.perf_counter() - start
    summary = {"steps": step, "seconds": elapsed, "final": str(final), "history": history}
    atomic_write_json(out / "summary.json", summary)
    return summary


def config_from_args(values: dict) -> PMConfig:
    known = {f.name for f in fields(PMConfig)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown PM options: {sorted(unknown)}")
    return PMConfig(**values)
