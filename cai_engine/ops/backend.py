"""Backend choice shared by every op: Triton on CUDA, native C++ on CPU, overridable."""
from __future__ import annotations

import os

import torch

BACKENDS = ("triton", "native", "torch")


def choose_backend(t: torch.Tensor) -> str:
    forced = os.environ.get("CAI_ENGINE_BACKEND", "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"CAI_ENGINE_BACKEND={forced!r}: expected one of {BACKENDS}")
        if forced == "native" and t.is_cuda:
            raise ValueError("CAI_ENGINE_BACKEND=native runs on CPU tensors only; got a CUDA tensor")
        if forced == "triton" and not t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("CAI_ENGINE_BACKEND=triton with CPU tensors needs TRITON_INTERPRET=1")
        return forced
    return "triton" if t.is_cuda else "native"


def as_numpy(t: torch.Tensor):
    """Zero-copy numpy view of a contiguous CPU tensor (the native module takes plain buffers)."""
    return t.detach().numpy()


def as_buffer(t: torch.Tensor):
    """Zero-copy numpy view for kernels that take float32 or bfloat16: bf16 as its int16 bit patterns (numpy has
    no bfloat16; the kernels reinterpret the bits)."""
    if t.requires_grad:
        t = t.detach()
    return t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


def needs_autograd(*tensors: torch.Tensor) -> bool:
    """Autograd records this call (or torch.compile traces it, which wants the custom op either way)."""
    if torch.compiler.is_compiling():
        return True
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def check_finite_temperature(temperature: float) -> float:
    if not (temperature > 0 and temperature != float("inf")):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    return 1.0 / float(temperature)
