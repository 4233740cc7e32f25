from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# `python -m pytest` puts the checkout's root first on sys.path, where the Triton sources' folder `kernels/` (shipped
# as cai_engine.kernels) would shadow the `kernels` package that transformers (>= 5.25) imports: the tests use the
# installed cai_engine, so the root leaves sys.path.
_ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or os.getcwd()).resolve() != _ROOT]

if not torch.cuda.is_available():  # Triton kernels run on CPU tensors through the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("CAI_ENGINE_CACHE", os.path.join(os.path.dirname(__file__), "..", ".cache", "cai-engine"))

from cai_engine.model.checkpoint import build_model, our_name  # noqa: E402
from cai_engine.model.config import ModelConfig  # noqa: E402
from cai_engine.model.tiny import byte_tokenizer  # noqa: E402
from cai_engine.model.tokenizer import Tokenizer  # noqa: E402


def tiny_tokenizer() -> Tokenizer:
    """A byte-level BPE over the 256 bytes plus two merges and ChatML specials: enough to round-trip files."""
    return byte_tokenizer()


def hf_config(kind: str, tied: bool, **overrides):
    import transformers
    common = dict(vocab_size=300, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  tie_word_embeddings=tied, rms_norm_eps=1e-5, bos_token_id=257, eos_token_id=258,
                  pad_token_id=256)
    common.update(overrides)
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
           "mistral": transformers.MistralConfig}[kind]
    return cls(**common)


def hf_and_ours(kind: str, tied: bool, seed: int = 0, **overrides):
    import transformers
    torch.manual_seed(seed)
    cfg = hf_config(kind, tied, **overrides)
    cls = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
           "mistral": transformers.MistralForCausalLM}[kind]
    hf = cls(cfg).eval()
    with torch.no_grad():  # random, non-trivial norms and biases so that a mix-up shows
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.5)
    ours_cfg = ModelConfig.from_hf(cfg.to_dict(), source="test")
    tensors = {our_name(k): (v, "test") for k, v in hf.state_dict().items()}
    ours = build_model(ours_cfg, tensors, dtype=torch.float32, device="cpu")
    return hf, ours


@pytest.fixture
def tokenizer() -> Tokenizer:
    return tiny_tokenizer()


def has_module(name: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(name) is not None


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

BACKENDS = ["native", "triton", "torch"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Every op test runs once per backend (Triton through TRITON_INTERPRET on a CPU-only machine)."""
    if request.param == "triton" and not torch.cuda.is_available() and not has_module("triton"):
        pytest.skip("triton is not installed")
    monkeypatch.setenv("CAI_ENGINE_BACKEND", request.param)
    return request.param


def device_for(backend: str) -> str:
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def synthetic_comparisons(path, n=24, seed=0):
    """Comparison JSONL in all three record formats; the answer made of "he" always beats the one of "zq"."""
    import json
    import random
    rnd = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            good, bad = "he" * rnd.randint(2, 5), "zq" * rnd.randint(2, 5)
            if i % 3 == 0:
                record = {"prompt": f"q{i}:", "responses": [bad, good, bad + good], "ranking": [2, 0, 1]}
            elif i % 3 == 1:
                record = {"prompt": f"q{i}:", "chosen": good, "rejected": bad}
            else:
                record = {"chosen": f"\n\nHuman: q{i}\n\nAssistant: {good}",
                          "rejected": f"\n\nHuman: q{i}\n\nAssistant: {bad}"}
            f.write(json.dumps(record) + "\n")
