"""token_logprobs: per-token log p(label) and entropy of softmax(hidden @ W^T / T), fused.

Forward keeps per-token statistics only (log-sum-exp, entropy); backward recomputes the logits one
[chunk, V] tile at a time, turns the tile into d(loss)/d(logits) in place, and feeds it to two GEMMs
(dh = dz @ W, dW += dz^T @ h). Backends: Triton (CUDA), native C++ epilogues around BLAS GEMMs (CPU),
and the dense torch reference. On CPUs with AVX512-BF16, bf16 operands go to a native kernel that computes
each logit tile, its epilogue and its gradient GEMMs in cache (csrc/logprob_bf16.cpp), on AMX-BF16 tiles where
the CPU has them and on VDPBF16PS vectors on AMD CPUs without (CAI_ENGINE_AMX=0 forces the vectors anywhere);
elsewhere (Intel cores without AMX run VDPBF16PS at half their fp32 FMA flops), or with
CAI_ENGINE_BF16_KERNELS=0, they are converted to fp32 for the BLAS path.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch
from torch import Tensor

from .backend import as_buffer, as_numpy, check_finite_temperature, choose_backend

BF16_KERNELS_ENV = "CAI_ENGINE_BF16_KERNELS"  # "0": bf16 operands take the fp32 path even where the kernels run
CHUNK_ELEMENTS = 1 << 24  # logits per chunk: 64 MiB of fp32
MIN_BLOCK_COLS = 4096     # backward vocabulary blocks stay wide enough for efficient GEMMs


def chunk_rows(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // vocab)


# ---------------------------------------------------------------- torch reference (dense)

def token_logprobs_reference(hidden, weight, labels, bias=None, temperature=1.0, ignore_index=-100,
                             return_entropy=False):
    """The obvious dense implementation; computes in float64 when given float64."""
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    z = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        z = z + bias.to(dtype)
    logp_all = torch.log_softmax(z / temperature, dim=-1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0)
    logp = logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1) * valid
    entropy = None
    if return_entropy:
        entropy = -(logp_all.exp() * logp_all).sum(-1) * valid
    return logp, entropy


# ---------------------------------------------------------------- native bf16 kernels (AVX512-BF16 CPUs)

def bf16_kernels(*operands: Optional[Tensor]) -> bool:
    """Whether the native bf16 kernels run for these operands: all bf16 and on CPU, and the CPU runs them faster
    than the fp32 path (AMX tiles, or VDPBF16PS on AMD; checked at run time, so the module imports everywhere).
    CAI_ENGINE_BF16_KERNELS=0 forces the fp32 path; CAI_ENGINE_AMX=0 forces the VDPBF16PS kernel on any CPU
    with AVX512-BF16 (tests and benchmarks of the vector kernel)."""
    if os.environ.get(BF16_KERNELS_ENV, "1").strip() == "0":
        return False
    if any(t.dtype != torch.bfloat16 or t.is_cuda for t in operands if t is not None):
        return False
    from .. import _native
    if not _native.bf16_kernels_available():
        return False
    return _native.bf16_kernels_preferred() or os.environ.get("CAI_ENGINE_AMX", "").strip() == "0"


def as_bf16_numpy(t: Tensor):
    """int16 view of a bf16 tensor (numpy has no bfloat16; the kernels reinterpret the bits)."""
    return t.detach().contiguous().view(torch.int16).numpy()


def bias_numpy(bias: Optional[Tensor]):
    return None if bias is None else bias.detach().float().contiguous().numpy()


def head_grad_buffers(hidden: Tensor, weight: Tensor, needs) -> tuple[Tensor, Tensor, Tensor]:
    """bf16 dh / dW and fp32 db filled in place by the native bf16 backward (empty where not needed)."""
    n, d, v = hidden.shape[0], hidden.shape[1], weight.shape[0]
    return (torch.empty(n, d, dtype=torch.bfloat16) if needs[0] else hidden.new_empty(0),
            torch.empty(v, d, dtype=torch.bfloat16) if needs[1] else weight.new_empty(0),
            torch.empty(v, dtype=torch.float32) if needs[2] else weight.new_empty(0, dtype=torch.float32))


def grad_buffer_numpy(t: Tensor, needed: bool):
    return as_buffer(t) if needed else None


def _forward_native_bf16(h, w, b, labels, inv_temp, ignore_index, with_entropy):
    from .. import _native
    n = h.shape[0]
    logp, lse, ent = (torch.empty(n, dtype=torch.float32) for _ in range(3))
    _native.logprob_forward_bf16(as_bf16_numpy(h), as_bf16_numpy(w), bias_numpy(b), as_numpy(labels), inv_temp,
                                 ignore_index, as_numpy(logp), as_numpy(lse), as_numpy(ent) if with_entropy else None)
    return logp, ent if with_entropy else torch.zeros(n, dtype=torch.float32), lse


def _backward_native_bf16(h, w, b, labels, lse, ent, g_lp, g_ent, inv_temp, ignore_index, needs):
    from .. import _native
    valid = labels != ignore_index
    g_lp, g_ent = (g * valid for g in (g_lp, g_ent))  # ignored tokens get no gradient
    grads = head_grad_buffers(h, w, needs)
    _native.logprob_backward_bf16(as_bf16_numpy(h), as_bf16_numpy(w), bias_numpy(b), as_numpy(labels), inv_temp,
                                  as_numpy(lse), as_numpy(ent), as_numpy(g_lp), as_numpy(g_ent),
                                  *(grad_buffer_numpy(g, n) for g, n in zip(grads, needs)))
    return grads


# ---------------------------------------------------------------- chunked driver (native + triton)

def _native_logits(h: Tensor, w: Tensor, b: Optional[Tensor], out: Tensor) -> Tensor:
    if b is None:
        return torch.mm(h, w.T, out=out)
    return torch.addmm(b, h, w.T, out=out)


def _forward_native(h, w, b, labels, inv_temp, ignore_index, with_entropy):
    from .. import _native
    N, V = h.shape[0], w.shape[0]
    logp = torch.empty(N, dtype=torch.float32)
    lse = torch.empty(N, dtype=torch.float32)
    ent = torch.empty(N, dtype=torch.float32) if with_entropy else torch.zeros(N, dtype=torch.float32)
    rows = chunk_rows(V)
    buf = torch.empty(min(rows, N), V, dtype=torch.float32)
    for i in range(0, N, rows):
        j = min(i + rows, N)
        z = _native_logits(h[i:j], w, b, buf[: j - i])
        _native.logprob_forward(as_numpy(z), as_numpy(labels[i:j]), inv_temp, ignore_index, as_numpy(logp[i:j]),
                                as_numpy(lse[i:j]), as_numpy(ent[i:j]) if with_entropy else None)
    return logp, ent, lse


def chunked_backward(h: Tensor, w: Tensor, b: Optional[Tensor], needs: tuple[bool, bool, bool],
                     dz_block: Callable[[slice, slice, Tensor], Tensor]):
    """dh, dW, db from d(loss)/d(logits), produced one [rows, cols] block at a time by `dz_block`.

    Blocks span all rows when they fit, so each dW block is written once and only the small dh
    accumulates (per-row chunks would re-read and re-write the whole [V, d] dW for every chunk).
    """
    N, V = h.shape[0], w.shape[0]
    need_h, need_w, need_b = needs
    acc = torch.float32
    dh = torch.zeros(h.shape, dtype=acc, device=h.device) if need_h else h.new_empty(0)
    dw = torch.zeros(w.shape, dtype=acc, device=w.device) if need_w else w.new_empty(0)
    db = torch.zeros(V, dtype=acc, device=w.device) if need_b else w.new_empty(0)
    if not any(needs) or N == 0:
        return dh, dw, db
    cols = min(V, max(MIN_BLOCK_COLS, CHUNK_ELEMENTS // N))
    rows = max(1, min(N, CHUNK_ELEMENTS // cols))
    buf = torch.empty(rows * cols, dtype=h.dtype, device=h.device)
    for i in range(0, N, rows):
        r = slice(i, min(i + rows, N))
        for c0 in range(0, V, cols):
            c = slice(c0, min(c0 + cols, V))
            dz = dz_block(r, c, buf[: (r.stop - r.start) * (c.stop - c0)].view(r.stop - r.start, c.stop - c0))
            if need_h:
                _accumulate(dh[r], dz, w[c])
            if need_w:
                _accumulate(dw[c], dz.T, h[r])
            if need_b:
                db[c] += dz.sum(0, dtype=acc)
    return dh, dw, db


def _accumulate(out: Tensor, a: Tensor, b: Tensor) -> None:
    if a.dtype == out.dtype:
        out.addmm_(a, b)
    else:  # half-precision GEMM, fp32 accumulation across blocks
        out += torch.mm(a, b)


def _backward(h, w, b, labels, lse, ent, g_lp, g_ent, inv_temp, ignore_index, needs, backend):
    valid = labels != ignore_index
    g_lp, g_ent = g_lp * valid, g_ent * valid  # ignored tokens get no gradient
    if backend == "native":
        from .. import _native

        def dz_block(r, c, buf):
            z = _native_logits(h[r], w[c], None if b is None else b[c], buf)
            _native.logprob_backward(as_numpy(z), as_numpy(labels[r] - c.start), inv_temp, as_numpy(lse[r]),
                                     as_numpy(ent[r]), as_numpy(g_lp[r]), as_numpy(g_ent[r]))
            return z
    else:
        from ..kernels import logprob as tk

        def dz_block(r, c, buf):
            return tk.logprob_dz(h[r], w[c], None if b is None else b[c], labels[r] - c.start, lse[r], ent[r],
                                 g_lp[r], g_ent[r], inv_temp, buf)
    return chunked_backward(h, w, b, needs, dz_block)


def prepare(h: Tensor, w: Tensor, b: Optional[Tensor], backend: str):
    """Contiguous operands; the native path computes in fp32 (half-precision CPU GEMMs would round the logits)."""
    if backend == "native" and h.dtype != torch.float32:
        return h.float().contiguous(), w.float().contiguous(), None if b is None else b.float().contiguous()
    return h.contiguous(), w.contiguous(), None if b is None else b.contiguous()


# ---------------------------------------------------------------- custom ops + autograd
# Both LM-head ops (this one and full_kl) return gradients for (hidden, weight, bias) the same way.

def head_grads_needed(ctx, bias) -> list[bool]:
    needs = [bool(n) for n in ctx.needs_input_grad[:3]]
    needs[2] = needs[2] and bias is not None
    return needs


def head_grads_cast(grads, hidden: Tensor, weight: Tensor, bias: Optional[Tensor]):
    dh, dw, db = grads
    return dh.to(hidden.dtype), dw.to(weight.dtype), db.to(weight.dtype if bias is None else bias.dtype)


def head_grads_fake(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], needs: list[bool]):
    shapes = (hidden.shape, weight.shape, (weight.shape[0],))
    like = (hidden, weight, weight if bias is None else bias)
    return tuple(t.new_empty(s if n else (0,)) for t, s, n in zip(like, shapes, needs))


def head_grads_result(grads, needs: list[bool], n_other_inputs: int) -> tuple:
    return tuple(g if n else None for g, n in zip(grads, needs)) + (None,) * n_other_inputs


@torch.library.custom_op("cai_engine::token_logprobs", mutates_args=())
def _token_logprobs_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, temperature: float,
                       ignore_index: int, with_entropy: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    inv_temp = 1.0 / temperature
    labels = labels.contiguous()
    if backend == "native" and bf16_kernels(hidden, weight):
        return _forward_native_bf16(hidden, weight, bias, labels, inv_temp, ignore_index, with_entropy)
    h, w, b = prepare(hidden, weight, bias, backend)
    if backend == "native":
        return _forward_native(h, w, b, labels, inv_temp, ignore_index, with_entropy)
    from ..kernels import logprob as tk
    return tk.logprob_forward(h, w, b, labels, inv_temp, ignore_index, with_entropy)


@_token_logprobs_op.register_fake
def _(hidden, weight, bias, labels, temperature, ignore_index, with_entropy, backend):
    n = hidden.shape[0]
    return tuple(hidden.new_empty(n, dtype=torch.float32) for _ in range(3))


@torch.library.custom_op("cai_engine::token_logprobs_backward", mutates_args=())
def _token_logprobs_backward_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, lse: Tensor,
                                entropy: Tensor, grad_logp: Tensor, grad_entropy: Tensor, temperature: float,
                                ignore_index: int, needs: list[bool], backend: str) -> tuple[Tensor, Tensor, Tensor]:
    if backend == "native" and bf16_kernels(hidden, weight):
        grads = _backward_native_bf16(hidden, weight, bias, labels.contiguous(), lse.contiguous(),
                                      entropy.contiguous(), grad_logp.float().contiguous(),
                                      grad_entropy.float().contiguous(), 1.0 / temperature, ignore_index, needs)
        return head_grads_cast(grads, hidden, weight, bias)
    h, w, b = prepare(hidden, weight, bias, backend)
    grads = _backward(h, w, b, labels.contiguous(), lse, entropy, grad_logp.float().contiguous(),
                      grad_entropy.float().contiguous(), 1.0 / temperature, ignore_index, tuple(needs), backend)
    return head_grads_cast(grads, hidden, weight, bias)


@_token_logprobs_backward_op.register_fake
def _(hidden, weight, bias, labels, lse, entropy, grad_logp, grad_entropy, temperature, ignore_index, needs, backend):
    return head_grads_fake(hidden, weight, bias, needs)


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, temperature, ignore_index, with_entropy, backend = inputs
    _, entropy, lse = output
    ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy)
    ctx.args = (temperature, ignore_index, backend)


def _backward_fn(ctx, grad_logp, grad_entropy, _grad_lse):
    hidden, weight, bias, labels, lse, entropy = ctx.saved_tensors
    temperature, ignore_index, backend = ctx.args
    needs = head_grads_needed(ctx, bias)
    grad_logp = torch.zeros_like(lse) if grad_logp is None else grad_logp
    grad_entropy = torch.zeros_like(lse) if grad_entropy is None else grad_entropy
    grads = _token_logprobs_backward_op(hidden, weight, bias, labels, lse, entropy, grad_logp, grad_entropy,
                                        temperature, ignore_index, needs, backend)
    return head_grads_result(grads, needs, 5)


_token_logprobs_op.register_autograd(_backward_fn, setup_context=_setup_context)


# ---------------------------------------------------------------- public API

def token_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Optional[Tensor] = None,
                   temperature: float = 1.0, ignore_index: int = -100,
                   return_entropy: bool = False) -> tuple[Tensor, Optional[Tensor]]:
    """Per-token log p(label) (fp32) under softmax(hidden @ weight^T / temperature), without building the logits.

    hidden [..., d], weight [V, d] (the LM head), labels [...]; ignored positions give 0 and no gradient.
    With return_entropy, also the per-token entropy of that distribution (differentiable too).
    """
    check_finite_temperature(temperature)
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"labels: expected shape {tuple(hidden.shape[:-1])} to match hidden {tuple(hidden.shape)}, "
                         f"got {tuple(labels.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight: expected [V, {hidden.shape[-1]}], got {tuple(weight.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias: expected [{weight.shape[0]}], got {tuple(bias.shape)}")
    backend = choose_backend(hidden)
    lead = labels.shape
    h2, y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1).long()
    if backend == "torch":
        logp, ent = token_logprobs_reference(h2, weight, y, bias, temperature, ignore_index, return_entropy)
        logp, ent = logp.float(), None if ent is None else ent.float()
    else:
        logp, ent, _ = _token_logprobs_op(h2, weight, bias, y, float(temperature), int(ignore_index),
                                          bool(return_entropy), backend)
    return logp.view(lead), (ent.view(lead) if return_entropy else None)

