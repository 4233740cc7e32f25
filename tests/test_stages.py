"""The stages chained through their files on a tiny random model: critique -> sft -> feedback -> pm -> rl."""
from __future__ import annotations

import json

import pytest

from cai_engine import save_model
from cai_engine.data.comparisons import read_comparisons
from cai_engine.io import read_jsonl
from cai_engine.train.__main__ import main as train_main
from conftest import hf_and_ours, tiny_tokenizer


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    _, model = hf_and_ours("llama", True, max_position_embeddings=16384)
    save_model(model, tiny_tokenizer(), root / "model")
    return root / "model"


def test_stages_chain_through_their_files(tmp_path, tiny_model, capsys):
    run = tmp_path / "run"
    common = ["--run-dir", str(run), "--model", str(tiny_model), "--no-progress", "--precision", "fp32"]
    assert train_main(["critique", *common, "--limit", "3", "--rounds", "1", "--max-new-tokens", "6",
                       "--few-shot", "1"]) == 0
    records = read_jsonl(run / "critique" / "revisions.jsonl")
    assert len(records) == 3 and all(len(r["rounds"]) == 1 for r in records)
    assert train_main(["sft", *common, "--skip-flags", "", "--epochs", "1", "--max-seq-len", "4096",
                       "--eval-fraction", "0"]) == 0
    assert (run / "sft" / "final" / "config.json").is_file()
    assert train_main(["feedback", *common, "--limit", "4", "--max-new-tokens", "6", "--principles-per-pair", "2"]) == 0
    comparisons = read_comparisons(run / "feedback" / "comparisons.jsonl")  # the PM's own reader
    assert len(comparisons) == 4 and all(0 <= c.probs[0] <= 1 for c in comparisons)
    pairs = read_jsonl(run / "feedback" / "pairs.jsonl")
    assert [p["prompt"] for p in pairs] == [c.prompt for c in comparisons]
    assert train_main(["pm", *common, "--eval-fraction", "0", "--batch-groups", "2"]) == 0
    assert json.loads((run / "pm" / "final" / "config.json").read_text())["architectures"] == \
        ["LlamaForSequenceClassification"]
    assert train_main(["rl", *common, "--limit", "4", "--prompts-per-batch", "2", "--max-new-tokens", "4",
                       "--epochs-per-batch", "1", "--minibatches", "1", "--set", "rl.kv_cache_mb=8"]) == 0
    assert len(read_jsonl(run / "rl" / "metrics.jsonl")) == 2
    # a finished generation stage rerun with another config is refused, naming the key
    capsys.readouterr()
    assert train_main(["feedback", *common, "--limit", "4", "--max-new-tokens", "7", "--principles-per-pair", "2"]) == 2
    assert "feedback.max_new_tokens (6 -> 7)" in capsys.readouterr().err
