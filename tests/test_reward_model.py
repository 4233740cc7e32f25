import json

import pytest
import torch

from cai_engine.data.comparisons import DataError, parse_record, read_comparisons, split_hh
from cai_engine.model.heads import RewardModel, pack_separate, pack_shared
from cai_engine.train.pm import calibration
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


def test_export_scores_equal_in_transformers_when_pad_is_eos(tmp_path, reward_model, tokenizer):
    """SmolLM2 and Llama 3 pad with their EOS; transformers reads the score at the last non-pad token, so an
    export keeping pad == EOS would score the token before the EOS that our trainer reads."""
    import copy
    import transformers
    from cai_engine.model.heads import distinct_pad
    eos_padded = copy.copy(tokenizer)
    eos_padded.pad_token = tokenizer.eos_token
    assert eos_padded.pad_id == eos_padded.eos_id
    reward_model.save(tmp_path, eos_padded)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["pad_token_id"] != eos_padded.eos_id and saved["pad_token_id"] == distinct_pad(eos_padded).pad_id
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    eos = eos_padded.eos_id
    answers = [[40, 41, 42, eos], [50, 51, eos], [60, 61, 62, 63, 64, eos]]
    prompt = [30, 31, 32]
    with torch.no_grad():
        ours = reward_model(pack_separate([(prompt, answers)], pad_id=saved["pad_token_id"]))
        rows = pack_separate([(prompt, answers)], pad_id=saved["pad_token_id"]).input_ids  # right-padded batch
        theirs = hf(rows, attention_mask=(rows != saved["pad_token_id"]).long()).logits[:, 0]
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
