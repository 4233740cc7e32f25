"""Training checkpoints: written atomically, kept K at a time, enough to resume bit for bit.

A checkpoint folder `checkpoint-<step>` is a Hugging Face model folder (the trainer's export: config,
`model.safetensors`, tokenizer; it loads in transformers and in `load_model`) plus what a resume needs: the
trainable module's fp32 master weights under our names (`trainer_weights.safetensors`: for RL that includes
the value head or critic), the optimizer state (safetensors + JSON, never pickled), every RNG state, and
`trainer_state.json` (step, epoch, history, the resolved config). It is built under a hidden temporary name, every file and the folder fsynced, then
renamed into place, so a kill at any moment leaves either the old checkpoint or the new one, never half of
one. Hidden leftovers of a killed write are removed when the next run starts.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..io import FILE_MODE, atomic_write_json, fsync_dir, read_json

PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
WEIGHTS_FILE = "trainer_weights.safetensors"


def write_folder(root: Path, name: str, write: Callable[[Path], None]) -> Path:
    """Build `root/name` under a hidden temporary name, fsync it, then rename it into place."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    tmp = root / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        # inside the try: a Ctrl-C delivered as mkdir returns (seen in CI) must not leave the folder behind
        tmp.mkdir()  # mode 0777 & ~umask: readable by the group and others as the umask allows
        write(tmp)
        for path in sorted(tmp.rglob("*")):
            if path.is_file():
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
        fsync_dir(tmp)
        if final.exists():
            old = root / f".{name}.old-{os.getpid()}"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def clean_stale(root: Path) -> list[Path]:
    """Remove the hidden temporary folders of writes that a kill interrupted."""
    removed = []
    if root.is_dir():
        for path in root.iterdir():
            if path.is_dir() and path.name.startswith(".") and (".tmp-" in path.name or ".old-" in path.name):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Finished checkpoints under root, oldest first."""
    found = []
    if root.is_dir():
        for path in root.glob(f"{PREFIX}*"):
            step = path.name[len(PREFIX):]
            if step.isdigit() and (path / STATE_FILE).is_file():
                found.append((int(step), path))
    return sorted(found)


def latest(root: Path) -> Path | None:
    found = checkpoints(root)
    return found[-1][1] if found else None


def prune(root: Path, keep: int) -> None:
    for _, path in checkpoints(root)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Streamed to disk (no second copy in memory: the optimizer state of a 135M model is 1 GB); the
    folder is renamed into place whole, so the file needs no atomic write of its own."""
    save_file(tensors, str(path))
    os.chmod(path, FILE_MODE)  # safetensors' writer makes files 0600


def save_weights(model: torch.nn.Module, directory: Path) -> None:
    """The trainable module's parameters exactly as they are (fp32 masters); shared tensors stored once."""
    tensors = {name: p.detach().to("cpu").contiguous() for name, p in model.named_parameters()}
    save_tensors(tensors, directory / WEIGHTS_FILE)


def load_weights(model: torch.nn.Module, directory: Path) -> None:
    path = directory / WEIGHTS_FILE
    tensors = load_file(str(path))
    params = dict(model.named_parameters())
    if set(tensors) != set(params):
        missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        raise ValueError(f"{path}: does not match the model "
                         f"(missing {missing[:3]}, unexpected {extra[:3]})")
    with torch.no_grad():
        for name, p in params.items():
            if tensors[name].shape != p.shape:
                raise ValueError(f"{path}: tensor {name!r} has shape "
                                 f"{tuple(tensors[name].shape)}, expected {tuple(p.shape)}")
            p.copy_(tensors[name])


def save_optimizer(optimizer: torch.optim.Optimizer, directory: Path, state: dict | None = None) -> None:
    """Optimizer state as safetensors + JSON (never pickled): tensors keyed '<param index>.<name>'. `state`: the
    state dict to write when it is not the optimizer's own (FSDP2's, gathered whole)."""
    state = state if state is not None else optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    save_tensors(tensors, directory / "optimizer.safetensors")
    atomic_write_json(directory / "optimizer.json", {"param_groups": state["param_groups"], "scalars": scalars})


def load_optimizer(optimizer: torch.optim.Optimizer, directory: Path) -> None:
    meta = read_json(directory / "optimizer.json")
    state: dict[int, dict] = {}
    for name, value in load_file(str(directory / "optimizer.safetensors")).items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    for name, value in meta["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    """Every RNG the run may touch: Python, NumPy, torch CPU and each CUDA device (JSON part, tensor part)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    meta = {"python": [version, list(internal), gauss], "numpy": [kind, keys.tolist(), pos, has_gauss, cached]}
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    return meta, tensors


def set_rng_state(meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def save_training_state(directory: Path, *, model, optimizer, state: dict,
                        extra: dict[str, torch.Tensor] | None = None, optimizer_state: dict | None = None) -> None:
    if extra is not None:  # a trainer's own state (a rollout buffer, an adaptive coefficient)
        save_tensors({k: v.detach().cpu().contiguous() for k, v in extra.items()}, directory / "task_state.safetensors")
    save_weights(model, directory)
    save_optimizer(optimizer, directory, optimizer_state)
    meta, tensors = rng_state()
    save_tensors(tensors, directory / "rng.safetensors")
    atomic_write_json(directory / STATE_FILE, {**state, "rng": meta})


def load_training_state(directory: Path, *, optimizer) -> dict:
    """Optimizer, RNGs and trainer state (the weights go in first, with `load_weights`, before any wrapping)."""
    state = read_json(directory / STATE_FILE)
    load_optimizer(optimizer, directory)
    set_rng_state(state.pop("rng"), load_file(str(directory / "rng.safetensors")))
    return state


def load_extra(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / "task_state.safetensors"
    return load_file(str(path)) if path.is_file() else {}


def read_state(directory: Path) -> dict:
    return json.loads((directory / STATE_FILE).read_text())
