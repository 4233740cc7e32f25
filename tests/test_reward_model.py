import json

import pytest
import torch

from cai_engine.data.comparisons import DataError, parse_record, read_comparisons, split_hh
from cai_engine import save_model
from cai_engine.model.heads import RewardModel, pack_separate, pack_shared
from cai_engine.train.__main__ import main as train_main
from cai_engine.train.pm import PMConfig, calibration, train_pm
from conftest import hf_and_ours


@pytest.fixture
def reward_model():
    torch.manual_seed(0)
    _, backbone = hf_and_ours("llama", True)
    return RewardModel(backbone).eval()


def groups(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(3, 255, (n,), generator=g).tolist()
    return [(ids(9), [ids(4), ids(7), ids(1), ids(5)]), (ids(3), [ids(6), ids(2)]), (ids(14), [ids(3)])]


def test_prefix_shared_rewards_equal_separate_encoding(reward_model):
    gs = groups()
    with torch.no_grad():
        shared = reward_model(pack_shared(gs, pad_id=0))
        separate = reward_model(pack_separate(gs, pad_id=0))
        one_by_one = torch.cat([reward_model(pack_separate([(p, [r])], 0)) for p, rs in gs for r in rs])
    assert shared.shape == (7,)
    torch.testing.assert_close(shared, separate, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared, one_by_one, atol=1e-5, rtol=1e-5)


def test_shared_packing_layout():
    batch = pack_shared([([5, 6], [[7, 8], [9]])], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 2]]
    assert batch.read_index.tolist() == [3, 4]
    allowed = batch.attn_mask[0]
    assert allowed[4, :2].all() and not allowed[4, 2:4].any() and allowed[4, 4]


def test_reward_model_round_trip_and_transformers(tmp_path, reward_model, tokenizer):
    import transformers
    reward_model.save(tmp_path, tokenizer)
    again, _ = RewardModel.load(tmp_path)
    assert torch.equal(again.score.weight, reward_model.score.weight)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    ids = torch.randint(3, 255, (1, 12))
    batch = pack_separate([(ids[0, :5].tolist(), [ids[0, 5:].tolist()])], 0)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits[0, 0], again(batch)[0], atol=1e-5, rtol=1e-5)


def test_record_formats():
    c = parse_record({"prompt": "p", "responses": ["a", "b", "c"], "ranking": [2, 0, 1]})
    assert c.pairs == [(0, 1), (0, 2), (1, 2)] and c.probs == [0.0, 0.0, 1.0]
    c = parse_record({"prompt": "p", "responses": ["a", "b"], "soft_labels": 0.8})
    assert c.pairs == [(0, 1)] and c.probs == [0.8]
    c = parse_record({"prompt": "p", "responses": ["a", "b", "c"],
                      "soft_labels": [[0.5, 0.7, 0.6], [0.3, 0.5, 0.4], [0.4, 0.6, 0.5]]})
    assert c.probs == [0.7, 0.6, 0.4]
    c = parse_record({"prompt": "p", "chosen": "good", "rejected": "bad"})
    assert c.responses == ["good", "bad"] and c.probs == [1.0]
    hh = {"chosen": "\n\nHuman: hi\n\nAssistant: hello!\n\nHuman: bye\n\nAssistant: Goodbye, take care.",
          "rejected": "\n\nHuman: hi\n\nAssistant: hello!\n\nHuman: bye\n\nAssistant: Go away."}
    c = parse_record(hh)
    assert c.prompt == "\n\nHuman: hi\n\nAssistant: hello!\n\nHuman: bye\n\nAssistant:"
    assert c.responses == [" Goodbye, take care.", " Go away."]
    assert split_hh("\n\nHuman: x\n\nAssistant: A", "\n\nHuman: x\n\nAssistant: B")[0].endswith("Assistant:")


def test_malformed_lines_are_reported_with_their_number(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n\n" + '{"prompt": "p", oops}\n')
    with pytest.raises(DataError, match=r"data.jsonl:3: invalid JSON"):
        read_comparisons(path)
    path.write_text(json.dumps({"prompt": "p", "responses": ["a", "b"], "soft_labels": [[0.5, 0.9], [0.9, 0.5]]}))
    with pytest.raises(DataError, match=r"data.jsonl:1: soft_labels\[0\]\[1\] \+ soft_labels\[1\]\[0\] must be 1"):
        read_comparisons(path)
    path.write_text(json.dumps({"prompt": "p", "responses": ["a", "  "], "ranking": [0, 1]}))
    with pytest.raises(DataError, match=r"data.jsonl:1: response 1 is empty"):
        read_comparisons(path)


def test_calibration():
    pred = torch.tensor([0.9, 0.1, 0.8, 0.3])
    assert calibration(pred, torch.tensor([1.0, 0.0, 1.0, 0.0]))["accuracy"] == 1.0
    assert calibration(pred, pred)["ece"] < 1e-6
    assert abs(calibration(torch.full((4,), 0.9), torch.tensor([1.0, 1.0, 0.0, 0.0]))["ece"] - 0.4) < 1e-6


def synthetic_data(path, n=24, seed=0):
    import random
    rnd = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            good, bad = "he" * rnd.randint(2, 5), "zq" * rnd.randint(2, 5)
            if i % 3 == 0:
                f.write(json.dumps({"prompt": f"q{i}:", "responses": [bad, good, bad + good], "ranking": [2, 0, 1]}))
            elif i % 3 == 1:
                f.write(json.dumps({"prompt": f"q{i}:", "chosen": good, "rejected": bad}))
            else:
                f.write(json.dumps({"chosen": f"\n\nHuman: q{i}\n\nAssistant: {good}",
                                    "rejected": f"\n\nHuman: q{i}\n\nAssistant: {bad}"}))
            f.write("\n")


def test_pm_training_learns_and_resumes(tmp_path, tokenizer):
    torch.manual_seed(0)
    _, backbone = hf_and_ours("llama", True)
    save_model(backbone, tokenizer, tmp_path / "base")
    synthetic_data(tmp_path / "data.jsonl")
    logs = []
    cfg = PMConfig(data=str(tmp_path / "data.jsonl"), output_dir=str(tmp_path / "run"), model=str(tmp_path / "base"),
                   epochs=3, batch_groups=4, grad_accum=2, lr=3e-3, schedule="constant", checkpoint_every=2,
                   eval_fraction=0.25)
    summary = train_pm(cfg, log=logs.append)
    history = summary["history"]
    assert len(history) == 3 and summary["steps"] == 6
    assert history[-1]["loss"] < history[0]["loss"] or history[-1]["accuracy"] >= history[0]["accuracy"]
    final = tmp_path / "run" / "final"
    assert (final / "config.json").is_file() and (final / "optimizer.safetensors").is_file()
    assert json.loads((final / "config.json").read_text())["architectures"] == ["LlamaForSequenceClassification"]
    # a longer run over the same output directory resumes from the last checkpoint, not from scratch
    logs.clear()
    cfg.epochs = 4
    summary = train_pm(cfg, log=logs.append)
    assert any("resumed from" in line and "checkpoint-6" in line for line in logs)
    assert summary["steps"] == 8 and len(summary["history"]) == 4


def test_train_cli_reports_bad_data(tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "p"}\n')
    assert train_main(["pm", "--data", str(tmp_path / "bad.jsonl"), "--output-dir", str(tmp_path / "o")]) == 2
    assert "bad.jsonl:1: 'responses' must be a list" in capsys.readouterr().err
