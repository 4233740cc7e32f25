"""Sampling parameters and the per-sequence logits processor of the engine."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(slots=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0          # 0 = greedy
    top_k: int = 0                    # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0   # HF-style, over prompt and output tokens
    presence_penalty: float = 0.0     # OpenAI-style, over output tokens
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int = 128
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def validate(self) -> None:
        checks = [
            (self.n >= 1, "n must be >= 1"),
            (self.temperature >= 0, "temperature must be >= 0"),
            (self.top_k >= 0, "top_k must be >= 0 (0 = off)"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (self.max_tokens >= 1, "max_tokens must be >= 1"),
            (0 <= self.min_tokens <= self.max_tokens, "min_tokens must be in [0, max_tokens]"),
            (all(isinstance(s, str) and s for s in self.stop), "stop must be a list of non-empty strings"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"SamplingParams: {message}")


def process_logits(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor, output: list[int],
                   banned: list[int]) -> torch.Tensor:
    """Log-probabilities after penalties, temperature, top-k, top-p and min-p (greedy keeps the argmax only).

    seen: token ids of prompt + output (for the repetition penalty); banned: ids masked out (EOS and stop
    ids before min_tokens).
    """
    z = logits.float().clone()
    if params.repetition_penalty != 1.0 and seen.numel():
        picked = z[seen]
        z[seen] = torch.where(picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty)
    if output and (params.presence_penalty or params.frequency_penalty):
        counts = torch.bincount(torch.tensor(output), minlength=z.numel()).to(z.dtype)
        z -= params.presence_penalty * (counts > 0) + params.frequency_penalty * counts
    if banned:
        z[banned] = float("-inf")
    if params.temperature == 0:
        keep = torch.full_like(z, float("-inf"))
        keep[z.argmax()] = 0.0
        return keep
    z = z / params.temperature
    if params.top_k and params.top_k < z.numel():
        kth = torch.topk(z, params.top_k).values[-1]
        z = z.masked_fill(z < kth, float("-inf"))
    if params.top_p < 1.0:
        z = _top_p(z, params.top_p)
    if params.min_p > 0:
        probs = z.softmax(-1)
        z = z.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    return z.log_softmax(-1)


def _top_p(z: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p (the sorted prefix).

    Sorting the vocabulary costs milliseconds per row; instead bisect for the largest probability
    threshold t whose kept mass, sum of p >= t, still reaches top_p (native: vectorised passes).
    """
    probs = z.softmax(-1)
    if probs.device.type == "cpu" and probs.dtype == torch.float32:
        from . import _native
        threshold = _native.top_p_threshold(probs.numpy(), top_p)
    else:
        lo, hi = 0.0, float(probs.max())
        for _ in range(32):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if float(torch.where(probs >= mid, probs, 0).sum()) >= top_p else (lo, mid)
        threshold = lo
    return z.masked_fill(probs < threshold, float("-inf"))


def sample(logprobs: torch.Tensor, generator: torch.Generator) -> int:
    """One draw from exp(logprobs) by inverting its CDF with a single uniform from the sequence's generator."""
    cdf = logprobs.exp().cumsum(0)
    u = torch.rand(1, generator=generator, dtype=cdf.dtype) * cdf[-1]
    return min(int(torch.searchsorted(cdf, u, right=True)), cdf.numel() - 1)
