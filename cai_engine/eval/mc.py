"""Multiple-choice evaluation files: reading, scoring, and the accuracy with its Wilson interval.

Format (the one published with the paper's evaluations), one JSON object per line:
  {"prompt": "...The answer is:", "corrects": [" (A)"], "incorrects": [" (B)", ...], ...other keys ignored}
A question is right when every correct continuation has a higher summed log-probability than every
incorrect one.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Sequence

from ..cai.multiple_choice import chat_wrap, score_continuations
from ..data.comparisons import DataError
from ..model.decoder import Transformer
from ..model.tokenizer import Tokenizer

Z_95 = 1.959963984540054  # the standard normal quantile at 0.975


@dataclass(slots=True)
class MCQuestion:
    line: int
    prompt: str
    corrects: list[str]
    incorrects: list[str]


def _continuations(obj: dict, key: str) -> list[str]:
    value = obj.get(key)
    if not (isinstance(value, list) and value and all(isinstance(c, str) and c for c in value)):
        raise ValueError(f"{key!r} must be a non-empty list of non-empty strings"
                         + ("" if key in obj else " (missing)"))
    return value


def read_mc_questions(path: str | os.PathLike, limit: int | None = None) -> list[MCQuestion]:
    """The first `limit` questions of a JSONL file (all when None); a malformed line raises DataError."""
    out: list[MCQuestion] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if limit is not None and len(out) >= limit:
                break
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
                prompt = obj.get("prompt")
                if not isinstance(prompt, str) or not prompt:
                    raise ValueError("'prompt' must be a non-empty string" + ("" if "prompt" in obj else " (missing)"))
                out.append(MCQuestion(lineno, prompt, _continuations(obj, "corrects"), _continuations(obj, "incorrects")))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
            except ValueError as e:
                raise DataError(f"{path}:{lineno}: {e}") from None
    if not out:
        raise DataError(f"{path}: no questions")
    return out


def wilson_interval(right: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion: unlike the normal approximation it stays inside
    [0, 1] and keeps a sensible width at accuracies near 0 or 1 and for small n."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    p = right / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # at 0/n and n/n the bound is exactly 0 (or 1); the formula leaves a rounding residue there
    return (0.0 if right == 0 else centre - half), (1.0 if right == n else centre + half)


def evaluate_mc(model: Transformer, tokenizer: Tokenizer, questions: Sequence[MCQuestion], *,
                chat_template: bool = False, max_batch_tokens: int = 8192,
                progress: bool | None = None) -> list[dict]:
    """One result per question: its line, both lists of log-probs, and whether it is right."""
    prompts = [chat_wrap(tokenizer, q.prompt) if chat_template else q.prompt for q in questions]
    scores = score_continuations(model, tokenizer, [(p, q.corrects + q.incorrects) for p, q in zip(prompts, questions)],
                                 max_batch_tokens=max_batch_tokens, progress=progress, description="mc")
    results = []
    for q, s in zip(questions, scores):
        good, bad = s[: len(q.corrects)], s[len(q.corrects):]
        results.append({"line": q.line, "right": min(good) > max(bad),
                        "corrects_logprobs": good, "incorrects_logprobs": bad})
    return results


def summary_line(results: Sequence[dict]) -> str:
    right, n = sum(r["right"] for r in results), len(results)
    lo, hi = wilson_interval(right, n)
    return f"accuracy {right / n:.4f} ({right}/{n}, 95% CI {lo:.4f}-{hi:.4f})"
