"""Optimizer, schedule and resumable checkpoints shared by the trainers."""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..io import atomic_write_json, read_json

OPTIMIZERS = ("adamw", "adamw8bit")
SCHEDULES = ("cosine", "constant")


def make_optimizer(params, *, name: str, lr: float, weight_decay: float, device: torch.device):
    params = [p for p in params if p.requires_grad]
    if name == "adamw8bit":
        if device.type != "cuda":
            raise ValueError("optimizer=adamw8bit (bitsandbytes) runs on CUDA only; use optimizer=adamw")
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ValueError("optimizer=adamw8bit needs bitsandbytes: pip install 'cai-engine[gpu]'") from None
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    if name != "adamw":
        raise ValueError(f"optimizer={name!r}: expected one of {OPTIMIZERS}")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=device.type == "cuda")


def make_schedule(optimizer, *, name: str, warmup_steps: int, total_steps: int, last_step: int = -1):
    if name not in SCHEDULES:
        raise ValueError(f"schedule={name!r}: expected one of {SCHEDULES}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if name == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=last_step)


def save_optimizer(optimizer, directory: Path) -> None:
    """Optimizer state as safetensors + JSON (never pickled): tensors keyed '<param index>.<name>'."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    save_file(tensors, str(directory / "optimizer.safetensors"))
    atomic_write_json(directory / "optimizer.json", {"param_groups": state["param_groups"], "scalars": scalars})


def load_optimizer(optimizer, directory: Path) -> None:
    meta = read_json(directory / "optimizer.json")
    state: dict[int, dict] = {}
    for name, value in load_file(str(directory / "optimizer.safetensors")).items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    for name, value in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def write_checkpoint(root: Path, name: str, write) -> Path:
    """Build a checkpoint folder under a temporary name, then rename it into place: never half-written."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}."))
    try:
        write(tmp)
        if final.exists():
            old = root / f".{name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def latest_checkpoint(root: Path, prefix: str = "checkpoint-") -> Path | None:
    found = []
    for p in root.glob(f"{prefix}*"):
        if (p / "trainer_state.json").is_file() and p.name[len(prefix):].isdigit():
            found.append((int(p.name[len(prefix):]), p))
    return max(found)[1] if found else None


def read_trainer_state(directory: Path) -> dict:
    return json.loads((directory / "trainer_state.json").read_text())
