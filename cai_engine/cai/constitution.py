"""The constitution as data: critique/revision principles (SL stage), comparison principles (RL stage) and
the few-shot examples that go in front of both.

`Constitution.load(path)` reads
  - "" (or nothing): the project's own constitution, `cai_engine/cai/data/constitution.toml`;
  - a `.toml` or `.json` file in that format (see the header of the packaged file and README.md);
  - a folder holding the files published with the Constitutional AI paper, unchanged, by their names:
    CritiqueRevisionInstructions.json, CritiqueRevisionFewShotPrompts.json, RLMadisonInstructions.json,
    RLMadisonFewShotPrompts.json and, optionally, RLMadisonPrecogFewShotPrompts.json.
Every malformed file raises ConstitutionError naming the file, the key or index, and what was expected.
"""
from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ..data.comparisons import split_labeled

PAPER_FILES = {
    "critique": "CritiqueRevisionInstructions.json",
    "critique_few_shot": "CritiqueRevisionFewShotPrompts.json",
    "comparison": "RLMadisonInstructions.json",
    "comparison_few_shot": "RLMadisonFewShotPrompts.json",
    "comparison_cot_few_shot": "RLMadisonPrecogFewShotPrompts.json",   # optional
}
CRITIQUE_LABELS = ("Human", "Assistant", "CritiqueRequest", "Critique", "RevisionRequest", "Revision")


class ConstitutionError(ValueError):
    """A constitution file that cannot be used; the message names the file, the key or index, and what was expected."""


@dataclass(slots=True, frozen=True)
class CritiquePrinciple:
    id: str
    critique_request: str     # plain text; the prompt format adds the "CritiqueRequest:" label
    revision_request: str     # plain text; the prompt format adds the "RevisionRequest:" label


@dataclass(slots=True, frozen=True)
class ComparisonPrinciple:
    id: str
    instruction: str          # "Choose the response that ..."; the RL prompt adds "Options:" and the options


@dataclass(slots=True, frozen=True)
class CritiqueExample:
    prompt: str                               # the last human turn
    response: str                             # the assistant's answer to be critiqued
    critique_request: str
    critique: str
    revision_request: str
    revision: str
    context: tuple[tuple[str, str], ...] = ()  # earlier turns as (role, content), role "user" | "assistant"


@dataclass(slots=True, frozen=True)
class MultipleChoiceExample:
    prompt: str                               # ends with "The answer is:"
    corrects: tuple[str, ...]                 # e.g. (" (A)",)
    incorrects: tuple[str, ...]


@dataclass(slots=True)
class Constitution:
    critique_principles: list[CritiquePrinciple]
    comparison_principles: list[ComparisonPrinciple]
    critique_few_shot: list[CritiqueExample] = field(default_factory=list)
    comparison_few_shot: list[MultipleChoiceExample] = field(default_factory=list)
    comparison_cot_few_shot: list[str] = field(default_factory=list)   # each ends "So the answer is: (X)"
    source: str = ""

    @classmethod
    def load(cls, path: str | os.PathLike | None = "") -> "Constitution":
        if path is None or str(path) == "":
            ref = resources.files("cai_engine.cai") / "data" / "constitution.toml"
            return _from_ours(tomllib.loads(ref.read_text(encoding="utf-8")), "cai_engine/cai/data/constitution.toml")
        path = Path(path)
        if path.is_dir():
            return _from_paper_folder(path)
        if not path.is_file():
            raise ConstitutionError(f"{path}: no such file or folder (expected a .toml/.json constitution or a "
                                    f"folder with {PAPER_FILES['critique']} and the other published files)")
        text = path.read_text(encoding="utf-8")
        try:
            if path.suffix == ".toml":
                data = tomllib.loads(text)
            elif path.suffix == ".json":
                data = json.loads(text)
            else:
                raise ConstitutionError(f"{path}: expected a .toml or .json file, or a folder of the paper's files")
        except tomllib.TOMLDecodeError as e:
            raise ConstitutionError(f"{path}: invalid TOML: {e}") from None
        except json.JSONDecodeError as e:
            raise ConstitutionError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        return _from_ours(data, str(path))

    def critique_principle(self, id: str) -> CritiquePrinciple:
        for p in self.critique_principles:
            if p.id == id:
                return p
        raise KeyError(f"no critique principle {id!r} in {self.source or 'the constitution'}")

    def comparison_principle(self, id: str) -> ComparisonPrinciple:
        for p in self.comparison_principles:
            if p.id == id:
                return p
        raise KeyError(f"no comparison principle {id!r} in {self.source or 'the constitution'}")


# ---------------------------------------------------------------------- our format

