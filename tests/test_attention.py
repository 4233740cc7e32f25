"""ops.attention: the decoder's native bf16 attention (forward and backward) against a float64 reference.

Tolerance: the largest error of each gradient, relative to its largest entry, stays under 1e-2. Every gradient is
rounded to bf16 once (2^-9 relative), and P and dS are bf16 operands of the products (as in GPU FlashAttention), which
adds a few bf16 ulps; torch's own bf16 CPU backward lands at about 1e-2 on these inputs (ours at about 5e-3).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cai_engine.ops.attention import attention

native = pytest.importorskip("cai_engine._native")
needs_bf16 = pytest.mark.skipif(not native.bf16_kernels_available(), reason="CPU without AVX512-BF16")
TOLERANCE = 1e-2


def reference(q, k, v, mask, causal):
    """float64 softmax attention; mask additive or bool, [B or 1, 1, T, S]."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    T, S = scores.shape[-2:]
    if causal:
        scores = scores.masked_fill(~torch.ones(T, S, dtype=torch.bool).tril(S - T), float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.double()
    return torch.softmax(scores, -1) @ v


def inputs(B, H, KV, T, S, D, seed=0):
    """q, k, v as the decoder makes them: [B, heads, T, D] views of [B, T, heads, D] projection rows."""
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, T, H, D, generator=g) * 1.5).bfloat16().transpose(1, 2).requires_grad_()
    k = (torch.randn(B, S, KV, D, generator=g) * 1.5).bfloat16().transpose(1, 2).requires_grad_()
    v = torch.randn(B, S, KV, D, generator=g).bfloat16().transpose(1, 2).requires_grad_()
    grad = torch.randn(B, T, H, D, generator=g).bfloat16().transpose(1, 2)
    return q, k, v, grad


def random_mask(B, T, S, kind, seed=1):
    g = torch.Generator().manual_seed(seed)
    allow = torch.rand(B, 1, T, S, generator=g) < 0.5
    allow[..., :, 40:80] = False  # whole 32 x 32 tiles nobody sees (skipped), where S reaches them
    allow[..., torch.arange(T), torch.arange(T) % S] = True  # every row sees a key
    if kind == "bool":
        return allow
    dtype = torch.float32 if kind == "fp32" else torch.bfloat16
    return torch.zeros(B, 1, T, S, dtype=dtype).masked_fill_(~allow, float("-inf"))


def check(q, k, v, grad, mask=None, causal=False):
    out = attention(q, k, v, mask=mask, causal=causal)
    got = torch.autograd.grad(out, (q, k, v), grad)
    exact = [t.detach().double().requires_grad_() for t in (q, k, v)]
    expected_out = reference(*exact, mask, causal)
    expected = torch.autograd.grad(expected_out, exact, grad.double())
    assert (out.double() - expected_out).abs().max() <= TOLERANCE * expected_out.abs().max()
    for name, a, b in zip("qkv", got, expected):
        assert a.dtype == torch.bfloat16 and a.shape == b.shape
        error = float((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-6))  # one key: grad_q is 0
        assert error < TOLERANCE, f"grad_{name}: max error {error:.2e} of its largest entry"


@needs_bf16
@pytest.mark.parametrize("amx", ["1", "0"])
@pytest.mark.parametrize("B,H,KV,T,D", [
    (2, 6, 2, 40, 64),     # T past one 32-row block, 3 query heads per KV head
    (1, 9, 3, 100, 64),    # SmolLM2's heads; one (batch, KV head) pair per thread: key blocks split between tasks
    (3, 4, 4, 37, 32),     # no grouping, head_dim 32
    (2, 8, 2, 70, 128),    # head_dim 128
    (1, 2, 1, 1, 64),      # a single token
])
def test_causal_backward_matches_float64(B, H, KV, T, D, amx, monkeypatch):
    monkeypatch.setenv("CAI_ENGINE_AMX", amx)  # "0": the VDPBF16PS path on AMX machines too
    check(*inputs(B, H, KV, T, T, D), causal=True)


@needs_bf16
@pytest.mark.parametrize("kind", ["bf16", "fp32", "bool"])
@pytest.mark.parametrize("B,H,KV,T,S,mask_batches", [
    (2, 6, 2, 70, 70, 2),
    (3, 4, 2, 45, 45, 1),   # one mask for the batch, broadcast
    (2, 4, 1, 33, 90, 2),   # more keys than queries (a cached prefix in front)
])
def test_masked_backward_matches_float64(B, H, KV, T, S, mask_batches, kind):
    q, k, v, grad = inputs(B, H, KV, T, S, 64)
    mask = random_mask(mask_batches, T, S, kind)
    check(q, k, v, grad, mask=mask)


