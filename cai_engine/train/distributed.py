"""Hooks for `torch.distributed` (torchrun): who this process is, who writes, and the DDP wrap.

Without a process group every helper answers for a single process, so trainers call them unconditionally.
"""
from __future__ import annotations

from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

from .config import ConfigError

T = TypeVar("T")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0 writes checkpoints, metrics and outputs; the other ranks only compute."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(value: float) -> float:
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t)


def broadcast_from_main(work: Callable[[], T]) -> T:
    """Run `work` on rank 0 only (it reads and writes files) and hand its result, or its error, to every rank:
    a refusal stops all ranks at once instead of leaving the others waiting at the next collective."""
    if not is_distributed():
        return work()
    box: list[Any] = [None]
    if is_main():
        try:
            box[0] = ("ok", work())
        except Exception as e:
            dist.broadcast_object_list([("error", str(e))], src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise ConfigError(value)
    return value


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around the model when a process group exists; the model itself otherwise."""
    if not is_distributed() or world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def init_from_environment() -> None:
    """Join the process group torchrun describes (RANK/WORLD_SIZE set); gloo on CPU, nccl on CUDA."""
    import os
    if "RANK" not in os.environ or is_distributed():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