def _from_ours(data, source: str) -> Constitution:
    if not isinstance(data, dict):
        raise ConstitutionError(f"{source}: expected a table/object with 'critique' and 'comparison' lists")
    critique = [CritiquePrinciple(_str(e, "id", source, f"critique[{i}]"), _str(e, "critique", source, f"critique[{i}]"),
                                  _str(e, "revision", source, f"critique[{i}]"))
                for i, e in enumerate(_tables(data, "critique", source, required=True))]
    comparison = [ComparisonPrinciple(_str(e, "id", source, f"comparison[{i}]"),
                                      _str(e, "instruction", source, f"comparison[{i}]"))
                  for i, e in enumerate(_tables(data, "comparison", source, required=True))]
    for kind, items in (("critique", critique), ("comparison", comparison)):
        seen = set()
        for i, p in enumerate(items):
            if p.id in seen:
                raise ConstitutionError(f"{source}: {kind}[{i}].id: duplicate id {p.id!r} (ids must be unique)")
            seen.add(p.id)
    by_id = {p.id: p for p in critique}
    examples = []
    for i, e in enumerate(_tables(data, "critique_example", source)):
        where = f"critique_example[{i}]"
        if "principle" in e:
            name = _str(e, "principle", source, where)
            if name not in by_id:
                raise ConstitutionError(f"{source}: {where}.principle: {name!r} is not the id of a [[critique]] entry")
            requests = by_id[name].critique_request, by_id[name].revision_request
        else:
            requests = _str(e, "critique_request", source, where), _str(e, "revision_request", source, where)
        examples.append(CritiqueExample(
            _str(e, "prompt", source, where), _str(e, "response", source, where), requests[0],
            _str(e, "critique", source, where), requests[1], _str(e, "revision", source, where),
            _context(e.get("context", []), source, f"{where}.context")))
    multiple_choice = [_multiple_choice(e, source, f"comparison_example[{i}]")
                       for i, e in enumerate(_tables(data, "comparison_example", source))]
    cot = [_str(e, "prompt", source, f"comparison_cot_example[{i}]")
           for i, e in enumerate(_tables(data, "comparison_cot_example", source))]
    return Constitution(critique, comparison, examples, multiple_choice, cot, source)


def _tables(data: dict, key: str, source: str, required: bool = False) -> list[dict]:
    if key not in data:
        if required:
            raise ConstitutionError(f"{source}: missing '{key}': expected a non-empty list of tables ([[{key}]])")
        return []
    items = data[key]
    if not isinstance(items, list) or (required and not items):
        raise ConstitutionError(f"{source}: '{key}': expected a non-empty list of tables ([[{key}]])")
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ConstitutionError(f"{source}: {key}[{i}]: expected a table/object, got {type(item).__name__}")
    return items


