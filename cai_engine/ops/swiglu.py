"""swiglu: silu(gate) * up, the Llama MLP's activation, fused, with its gradients.

Eager autograd keeps silu(gate) beside gate and up (a third [tokens, intermediate] tensor per layer) and runs
three elementwise passes forward and five backward; this op keeps gate and up only, recomputes the sigmoid in
backward, and does each direction in one pass with fp32 arithmetic whatever the storage (bf16 under
bf16-mixed). Backends: Triton (CUDA), native C++ (CPU), torch reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .backend import as_buffer, choose_backend, needs_autograd
from .rms_norm import KERNEL_DTYPES


def swiglu_reference(gate: Tensor, up: Tensor) -> Tensor:
    """The plain torch composition in (at least) fp32, rounded once to the inputs' dtype."""
    dtype = torch.promote_types(gate.dtype, torch.float32)
    return (F.silu(gate.to(dtype)) * up.to(dtype)).to(gate.dtype)


def _forward(gate: Tensor, up: Tensor, backend: str) -> Tensor:
    out = torch.empty_like(gate)
    if backend == "native":
        from .. import _native
        _native.swiglu_forward(as_buffer(gate), as_buffer(up), as_buffer(out))
    else:
        from ..kernels import swiglu as tk
        tk.swiglu_forward(gate, up, out)
    return out


@torch.library.custom_op("cai_engine::swiglu", mutates_args=())
def _swiglu_op(gate: Tensor, up: Tensor, backend: str) -> Tensor:
    return _forward(gate, up, backend)


@_swiglu_op.register_fake
def _(gate, up, backend):
    return torch.empty_like(gate)


def _setup_context(ctx, inputs, output):
    gate, up, backend = inputs
    ctx.save_for_backward(gate, up)
    ctx.backend = backend


def _backward(ctx, grad_out):
    gate, up = ctx.saved_tensors
    grad_out = grad_out.contiguous()
    grad_gate, grad_up = torch.empty_like(gate), torch.empty_like(up)
    if ctx.backend == "native":
        from .. import _native
        _native.swiglu_backward(as_buffer(gate), as_buffer(up), as_buffer(grad_out), as_buffer(grad_gate),
                                as_buffer(grad_up))
    else:
        from ..kernels import swiglu as tk
        tk.swiglu_backward(gate, up, grad_out, grad_gate, grad_up)
    return grad_gate, grad_up, None


_swiglu_op.register_autograd(_backward, setup_context=_setup_context)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up for gate and up of one shape and dtype; the result in that dtype."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"gate and up must match: got {tuple(gate.shape)} {gate.dtype} and "
                         f"{tuple(up.shape)} {up.dtype}")
    backend = choose_backend(gate)
    if backend == "torch" or gate.dtype not in KERNEL_DTYPES:
        return swiglu_reference(gate, up)
    args = (gate.contiguous(), up.contiguous(), backend)
    # without autograd, the kernel directly (the same bits; see rms_norm)
    return _swiglu_op(*args) if needs_autograd(gate, up) else _forward(*args)
