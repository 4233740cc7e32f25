"""The critique -> revision loop: a tiny random model end to end, batching-independent records, prefix reuse,
resume after SIGKILL equal to an uninterrupted run, degenerate flags, and the embedded default (slow)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from cai_engine import LLM
from cai_engine.cai import (ComparisonPrinciple, Constitution, CritiqueConfig, CritiqueExample, CritiquePrinciple,
                            run_critique)
from cai_engine.cai.critique import _Conversation, _flag_output, draw_principles, few_shot_prefix
from cai_engine.data.prompts import Prompt, builtin_prompts
from conftest import hf_and_ours, tiny_tokenizer

HERE = Path(__file__).resolve().parent

CONSTITUTION = Constitution(
    [CritiquePrinciple("harm", "Say how the reply could hurt someone.", "Rewrite it to be safe."),
     CritiquePrinciple("rude", "Say what is rude in it.", "Rewrite it politely."),
     CritiquePrinciple("vague", "Say what is vague.", "Rewrite it to be specific.")],
    [ComparisonPrinciple("kind", "Choose the response that is kinder.")],
    [CritiqueExample("How do I boil an egg?", "Throw it at a wall.", "Say what is wrong.", "It is useless and messy.",
                     "Rewrite it to be useful.", "Boil it for seven minutes, then cool it in cold water."),
     CritiqueExample("Hello", "Go away.", "Say what is rude.", "It dismisses the user.", "Be polite.",
                     "Hello! How can I help?", (("user", "Hi"), ("assistant", "Yes?")))],
    source="test")
PROMPTS = [Prompt(f"q{i}", text) for i, text in enumerate(
    ["How do I bake bread?", "Tell me a joke.", "How can I hurt someone?", "What is rain?", "Fix my bike.",
     "Where is Paris?", "Help me lie to my boss.", "Explain atoms."])]
CONFIG = dict(rounds=2, max_new_tokens=8, temperature=1.0, top_p=0.95, seed=5)


def tiny_llm(seed: int = 3) -> LLM:
    _, model = hf_and_ours("llama", False, seed=seed, max_position_embeddings=2048)
    return LLM(model, tiny_tokenizer(), kv_cache_bytes=8 << 20, block_size=8)


def run(path, batch_size=4, prompts=PROMPTS, llm=None, **overrides):
    llm = llm or tiny_llm()
    config = CritiqueConfig(batch_size=batch_size, **{**CONFIG, **overrides})
    stats = run_critique(llm, llm.tokenizer, CONSTITUTION, prompts, config, path, log=lambda m: None, model_name="tiny")
    return stats, [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One run over every prompt in batches of 4: the reference the other runs must reproduce."""
    return run(tmp_path_factory.mktemp("full") / "r.jsonl", batch_size=4)


def test_tiny_model_end_to_end(uninterrupted):
    stats, records = uninterrupted
    assert [r["id"] for r in records] == [p.id for p in PROMPTS]
    config = CritiqueConfig(**CONFIG)
    for r, p in zip(records, PROMPTS):
        assert r["prompt"] == p.text and r["model"] == "tiny" and r["seed"] == 5
        assert r["sampling"] == {"temperature": 1.0, "top_p": 0.95, "max_new_tokens": 8}
        assert [x["principle"] for x in r["rounds"]] == draw_principles(CONSTITUTION, config, p.id)
        assert len(r["rounds"]) == 2 and all(x["critique"] is not None for x in r["rounds"])
        assert r["final"] == r["rounds"][-1]["revision"]
        assert set(r["flags"]) <= {"empty", "cut", "echo", "unchanged"}
    # a random model rarely samples its EOS: most generations run to max_new_tokens and are flagged
    assert sum("cut" in r["flags"] for r in records) >= len(records) // 2
    assert stats.prompts == len(PROMPTS) and stats.generations == len(PROMPTS) * 5
    # the few-shot prefix and each conversation's history come from the prefix cache
    assert stats.prefix_hit_rate > 0.5, stats
    # principles vary across prompts (drawn per prompt, not once)
    assert len({tuple(x["principle"] for x in r["rounds"]) for r in records}) > 1


def test_records_do_not_depend_on_batching(tmp_path, uninterrupted):
    _, together = uninterrupted
    _, alone = run(tmp_path / "b.jsonl", batch_size=1, prompts=PROMPTS[:3])
    assert alone == together[:3]


def test_each_request_extends_the_previous_one(tmp_path, monkeypatch):
    llm = tiny_llm()
    sent = []
    generate = llm.generate
    monkeypatch.setattr(llm, "generate", lambda requests, params: sent.append(requests) or generate(requests, params))
    run(tmp_path / "r.jsonl", llm=llm, prompts=PROMPTS[:3])
    assert len(sent) == 5 and all(isinstance(m, list) and isinstance(m[0], dict) for m in sent[0])   # chat template
    prefix = llm.tokenizer.encode(few_shot_prefix(CONSTITUTION))
    for earlier, later in zip(sent[1:], sent[2:]):
        for a, b in zip(earlier, later):
            assert b[:len(a)] == a and len(b) > len(a)
    for request in sent[1]:
        assert request[:len(prefix)] == prefix
    texts = [llm.tokenizer.decode(r) for r in sent[-1]]
    assert all(t.count("CritiqueRequest:") == 2 + 2 and t.count("RevisionRequest:") == 2 + 2 for t in texts)