def _str(obj: dict, key: str, source: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value.strip():
        got = "missing" if key not in obj else f"got {type(value).__name__} {value!r}"[:80]
        raise ConstitutionError(f"{source}: {where}.{key}: expected a non-empty string ({got})")
    return value.strip() if key not in ("prompt",) else value


def _context(turns, source: str, where: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(turns, list):
        raise ConstitutionError(f"{source}: {where}: expected a list of {{role, content}} messages")
    out = []
    for i, t in enumerate(turns):
        if not (isinstance(t, dict) and t.get("role") in ("user", "assistant") and isinstance(t.get("content"), str)):
            raise ConstitutionError(f"{source}: {where}[{i}]: expected {{role: 'user'|'assistant', content: str}}")
        out.append((t["role"], t["content"]))
    return tuple(out)


def _multiple_choice(e, source: str, where: str) -> MultipleChoiceExample:
    if not isinstance(e, dict):
        raise ConstitutionError(f"{source}: {where}: expected an object with prompt, corrects, incorrects")
    prompt = _str(e, "prompt", source, where)
    lists = []
    for key in ("corrects", "incorrects"):
        value = e.get(key)
        if not (isinstance(value, list) and value and all(isinstance(v, str) and v for v in value)):
            raise ConstitutionError(f"{source}: {where}.{key}: expected a non-empty list of strings such as [\" (A)\"]")
        lists.append(tuple(value))
    return MultipleChoiceExample(prompt, *lists)


# ---------------------------------------------------------------------- the paper's published files

def _from_paper_folder(folder: Path) -> Constitution:
    def read(kind: str, required: bool = True):
        path = folder / PAPER_FILES[kind]
        if not path.is_file():
            if required:
                raise ConstitutionError(f"{path}: missing (a folder of the paper's files needs "
                                        f"{', '.join(v for k, v in PAPER_FILES.items() if k != 'comparison_cot_few_shot')})")
            return None, str(path)
        try:
            return json.loads(path.read_text(encoding="utf-8")), str(path)
        except json.JSONDecodeError as e:
            raise ConstitutionError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None

    data, src = read("critique")
    if not isinstance(data, dict) or not data:
        raise ConstitutionError(f"{src}: expected a non-empty object of id -> {{\"prompt\": [...], \"edit_request\": ...}}")
    critique = []
    for key, value in data.items():
        if not (isinstance(value, dict) and isinstance(value.get("prompt"), list) and value["prompt"]
                and all(isinstance(p, str) and p.strip() for p in value["prompt"])):
            raise ConstitutionError(f"{src}: key {key!r}: expected {{\"prompt\": [critique request, ...], "
                                    f"\"edit_request\": revision request}} with a non-empty list of strings")
        if not isinstance(value.get("edit_request"), str) or not value["edit_request"].strip():
            raise ConstitutionError(f"{src}: key {key!r}: 'edit_request' must be a non-empty string")
        revision = _unlabel(value["edit_request"], "RevisionRequest", "Revision")
        for i, request in enumerate(value["prompt"]):
            # several critique requests under one id share its revision request: ids "key", "key/1", ...
            critique.append(CritiquePrinciple(key if i == 0 else f"{key}/{i}",
                                              _unlabel(request, "CritiqueRequest", "Critique"), revision))

    data, src = read("critique_few_shot")
    if not isinstance(data, list) or not data:
        raise ConstitutionError(f"{src}: expected a non-empty JSON list of transcript strings")
    examples = [_paper_critique_example(t, src, i) for i, t in enumerate(data)]

    data, src = read("comparison")
    if not isinstance(data, list) or not data:
        raise ConstitutionError(f"{src}: expected a non-empty JSON list of instruction strings ending in 'Options:'")
    comparison = []
    for i, text in enumerate(data):
        if not isinstance(text, str) or not text.rstrip().endswith("Options:"):
            raise ConstitutionError(f"{src}: index {i}: expected a string ending in 'Options:'")
        # stable ids by position: the published list has no ids of its own
        comparison.append(ComparisonPrinciple(f"madison-{i:02d}", text.rstrip()[: -len("Options:")].strip()))

    data, src = read("comparison_few_shot")
    if not isinstance(data, list) or not data:
        raise ConstitutionError(f"{src}: expected a non-empty JSON list of {{prompt, corrects, incorrects}} objects")
    multiple_choice = [_multiple_choice(e, src, f"index {i}") for i, e in enumerate(data)]

    data, src = read("comparison_cot_few_shot", required=False)
    cot = []
    if data is not None:
        if not isinstance(data, list):
            raise ConstitutionError(f"{src}: expected a JSON list of {{\"prompt\": ...}} objects")
        for i, e in enumerate(data):
            if not (isinstance(e, dict) and isinstance(e.get("prompt"), str) and "So the answer is:" in e["prompt"]):
                raise ConstitutionError(f"{src}: index {i}: expected {{\"prompt\": str}} whose text ends in "
                                        f"'So the answer is: (X)'")
            cot.append(e["prompt"])
    return Constitution(critique, comparison, examples, multiple_choice, cot, str(folder))


def _unlabel(text: str, label: str, answer_label: str) -> str:
    """'\\n\\nCritiqueRequest: X\\n\\nCritique:' -> 'X' (plain text is taken as it is)."""
    text = text.strip()
    if text.startswith(label + ":"):
        text = text[len(label) + 1:]
    if text.endswith(answer_label + ":"):
        text = text[: -len(answer_label) - 1]
    return text.strip()


def _paper_critique_example(text, source: str, index: int) -> CritiqueExample:
    where = f"{source}: index {index}"
    if not isinstance(text, str):
        raise ConstitutionError(f"{where}: expected a transcript string")
    try:
        turns = split_labeled(text, CRITIQUE_LABELS)
    except ValueError as e:
        raise ConstitutionError(f"{where}: {e}") from None
    tail = [label for label, _ in turns[-4:]]
    conversation = turns[:-4]
    if tail != ["CritiqueRequest", "Critique", "RevisionRequest", "Revision"] or len(conversation) < 2 \
            or [l for l, _ in conversation[-2:]] != ["Human", "Assistant"] \
            or any(l not in ("Human", "Assistant") for l, _ in conversation):
        raise ConstitutionError(f"{where}: expected 'Human:' / 'Assistant:' turns ending with an Assistant turn, then "
                                f"'CritiqueRequest:', 'Critique:', 'RevisionRequest:', 'Revision:' once each, in order")
    roles = {"Human": "user", "Assistant": "assistant"}
    context = tuple((roles[l], body) for l, body in conversation[:-2])
    (_, prompt), (_, response) = conversation[-2:]
    (_, crit_req), (_, crit), (_, rev_req), (_, rev) = turns[-4:]
    return CritiqueExample(prompt, response, crit_req, crit, rev_req, rev, context)
