"""Hugging Face layout: config.json + *.safetensors (+ index) + tokenizer files. Never unpickles anything."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from .config import ModelConfig
from ..errors import CheckpointError
from ..io import atomic_write_bytes, atomic_write_json, read_json
from .decoder import Transformer, rope_inv_freq
from .tokenizer import Tokenizer

MAX_SHARD_BYTES = 4 << 30
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
HEAD_TENSORS = ("score.weight",)  # task heads (the reward model's) are read by their owners, not the decoder


def hf_name(name: str) -> str:
    return "lm_head.weight" if name == "lm_head_weight" else f"model.{name}"


def our_name(name: str) -> str:
    if name == "lm_head.weight":
        return "lm_head_weight"
    return name[len("model."):] if name.startswith("model.") else name


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def build_model(config: ModelConfig, tensors: dict[str, tuple[torch.Tensor, str]], *,
                dtype: torch.dtype | None, device) -> Transformer:
    """Make a model from {our_name: (tensor, source file)}; checks every name and shape against the config."""
    device = torch.device(device or "cpu")
    dtype = dtype or default_dtype(device)
    with torch.device("meta"):
        model = Transformer(config)
    expected = dict(model.named_parameters())
    if config.tie_word_embeddings:
        tensors.pop("lm_head_weight", None)
    missing = [hf_name(n) for n in expected if n not in tensors]
    if missing:
        raise CheckpointError(f"checkpoint is missing {len(missing)} tensor(s) for {config.architecture}: "
                              f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    for name, (tensor, source) in tensors.items():
        if name not in expected:
            raise CheckpointError(f"{source}: unexpected tensor {hf_name(name)!r} for {config.architecture}")
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(f"{source}: tensor {hf_name(name)!r} has shape {tuple(tensor.shape)}, "
                                  f"expected {tuple(expected[name].shape)} from the config")
    model = model.to(dtype=dtype).to_empty(device=device)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(tensors[name][0])
    model.inv_freq = rope_inv_freq(config).to(device)
    return model.eval()


def weight_files(directory: Path) -> list[Path]:
    """The model's safetensors files: the index's shards, else model*.safetensors, else any *.safetensors."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: has no 'weight_map' object")
        files = [directory / f for f in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{index}: names shard {f.name}, which is missing")
        return files
    files = sorted(directory.glob("model*.safetensors")) or sorted(directory.glob("*.safetensors"))
    if not files:
        pickled = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt")]
        extra = f" (found {pickled}: pickled weights are never loaded)" if pickled else ""
        raise CheckpointError(f"{directory}: no *.safetensors weights{extra}")
    return files


def read_safetensors(files: list[Path]) -> dict[str, tuple[torch.Tensor, str]]:
    tensors: dict[str, tuple[torch.Tensor, str]] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    if key.endswith(_IGNORED_SUFFIXES) or key in HEAD_TENSORS:
                        continue
                    tensors[our_name(key)] = (f.get_tensor(key), str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot read safetensors file (truncated or corrupt?): {e}") from None
    return tensors


def load_hf_dir(directory: str | os.PathLike, *, dtype=None, device=None) -> tuple[Transformer, Tokenizer]:
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    config_path = directory / "config.json"
    config = ModelConfig.from_hf(read_json(config_path), source=str(config_path))
    model = build_model(config, read_safetensors(weight_files(directory)), dtype=dtype, device=device)
    gen_path = directory / "generation_config.json"
    model.generation_config = read_json(gen_path) if gen_path.is_file() else {}
    return model, Tokenizer.from_dir(directory)


def save_hf_dir(model: Transformer, tokenizer: Tokenizer, directory: str | os.PathLike, *,
                extra_tensors: dict | None = None, config_overrides: dict | None = None) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = model.config.to_hf()
    cfg["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    cfg.update(config_overrides or {})
    state = {hf_name(n): p.detach().to("cpu").contiguous() for n, p in model.named_parameters()}
    state.update({k: v.detach().to("cpu").contiguous() for k, v in (extra_tensors or {}).items()})
    shards, current, size = [], {}, 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > MAX_SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        atomic_write_bytes(directory / "model.safetensors", safetensors_bytes(shards[0], metadata={"format": "pt"}))
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            atomic_write_bytes(directory / fname, safetensors_bytes(shard, metadata={"format": "pt"}))
            weight_map.update(dict.fromkeys(shard, fname))
        total = sum(t.numel() * t.element_size() for t in state.values())
        atomic_write_json(directory / "model.safetensors.index.json",
                          {"metadata": {"total_size": total}, "weight_map": weight_map})
    atomic_write_json(directory / "config.json", cfg)
    gen = dict(getattr(model, "generation_config", {}) or {})
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if gen.get(key) is None and cfg.get(key) is not None:
            gen[key] = cfg[key]
    atomic_write_json(directory / "generation_config.json", gen)
    tokenizer.save(directory)
    if len(shards) == 1:  # an index left by an earlier sharded save would shadow the new file
        (directory / "model.safetensors.index.json").unlink(missing_ok=True)
