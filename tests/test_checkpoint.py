import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from cai_engine import CheckpointError, load_model, save_model
from conftest import hf_and_ours


@pytest.mark.parametrize("kind,tied", [("llama", True), ("qwen2", False)])
def test_save_load_round_trip_is_bit_exact(tmp_path, tokenizer, kind, tied):
    _, ours = hf_and_ours(kind, tied)
    save_model(ours, tokenizer, tmp_path / "ckpt")
    again, tok = load_model(tmp_path / "ckpt")
    a, b = ours.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert again.config == ours.config
    assert tok.encode("hello <|im_end|>") == tokenizer.encode("hello <|im_end|>")
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == \
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)


@pytest.mark.parametrize("kind,tied", [("llama", True), ("llama", False), ("qwen2", True), ("mistral", False)])
def test_transformers_loads_what_we_save(tmp_path, tokenizer, kind, tied):
    import transformers
    _, ours = hf_and_ours(kind, tied, seed=4)
    save_model(ours, tokenizer, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 300, (2, 17))
    with torch.no_grad():
        assert (hf(ids).logits - ours.logits(ids)).abs().max() < 1e-4
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    msgs = [{"role": "user", "content": "hello there"}]
    assert hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        tokenizer.apply_chat_template(msgs)
    assert hf_tok("hello <|im_end|> world")["input_ids"] == tokenizer.encode("hello <|im_end|> world")
    assert hf_tok.eos_token == "<|im_end|>"


def test_sharded_checkpoint_with_index_loads(tmp_path, tokenizer, monkeypatch):
    import cai_engine.model.checkpoint as ckpt
    _, ours = hf_and_ours("llama", False)
    monkeypatch.setattr(ckpt, "MAX_SHARD_BYTES", 60_000)
    save_model(ours, tokenizer, tmp_path)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    again, _ = load_model(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), again.parameters()))


@pytest.fixture
def saved(tmp_path, tokenizer):
    _, ours = hf_and_ours("llama", False)
    save_model(ours, tokenizer, tmp_path)
    return tmp_path


def edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_error_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or directory"):
        load_model(tmp_path / "nope")


def test_error_missing_config(saved):
    (saved / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config.json: file is missing"):
        load_model(saved)


def test_error_truncated_safetensors(saved):
    f = saved / "model.safetensors"
    f.write_bytes(f.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=r"model.safetensors: cannot read safetensors"):
        load_model(saved)


def test_error_unknown_architecture(saved):
    edit_config(saved, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(CheckpointError, match=r"config.json: model_type='gpt2'"):
        load_model(saved)


def test_error_key_we_cannot_honour(saved):
    edit_config(saved, hidden_act="gelu")
    with pytest.raises(CheckpointError, match=r"config.json: hidden_act='gelu' cannot be honoured"):
        load_model(saved)
    edit_config(saved, hidden_act="silu", rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(CheckpointError, match=r"config.json: rope_scaling type 'yarn'"):
        load_model(saved)


def test_error_tensor_of_wrong_shape(saved):
    f = saved / "model.safetensors"
    tensors = load_file(f)
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(7, 64)
    save_file(tensors, f)
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'model.layers.1.mlp.up_proj.weight' "
                                              r"has shape \(7, 64\), expected \(112, 64\)"):
        load_model(saved)


def test_error_missing_tensor(saved):
    f = saved / "model.safetensors"
    tensors = load_file(f)
    del tensors["lm_head.weight"]
    save_file(tensors, f)
    with pytest.raises(CheckpointError, match=r"missing 1 tensor\(s\).*lm_head.weight"):
        load_model(saved)


def test_error_required_config_key(saved):
    cfg = json.loads((saved / "config.json").read_text())
    del cfg["hidden_size"]
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config.json: required key 'hidden_size' is missing"):
        load_model(saved)


def test_error_invalid_json_names_line(saved):
    (saved / "config.json").write_text('{\n  "model_type": "llama",\n  oops\n}')
    with pytest.raises(CheckpointError, match=r"config.json: invalid JSON at line 3"):
        load_model(saved)


def test_pickled_weights_are_refused(tmp_path, saved):
    (saved / "model.safetensors").rename(saved / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickled weights are never loaded"):
        load_model(saved)
