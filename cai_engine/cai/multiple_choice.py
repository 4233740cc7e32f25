"""Multiple-choice scoring by teacher forcing: the summed log-probability of each continuation after a prompt.

Questions are packed as prefix trees: a row holds [prompt | option_1 | ... | option_K] where every option
attends to the prompt and to itself only (as the preference model's `pack_shared`), so a prompt is
encoded once for all of its options; and questions whose prompts start alike (the few-shot examples
in front of every feedback question, one conversation under several principles) share that common
prefix in one row too. A whole batch is one forward pass with a tree attention mask. Log-probs come
from the fused `token_logprobs` op on the hidden states at the predicting positions only, so the
[tokens, vocab] logits are never built.

Tokenisation: the prompt is encoded on its own (with the tokenizer's special tokens, as for any
prompt) and each continuation on its own without them, then concatenated; the first continuation
token is predicted from the prompt's last position.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm import tqdm

from ..model.decoder import Transformer
from ..model.tokenizer import Tokenizer
from ..ops import token_logprobs
from ..ops.backend import cpu_has_fast_bf16

ANSWER_LEAD = "The answer is:"


def fast_dtype(device: str | torch.device) -> torch.dtype:
    """bfloat16 where it is fast (CUDA with bf16, CPUs with AVX512-BF16/AMX), float32 elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if device.type == "cpu" and cpu_has_fast_bf16()[0] else torch.float32


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


@dataclass(slots=True)
class _Row:
    shared: int                 # tokens of prompt every member starts with (a lone question: all of its prompt)
    members: list[int]          # question indices
    length: int                 # packed tokens: shared + each member's rest of prompt and options


def _common_prefix(a: Sequence[int], b: Sequence[int], cap: int) -> int:
    n = min(len(a), len(b), cap)
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _rows(prompts: list[Sequence[int]], sizes: list[int], max_row_tokens: int) -> list[_Row]:
    """Questions grouped into rows that share a prompt prefix, when sharing saves tokens.

    Sorting the prompts puts those with common prefixes next to each other, and the prefix shared by a
    sorted run is the one its first and last members share. A question joins the current row when the
    tokens it saves outweigh the prefix the row's members would stop sharing, within the row budget.
    """
    rows: list[_Row] = []
    for i in sorted(range(len(prompts)), key=lambda i: prompts[i]):
        if rows:
            row = rows[-1]
            common = _common_prefix(prompts[row.members[0]], prompts[i], row.shared)
            # members after the first re-encode what stops being shared; the newcomer adds all but the prefix
            grown = row.length + (row.shared - common) * (len(row.members) - 1) + sizes[i] - common
            if common > 0 and grown < row.length + sizes[i] and grown <= max_row_tokens:
                row.shared, row.length = common, grown
                row.members.append(i)
                continue
        rows.append(_Row(len(prompts[i]), [i], sizes[i]))
    return rows


def _batches(rows: list[_Row], max_batch_tokens: int) -> list[list[_Row]]:
    """Rows longest first, each batch's padded size (rows x longest row) within budget."""
    batches: list[list[_Row]] = []
    for row in sorted(rows, key=lambda r: -r.length):
        if batches and (len(batches[-1]) + 1) * batches[-1][0].length <= max_batch_tokens:
            batches[-1].append(row)
        else:
            batches.append([row])
    return batches


