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


def process_logits(logits: torch.Tensor, params: list[SamplingParams], tokens: list[list[int]],
                   outputs: list[list[int]], banned: list[list[int]]) -> torch.Tensor:
    """Log-probabilities [N, V] after penalties, temperature, top-k, top-p and min-p, one row per sequence
    (greedy rows keep their argmax only). Rows are processed together, but each row's result depends on
    that row alone, so sampling does not depend on what else is in the batch.

    tokens: each row's prompt + output ids (repetition penalty); outputs: output ids (presence and
    frequency penalties); banned: ids masked out (EOS and stop ids before min_tokens).
    """
    z = logits.float().clone()
    for i, p in enumerate(params):  # the rarer per-row options
        if p.repetition_penalty != 1.0 and tokens[i]:
            seen = torch.tensor(tokens[i], device=z.device)
            picked = z[i, seen]
            z[i, seen] = torch.where(picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty)
        if outputs[i] and (p.presence_penalty or p.frequency_penalty):
            counts = torch.bincount(torch.tensor(outputs[i], device=z.device), minlength=z.shape[1]).to(z.dtype)
            z[i] -= p.presence_penalty * (counts > 0) + p.frequency_penalty * counts
        if banned[i]:
            z[i, banned[i]] = float("-inf")
    greedy = [i for i, p in enumerate(params) if p.temperature == 0]
    argmax = z[greedy].argmax(-1) if greedy else None
    z /= torch.tensor([p.temperature or 1.0 for p in params], device=z.device)[:, None]
    for i, p in enumerate(params):
        if p.temperature and p.top_k and p.top_k < z.shape[1]:
            kth = torch.topk(z[i], p.top_k).values[-1]
            z[i].masked_fill_(z[i] < kth, float("-inf"))
    rows = [i for i, p in enumerate(params) if p.temperature and p.top_p < 1.0]
    if rows:
        z[rows] = _top_p(z[rows], torch.tensor([params[i].top_p for i in rows]))
    rows = [i for i, p in enumerate(params) if p.temperature and p.min_p > 0]
    if rows:
        probs = z[rows].softmax(-1)
        min_p = torch.tensor([params[i].min_p for i in rows], device=z.device)[:, None]
        z[rows] = z[rows].masked_fill(probs < min_p * probs.amax(-1, keepdim=True), float("-inf"))
    logprobs = z.log_softmax(-1)
    if greedy:
        logprobs[greedy] = float("-inf")
        logprobs[greedy, argmax] = 0.0
    return logprobs


def _top_p(z: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Per row of z [N, V], keep the smallest set of most likely tokens whose mass reaches top_p [N]
    (the sorted prefix).

    Sorting the vocabulary costs milliseconds per row; instead bisect for the largest probability
    threshold t whose kept mass, sum of p >= t, still reaches top_p (native: vectorised passes).
    """
    probs = z.softmax(-1)
    if probs.device.type == "cpu" and probs.dtype == torch.float32:
        from .. import _native
        threshold = torch.from_numpy(_native.top_p_threshold(probs.contiguous().numpy(), top_p.float().numpy()))
    else:
        top_p = top_p.to(probs.device, probs.dtype)
        lo, hi = torch.zeros_like(top_p), probs.amax(-1)
        for _ in range(32):
            mid = 0.5 * (lo + hi)
            enough = torch.where(probs >= mid[:, None], probs, 0).sum(-1) >= top_p
            lo, hi = torch.where(enough, mid, lo), torch.where(enough, hi, mid)
        threshold = lo
    return z.masked_fill(probs < threshold.to(probs.device)[:, None], float("-inf"))


def draw(logits: torch.Tensor, params: list[SamplingParams], tokens: list[list[int]], outputs: list[list[int]],
         banned: list[list[int]], generators: list[torch.Generator]) -> tuple[list[int], list[float], list[float]]:
    """One token per row of fp32 logits [N, V] (arguments as process_logits', plus each row's generator), with its
    log-prob under the raw logits and under the processed distribution it was drawn from.

    Each row inverts its CDF (vocabulary order) at one uniform from its own generator, on every path. Rows that
    use temperature and top-p only (the trainers' rollouts) are drawn natively on CPU in a few passes over each
    row, never an [N, V] tensor; the rest go through process_logits."""
    u = torch.cat([torch.rand(1, generator=g, dtype=torch.float32) for g in generators])
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and all(
            _nucleus_only(p) for p in params) and not any(banned):
        from .. import _native
        n = len(params)
        picked, raw, chosen = torch.empty(n, dtype=torch.int64), torch.empty(n), torch.empty(n)
        _native.sample_nucleus(logits.contiguous().numpy(), torch.tensor([1.0 / p.temperature for p in params]).numpy(),
                               torch.tensor([p.top_p for p in params]).numpy(), u.numpy(), picked.numpy(),
                               raw.numpy(), chosen.numpy())
        return picked.tolist(), raw.tolist(), chosen.tolist()
    processed = process_logits(logits, params, tokens, outputs, banned)
    picked = sample(processed, u)
    rows, index = torch.arange(len(params), device=logits.device), torch.tensor(picked, device=logits.device)
    raw = (logits[rows, index] - logits.logsumexp(-1)).tolist()
    return picked, raw, processed[rows, index].tolist()


def _nucleus_only(p: SamplingParams) -> bool:
    return (p.temperature > 0 and p.top_k == 0 and p.min_p == 0 and p.repetition_penalty == 1.0
            and not p.presence_penalty and not p.frequency_penalty)


def sample(logprobs: torch.Tensor, u: torch.Tensor) -> list[int]:
    """One draw per row of exp(logprobs) [N, V] by inverting its CDF at u[row] (uniform in [0, 1))."""
    if logprobs.device.type == "cpu" and logprobs.dtype == torch.float32:
        # native: two vectorised passes, the second stopping where the mass passes u (no [N, V] exp or cumsum)
        from .. import _native
        return _native.sample_rows(logprobs.contiguous().numpy(), u.numpy()).tolist()
    cdf = logprobs.exp().cumsum(-1)
    picked = torch.searchsorted(cdf, (u.to(cdf.device, cdf.dtype) * cdf[:, -1])[:, None], right=True).squeeze(1)
    return picked.clamp_max(cdf.shape[1] - 1).tolist()
