"""Training precision: `bf16-mixed` keeps fp32 master weights, gradients and optimizer state and runs the
matmuls of the forward and backward passes in bf16; `fp32` runs everything in fp32.

On this project's CPUs (AVX512-BF16 / AMX) and on every GPU, bf16 matmuls are 3-6x faster than fp32 (3x on AMD
Zen 4, 4-6x with AMX), so `auto` picks bf16-mixed there. A pure-bf16 model (AdamW stepping bf16 weights) is
never the answer: at lr 1e-5 the update of any weight above ~0.003 in magnitude rounds away and the model
barely learns.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..ops.backend import cpu_has_fast_bf16

MODES = ("auto", "bf16-mixed", "fp32")


@dataclass(slots=True, frozen=True)
class Precision:
    mode: str        # "bf16-mixed" or "fp32" (never "auto" once resolved)
    reason: str      # one line for the log

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.mode == "bf16-mixed" else torch.float32

    def autocast(self, device: torch.device):
        """The context the forward pass runs in: bf16 matmuls, fp32 everywhere autocast keeps fp32."""
        if self.mode != "bf16-mixed":
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=torch.bfloat16)

    def op_inputs(self, hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states and head weight as the fused ops should read them (custom ops see no autocast):
        bf16 under bf16-mixed, so the head GEMMs run in bf16 while gradients flow back to fp32 masters."""
        dtype = self.compute_dtype
        return hidden.to(dtype), weight.to(dtype)


def resolve_precision(mode: str, device: torch.device) -> Precision:
    if mode not in MODES:
        raise ValueError(f"precision.mode = {mode!r}: expected one of {', '.join(MODES)}")
    if mode == "fp32":
        return Precision("fp32", "fp32 as configured")
    if device.type == "cuda":
        if not torch.cuda.is_bf16_supported():
            if mode == "bf16-mixed":
                raise ValueError(f"precision.mode = bf16-mixed: {torch.cuda.get_device_name(device)} has no bf16")
            return Precision("fp32", "this GPU has no bf16")
        return Precision("bf16-mixed", "bf16-mixed as configured" if mode == "bf16-mixed" else "CUDA device")
    fast, why = cpu_has_fast_bf16()
    if mode == "bf16-mixed":
        return Precision("bf16-mixed", "bf16-mixed as configured" + ("" if fast else f" ({why}: bf16 will be slow)"))
    if fast:
        return Precision("bf16-mixed", f"{why}: bf16 matmuls are 3-6x faster than fp32 here")
    return Precision("fp32", f"{why}: bf16 matmuls would be slower than fp32")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"run.device = {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"run.device = {name!r}: this torch build or machine has no CUDA device; use cpu")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"run.device = {name!r}: expected auto, cpu, cuda or cuda:N")
    return device


def sampler_dtype(mode: str, device: torch.device) -> torch.dtype:
    """The generation stages sample and score in the run's compute precision, as RL does: bf16 where it is fast,
    fp32 when `precision.mode = fp32` asks for it (then records do not depend on which prompts share a process)."""
    return resolve_precision(mode, device).compute_dtype