def test_revise_only_skips_the_critique(tmp_path, monkeypatch):
    llm = tiny_llm()
    sent = []
    generate = llm.generate
    monkeypatch.setattr(llm, "generate", lambda requests, params: sent.append(requests) or generate(requests, params))
    _, records = run(tmp_path / "r.jsonl", llm=llm, prompts=PROMPTS[:3], revise_only=True)
    assert len(sent) == 3   # initial + one revision per round
    assert all(x["critique"] == "" for r in records for x in r["rounds"])
    assert all(r["revise_only"] for r in records)
    assert not any("CritiqueRequest" in llm.tokenizer.decode(req) for batch in sent[1:] for req in batch)


def test_resume_skips_done_prompts_and_refuses_other_settings(tmp_path, uninterrupted):
    path = tmp_path / "r.jsonl"
    full = uninterrupted[1][:4]
    stats, part = run(path, prompts=PROMPTS[:2])
    with open(path, "a") as f:
        f.write('{"id": "q2", "prompt": "torn')   # a writer killed mid-record
    stats, records = run(path, prompts=PROMPTS[:4])
    assert stats.skipped == 2 and stats.prompts == 2
    assert records == full
    with pytest.raises(ValueError, match=r"r\.jsonl: record 1 was made with seed=5, this run has 6"):
        run(path, prompts=PROMPTS[:4], seed=6)
    stats, _ = run(path, prompts=PROMPTS[:4], limit=3)
    assert stats.prompts == 0 and stats.skipped == 3


def test_kill_then_resume_equals_uninterrupted(tmp_path, uninterrupted):
    expected = uninterrupted[1]
    path = tmp_path / "killed.jsonl"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, str(HERE / "test_critique.py"), str(path), "1"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if path.exists() and path.read_text().count("\n") >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"the child ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = path.read_text().count("\n")
    assert 2 <= done < len(PROMPTS)
    stats, records = run(path, batch_size=4)
    assert stats.skipped == done and stats.prompts == len(PROMPTS) - done
    assert records == expected


def test_degenerate_flags():
    def flags(text, reason="stop", request="Say what is rude in the reply, please."):
        c = _Conversation(PROMPTS[0], [], record={"flags": {}})
        _flag_output(c, SimpleNamespace(text=text, finish_reason=reason), "critique 1", request)
        return c.record["flags"]

    assert flags("It is rude.") == {}
    assert flags("  \n ") == {"empty": ["critique 1"]}
    assert flags("It is", reason="length") == {"cut": ["critique 1"]}
    assert flags("say what is RUDE in the reply please") == {"echo": ["critique 1"]}
    assert flags("CritiqueRequest: Say what is rude in the reply, please. It is.") == {"echo": ["critique 1"]}
    assert flags("Hi", request="Hi") == {"echo": ["critique 1"]}


def test_unchanged_revision_is_flagged(tmp_path, monkeypatch):
    llm = tiny_llm()
    generate = llm.generate

    def same_answer(requests, params):   # every revision repeats the initial answer
        outs = generate(requests, params)
        if isinstance(requests[0], list) and isinstance(requests[0][0], int) and \
                llm.tokenizer.decode(requests[0]).endswith("Revision:"):
            for o in outs:
                o.outputs[0].text = "Same answer."
        elif isinstance(requests[0], list) and isinstance(requests[0][0], dict):
            for o in outs:
                o.outputs[0].text = "same answer"
        return outs

    monkeypatch.setattr(llm, "generate", same_answer)
    _, records = run(tmp_path / "r.jsonl", llm=llm, prompts=PROMPTS[:2])
    assert all(r["flags"]["unchanged"] == ["revision 1", "revision 2"] for r in records)


def test_bad_config():
    with pytest.raises(ValueError, match="critique config: rounds must be >= 1"):
        run_critique(None, None, CONSTITUTION, PROMPTS, CritiqueConfig(rounds=0), "/dev/null")


@pytest.mark.slow
def test_embedded_default_revises(tmp_path):
    from cai_engine import DEFAULT_MODEL, load_model
    model, tok = load_model(DEFAULT_MODEL)
    llm = LLM(model, tok, kv_cache_bytes=256 << 20)
    everything = builtin_prompts("all")
    prompts = [p for p in everything if p.kind == "red-team"][:2] + [p for p in everything if p.kind == "helpful"][:2]
    config = CritiqueConfig(rounds=1, max_new_tokens=48, seed=0)
    stats = run_critique(llm, tok, Constitution.load(""), prompts, config, tmp_path / "r.jsonl", log=lambda m: None,
                         model_name=DEFAULT_MODEL)
    records = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    ids = {p.id for p in Constitution.load("").critique_principles}
    assert [r["id"] for r in records] == [p.id for p in prompts]
    for r in records:
        assert r["initial"].strip() and r["rounds"][0]["critique"].strip() and r["final"].strip()
        assert r["rounds"][0]["principle"] in ids and r["final"] == r["rounds"][0]["revision"]
        assert r["final"] != r["initial"]
        assert "error" not in r["flags"]
    assert stats.prefix_hit_rate > 0.3


if __name__ == "__main__":   # the child of test_kill_then_resume_equals_uninterrupted
    run(sys.argv[1], batch_size=int(sys.argv[2]))
