"""Linear layers of the sampling engine's steps (inference only): y = x W^T (+ bias) (+ residual), several weights
over one input (a layer's q, k and v), and the gated MLP input silu(x Wg^T) * (x Wu^T).

Native path: bf16 on CPUs with AMX (csrc/linear_bf16.cpp). oneDNN's bf16 GEMM lays the weight out anew on every
call, which at a decode step's few rows costs more than the product itself; the tile kernel reads each weight as
stored (no second copy to refresh after an optimizer step), packs the step's tokens once for all the weights of
the call, and adds bias and residual in fp32 before rounding once. Measured in bench/bench_sampler.py.
fp32 steps on CPUs without bf16 units (where the engine samples in fp32) take an AVX2 kernel for the products
(csrc/linear_f32.cpp): torch's fp32 GEMM at a step's few rows runs far below the memory bandwidth there.
Everywhere else the torch composition runs: CUDA (cuBLAS is the GEMM to beat there, so there is no Triton
kernel), CPUs without AMX, and autograd (these ops have no backward; training uses ops.projection).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from .backend import as_buffer, as_numpy, choose_backend, cpu_has_fast_bf16, needs_autograd
from .rms_norm import rms_norm
from .swiglu import swiglu

TILE_K = 32  # the kernel's K step: other widths take the torch path rather than a padded copy of the weight
# Above this many rows (a prefill chunk) oneDNN's GEMM wins: the weight's relayout is paid once for many rows.
# Measured over all the embedded default's weights: the tiles 1.25x faster at 64 rows, 0.92x at 128.
MAX_ROWS = 64
F32_K = 8  # the fp32 kernel's K step (one AVX2 vector)
# Up to these rows the fp32 kernel beats torch's GEMM (bench/RESULTS.md, AMD Zen 3): a layer's weights 1.5-3.5x at
# 1-32 rows, 1.04-1.44x at 64, 0.7-1.4x beyond; the LM head, which no cache holds, 2.0-2.5x up to 128 rows.
MAX_ROWS_F32, MAX_ROWS_F32_UNCACHED, CACHED_WEIGHT_BYTES = 64, 128, 16 << 20

Norm = tuple[Tensor, float]  # an RMSNorm (weight, eps) applied to x before the product


@functools.cache
def tiles_preferred() -> bool:
    from .. import _native
    return _native.bf16_kernels_preferred()


@functools.cache
def f32_kernel_preferred() -> bool:
    """The fp32 kernel where the engine samples in fp32 by default: CPUs with AVX2 but no bf16 units (measured
    on AMD Zen 3; CPUs with bf16 units sample in bf16, and their fp32 BLAS is unmeasured against it)."""
    from .. import _native
    return _native.linear_f32_available() and not cpu_has_fast_bf16()[0]


def _f32_ok(x: Tensor, weights: list[Tensor]) -> bool:
    if x.dtype != torch.float32 or not f32_kernel_preferred():  # every bf16 call leaves here, at no cost
        return False
    uncached = sum(w.numel() for w in weights) * 4 > CACHED_WEIGHT_BYTES
    return (x.shape[-1] % F32_K == 0
            and x.numel() <= (MAX_ROWS_F32_UNCACHED if uncached else MAX_ROWS_F32) * x.shape[-1]
            and choose_backend(x) == "native"
            and all(w.dtype == torch.float32 and w.is_contiguous() for w in weights)
            and not needs_autograd(x, *weights))


def _product(h: Tensor, weight: Tensor, bias: Tensor | None, native_f32: bool) -> Tensor:
    """h @ weight.T (+ bias): the fp32 kernel where `_f32_ok` said so, else torch's."""
    if not native_f32:
        return F.linear(h, weight, None if bias is None else bias.to(h.dtype))
    from .. import _native
    rows = _rows(h)
    out = rows.new_empty(rows.shape[0], weight.shape[0])
    _native.linear_f32(as_numpy(rows), as_numpy(weight), None if bias is None else as_numpy(bias.float().contiguous()),
                       out.numpy())
    return _shaped(out, h)


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
        native_f32 = _f32_ok(h, weights)
        return [_product(h, w, b, native_f32) for w, b in zip(weights, biases)]
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
        y = _product(x, weight, bias, _f32_ok(x, [weight]))
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
        native_f32 = _f32_ok(h, [gate_weight, up_weight])
        return swiglu(_product(h, gate_weight, None, native_f32), _product(h, up_weight, None, native_f32))
    from .. import _native
    rows = _rows(x)
    out = rows.new_empty(rows.shape[0], gate_weight.shape[0])
    _native.gated_linear_bf16(as_buffer(rows), as_buffer(gate_weight), as_buffer(up_weight), as_buffer(out),
                              **_norm_args(norm))
    return _shaped(out, x)