def _pack(batch: list[_Row], questions, pad_id: int):
    """Token ids, positions, the [B, T, T] tree mask, and per option token: predicting flat index and label.

    A row is [shared prefix | rest of prompt 1 | options of 1 | rest of prompt 2 | options of 2 | ...]:
    a question's tokens see the prefix and its own earlier tokens; each option sees its question's
    prompt and itself only. Positions are those each token has in its own unpacked question.
    """
    width = max(r.length for r in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    pos = torch.zeros(len(batch), width, dtype=torch.long)
    question = torch.full((len(batch), width), -2, dtype=torch.long)  # -1: shared prefix, -2: padding
    option = torch.full((len(batch), width), -1, dtype=torch.long)    # -1: prompt
    source, labels, owner = [], [], []
    n_options = 0
    for b, row in enumerate(batch):
        prefix = questions[row.members[0]][0][: row.shared]
        ids[b, : row.shared] = torch.tensor(prefix)
        pos[b, : row.shared] = torch.arange(row.shared)
        question[b, : row.shared] = -1
        t = row.shared
        for q in row.members:
            prompt, options = questions[q]
            rest = prompt[row.shared:]
            ids[b, t: t + len(rest)] = torch.tensor(rest, dtype=torch.long)
            pos[b, t: t + len(rest)] = torch.arange(row.shared, len(prompt))
            question[b, t: t + len(rest)] = q
            t += len(rest)
            # the prompt's last token predicts every option's first token; with nothing beyond the
            # shared prefix (an identical prompt), that is the prefix's last token, not the row's previous one
            last = b * width + (t if rest else row.shared) - 1
            for k, opt in enumerate(options):
                ids[b, t: t + len(opt)] = torch.tensor(opt, dtype=torch.long)
                pos[b, t: t + len(opt)] = torch.arange(len(prompt), len(prompt) + len(opt))
                question[b, t: t + len(opt)], option[b, t: t + len(opt)] = q, k
                source += [last] + list(range(b * width + t, b * width + t + len(opt) - 1))
                labels += opt
                owner += [n_options] * len(opt)
                n_options += 1
                t += len(opt)
    real = question != -2
    # query i may see key j: j is the shared prefix, or j is i's question's prompt or i's own option
    same = question[:, :, None] == question[:, None, :]
    visible = (question[:, None, :] == -1) | (same & ((option[:, None, :] == -1) | (option[:, None, :] == option[:, :, None])))
    return ids, pos, real.long(), visible, source, labels, owner, n_options


@torch.no_grad()
def score_token_ids(model: Transformer, questions: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]], *,
                    max_batch_tokens: int = 8192, max_row_tokens: int = 2048, pad_id: int = 0,
                    progress: bool | None = None, description: str = "scoring") -> list[list[float]]:
    """Summed log p(option | prompt) for every option of every question (token ids in, floats out, input order).

    Prompts that start alike (few-shot examples, one conversation asked under several principles)
    share one encoding of their common prefix within a row of at most `max_row_tokens` (longer rows
    cost more in dense masked attention than the prefix saves); a question's options always share
    its prompt. The result equals scoring every prompt + option on its own.
    """
    if max_batch_tokens < 1 or max_row_tokens < 1:
        raise ValueError(f"max_batch_tokens and max_row_tokens must be >= 1, got {max_batch_tokens}, {max_row_tokens}")
    limit = model.config.max_position_embeddings
    sizes = []
    for q, (prompt, options) in enumerate(questions):
        if not prompt or not options or not all(options):
            raise ValueError(f"question {q}: needs a non-empty prompt and non-empty options")
        longest = len(prompt) + max(len(o) for o in options)
        if longest > limit:
            raise ValueError(f"question {q}: prompt and option take {longest} tokens; the model's context is {limit}")
        sizes.append(len(prompt) + sum(len(o) for o in options))
    questions = [(list(p), [list(o) for o in opts]) for p, opts in questions]
    scores: list[list[float]] = [[] for _ in questions]
    show = progress if progress is not None else sys.stderr.isatty()
    device, weight = model.device, model.lm_head
    rows = _rows([p for p, _ in questions], sizes, max_row_tokens)
    with tqdm(total=len(questions), desc=description, disable=not show, file=sys.stderr) as bar:
        for batch in _batches(rows, max_batch_tokens):
            ids, pos, real, visible, source, labels, owner, n_options = _pack(batch, questions, pad_id)
            hidden = model(ids.to(device), position_ids=pos.to(device), attention_mask=real.to(device),
                           attn_mask=visible.to(device))
            flat = hidden.reshape(-1, hidden.shape[-1])[torch.tensor(source, device=device)]
            logp, _ = token_logprobs(flat, weight, torch.tensor(labels, device=device))
            sums = torch.zeros(n_options, dtype=torch.float64, device=device)
            sums.index_add_(0, torch.tensor(owner, device=device), logp.double())
            sums = sums.tolist()
            for row in batch:
                for q in row.members:
                    k = len(questions[q][1])
                    scores[q], sums = sums[:k], sums[k:]
                bar.update(len(row.members))
    return scores


def score_continuations(model: Transformer, tokenizer: Tokenizer, questions: Sequence[tuple[str, Sequence[str]]], *,
                        max_batch_tokens: int = 8192, max_row_tokens: int = 2048, progress: bool | None = None,
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
    return score_token_ids(model, encoded, max_batch_tokens=max_batch_tokens, max_row_tokens=max_row_tokens,
                           pad_id=tokenizer.pad_id or 0,
                           progress=progress, description=description)
