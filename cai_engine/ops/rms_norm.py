"""rms_norm: y = x / sqrt(mean(x^2) + eps) * weight over the last dimension, fused, with its gradients.

Under bf16-mixed the residual stream x is fp32 and every consumer of the norm is a bf16 projection. Eager
autograd around `F.rms_norm` keeps fp32 intermediates, then autocast casts the fp32 result to bf16 once per
projection (three copies before q/k/v, two before gate/up) and keeps each. This op returns the autocast dtype
directly, rounded once, and saves only x and one fp32 rstd per row. Backends: Triton (CUDA), native C++ (CPU),
torch reference; fp32 arithmetic in all three. The weight gradient is summed in a fixed order (exact resume).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .backend import as_buffer, as_numpy, choose_backend, needs_autograd

KERNEL_DTYPES = (torch.float32, torch.bfloat16)  # storage the kernels read and write; others take the reference


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """The plain torch composition; computes in float64 when given float64."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(dtype)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.to(dtype)
    return y.to(out_dtype or x.dtype)


def _weight_numpy(weight: Tensor):
    """A numpy view of a copy: numpy pins a tensor's storage for good, and FSDP2 frees and re-gathers the storage
    of the parameter itself between forward and backward (d floats: the copy costs nothing)."""
    return as_numpy(weight.detach().clone())


def _forward(x: Tensor, weight: Tensor, eps: float, out_dtype: torch.dtype, backend: str) -> tuple[Tensor, Tensor]:
    """(y [rows, d] in out_dtype, rstd [rows] fp32) from contiguous x [rows, d] and fp32 weight [d]."""
    rows, d = x.shape
    y = torch.empty(rows, d, dtype=out_dtype, device=x.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    if backend == "native":
        from .. import _native
        _native.rms_norm_forward(as_buffer(x), _weight_numpy(weight), eps, as_buffer(y), as_numpy(rstd))
    else:
        from ..kernels import rms_norm as tk
        tk.rms_norm_forward(x, weight, eps, y, rstd)
    return y, rstd


@torch.library.custom_op("cai_engine::rms_norm", mutates_args=())
def _rms_norm_op(x: Tensor, weight: Tensor, eps: float, out_dtype: torch.dtype, backend: str) -> tuple[Tensor, Tensor]:
    return _forward(x, weight, eps, out_dtype, backend)


@_rms_norm_op.register_fake
def _(x, weight, eps, out_dtype, backend):
    return x.new_empty(x.shape, dtype=out_dtype), x.new_empty(x.shape[0], dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, weight, _eps, _out_dtype, backend = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.backend = backend


def _backward(ctx, grad_y, _grad_rstd):
    x, weight, rstd = ctx.saved_tensors
    grad_y = grad_y.contiguous()
    grad_x = torch.empty_like(x)
    grad_weight = torch.empty(x.shape[1], dtype=torch.float32, device=x.device)
    if ctx.backend == "native":
        from .. import _native
        _native.rms_norm_backward(as_buffer(x), _weight_numpy(weight), as_numpy(rstd), as_buffer(grad_y),
                                  as_buffer(grad_x), as_numpy(grad_weight))
    else:
        from ..kernels import rms_norm as tk
        tk.rms_norm_backward(x, weight, rstd, grad_y, grad_x, grad_weight)
    return grad_x, grad_weight, None, None, None


_rms_norm_op.register_autograd(_backward, setup_context=_setup_context)


def rms_norm(x: Tensor, weight: Tensor, eps: float, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """RMSNorm of x [..., d] with weight [d]; the result in out_dtype (default x's dtype)."""
    d = x.shape[-1]
    if weight.shape != (d,):
        raise ValueError(f"weight: expected [{d}] (x's last dimension), got shape {tuple(weight.shape)}")
    out_dtype = out_dtype or x.dtype
    backend = choose_backend(x)
    if backend == "torch" or x.dtype not in KERNEL_DTYPES or out_dtype not in KERNEL_DTYPES:
        return rms_norm_reference(x, weight, eps, out_dtype)
    args = (x.reshape(-1, d).contiguous(), weight.float().contiguous(), float(eps), out_dtype, backend)
    # Without autograd the kernel is called directly (a custom op's dispatch costs more than the kernel at decode
    # sizes): the same bits, so a model scores the same with and without gradients (PPO ratios, DPO references).
    y, _ = _rms_norm_op(*args) if needs_autograd(x, weight) else _forward(*args)
    return y.view(x.shape)
