"""Prompts for the critique loop and the RL stage: the built-in red-team and helpfulness sets, and user files.

Built-in (`builtin_prompts.jsonl`, written for this project): red-team prompts across harm categories and
ordinary helpfulness prompts (including sensitive-sounding but legitimate ones, to catch over-refusal).
Each has a stable id; its split (train / held-out) is a hash of the id, so adding prompts never moves old ones.

User files, JSONL, one prompt per line, any of:
  {"prompt": "text"}                                            optional "id", "context": [messages]
  {"messages": [{"role": "user", "content": ...}, ...]}         the last user turn is the prompt
  {"transcript": "\\n\\nHuman: ...\\n\\nAssistant: ..."}         HH-RLHF red-team style
  {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", ...}        HH-RLHF preference style (chosen side)
In a conversation, the last human turn is the prompt and the turns before it are kept as context.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .comparisons import DataError, hh_turns

HELD_OUT_PERCENT = 20
SPLITS = ("train", "held-out", "all")


@dataclass(slots=True, frozen=True)
class Prompt:
    id: str
    text: str
    context: tuple[tuple[str, str], ...] = ()   # earlier turns (role, content), oldest first
    kind: str = "user"                          # "red-team" | "helpful" | "user"
    category: str = ""

    @property
    def split(self) -> str:
        return split_of(self.id)

    def messages(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.context] + [{"role": "user", "content": self.text}]


def split_of(prompt_id: str) -> str:
    bucket = int.from_bytes(hashlib.sha256(prompt_id.encode()).digest()[:8], "little") % 100
    return "held-out" if bucket < HELD_OUT_PERCENT else "train"


def builtin_prompts(split: str = "train", kind: str | None = None) -> list[Prompt]:
    """The shipped prompts of one split ("train", "held-out" or "all"), optionally of one kind."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    text = (resources.files("cai_engine.data") / "builtin_prompts.jsonl").read_text(encoding="utf-8")
    out = []
    for line in text.splitlines():
        r = json.loads(line)
        p = Prompt(r["id"], r["prompt"], (), r["kind"], r["category"])
        if (split == "all" or p.split == split) and (kind is None or p.kind == kind):
            out.append(p)
    return out


def load_prompts(path: str | os.PathLike = "", split: str = "train") -> list[Prompt]:
    """Prompts from a JSONL file, or the built-in `split` when path is empty. The first malformed line
    raises DataError naming the file and line."""
    if not str(path):
        return builtin_prompts(split)
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such prompts file (expected JSONL with 'prompt', 'messages', 'transcript' "
                        f"or 'chosen' per line)")
    out, ids = [], set()
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                prompt = parse_prompt(json.loads(line), default_id=f"{path.name}:{lineno}")
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
            except ValueError as e:
                raise DataError(f"{path}:{lineno}: {e}") from None
            if prompt.id in ids:
                raise DataError(f"{path}:{lineno}: duplicate id {prompt.id!r} (ids must be unique)")
            ids.add(prompt.id)
            out.append(prompt)
    if not out:
        raise DataError(f"{path}: no prompts")
    return out


def parse_prompt(obj, default_id: str) -> Prompt:
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    pid = obj.get("id", default_id)
    if not isinstance(pid, (str, int)) or isinstance(pid, bool):
        raise ValueError("'id' must be a string or an integer")
    pid = str(pid)
    if "prompt" in obj:
        if not isinstance(obj["prompt"], str) or not obj["prompt"].strip():
            raise ValueError("'prompt' must be a non-empty string")
        return Prompt(pid, obj["prompt"], _messages(obj.get("context", []), "context"))
    if "messages" in obj:
        turns = _messages(obj["messages"], "messages")
    elif "transcript" in obj or "chosen" in obj:
        key = "transcript" if "transcript" in obj else "chosen"
        if not isinstance(obj[key], str):
            raise ValueError(f"{key!r} must be a string")
        try:
            turns = tuple((m["role"], m["content"]) for m in hh_turns(obj[key]))
        except ValueError as e:
            raise ValueError(f"{key!r}: {e}") from None
    else:
        raise ValueError("expected 'prompt' (text), 'messages' (chat), or 'transcript' / 'chosen' (HH-RLHF)")
    last = max((i for i, (role, _) in enumerate(turns) if role == "user"), default=None)
    if last is None or not turns[last][1].strip():
        raise ValueError("the conversation has no non-empty user/Human turn to use as the prompt")
    return Prompt(pid, turns[last][1], turns[:last])


def _messages(value, key: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, list):
        raise ValueError(f"{key!r} must be a list of {{role, content}} messages")
    out = []
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                and isinstance(m.get("content"), str)):
            raise ValueError(f"{key}[{i}]: expected {{\"role\": \"system\"|\"user\"|\"assistant\", \"content\": str}}")
        out.append((m["role"], m["content"]))
    return tuple(out)
