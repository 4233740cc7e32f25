"""SFT trainer (SL-CAI): finetune on prompt -> revised answer, loss on the answer's tokens only.

Examples come from the critique stage's `revisions.jsonl` (the final revision, or every revision) and,
optionally, a JSONL of helpfulness samples (`prompt` or `messages`, and `response`), as the paper mixes
both. Each example is the chat-templated conversation up to the assistant turn, then the answer and EOS;
examples are packed into rows of `max_seq_len` tokens with segment ids (attention and positions restart at
every example, so nothing leaks between them). The loss reads the hidden states at the answer positions
only and scores them with the fused log-prob op (never the [tokens x vocab] logits); the step's loss is
the mean over its answer tokens. The loop (bf16-mixed, accumulation, schedule, exact resume) is `loop.py`.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..data.comparisons import DataError
from ..io import read_jsonl
from ..model.loading import load_model, save_model
from ..model.tokenizer import Tokenizer
from ..ops import token_logprobs
from .config import ConfigError, RunConfig
from .loop import (MicroBatchResult, TrainSummary, TrainTask, preflight, run_training,
                   seed_everything, stage_settings)
from .precision import Precision


@dataclass(slots=True)
class SFTExample:
    messages: list[dict[str, str]]   # the conversation up to (not including) the answer
    response: str


@dataclass(slots=True)
class TokenizedExample:
    tokens: list[int]
    first_target: int                # index of the first answer token (the loss covers tokens[first_target:])


@dataclass(slots=True)
class PackedRow:
    tokens: list[int]
    positions: list[int]
    segments: list[int]              # 1, 2, ... per example; 0 = padding
    targets: list[int]               # indices t whose next token tokens[t + 1] is an answer token


def examples_from_revisions(path: str | Path, *, targets: str, skip_flags: Sequence[str]) -> tuple[list[SFTExample], int]:
    """Prompt -> final revision (targets="final") or -> every revision ("all"); an answer flagged with any of
    `skip_flags` is left out. Returns the examples and how many records lost an answer that way."""
    records = read_jsonl(path)
    if not records:
        raise DataError(f"{path}: no records")
    examples, skipped = [], 0
    for lineno, record in enumerate(records, start=1):
        prompt, final = record.get("prompt"), record.get("final")
        if not isinstance(prompt, str) or not isinstance(final, str):
            raise DataError(f"{path}: record {lineno}: expected 'prompt' and 'final' strings (a critique record)")
        flags = record.get("flags") or {}
        rounds = record.get("rounds") or []
        # a flag names the generations it applies to ("initial", "critique 2", "revision 2"): only the flags of
        # the answers trained on count (a critique cut at max tokens can still lead to a sound revision)
        if targets == "final":
            answers = [(final, f"revision {len(rounds)}" if rounds else "initial")]
        else:
            answers = [(r.get("revision", ""), f"revision {i}") for i, r in enumerate(rounds, 1)] or [(final, "initial")]
        kept = [a for a, where in answers if not any(where in flags.get(flag, ()) for flag in skip_flags)]
        if len(kept) < len(answers):
            skipped += 1
        context = [m for m in record.get("context") or [] if isinstance(m, dict)]
        messages = context + [{"role": "user", "content": prompt}]
        examples += [SFTExample(messages, a) for a in kept if a.strip()]
    return examples, skipped


def examples_from_chat_file(path: str | Path) -> list[SFTExample]:
    """Helpfulness samples: {"prompt": str | "messages": [...], "response": str} per line."""
    examples = []
    for lineno, record in enumerate(read_jsonl(path), start=1):
        response = record.get("response")
        if "messages" in record:
            messages = record["messages"]
            if not (isinstance(messages, list) and all(isinstance(m, dict) and "role" in m and "content" in m
                                                       for m in messages)):
                raise DataError(f"{path}: record {lineno}: 'messages' must be a list of {{role, content}}")
        elif isinstance(record.get("prompt"), str):
            messages = [{"role": "user", "content": record["prompt"]}]
        else:
            raise DataError(f"{path}: record {lineno}: expected 'prompt' (string) or 'messages'")
        if not isinstance(response, str) or not response.strip():
            raise DataError(f"{path}: record {lineno}: expected a non-empty 'response' string")
        examples.append(SFTExample(messages, response))
    return examples


def tokenize(example: SFTExample, tokenizer: Tokenizer, max_seq_len: int) -> TokenizedExample:
    prompt = tokenizer.encode(tokenizer.apply_chat_template(example.messages, add_generation_prompt=True),
                              add_special_tokens=False)
    answer = tokenizer.encode(example.response, add_special_tokens=False)
    if tokenizer.eos_id is not None:
        answer = answer + [tokenizer.eos_id]
    answer = answer[: max_seq_len - 1]
    prompt = prompt[-(max_seq_len - len(answer)):]  # keep the end of a long conversation
    return TokenizedExample(prompt + answer, len(prompt))


def pack(sequences: Sequence[TokenizedExample], max_seq_len: int) -> list[PackedRow]:
    """First-fit packing in data order: deterministic, rows of at most max_seq_len tokens."""
    rows: list[PackedRow] = []
    for seq in sequences:
        row = next((r for r in rows if len(r.tokens) + len(seq.tokens) <= max_seq_len), None)
        if row is None:
            row = PackedRow([], [], [], [])
            rows.append(row)
        start, segment = len(row.tokens), (row.segments[-1] if row.segments else 0) + 1
        row.tokens += seq.tokens
        row.positions += range(len(seq.tokens))
        row.segments += [segment] * len(seq.tokens)
        row.targets += [start + t - 1 for t in range(max(seq.first_target, 1), len(seq.tokens))]
    return rows


def collate(rows: Sequence[PackedRow], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(r.tokens) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    positions = torch.zeros_like(ids)
    segments = torch.zeros_like(ids)
    flat_targets, labels = [], []
    for b, r in enumerate(rows):
        n = len(r.tokens)
        ids[b, :n], positions[b, :n], segments[b, :n] = (torch.tensor(r.tokens), torch.tensor(r.positions),
                                                        torch.tensor(r.segments))
        flat_targets += [b * width + t for t in r.targets]
        labels += [r.tokens[t + 1] for t in r.targets]
    return {"input_ids": ids, "position_ids": positions, "segment_ids": segments,
            "targets": torch.tensor(flat_targets, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long)}


def answer_logprobs(trained, head: torch.Tensor | Callable[[], torch.Tensor], batch: dict[str, torch.Tensor],
                    precision: Precision, device) -> torch.Tensor:
    """log p(answer token) at every target position: hidden states of those positions only, fused op. `head`: the
    LM head weight, or a function that reads it after the forward (FSDP2 holds it whole only from then on)."""
    hidden = trained(batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device),
                     segment_ids=batch["segment_ids"].to(device))
    hidden = hidden.reshape(-1, hidden.shape[-1])[batch["targets"].to(device)]
    hidden, weight = precision.op_inputs(hidden, head() if callable(head) else head)
    logprobs, _ = token_logprobs(hidden, weight, batch["labels"].to(device))
    return logprobs



def default_revisions(config: RunConfig) -> Path:
    return Path(config.run.dir) / "critique" / "revisions.jsonl"


def train_sft(config: RunConfig, *, allow_config_change: bool = False, log: Callable[[str], None] = print,
              progress: bool = True) -> TrainSummary:
    settings = config.sft
    data = Path(settings.data) if settings.data else default_revisions(config)
    if not data.is_file():
        raise ConfigError(f"sft.data = {str(data)!r}: file not found (run the critique stage first, or give "
                          "--data FILE)")
    if settings.helpful_data and not Path(settings.helpful_data).is_file():
        raise ConfigError(f"sft.helpful_data = {settings.helpful_data!r}: file not found")
    loop = stage_settings(config, "sft", allow_config_change=allow_config_change, progress=progress)
    device, precision = loop.device, loop.precision
    finished = preflight(loop, log)
    if finished is not None:
        return finished
    examples, skipped = examples_from_revisions(data, targets=settings.targets, skip_flags=settings.skip_flags)
    helpful = examples_from_chat_file(settings.helpful_data) if settings.helpful_data else []
    log(f"data: {len(examples)} revision examples from {data} ({skipped} flagged records skipped)"
        + (f", {len(helpful)} helpfulness examples from {settings.helpful_data}" if helpful else ""))
    examples += helpful
    if not examples:
        raise DataError(f"{data}: no usable examples (all records flagged or empty)")
    order = list(range(len(examples)))
    random.Random(config.run.seed).shuffle(order)
    n_eval = int(round(len(examples) * settings.eval_fraction)) if len(examples) > 1 else 0
    held = set(order[:min(n_eval, len(examples) - 1)])
    log(f"loading {config.model.name} ...")
    seed_everything(config.run.seed)
    model, tokenizer = load_model(config.model.name, dtype=torch.float32, device=device)  # fp32 masters
    sequences = [tokenize(e, tokenizer, settings.max_seq_len) for e in examples]
    train_rows = pack([s for i, s in enumerate(sequences) if i not in held], settings.max_seq_len)
    eval_rows = pack([s for i, s in enumerate(sequences) if i in held], settings.max_seq_len)
    answer_tokens = sum(len(r.targets) for r in train_rows)
    log(f"{len(examples) - len(held)} train / {len(held)} held-out examples; packed into {len(train_rows)} rows of "
        f"<= {settings.max_seq_len} tokens ({answer_tokens} answer tokens)")
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0

    def loss(trained, indices: list[int]) -> MicroBatchResult:
        batch = collate([train_rows[i] for i in indices], pad)
        logprobs = answer_logprobs(trained, lambda: model.lm_head, batch, precision, device)
        # tokens: real ones only (padding of the shorter rows is not work done)
        return MicroBatchResult(-logprobs.sum(), float(logprobs.numel()), int((batch["segment_ids"] > 0).sum()))

    @torch.no_grad()
    def evaluate(m) -> dict[str, Any]:
        total, count = 0.0, 0
        for i in range(0, len(eval_rows), settings.batch_rows):
            batch = collate(eval_rows[i:i + settings.batch_rows], pad)
            with precision.autocast(device):
                logprobs = answer_logprobs(m, lambda: m.lm_head, batch, precision, device)
            total, count = total - float(logprobs.sum()), count + logprobs.numel()
        return {"loss": total / max(count, 1), "tokens": count}

    task = TrainTask(name="sft", model=model, num_examples=len(train_rows), micro_batch=settings.batch_rows,
                     grad_accum=settings.grad_accum, epochs=settings.epochs, lr=settings.lr, loss=loss,
                     export=lambda m, d: save_model(m, tokenizer, d),
                     evaluate=evaluate if eval_rows else None, eval_every=settings.eval_every)
    return run_training(task, loop, log)
