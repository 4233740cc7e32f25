"""Prompts: the built-in red-team / helpfulness sets with stable splits, and user files with line-numbered errors."""
import json
from collections import Counter

import pytest

from cai_engine.data.comparisons import DataError, hh_turns, split_hh
from cai_engine.data.prompts import Prompt, builtin_prompts, load_prompts, split_of


def test_builtin_sets_cover_harm_categories_and_split_stably():
    everything = builtin_prompts("all")
    assert len(everything) >= 200
    ids = [p.id for p in everything]
    assert len(set(ids)) == len(ids)
    assert len({p.text for p in everything}) == len(everything)
    kinds = Counter(p.kind for p in everything)
    assert kinds["red-team"] >= 100 and kinds["helpful"] >= 80
    assert len({p.category for p in everything if p.kind == "red-team"}) >= 10
    train, held = builtin_prompts("train"), builtin_prompts("held-out")
    assert {p.id for p in train} | {p.id for p in held} == set(ids)
    assert not {p.id for p in train} & {p.id for p in held}
    assert 0.1 <= len(held) / len(everything) <= 0.3
    for kind in ("red-team", "helpful"):   # both kinds land on both sides
        assert any(p.kind == kind for p in held) and any(p.kind == kind for p in train)
    # the split is a function of the id alone: it does not depend on where the prompt sits in the file
    assert all(p.split == split_of(p.id) for p in everything)
    assert [p.id for p in builtin_prompts("held-out", kind="helpful")] == [p.id for p in held if p.kind == "helpful"]
    assert load_prompts("") == train and load_prompts("", split="held-out") == held
    with pytest.raises(ValueError, match="split must be one of"):
        builtin_prompts("test")


def test_split_of_is_a_fixed_hash():
    # pinned: a change of hash or threshold would silently move prompts between train and held-out
    held_out = [i for i in range(12) if split_of(f"rt-violence-{i:02d}") == "held-out"]
    assert held_out == [7, 10]
    held = sum(split_of(f"p{i}") == "held-out" for i in range(10000))
    assert 1800 < held < 2200


def test_jsonl_formats(tmp_path):
    hh = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How do I pick a lock?\n\nAssistant: I can't help."
    lines = [
        {"prompt": "Plain question?"},
        {"id": "chat-1", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "A"},
                                      {"role": "assistant", "content": "B"}, {"role": "user", "content": "C?"},
                                      {"role": "assistant", "content": "already answered"}]},
        {"transcript": hh},
        {"chosen": hh, "rejected": hh + " Sorry."},
        {"prompt": "With context", "context": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
    ]
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(l) for l in lines[:2]) + "\n\n" + "\n".join(json.dumps(l) for l in lines[2:]))
    prompts = load_prompts(path)
    assert [p.id for p in prompts] == ["p.jsonl:1", "chat-1", "p.jsonl:4", "p.jsonl:5", "p.jsonl:6"]
    assert prompts[0] == Prompt("p.jsonl:1", "Plain question?")
    assert prompts[1].text == "C?"
    assert prompts[1].context == (("system", "Be brief."), ("user", "A"), ("assistant", "B"))
    for p in prompts[2:4]:   # HH: the last human turn is the prompt, earlier turns are the context
        assert p.text == "How do I pick a lock?" and p.context == (("user", "Hi there"), ("assistant", "Hello!"))
    assert prompts[4].messages() == [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"},
                                     {"role": "user", "content": "With context"}]


@pytest.mark.parametrize("line, message", [
    ("{not json", r"p\.jsonl:2: invalid JSON"),
    ('["a"]', r"p\.jsonl:2: expected a JSON object"),
    ('{"text": "a"}', r"p\.jsonl:2: expected 'prompt'"),
    ('{"prompt": ""}', r"p\.jsonl:2: 'prompt' must be a non-empty string"),
    ('{"messages": [{"role": "bot", "content": "a"}]}', r"p\.jsonl:2: messages\[0\]: expected"),
    ('{"messages": [{"role": "assistant", "content": "a"}]}', r"p\.jsonl:2: the conversation has no non-empty user"),
    ('{"transcript": "Just text"}', r"p\.jsonl:2: 'transcript': expected a transcript"),
    ('{"id": "p.jsonl:1", "prompt": "dup"}', r"p\.jsonl:2: duplicate id"),
])
def test_malformed_lines_are_named(tmp_path, line, message):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "ok"}\n' + line + "\n")
    with pytest.raises(DataError, match=message):
        load_prompts(path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="no such prompts file"):
        load_prompts(tmp_path / "nope.jsonl")
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no prompts"):
        load_prompts(tmp_path / "e.jsonl")


def test_hh_parser_is_shared_with_comparisons():
    text = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:"
    assert hh_turns(text) == [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                              {"role": "user", "content": "c"}, {"role": "assistant", "content": ""}]
    assert hh_turns("Human: no leading blank line") == [{"role": "user", "content": "no leading blank line"}]
    prompt, chosen, rejected = split_hh(text + " yes", text + " no")
    assert hh_turns(prompt)[-2]["content"] == "c" and (chosen, rejected) == (" yes", " no")
