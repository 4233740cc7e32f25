"""projection: the decoder's linear layers in training, y = x W^T (+ b), with W an fp32 master weight.

Under bf16-mixed, autocast runs `nn.Linear` as three bf16 GEMMs and hands the weight gradient back in bf16, which
autograd then casts to the master's fp32. On CPUs with AMX the weight gradient is where that loses: oneDNN's bf16
GEMM with the tokens as its reduction dimension runs at about half its forward speed here, and its bf16 result is
one more pass (and a rounding of a sum over every token) before the fp32 gradient exists. This op keeps autocast's
forward and input gradient (the same bf16 GEMMs, so the same bits) and computes the weight gradient with our tile
kernel (`csrc/linear_grad_bf16.cpp`), accumulated and returned in fp32; the bias gradient is summed in fp32 too.
Everywhere else (fp32 training, CUDA, where cuBLAS has no such gap, CPUs without AMX, no autograd, feature counts
not multiples of 32, CAI_ENGINE_BACKEND=torch) it is the layer itself, which is also the reference the tests hold
it to.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backend import as_buffer, choose_backend, needs_autograd
from .linear import TILE_K


@functools.cache
def kernel_preferred() -> bool:
    """AMX tiles only: the gain was measured there. On AMD Zen 4 (VDPBF16PS, no AMX; the kernel's vector path,
    tested with CAI_ENGINE_AMX=0) oneDNN's weight gradient already runs at its forward speed, and the kernel
    was 4% slower inside the decoder (16 rows x 174 tokens, forward + backward: 6.19 s vs 5.96 s), so autocast's
    linear stays there."""
    from .. import _native
    return bool(_native.amx_available())


def _native_fits(x: Tensor, weight: Tensor) -> bool:
    return (x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16 and weight.dtype == torch.float32
            and weight.shape[0] % TILE_K == 0 and weight.shape[1] % TILE_K == 0 and needs_autograd(x, weight)
            and not torch.compiler.is_compiling() and choose_backend(x) == "native" and kernel_preferred())


def project(x: Tensor, layer: nn.Linear) -> Tensor:
    """`layer(x)`, with the weight gradient from our kernel where it is faster (see the module docstring). Only a
    plain `nn.Linear`: a subclass (a quantized or adapter layer) may compute something else, so it runs itself."""
    if type(layer) is not nn.Linear or not _native_fits(x, layer.weight):
        return layer(x)
    return _Projection.apply(x, layer.weight, layer.bias)


class _Projection(torch.autograd.Function):
    """An autograd.Function rather than a torch.library custom op (as the other ops are): it runs ~420 times a
    micro-batch of the embedded default, and the custom op's dispatch cost ~100 us more per call; under
    torch.compile `project` takes the module's own path instead."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        x, weight_bf16 = x.to(torch.bfloat16), weight.detach().to(torch.bfloat16)  # autocast's casts
        ctx.save_for_backward(x, weight_bf16)
        ctx.has_bias = bias is not None
        with torch.autocast("cpu", enabled=False):
            return F.linear(x, weight_bf16, None if bias is None else bias.detach().to(torch.bfloat16))

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight_bf16 = ctx.saved_tensors
        rows = grad_out.reshape(-1, grad_out.shape[-1]).to(torch.bfloat16).contiguous()
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = (rows @ weight_bf16).view(x.shape)
        if ctx.needs_input_grad[1]:
            from .. import _native
            grad_weight = torch.empty(weight_bf16.shape, dtype=torch.float32)
            _native.linear_weight_grad_bf16(as_buffer(rows), as_buffer(x.reshape(-1, x.shape[-1]).contiguous()),
                                            grad_weight.numpy())
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = rows.float().sum(0)
        return grad_x, grad_weight, grad_bias
