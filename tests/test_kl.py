import pytest
import torch

import cai_engine.ops.logprob as logprob_mod
from cai_engine.ops import full_kl, kl_penalty
from cai_engine.ops.kl import full_kl_reference
from conftest import device_for


def make(n, v, d, d_ref, *, scale=1.0, dtype=torch.float32, device="cpu", seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(n, d, generator=g) * scale).to(dtype)
    w = (torch.randn(v, d, generator=g) / d ** 0.5).to(dtype)
    rh = (torch.randn(n, d_ref, generator=g) * scale).to(dtype)
    rw = (torch.randn(v, d_ref, generator=g) / d_ref ** 0.5).to(dtype)
    b = torch.randn(v, generator=g).to(dtype) if bias else None
    to = lambda t, grad: None if t is None else t.to(device).requires_grad_(grad)
    return to(h, True), to(w, True), to(rh, False), to(rw, False), to(b, True)


def check(h, w, rh, rw, b, *, temperature=1.0, atol=2e-5, rtol=1e-4, gatol=2e-5, grtol=1e-4):
    g = torch.randn(h.shape[:-1], generator=torch.Generator().manual_seed(1)).to(h.device)
    kl = full_kl(h, w, rh, rw, temperature=temperature, bias=b)
    assert kl.dtype == torch.float32 and kl.shape == h.shape[:-1]
    params = [t for t in (h, w, b) if t is not None]
    grads = torch.autograd.grad((g * kl).sum(), params)
    ref_params = [t.detach().cpu().double().requires_grad_() for t in params]
    rb = ref_params[2] if b is not None else None
    rkl = full_kl_reference(ref_params[0], ref_params[1], rh.cpu().double(), rw.cpu().double(), temperature, rb)
    rgrads = torch.autograd.grad((g.cpu().double() * rkl).sum(), ref_params)
    torch.testing.assert_close(kl.cpu().double(), rkl.detach(), atol=atol, rtol=rtol)
    assert (kl > -atol).all()
    for name, got, want in zip("hwb", grads, rgrads):
        torch.testing.assert_close(got.cpu().double(), want, atol=gatol, rtol=grtol, msg=f"grad of {name}")


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_full_kl_equals_dense(backend, temperature):
    check(*make(37, 301, 40, 24, device=device_for(backend), bias=True), temperature=temperature)


def test_full_kl_large_logits_and_chunks(backend, monkeypatch):
    monkeypatch.setattr(logprob_mod, "CHUNK_ELEMENTS", 130 * 5)
    monkeypatch.setattr(logprob_mod, "MIN_BLOCK_COLS", 48)
    check(*make(23, 130, 16, 16, scale=40.0, device=device_for(backend), seed=2), atol=2e-3, rtol=1e-4,
          gatol=2e-3, grtol=1e-3)


def test_full_kl_bf16(backend):
    check(*make(19, 100, 32, 32, dtype=torch.bfloat16, device=device_for(backend), seed=3),
          atol=2e-3, rtol=2e-2, gatol=3e-2, grtol=3e-2)


def test_full_kl_is_zero_for_the_same_model(backend):
    h, w, _, _, _ = make(17, 90, 12, 12, device=device_for(backend), seed=4)
    kl = full_kl(h, w, h.detach(), w.detach(), temperature=0.8)
    assert kl.abs().max() < 1e-5
    (gh,) = torch.autograd.grad(kl.sum(), [h])
    assert gh.abs().max() < 1e-5


def test_full_kl_mask_and_leading_dims(backend):
    h, w, rh, rw, _ = make(12, 50, 8, 8, device=device_for(backend), seed=5)
    mask = torch.ones(3, 4, dtype=torch.bool, device=h.device)
    mask[1, 2:] = False
    kl = full_kl(h.view(3, 4, 8), w, rh.view(3, 4, 8), rw, mask=mask)
    assert kl.shape == (3, 4) and (kl[~mask] == 0).all() and (kl[mask] > 0).all()


def test_full_kl_shape_errors():
    h, w, rh, rw, _ = make(5, 10, 4, 6)
    with pytest.raises(ValueError, match="ref_hidden: expected leading shape"):
        full_kl(h, w, rh[:3], rw)
    with pytest.raises(ValueError, match="over one vocabulary"):
        full_kl(h, w, rh, rw[:7])


def test_kl_penalty_estimators():
    logp = torch.tensor([-1.0, -2.0, -0.5, -30.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-1.5, -1.0, -0.5, -1.0], dtype=torch.float64)
    lr = (logp - ref).detach()
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), lr)
    torch.testing.assert_close(kl_penalty(logp, ref, "abs"), lr.abs())
    torch.testing.assert_close(kl_penalty(logp, ref, "k2"), 0.5 * lr ** 2)
    k3 = kl_penalty(logp, ref, "k3")
    r = (-lr).clamp(-20, 20)
    torch.testing.assert_close(k3, torch.exp(r) - r - 1)
    assert (k3 >= 0).all() and torch.isfinite(k3).all() and k3[2] == 0
    (g,) = torch.autograd.grad(k3.sum(), [logp])
    torch.testing.assert_close(g[:3], 1 - torch.exp(-lr[:3]))
    with pytest.raises(ValueError, match="kind='k4'"):
        kl_penalty(logp, ref, "k4")


