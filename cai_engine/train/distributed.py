"""Hooks for `torch.distributed` (torchrun): who this process is, who writes, and the DDP or FSDP2 wrap.

Without a process group every helper answers for a single process, so trainers call them unconditionally.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor

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


def wrap_model(model: torch.nn.Module, device: torch.device, parallel: str = "ddp") -> torch.nn.Module:
    """The module a trainer calls under torchrun: DDP around the model (a whole copy per rank), or FSDP2 on it
    (`fully_shard` on each decoder block, then the root: parameters, gradients and optimizer state sharded over
    the ranks; the model itself is returned, its parameters now DTensor shards). The model itself alone."""
    if not is_distributed() or world_size() == 1:
        return model
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard
        from ..model.decoder import Block
        for module in model.modules():
            if isinstance(module, Block):  # one all-gather per block: only one block is whole at a time
                fully_shard(module)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def gradient_sync(trained: torch.nn.Module, model: torch.nn.Module, last: bool):
    """Context of one micro-batch's backward: gradients are reduced over the ranks on the step's last only."""
    if trained is not model:  # DDP
        return contextlib.nullcontext() if last else trained.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(last)
    return contextlib.nullcontext()


def is_sharded(model: torch.nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


@contextlib.contextmanager
def whole_weights(model: torch.nn.Module):
    """Every rank enters (an all-gather under FSDP2): inside, the model's parameters are whole tensors, so rank 0
    can write a checkpoint or the final model as a single process would. A no-op without sharding."""
    if not is_sharded(model):
        yield
        return
    from torch.distributed.fsdp import FSDPModule
    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in modules:
        m.unshard()
    try:
        yield
    finally:
        for m in modules:
            m.reshard()


def whole_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state dict with every sharded tensor gathered whole (every rank calls it)."""
    state = optimizer.state_dict()
    state["state"] = {index: {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in entry.items()}
                      for index, entry in state["state"].items()}
    return state


def shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After loading whole tensors into an optimizer over FSDP2 shards: keep each rank's shard of them."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not isinstance(p, DTensor):
                continue
            for key, value in optimizer.state.get(p, {}).items():
                if torch.is_tensor(value) and not isinstance(value, DTensor) and value.shape == p.shape:
                    optimizer.state[p][key] = distribute_tensor(value.to(p.device), p.device_mesh, p.placements)


def init_from_environment() -> None:
    """Join the process group torchrun describes (RANK/WORLD_SIZE set); gloo on CPU, nccl on CUDA."""
    import os
    if "RANK" not in os.environ or is_distributed():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
