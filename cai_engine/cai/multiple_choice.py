"""Multiple-choice scoring by teacher forcing: the summed log-probability of each continuation after a prompt.

Each question is packed into one row, [prompt | option_1 | ... | option_K], where every option attends
to the prompt and to itself only (`pack_shared`, the preference model's prefix sharing): the prompt is
encoded once for all of its options, and a whole batch of questions is one forward pass. Log-probs come
from the fused `token_logprobs` op on the hidden states at the predicting positions only, so the
[tokens, vocab] logits are never built.

Tokenisation: the prompt is encoded on its own (with the tokenizer's special tokens, as for any
prompt) and each continuation on its own without them, then concatenated; the first continuation
token is predicted from the prompt's last position.
"""
from __future__ import annotations

import sys
from functools import lru_cache
from typing import Sequence

import torch
from tqdm import tqdm

from ..model.decoder import Transformer
from ..model.heads import pack_shared
from ..model.tokenizer import Tokenizer
from ..ops import token_logprobs

ANSWER_LEAD = "The answer is:"


@lru_cache(maxsize=None)
def _cpu_has_bf16() -> bool:
    """Native bf16 dot products (AVX512-BF16 or AMX): where bf16 GEMMs beat fp32 on a CPU."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:  # not Linux: no cheap way to tell, stay exact
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def fast_dtype(device: str | torch.device) -> torch.dtype:
    """bfloat16 where it is fast (CUDA with bf16, CPUs with AVX512-BF16/AMX), float32 elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if device.type == "cpu" and _cpu_has_bf16() else torch.float32


def chat_wrap(tokenizer: Tokenizer, text: str, lead: str = ANSWER_LEAD) -> str:
    """A raw question in the model's chat template: the text before the final `lead` becomes the user
    turn, and the assistant's reply starts with `lead`, so continuations are scored as its first words."""
    body = text[: -len(lead)].rstrip() if text.endswith(lead) else text
    start = tokenizer.apply_chat_template([{"role": "user", "content": body}], add_generation_prompt=True)
    return start + (lead if text.endswith(lead) else "")


def encode_question(tokenizer: Tokenizer, prompt: str, continuations: Sequence[str]) -> tuple[list[int], list[list[int]]]:
    if not isinstance(prompt, str) or not prompt:
        raise ValueError("the prompt must be a non-empty string")
    if not continuations or not all(isinstance(c, str) and c for c in continuations):
        raise ValueError("continuations must be a non-empty list of non-empty strings")
    prompt_ids = tokenizer.encode(prompt)
    options = tokenizer.encode_batch(list(continuations), add_special_tokens=False)
    if not prompt_ids:
        raise ValueError("the prompt encodes to no tokens")
    for text, ids in zip(continuations, options):
        if not ids:
            raise ValueError(f"continuation {text!r} encodes to no tokens")
    return prompt_ids, options


def _batches(lengths: list[int], max_batch_tokens: int) -> list[list[int]]:
    """Question indices grouped longest first, each batch's padded size (rows x longest row) within budget."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= max_batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


@torch.no_grad()
def score_token_ids(model: Transformer, questions: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]], *,
                    max_batch_tokens: int = 8192, pad_id: int = 0, progress: bool | None = None,
                    description: str = "scoring") -> list[list[float]]:
    """Summed log p(option | prompt) for every option of every question (token ids in, floats out, input order)."""
    if max_batch_tokens < 1:
        raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
    limit = model.config.max_position_embeddings
    lengths = []
    for q, (prompt, options) in enumerate(questions):
        if not prompt or not options or not all(options):
            raise ValueError(f"question {q}: needs a non-empty prompt and non-empty options")
        longest = len(prompt) + max(len(o) for o in options)
        if longest > limit:
            raise ValueError(f"question {q}: prompt and option take {longest} tokens; the model's context is {limit}")
        lengths.append(len(prompt) + sum(len(o) for o in options))
    scores: list[list[float]] = [[] for _ in questions]
    show = progress if progress is not None else sys.stderr.isatty()
    device, weight = model.device, model.lm_head
    with tqdm(total=len(questions), desc=description, disable=not show, file=sys.stderr) as bar:
        for batch in _batches(lengths, max_batch_tokens):
            items = [(questions[i][0], questions[i][1]) for i in batch]
            packed = pack_shared(items, pad_id).to(device)
            hidden = model(packed.input_ids, position_ids=packed.position_ids,
                           attention_mask=packed.attention_mask, attn_mask=packed.attn_mask)
            width = packed.input_ids.shape[1]
            source, labels, owner = [], [], []  # predicting position, target token, option index
            n_options = 0
            for row, (prompt, options) in enumerate(items):
                start = row * width + len(prompt)  # flat index of the first option token in this row
                for option in options:
                    # the first token is predicted by the prompt's last position, not the previous option's
                    source += [row * width + len(prompt) - 1] + list(range(start, start + len(option) - 1))
                    labels += option
                    owner += [n_options] * len(option)
                    start += len(option)
                    n_options += 1
            flat = hidden.reshape(-1, hidden.shape[-1])[torch.tensor(source, device=device)]
            logp, _ = token_logprobs(flat, weight, torch.tensor(labels, device=device))
            sums = torch.zeros(n_options, dtype=torch.float64, device=device)
            sums.index_add_(0, torch.tensor(owner, device=device), logp.double())
            sums = sums.tolist()
            for i, (_, options) in zip(batch, items):
                scores[i], sums = sums[: len(options)], sums[len(options):]
            bar.update(len(batch))
    return scores


def score_continuations(model: Transformer, tokenizer: Tokenizer, questions: Sequence[tuple[str, Sequence[str]]], *,
                        max_batch_tokens: int = 8192, progress: bool | None = None,
                        description: str = "scoring") -> list[list[float]]:
    """Summed log p(continuation | prompt) for each (prompt, continuations) question, raw text in.

    Questions are scored in batches of about `max_batch_tokens` packed tokens, longest first.
    """
    encoded = []
    for q, (prompt, continuations) in enumerate(questions):
        try:
            encoded.append(encode_question(tokenizer, prompt, continuations))
        except ValueError as e:
            raise ValueError(f"question {q}: {e}") from None
    return score_token_ids(model, encoded, max_batch_tokens=max_batch_tokens, pad_id=tokenizer.pad_id or 0,
                           progress=progress, description=description)
