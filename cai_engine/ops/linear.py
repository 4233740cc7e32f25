"""Linear layers of the sampling engine's steps (inference only): y = x W^T (+ bias) (+ residual), several weights
over one input (a layer's q, k and v), and the gated MLP input silu(x Wg^T) * (x Wu^T).

Native path: bf16 on CPUs with AMX (csrc/linear_bf16.cpp). oneDNN's bf16 GEMM lays the weight out anew on every
call, which at a decode step's few rows costs more than the product itself; the tile kernel reads each weight as
stored (no second copy to refresh after an optimizer step), packs the step's tokens once for all the weights of
the call, and adds bias and residual in fp32 before rounding once. Measured in bench/bench_sampler.py.
Everywhere else the torch composition runs: CUDA (cuBLAS is the GEMM to beat there, so there is no Triton
kernel), fp32, CPUs without AMX, and autograd (these ops have no backward; training uses ops.projection).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from .backend import as_buffer, choose_backend, needs_autograd
from .rms_norm import rms_norm
from .swiglu import swiglu

TILE_K = 32  # the kernel's K step: other widths take the torch path rather than a padded copy of the weight
# Above this many rows (a prefill chunk) oneDNN's GEMM wins: the weight's relayout is paid once for many rows.
# Measured over all the embedded default's weights: the tiles 1.25x faster at 64 rows, 0.92x at 128.
MAX_ROWS = 64

Norm = tuple[Tensor, float]  # an RMSNorm (weight, eps) applied to x before the product


@functools.cache
def tiles_preferred() -> bool:
    from .. import _native
    return _native.bf16_kernels_preferred()


def _native_ok(x: Tensor, weights: list[Tensor]) -> bool:
    return (x.dtype == torch.bfloat16 and tiles_preferred() and x.shape[-1] % TILE_K == 0
            and x.numel() <= MAX_ROWS * x.shape[-1] and choose_backend(x) == "native"
            and all(w.dtype == torch.bfloat16 and w.is_contiguous() for w in weights)
            and not needs_autograd(x, *weights))


def _rows(x: Tensor) -> Tensor:
    return x if x.dim() == 2 and x.is_contiguous() else x.reshape(-1, x.shape[-1]).contiguous()


def _shaped(out: Tensor, x: Tensor) -> Tensor:
    return out if x.dim() == 2 else out.view(*x.shape[:-1], out.shape[1])


def _float(t: Tensor | None):
    """A float32 numpy copy (biases, norm weights: a numpy view would pin the parameter's storage)."""
    return None if t is None else t.detach().to(torch.float32, copy=True).numpy()


def _norm_args(norm: Norm | None) -> dict:
    return {} if norm is None else {"norm_weight": _float(norm[0]), "eps": float(norm[1])}


def linears(x: Tensor, weights: list[Tensor], biases: list[Tensor | None] | None = None,
            norm: Norm | None = None) -> list[Tensor]:
    """[h @ w.T + b for each weight] in x's dtype, h = rms_norm(x) with `norm`, else x; x [..., K], each weight
    [N_j, K]. The native path normalises and packs x once for all the weights (a layer's q, k and v)."""
    biases = biases or [None] * len(weights)
    if not _native_ok(x, weights):
        h = x if norm is None else rms_norm(x, norm[0], norm[1])
        return [F.linear(h, w, None if b is None else b.to(h.dtype)) for w, b in zip(weights, biases)]
    from .. import _native
    rows = _rows(x)
    outs = [rows.new_empty(rows.shape[0], w.shape[0]) for w in weights]
    _native.linear_bf16(as_buffer(rows), [as_buffer(w) for w in weights], [_float(b) for b in biases],
                        [as_buffer(o) for o in outs], **_norm_args(norm))
    return [_shaped(o, x) for o in outs]


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, residual: Tensor | None = None,
           out_dtype: torch.dtype | None = None) -> Tensor:
    """x @ weight.T (+ bias) (+ residual), in `out_dtype` (default x's). The native path rounds once, after the
    additions; the torch path rounds the product first, as the plain layers do."""
    out_dtype = out_dtype or x.dtype
    if not _native_ok(x, [weight]) or out_dtype not in (torch.bfloat16, torch.float32) or (
            residual is not None and (residual.dtype != torch.bfloat16 or out_dtype != torch.bfloat16)):
        y = F.linear(x, weight, None if bias is None else bias.to(x.dtype))
        return (y if residual is None else y + residual).to(out_dtype)
    from .. import _native
    rows = _rows(x)
    out = torch.empty(rows.shape[0], weight.shape[0], dtype=out_dtype)
    extra = {} if residual is None else {"residual": as_buffer(_rows(residual))}
    _native.linear_bf16(as_buffer(rows), [as_buffer(weight)], [_float(bias)], [as_buffer(out)], **extra)
    return _shaped(out, x)


def gated_linear(x: Tensor, gate_weight: Tensor, up_weight: Tensor, norm: Norm | None = None) -> Tensor:
    """silu(h @ gate_weight.T) * (h @ up_weight.T), h = rms_norm(x) with `norm`, else x: the Llama MLP up to its
    down projection."""
    if not _native_ok(x, [gate_weight, up_weight]):
        h = x if norm is None else rms_norm(x, norm[0], norm[1])
        return swiglu(F.linear(h, gate_weight), F.linear(h, up_weight))
    from .. import _native
    rows = _rows(x)
    out = rows.new_empty(rows.shape[0], gate_weight.shape[0])
    _native.gated_linear_bf16(as_buffer(rows), as_buffer(gate_weight), as_buffer(up_weight), as_buffer(out),
                              **_norm_args(norm))
    return _shaped(out, x)
