"""KL penalties for PPO: Schulman's per-sample estimators, and the exact full-vocabulary KL.

full_kl computes KL(pi || pi_ref) = sum_v p_v (log p_v - log q_v) per token from both models' hidden
states, tile by tile, without building either distribution; the gradient flows to the policy side.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .backend import as_numpy, check_finite_temperature, choose_backend
from .logprob import (_native_logits, as_bf16_numpy, bf16_kernels, bias_numpy, chunk_rows, chunked_backward,
                      grad_buffer_numpy, head_grad_buffers, head_grads_cast, head_grads_fake, head_grads_needed,
                      head_grads_result, prepare)

KL_KINDS = ("k1", "abs", "k2", "k3")
MAX_LOG_RATIO = 20.0


def kl_penalty(logp: Tensor, ref_logp: Tensor, kind: str = "k3") -> Tensor:
    """Per-token KL estimate from sampled-token log-probs of the policy and the reference.

    k1 = log r, abs = |log r|, k2 = (log r)^2 / 2, k3 = exp(-log r) + log r - 1, with log r = logp - ref_logp
    (k3 clamps log r to +-20 so exp cannot overflow).
    """
    log_ratio = logp - ref_logp
    if kind == "k1":
        return log_ratio
    if kind == "abs":
        return log_ratio.abs()
    if kind == "k2":
        return 0.5 * log_ratio.square()
    if kind == "k3":
        r = (-log_ratio).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
        return torch.exp(r) - r - 1
    raise ValueError(f"kind={kind!r}: expected one of {KL_KINDS}")


def full_kl_reference(hidden, weight, ref_hidden, ref_weight, temperature=1.0, bias=None, ref_bias=None):
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    z = hidden.to(dtype) @ weight.to(dtype).T
    r = ref_hidden.to(dtype) @ ref_weight.to(dtype).T
    if bias is not None:
        z = z + bias.to(dtype)
    if ref_bias is not None:
        r = r + ref_bias.to(dtype)
    logp = torch.log_softmax(z / temperature, -1)
    logq = torch.log_softmax(r / temperature, -1)
    return (logp.exp() * (logp - logq)).sum(-1)


def _forward_native(h, w, b, rh, rw, rb, inv_temp):
    from .. import _native
    N, V = h.shape[0], w.shape[0]
    kl, lse, md = (torch.empty(N, dtype=torch.float32) for _ in range(3))
    rows = chunk_rows(V)
    zbuf = torch.empty(min(rows, N), V)
    rbuf = torch.empty_like(zbuf)
    for i in range(0, N, rows):
        j = min(i + rows, N)
        z = _native_logits(h[i:j], w, b, zbuf[: j - i])
        r = _native_logits(rh[i:j], rw, rb, rbuf[: j - i])
        _native.kl_forward(as_numpy(z), as_numpy(r), inv_temp, as_numpy(kl[i:j]), as_numpy(lse[i:j]),
                           as_numpy(md[i:j]))
    return kl, lse, md


def _forward_native_bf16(h, w, b, rh, rw, rb, inv_temp):
    from .. import _native
    kl, lse, md = (torch.empty(h.shape[0], dtype=torch.float32) for _ in range(3))
    _native.kl_forward_bf16(as_bf16_numpy(h), as_bf16_numpy(w), bias_numpy(b), as_bf16_numpy(rh), as_bf16_numpy(rw),
                            bias_numpy(rb), inv_temp, as_numpy(kl), as_numpy(lse), as_numpy(md))
    return kl, lse, md


def _backward_native_bf16(h, w, b, rh, rw, rb, lse, mean_diff, grad, inv_temp, needs):
    from .. import _native
    grads = head_grad_buffers(h, w, needs)
    _native.kl_backward_bf16(as_bf16_numpy(h), as_bf16_numpy(w), bias_numpy(b), as_bf16_numpy(rh), as_bf16_numpy(rw),
                             bias_numpy(rb), inv_temp, as_numpy(lse.contiguous()), as_numpy(mean_diff.contiguous()),
                             as_numpy(grad), *(grad_buffer_numpy(g, n) for g, n in zip(grads, needs)))
    return grads


@torch.library.custom_op("cai_engine::full_kl", mutates_args=())
def _full_kl_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], ref_hidden: Tensor, ref_weight: Tensor,
                ref_bias: Optional[Tensor], temperature: float, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    if backend == "native" and bf16_kernels(hidden, weight, ref_hidden, ref_weight):
        return _forward_native_bf16(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, 1.0 / temperature)
    h, w, b = prepare(hidden, weight, bias, backend)
    rh, rw, rb = prepare(ref_hidden, ref_weight, ref_bias, backend)
    if backend == "native":
        return _forward_native(h, w, b, rh, rw, rb, 1.0 / temperature)
    from ..kernels import logprob as tk
    return tk.kl_forward(h, w, b, rh, rw, rb, 1.0 / temperature)


@_full_kl_op.register_fake
def _(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, temperature, backend):
    return tuple(hidden.new_empty(hidden.shape[0], dtype=torch.float32) for _ in range(3))


@torch.library.custom_op("cai_engine::full_kl_backward", mutates_args=())
def _full_kl_backward_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], ref_hidden: Tensor,
                         ref_weight: Tensor, ref_bias: Optional[Tensor], lse: Tensor, mean_diff: Tensor,
                         grad: Tensor, temperature: float, needs: list[bool],
                         backend: str) -> tuple[Tensor, Tensor, Tensor]:
    inv_temp, g = 1.0 / temperature, grad.float().contiguous()
    if backend == "native" and bf16_kernels(hidden, weight, ref_hidden, ref_weight):
        grads = _backward_native_bf16(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, lse, mean_diff, g,
                                      inv_temp, needs)
        return head_grads_cast(grads, hidden, weight, bias)
    h, w, b = prepare(hidden, weight, bias, backend)
    rh, rw, rb = prepare(ref_hidden, ref_weight, ref_bias, backend)
    if backend == "native":
        from .. import _native
        ref_buf = torch.empty(0)

        def dz_block(r, c, buf):
            nonlocal ref_buf
            if ref_buf.numel() < buf.numel():
                ref_buf = torch.empty(buf.numel())
            z = _native_logits(h[r], w[c], _cols(b, c), buf)
            ref = _native_logits(rh[r], rw[c], _cols(rb, c), ref_buf[: buf.numel()].view(buf.shape))
            _native.kl_backward(as_numpy(z), as_numpy(ref), inv_temp, as_numpy(lse[r]), as_numpy(mean_diff[r]),
                                as_numpy(g[r]))
            return z
    else:
        from ..kernels import logprob as tk

        def dz_block(r, c, buf):
            return tk.kl_dz(h[r], w[c], _cols(b, c), rh[r], rw[c], _cols(rb, c), lse[r], mean_diff[r], g[r],
                            inv_temp, buf)
    return head_grads_cast(chunked_backward(h, w, b, tuple(needs), dz_block), hidden, weight, bias)


@_full_kl_backward_op.register_fake
def _(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, lse, mean_diff, grad, temperature, needs, backend):
    return head_grads_fake(hidden, weight, bias, needs)


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, ref_hidden, ref_weight, ref_bias, temperature, backend = inputs
    _, lse, mean_diff = output
    ctx.save_for_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, lse, mean_diff)
    ctx.args = (temperature, backend)


def _backward_fn(ctx, grad_kl, _g_lse, _g_md):
    hidden, weight, bias, ref_hidden, ref_weight, ref_bias, lse, mean_diff = ctx.saved_tensors
    temperature, backend = ctx.args
    needs = head_grads_needed(ctx, bias)
    grads = _full_kl_backward_op(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, lse, mean_diff, grad_kl,
                                 temperature, needs, backend)
    return head_grads_result(grads, needs, 5)


_full_kl_op.register_autograd(_backward_fn, setup_context=_setup_context)


def _cols(bias: Optional[Tensor], c: slice) -> Optional[Tensor]:
    return None if bias is None else bias[c]


def full_kl(hidden: Tensor, weight: Tensor, ref_hidden: Tensor, ref_weight: Tensor, *, temperature: float = 1.0,
            bias: Optional[Tensor] = None, ref_bias: Optional[Tensor] = None,
            mask: Optional[Tensor] = None) -> Tensor:
    """Exact per-token KL(pi || pi_ref) over the whole vocabulary (fp32), differentiable for the policy side.

    hidden/ref_hidden [..., d] and [..., d_ref]; weight [V, d], ref_weight [V, d_ref]. The reference side
    gets no gradient. mask [...] (bool) zeroes positions that do not count.
    """
    check_finite_temperature(temperature)
    if hidden.shape[:-1] != ref_hidden.shape[:-1]:
        raise ValueError(f"ref_hidden: expected leading shape {tuple(hidden.shape[:-1])}, "
                         f"got {tuple(ref_hidden.shape[:-1])}")
    if weight.shape[0] != ref_weight.shape[0] or weight.shape[1] != hidden.shape[-1] \
            or ref_weight.shape[1] != ref_hidden.shape[-1]:
        raise ValueError(f"weight {tuple(weight.shape)} / ref_weight {tuple(ref_weight.shape)} do not match "
                         f"hidden [..., {hidden.shape[-1]}] / ref_hidden [..., {ref_hidden.shape[-1]}] "
                         "over one vocabulary")
    lead = hidden.shape[:-1]
    h2 = hidden.reshape(-1, hidden.shape[-1])
    rh2 = ref_hidden.detach().reshape(-1, ref_hidden.shape[-1])
    rw, rb = ref_weight.detach(), None if ref_bias is None else ref_bias.detach()
    backend = choose_backend(hidden)
    if backend == "torch":
        kl = full_kl_reference(h2, weight, rh2, rw, temperature, bias, rb).float()
    else:
        if rh2.dtype != h2.dtype or rw.dtype != weight.dtype:
            rh2, rw = rh2.to(h2.dtype), rw.to(weight.dtype)
        kl = _full_kl_op(h2, weight, bias, rh2, rw, rb, float(temperature), backend)[0]
    kl = kl.view(lead)
    return kl if mask is None else kl * mask.to(kl.dtype)
