"""TRL's fused LM head, computed by our op.

TRL (>= 1.x) never calls a causal LM with labels through its own forward: every trainer (SFT, DPO, GRPO, RLOO, KTO)
wraps the model with `trl.trainer.utils.add_fused_lm_head`, whose forward runs the decoder and hands the hidden
states and LM head to one function, `ChunkedLogProbFunction.apply(hidden, weight, bias, targets, temperature,
chunk_size, final_logit_softcapping, logit_scale, outputs)`. That call is the narrowest point: we swap the name the
wrapper looks up at call time, so the masking, loss reduction and metrics stay TRL's own.

Our op gives the log-probs and the entropy with gradients. The metric-only extras TRL may ask for (`is_top1`,
`mean_logits`, `log_sum_sq_probs`) carry no gradient; `mean_logits` is exact from the mean head row, the other two
need one extra no-grad pass over the vocabulary, in blocks.
"""
from __future__ import annotations

import importlib

import torch
from torch import Tensor

from ..ops import token_logprobs

HOOK_MODULE, HOOK_NAME = "trl.trainer.utils", "_ChunkedLogProbFunction"
STATISTICS_BLOCK = 1 << 22  # logits per no-grad block: 16 MiB of fp32


def head_statistics(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, inv_temp: float,
                    outputs: tuple[str, ...]) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(log_sum_sq_probs, mean_logits, is_top1) of softmax(inv_temp * (hidden @ weight^T + bias)), no gradient."""
    with torch.no_grad():
        mean_logits = None
        if "mean_logits" in outputs:  # mean over v of z_v is linear in h: one mat-vec, no vocabulary pass
            mean_logits = (hidden.float() @ weight.float().mean(0) + (0.0 if bias is None else bias.float().mean()))
            mean_logits *= inv_temp
        # The vocabulary pass runs in the operands' dtype, as TRL's tiles do (bf16 GEMMs on bf16 models).
        dtype = torch.promote_types(hidden.dtype, weight.dtype)
        h, w = hidden.to(dtype), weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        need_sq, need_top = "log_sum_sq_probs" in outputs, "is_top1" in outputs
        if not (need_sq or need_top):
            return None, mean_logits, None
        n = h.shape[0]
        log_sum_sq = torch.empty(n, dtype=torch.float32, device=h.device) if need_sq else None
        is_top1 = torch.empty(n, dtype=torch.bool, device=h.device) if need_top else None
        rows = max(1, STATISTICS_BLOCK // w.shape[0])
        for i in range(0, n, rows):
            j = min(i + rows, n)
            z = h[i:j] @ w.T
            if b is not None:
                z += b
            z = z.float()
            if need_top:  # argmax returns the first maximum, as TRL's strict "earlier max" test does
                is_top1[i:j] = z.argmax(-1) == targets[i:j]
            if need_sq:  # log sum p^2 = logsumexp(2 z / T) - 2 logsumexp(z / T)
                z *= inv_temp
                log_sum_sq[i:j] = torch.logsumexp(2 * z, -1) - 2 * torch.logsumexp(z, -1)
        return log_sum_sq, mean_logits, is_top1


class FusedLogProbFunction:
    """Drop-in for TRL's ChunkedLogProbFunction: same `apply` arguments, same five outputs."""

    original = None  # TRL's class, for the cases our op does not cover (logit softcapping, a non-positive scale)

    @classmethod
    def apply(cls, hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
              logit_scale=1.0, outputs=("log_probs",)):
        if final_logit_softcapping is not None or not logit_scale > 0:
            return cls.original.apply(hidden, weight, bias, targets, temperature, chunk_size,
                                      final_logit_softcapping, logit_scale, outputs)
        # logit_scale * z / T == z / (T / logit_scale): one temperature for our op
        effective_temperature = temperature / logit_scale
        logp, entropy = token_logprobs(hidden, weight, targets, bias=bias, temperature=effective_temperature,
                                       return_entropy="entropy" in outputs)
        log_sum_sq, mean_logits, is_top1 = head_statistics(hidden, weight, bias, targets,
                                                           1.0 / effective_temperature, outputs)
        return logp, entropy, log_sum_sq, mean_logits, is_top1


def patch_trl() -> bool:
    """Point TRL's fused LM head at our op. False when TRL is not installed or has no such hook (older TRL calls
    the model with labels, which `patch`/`patch_transformers` already cover)."""
    try:
        module = importlib.import_module(HOOK_MODULE)
    except ImportError:
        return False
    current = getattr(module, HOOK_NAME, None)
    if current is None:
        return False
    if current is not FusedLogProbFunction:
        FusedLogProbFunction.original = current
        setattr(module, HOOK_NAME, FusedLogProbFunction)
    return True


def unpatch_trl() -> None:
    module = importlib.import_module(HOOK_MODULE)
    if getattr(module, HOOK_NAME, None) is FusedLogProbFunction:
        setattr(module, HOOK_NAME, FusedLogProbFunction.original)
