"""Comparison data for the preference model: our JSONL and HH-RLHF transcripts, validated line by line.

Our format, one JSON object per line:
  {"prompt": str, "responses": [str, ...], "soft_labels": p | [[K x K]]}   p = P(responses[0] beats [1])
  {"prompt": str, "responses": [str, ...], "ranking": [rank, ...]}          0 = best; equal ranks tie
  {"prompt": str, "chosen": str, "rejected": str}
HH-RLHF style: {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."}: the shared
conversation up to the last common "\\n\\nAssistant:" becomes the prompt.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"


class DataError(ValueError):
    """A malformed record; the message names the file and line."""


@dataclass(slots=True)
class Comparison:
    prompt: str
    responses: list[str]
    pairs: list[tuple[int, int]] = field(default_factory=list)   # local indices into responses
    probs: list[float] = field(default_factory=list)             # P(first beats second)


def split_labeled(text: str, labels: tuple[str, ...] = ("Human", "Assistant")) -> list[tuple[str, str]]:
    """Cut a transcript in the paper's style ("\\n\\nHuman: ...\\n\\nAssistant: ...", and the critique
    labels) into (label, text) turns, texts stripped. Raises ValueError if anything precedes the first label."""
    marker = re.compile("(?:^|\n\n)(" + "|".join(map(re.escape, labels)) + "):")
    found = list(marker.finditer(text))
    if not found or text[:found[0].start()].strip():
        names = " / ".join(f"'{label}:'" for label in labels)
        raise ValueError(f"expected a transcript of turns labelled {names}, each after a blank line")
    ends = [m.start() for m in found[1:]] + [len(text)]
    return [(m.group(1), text[m.end():end].strip()) for m, end in zip(found, ends)]


def hh_turns(text: str) -> list[dict[str, str]]:
    """An HH-RLHF transcript as chat messages (Human -> user, Assistant -> assistant)."""
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[label], "content": body} for label, body in split_labeled(text)]


def split_hh(chosen: str, rejected: str) -> tuple[str, str, str]:
    common = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        common += 1
    cut = chosen.rfind(ASSISTANT, 0, common)
    if cut < 0:
        raise ValueError(f"chosen and rejected share no {ASSISTANT.strip()!r} turn to split the prompt at")
    cut += len(ASSISTANT)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def parse_record(obj: dict) -> Comparison:
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if "prompt" not in obj and "chosen" in obj and "rejected" in obj:
        prompt, chosen, rejected = split_hh(_text(obj, "chosen"), _text(obj, "rejected"))
        return _checked(Comparison(prompt, [chosen, rejected], [(0, 1)], [1.0]))
    prompt = _text(obj, "prompt")
    if "chosen" in obj or "rejected" in obj:
        return _checked(Comparison(prompt, [_text(obj, "chosen"), _text(obj, "rejected")], [(0, 1)], [1.0]))
    responses = obj.get("responses")
    if not isinstance(responses, list) or len(responses) < 2 or not all(isinstance(r, str) for r in responses):
        raise ValueError("'responses' must be a list of at least two strings")
    k = len(responses)
    comp = Comparison(prompt, responses)
    if "soft_labels" in obj:
        labels = obj["soft_labels"]
        if isinstance(labels, (int, float)) and not isinstance(labels, bool):
            if k != 2:
                raise ValueError("a single soft label needs exactly two responses; give a K x K matrix otherwise")
            labels = [[0.5, labels], [1 - labels, 0.5]]
        if not (isinstance(labels, list) and len(labels) == k and all(isinstance(r, list) and len(r) == k for r in labels)):
            raise ValueError(f"'soft_labels' must be a number (K=2) or a {k} x {k} matrix")
        for a in range(k):
            for b in range(a + 1, k):
                p, q = labels[a][b], labels[b][a]
                if not all(isinstance(x, (int, float)) for x in (p, q)) or abs(p + q - 1) > 1e-4:
                    raise ValueError(f"soft_labels[{a}][{b}] + soft_labels[{b}][{a}] must be 1, got {p} and {q}")
                comp.pairs.append((a, b))
                comp.probs.append(float(p))
    elif "ranking" in obj:
        rank = obj["ranking"]
        if not (isinstance(rank, list) and len(rank) == k and all(isinstance(r, int) for r in rank)):
            raise ValueError(f"'ranking' must be a list of {k} integers (0 = best)")
        for a in range(k):
            for b in range(a + 1, k):
                comp.pairs.append((a, b))
                comp.probs.append(1.0 if rank[a] < rank[b] else 0.0 if rank[a] > rank[b] else 0.5)
    else:
        raise ValueError("needs 'soft_labels', 'ranking', or 'chosen'/'rejected'")
    return _checked(comp)


def _text(obj: dict, key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise ValueError(f"{key!r} must be a string" + ("" if key in obj else " (missing)"))
    return value


def _checked(comp: Comparison) -> Comparison:
    for i, r in enumerate(comp.responses):
        if not r.strip():
            raise ValueError(f"response {i} is empty")
    if any(not 0 <= p <= 1 for p in comp.probs):
        raise ValueError("labels must be probabilities in [0, 1]")
    return comp


def read_comparisons(path: str | os.PathLike) -> list[Comparison]:
    """Every record of a JSONL file; the first malformed line raises DataError with its line number."""
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                out.append(parse_record(json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
            except ValueError as e:
                raise DataError(f"{path}:{lineno}: {e}") from None
    if not out:
        raise DataError(f"{path}: no records")
    return out