@needs_bf16
def test_mask_and_causal_together_and_rows_that_see_only_themselves():
    B, H, KV, T = 2, 6, 3, 96
    q, k, v, grad = inputs(B, H, KV, T, T, 64, seed=3)
    allow = torch.ones(B, 1, T, T, dtype=torch.bool)
    allow[:, :, 64:, 32:64] = False  # the prompt-sharing layout of the PM: a response does not see the other
    allow[1, :, 90:, :] = False      # padding rows, which see only themselves
    allow[1, :, torch.arange(90, T), torch.arange(90, T)] = True
    mask = torch.zeros(B, 1, T, T, dtype=torch.bfloat16).masked_fill_(~allow, float("-inf"))
    check(q, k, v, grad, mask=mask, causal=True)


@needs_bf16
def test_forward_is_as_close_as_torchs_and_the_same_with_and_without_autograd():
    q, k, v, grad = inputs(4, 9, 3, 200, 200, 64)
    exact = reference(q.detach().double(), k.detach().double(), v.detach().double(), None, True)
    ours = attention(q, k, v, causal=True)
    with torch.no_grad():
        assert torch.equal(attention(q, k, v, causal=True), ours)  # evaluation scores with training's bits
        theirs = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    error = lambda out: float((out.detach().double() - exact).abs().mean())
    assert error(ours) <= 1.1 * error(theirs)  # both are one bf16 rounding of an fp32 result, about 5e-4


@needs_bf16
def test_a_row_that_sees_no_key_gets_zeros_not_nans():
    q, k, v, grad = inputs(1, 4, 2, 40, 40, 64)
    allow = torch.ones(1, 1, 40, 40, dtype=torch.bool)
    allow[..., 7, :] = False
    out = attention(q, k, v, mask=allow)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    assert out[:, :, 7].abs().max() == 0 and all(g.isfinite().all() for g in grads)
    assert grads[0][:, :, 7].abs().max() == 0


@needs_bf16
def test_other_dtypes_take_torchs_attention():
    q, k, v, grad = inputs(2, 6, 2, 50, 50, 64)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    got = torch.autograd.grad(attention(q32, k32, v32, causal=True), (q32, k32, v32), grad.float())
    q32b, k32b, v32b = (t.detach().clone().requires_grad_() for t in (q32, k32, v32))
    expected = torch.autograd.grad(F.scaled_dot_product_attention(q32b, k32b, v32b, is_causal=True, enable_gqa=True),
                                   (q32b, k32b, v32b), grad.float())
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


@needs_bf16
def test_bad_operands_get_one_line_errors():
    def call(q, k, lse_rows=None, mask=None):
        B, T, H, D = q.shape
        S, KV = k.shape[1], k.shape[2]
        lse = torch.zeros(B, T if lse_rows is None else lse_rows, H)
        as16 = lambda t: t.view(torch.int16).numpy()
        native.attention_backward_bf16(as16(q), as16(k), as16(k.clone()), as16(q.clone()), as16(q.clone()),
                                       lse.numpy(), mask, True, 0.125, as16(torch.empty_like(q)),
                                       as16(torch.empty_like(k)), as16(torch.empty_like(k)))
    q, k = torch.zeros(2, 8, 4, 64, dtype=torch.bfloat16), torch.zeros(2, 8, 2, 64, dtype=torch.bfloat16)
    call(q, k)
    with pytest.raises(ValueError, match="head_dim 48: expected a multiple of 32"):
        call(torch.zeros(2, 8, 4, 48, dtype=torch.bfloat16), torch.zeros(2, 8, 2, 48, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="q has 4 heads, k 3: expected a multiple"):
        call(q, torch.zeros(2, 8, 3, 64, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="lse: expected size 8 on axis 1, got 7"):
        call(q, k, lse_rows=7)
    with pytest.raises(ValueError, match="mask: expected 1 or 2 on axis 0, got 3"):
        call(q, k, mask=torch.zeros(3, 8, 8).numpy())


@needs_bf16
def test_a_learned_mask_gets_its_gradient_from_torchs_attention():
    q, k, v, grad = inputs(1, 4, 2, 40, 40, 64)
    bias = torch.zeros(1, 1, 40, 40, dtype=torch.bfloat16, requires_grad=True)
    (grad_bias,) = torch.autograd.grad(attention(q, k, v, mask=bias), (bias,), grad)
    assert grad_bias.abs().max() > 0
