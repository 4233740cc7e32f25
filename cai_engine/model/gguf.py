"""GGUF files: metadata -> config and tokenizer, tensors dequantized with the `gguf` package.

A converted GGUF is cached in the Hugging Face layout under the user cache directory, keyed by the
file's SHA-256, so a second load reads safetensors in well under a second.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import build_model, load_hf_dir, save_hf_dir
from .config import ModelConfig
from ..errors import CheckpointError
from .tokenizer import Tokenizer

_ARCH_TO_MODEL_TYPE = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head"}


def cache_dir() -> Path:
    root = os.environ.get("CAI_ENGINE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "cai-engine")
    return Path(root)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def load_gguf(path: str | os.PathLike, *, dtype=None, device=None, use_cache: bool = True):
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: GGUF file is missing")
    if not use_cache:
        model, tokenizer = convert_gguf(path)
        return model.to(dtype=dtype or model.dtype, device=device or "cpu"), tokenizer
    target = cache_dir() / f"gguf-{file_sha256(path)[:24]}"
    if not (target / "config.json").is_file():
        model, tokenizer = convert_gguf(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
        try:
            save_hf_dir(model, tokenizer, tmp)
            try:
                os.rename(tmp, target)
            except OSError:  # another process finished first; its copy is identical
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return load_hf_dir(target, dtype=dtype, device=device)


def read_metadata(reader) -> dict[str, Any]:
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        value = field.contents()
        meta[key] = value
    return meta


def config_from_gguf(meta: dict[str, Any], tensor_names: set[str], source: str) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch not in _ARCH_TO_MODEL_TYPE:
        raise CheckpointError(f"{source}: general.architecture={arch!r} is not supported; "
                              f"expected one of {sorted(_ARCH_TO_MODEL_TYPE)}")
    if "rope_freqs.weight" in tensor_names:
        raise CheckpointError(f"{source}: tensor 'rope_freqs.weight' (llama3 RoPE factors) cannot be honoured "
                              "from GGUF; load the Hugging Face directory of this model instead")

    def get(key, default=None, required=False):
        full = f"{arch}.{key}"
        if required and full not in meta:
            raise CheckpointError(f"{source}: metadata key {full!r} is missing")
        return meta.get(full, default)

    n_heads = int(get("attention.head_count", required=True))
    hidden = int(get("embedding_length", required=True))
    scaling = None
    if get("rope.scaling.type") == "linear":
        scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    elif get("rope.scaling.type") not in (None, "none"):
        raise CheckpointError(f"{source}: {arch}.rope.scaling.type={get('rope.scaling.type')!r} cannot be honoured")
    vocab = get("vocab_size") or len(meta.get("tokenizer.ggml.tokens", []))
    if not vocab:
        raise CheckpointError(f"{source}: neither {arch}.vocab_size nor tokenizer.ggml.tokens is present")
    return ModelConfig(
        model_type=_ARCH_TO_MODEL_TYPE[arch],
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length", required=True)),
        num_hidden_layers=int(get("block_count", required=True)),
        num_attention_heads=n_heads,
        num_key_value_heads=int(get("attention.head_count_kv", n_heads)),
        head_dim=int(get("attention.key_length", hidden // n_heads)),
        max_position_embeddings=int(get("context_length", 2048)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        sliding_window=None,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
    )


def our_tensor_name(gguf_name: str) -> str | None:
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _LAYER_NAMES:
        return f"layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _TOP_NAMES:
        name = _TOP_NAMES[parts[0]]
        return "lm_head_weight" if name == "lm_head" else f"{name}.{parts[1]}"
    return None


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's interleaving of Q/K rows (its converter's `permute`) back to the HF half-split layout."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def convert_gguf(path: Path):
    from gguf import GGUFReader
    from gguf.quants import dequantize

    source = str(path)
    try:
        reader = GGUFReader(source)
    except Exception as e:
        raise CheckpointError(f"{source}: cannot be read as GGUF: {e}") from None
    meta = read_metadata(reader)
    names = {t.name for t in reader.tensors}
    config = config_from_gguf(meta, names, source)
    tensors: dict[str, tuple[torch.Tensor, str]] = {}
    permute = config.model_type in ("llama", "mistral")  # llama.cpp permutes Q/K only for these
    for t in reader.tensors:
        name = our_tensor_name(t.name)
        if name is None:
            raise CheckpointError(f"{source}: unexpected tensor {t.name!r} for {config.architecture}")
        try:
            w = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        except NotImplementedError:
            raise CheckpointError(f"{source}: tensor {t.name!r} has type {t.tensor_type.name}, "
                                  "which the gguf package cannot dequantize") from None
        w = w.reshape([int(s) for s in reversed(t.shape)])
        if permute and t.name.endswith(("attn_q.weight", "attn_q.bias")):
            w = unpermute_rope_rows(w, config.num_attention_heads)
        elif permute and t.name.endswith(("attn_k.weight", "attn_k.bias")):
            w = unpermute_rope_rows(w, config.num_key_value_heads)
        tensors[name] = (torch.from_numpy(np.array(w, dtype=np.float32, order="C")), f"{source} [{t.name}]")
    model = build_model(config, tensors, dtype=torch.float32, device="cpu")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    model.generation_config = {"bos_token_id": config.bos_token_id, "eos_token_id": eos}
    return model, Tokenizer.from_gguf_fields(meta | {"context_length": config.max_position_embeddings}, source)
