"""SFT trainer: packing without cross-contamination, loss on answer tokens only, learning, HF export."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cai_engine import load_model, save_model
from cai_engine.data.comparisons import DataError
from cai_engine.io import read_jsonl
from cai_engine.train.__main__ import main as train_main
from cai_engine.train.precision import Precision
from cai_engine.train.sft import (SFTExample, answer_logprobs, collate, examples_from_chat_file,
                                  examples_from_revisions, pack, tokenize)
from conftest import hf_and_ours, tiny_tokenizer

FP32 = Precision("fp32", "test")


def write_revisions(path: Path, n: int = 24) -> None:
    with open(path, "w") as f:
        for i in range(n):
            record = {"id": f"p{i}", "prompt": f"q{i} zq?", "context": [], "initial": "zq zq",
                      "rounds": [{"principle": "a", "critique": "bad", "revision": "hello"},
                                 {"principle": "b", "critique": "ok", "revision": "hello hello"}],
                      "final": "hello hello",
                      "flags": {3: {"cut": ["revision 2"]}, 4: {"cut": ["initial", "critique 1"]}}.get(i, {})}
            f.write(json.dumps(record) + "\n")


@pytest.fixture(scope="module")
def sft_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    _, backbone = hf_and_ours("llama", False)
    save_model(backbone, tiny_tokenizer(), root / "base")
    write_revisions(root / "revisions.jsonl")
    return root


def test_packed_rows_score_each_example_as_if_alone(tokenizer):
    _, model = hf_and_ours("qwen2", True)
    examples = [SFTExample([{"role": "user", "content": "hi there"}], "hello"),
                SFTExample([{"role": "system", "content": "be kind"}, {"role": "user", "content": "why?"}], "because"),
                SFTExample([{"role": "user", "content": "x"}], "a much longer answer here")]
    sequences = [tokenize(e, tokenizer, 80) for e in examples]
    rows = pack(sequences, 80)
    assert len(rows) == 2 and rows[0].segments[-1] == 2  # the first two share a row
    with torch.no_grad():
        packed = answer_logprobs(model, model.lm_head, collate(rows, 0), FP32, "cpu")
        alone = torch.cat([answer_logprobs(model, model.lm_head, collate(pack([s], 80), 0), FP32, "cpu")
                           for s in sequences])
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
    # exactly the answer tokens (and EOS) are scored, never a prompt token
    assert packed.numel() == sum(len(s.tokens) - s.first_target for s in sequences)
    batch = collate(rows, 0)
    first = sequences[0]
    assert batch["labels"][: len(first.tokens) - first.first_target].tolist() == first.tokens[first.first_target:]
    assert first.tokens[-1] == tokenizer.eos_id


def test_revision_records_give_final_or_every_revision_and_skip_flagged(tmp_path):
    write_revisions(tmp_path / "r.jsonl", n=5)
    final, skipped = examples_from_revisions(tmp_path / "r.jsonl", targets="final", skip_flags=["cut"])
    assert len(final) == 4 and skipped == 1 and final[0].response == "hello hello"
    assert final[0].messages == [{"role": "user", "content": "q0 zq?"}]
    every, skipped = examples_from_revisions(tmp_path / "r.jsonl", targets="all", skip_flags=[])
    assert len(every) == 10 and skipped == 0
    # only the answer trained on counts: record 3's first revision stays; record 4's cut critique does not matter
    every, skipped = examples_from_revisions(tmp_path / "r.jsonl", targets="all", skip_flags=["cut"])
    assert len(every) == 9 and skipped == 1 and [e.response for e in every[6:8]] == ["hello", "hello"]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "p"}\n')
    with pytest.raises(DataError, match="bad.jsonl: record 1: expected 'prompt' and 'final'"):
        examples_from_revisions(tmp_path / "bad.jsonl", targets="final", skip_flags=[])
    (tmp_path / "chat.jsonl").write_text('{"messages": [{"role": "user", "content": "a"}], "response": "b"}\n'
                                         '{"prompt": "c", "response": ""}\n')
    with pytest.raises(DataError, match="chat.jsonl: record 2: expected a non-empty 'response'"):
        examples_from_chat_file(tmp_path / "chat.jsonl")


def test_sft_learns_and_exports_a_model_transformers_loads(tmp_path, sft_setup):
    import transformers
    run = tmp_path / "run"
    args = ["sft", "--model", str(sft_setup / "base"), "--data", str(sft_setup / "revisions.jsonl"),
            "--run-dir", str(run), "--lr", "3e-3", "--epochs", "4", "--batch-rows", "2", "--max-seq-len", "64",
            "--eval-fraction", "0.2", "--eval-every", "1", "--precision", "fp32", "--no-progress"]
    assert train_main(args) == 0
    history = json.loads((run / "sft" / "summary.json").read_text())["history"]
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]  # held-out answer loss (fails at lr 0)
    records = read_jsonl(run / "sft" / "metrics.jsonl")
    assert records[-1]["loss"] < 0.5 * records[0]["loss"]
    ours, tok = load_model(run / "sft" / "final")
    hf = transformers.AutoModelForCausalLM.from_pretrained(run / "sft" / "final").eval()
    ids = torch.tensor([tok.encode(tok.apply_chat_template([{"role": "user", "content": "q1 zq?"}]),
                                   add_special_tokens=False)])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours.logits(ids), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_sft_on_the_embedded_default_lowers_its_loss(tmp_path):
    """A few steps of the real model on hand-made revisions: the answer loss falls, the export loads."""
    with open(tmp_path / "revisions.jsonl", "w") as f:
        for i in range(8):
            f.write(json.dumps({"prompt": f"How do I pick a lock number {i}?", "final":
                                "I can't help with getting into property that isn't yours, but a licensed "
                                "locksmith can open your own lock quickly and legally.", "flags": {}}) + "\n")
    run = tmp_path / "run"
    assert train_main(["sft", "--data", str(tmp_path / "revisions.jsonl"), "--run-dir", str(run), "--lr", "1e-4",
                       "--epochs", "2", "--batch-rows", "2", "--eval-fraction", "0", "--max-seq-len", "256",
                       "--no-progress"]) == 0
    records = read_jsonl(run / "sft" / "metrics.jsonl")
    assert records[-1]["loss"] < records[0]["loss"]
    model, _ = load_model(run / "sft" / "final")
    assert model.config.num_hidden_layers == 30
