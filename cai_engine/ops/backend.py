"""Backend choice shared by every op: Triton on CUDA, native C++ on CPU, overridable; and what the CPU can do."""
from __future__ import annotations

import functools
import os
from pathlib import Path

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


@functools.cache
def cpu_flags() -> frozenset[str] | None:
    """The first CPU's feature flags from /proc/cpuinfo (Linux); None where they cannot be read."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def cpu_has_fast_bf16() -> tuple[bool, str]:
    """Whether bf16 matmuls beat fp32 on this CPU (AVX512-BF16 or AMX-BF16: 3-6x; without them oneDNN emulates
    bf16 at a fifth of fp32's speed), and why, in words. False where the flags cannot be read."""
    flags = cpu_flags()
    if flags is None:
        return False, "CPU flags unreadable"
    found = [name for name in ("amx_bf16", "avx512_bf16") if name in flags]
    return bool(found), ("CPU has " + " and ".join(found)) if found else "CPU has neither AVX512-BF16 nor AMX-BF16"