def test_k3_is_an_unbiased_estimate_of_full_kl():
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(50, dtype=torch.float64), 0)
    q = torch.softmax(torch.randn(50, dtype=torch.float64), 0)
    samples = torch.multinomial(p, 200_000, replacement=True)
    est = kl_penalty(p.log()[samples], q.log()[samples], "k3").mean()
    exact = (p * (p.log() - q.log())).sum()
    assert abs(est - exact) < 0.02 * exact + 1e-3


def test_full_kl_compiles_without_graph_breaks(monkeypatch):
    monkeypatch.setenv("CAI_ENGINE_BACKEND", "native")
    h, w, rh, rw, _ = make(10, 40, 8, 6)

    def fn(h, w):
        return full_kl(h, w, rh, rw, temperature=1.3).mean() + kl_penalty(h.sum(-1), rh.sum(-1), "k3").mean()

    torch._dynamo.reset()
    loss = torch.compile(fn, backend="aot_eager", fullgraph=True)(h, w)
    loss.backward()
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    fn(h2, w2).backward()
    torch.testing.assert_close(h.grad, h2.grad)
    torch.testing.assert_close(w.grad, w2.grad)


# ---------------------------------------------------------------- bf16 operands: native kernel (AMX or VDPBF16PS) vs fp32 path

from cai_engine import _native  # noqa: E402

BF16_PATHS = [pytest.param("amx", marks=pytest.mark.skipif(not _native.amx_available(), reason="CPU lacks AMX-BF16")),
              pytest.param("vectors", marks=pytest.mark.skipif(not _native.bf16_kernels_available(),
                                                               reason="CPU lacks AVX512-BF16")),
              "fallback"]


@pytest.fixture(params=BF16_PATHS)
def bf16_path(request, monkeypatch):
    """The native KL kernel on AMX tiles, on VDPBF16PS vectors (CAI_ENGINE_AMX=0), or the fp32 path."""
    monkeypatch.setenv("CAI_ENGINE_BACKEND", "native")
    monkeypatch.setenv(logprob_mod.BF16_KERNELS_ENV, "0" if request.param == "fallback" else "1")
    monkeypatch.setenv("CAI_ENGINE_AMX", "0" if request.param == "vectors" else "1")
    calls = []
    for name in ("kl_forward_bf16", "kl_backward_bf16"):
        real = getattr(_native, name)
        monkeypatch.setattr(_native, name, lambda *a, _real=real, _name=name, **k: (calls.append(_name), _real(*a, **k))[1])
    yield request.param
    assert bool(calls) == (request.param != "fallback"), calls


def check_bf16(h, w, rh, rw, b, *, temperature=1.0, atol=1e-4):
    """KL within `atol` of float64 on the same bf16-rounded inputs; bf16 gradients within a few roundings."""
    g = torch.randn(h.shape[:-1], generator=torch.Generator().manual_seed(1))
    kl = full_kl(h, w, rh, rw, temperature=temperature, bias=b)
    params = [t for t in (h, w, b) if t is not None]
    grads = torch.autograd.grad((g * kl).sum(), params)
    ref = [t.detach().double().requires_grad_() for t in params]
    rkl = full_kl_reference(ref[0], ref[1], rh.double(), rw.double(), temperature, ref[2] if b is not None else None)
    rgrads = torch.autograd.grad((g.double() * rkl).sum(), ref)
    assert (kl.double() - rkl).abs().max() <= atol
    for name, got, want, p in zip("hwb", grads, rgrads, params):
        assert got.dtype == p.dtype, name
        torch.testing.assert_close(got.double(), want, atol=1e-2 * want.abs().max().item(), rtol=1e-2,
                                   msg=f"grad of {name}")
    return kl


@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.7])
def test_full_kl_bf16_odd_sizes(bf16_path, temperature):
    # N, V, d and d_ref divide none of the tile sizes; the two heads have different widths
    check_bf16(*make(37, 301, 41, 23, dtype=torch.bfloat16, seed=6, bias=True), temperature=temperature)


def test_full_kl_bf16_large_logits(bf16_path):
    check_bf16(*make(23, 130, 16, 16, scale=40.0, dtype=torch.bfloat16, seed=2))


def test_full_kl_bf16_same_model_is_zero(bf16_path):
    h, w, _, _, _ = make(17, 90, 12, 12, dtype=torch.bfloat16, seed=4)
    kl = full_kl(h, w, h.detach(), w.detach(), temperature=0.8)
    assert kl.abs().max() < 1e-5


def test_full_kl_bf16_fallback_gives_the_same_results(monkeypatch):
    if not _native.bf16_kernels_available():
        pytest.skip("CPU lacks AVX512-BF16: only the fallback exists")
    monkeypatch.setenv("CAI_ENGINE_BACKEND", "native")
    h, w, rh, rw, b = make(45, 1000, 70, 40, dtype=torch.bfloat16, seed=7, bias=True)
    out = {}
    for flag in ("1", "0"):
        monkeypatch.setenv(logprob_mod.BF16_KERNELS_ENV, flag)
        kl = full_kl(h, w, rh, rw, temperature=1.3, bias=b)
        out[flag] = (kl, *torch.autograd.grad(kl.sum(), [h, w, b]))
    for name, k, f in zip(["kl", "dh", "dW", "db"], out["1"], out["0"]):
        tol = 2e-5 if name == "kl" else 1e-2 * f.abs().max().item()
        torch.testing.assert_close(k.double(), f.double(), atol=tol, rtol=0, msg=name)
