import pytest
import torch

import cai_engine.ops.logprob as logprob_mod
from cai_engine.ops import token_logprobs
from cai_engine.ops.logprob import token_logprobs_reference
from conftest import device_for


def make(n, v, d, *, scale=1.0, bias=False, dtype=torch.float32, device="cpu", seed=0, ignore=()):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(n, d, generator=g) * scale).to(dtype)
    w = (torch.randn(v, d, generator=g) / d ** 0.5).to(dtype)
    b = (torch.randn(v, generator=g)).to(dtype) if bias else None
    y = torch.randint(0, v, (n,), generator=g)
    for i in ignore:
        y[i] = -100
    to = lambda t: None if t is None else t.to(device).requires_grad_()
    return to(h), to(w), to(b), y.to(device)


def check(h, w, b, y, *, temperature=1.0, entropy=True, atol=2e-4, rtol=2e-5, gatol=2e-4, grtol=1e-4, chunk=None,
          monkeypatch=None):
    if chunk is not None:
        monkeypatch.setattr(logprob_mod, "CHUNK_ELEMENTS", chunk)
        monkeypatch.setattr(logprob_mod, "MIN_BLOCK_COLS", 32)  # several row chunks and vocabulary blocks
    g = torch.Generator().manual_seed(1)
    a = torch.randn(y.shape, generator=g).to(h.device)
    c = torch.randn(y.shape, generator=g).to(h.device)
    logp, ent = token_logprobs(h, w, y, bias=b, temperature=temperature, return_entropy=entropy)
    assert logp.dtype == torch.float32 and logp.shape == y.shape
    loss = (a * logp).sum() + ((c * ent).sum() if entropy else 0)
    params = [t for t in (h, w, b) if t is not None]
    grads = torch.autograd.grad(loss, params)

    ref_params = [t.detach().cpu().double().requires_grad_() for t in params]
    rh, rw = ref_params[:2]
    rb = ref_params[2] if b is not None else None
    rlogp, rent = token_logprobs_reference(rh, rw, y.cpu(), rb, temperature, -100, entropy)
    rloss = (a.cpu().double() * rlogp).sum() + ((c.cpu().double() * rent).sum() if entropy else 0)
    rgrads = torch.autograd.grad(rloss, ref_params)

    torch.testing.assert_close(logp.cpu().double(), rlogp.detach(), atol=atol, rtol=rtol)
    if entropy:
        assert ent.dtype == torch.float32
        torch.testing.assert_close(ent.cpu().double(), rent.detach(), atol=atol, rtol=rtol)
    for name, got, want, p in zip("hwb", grads, rgrads, params):
        assert got.dtype == p.dtype, name
        torch.testing.assert_close(got.cpu().double(), want, atol=gatol, rtol=grtol, msg=f"grad of {name}")
    ignored = (y == -100).cpu()
    if ignored.any():
        assert (logp.cpu()[ignored] == 0).all()
        assert (grads[0].cpu()[ignored] == 0).all()


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_values_and_grads(backend, temperature):
    dev = device_for(backend)
    check(*make(37, 301, 40, bias=True, device=dev, ignore=(3, 17)), temperature=temperature)


def test_odd_sizes_no_bias_no_entropy(backend):
    dev = device_for(backend)
    check(*make(1, 7, 3, device=dev), entropy=False)
    check(*make(19, 65, 33, device=dev, seed=5), entropy=False)


def test_logits_in_the_hundreds(backend):
    dev = device_for(backend)
    h, w, b, y = make(29, 257, 24, scale=90.0, device=dev, seed=2)
    with torch.no_grad():
        assert (h @ w.T).abs().max() > 300
    check(h, w, b, y, atol=2e-3, rtol=1e-5, gatol=2e-3, grtol=1e-3)


def test_rows_where_every_logit_is_very_negative(backend):
    dev = device_for(backend)
    h, w, _, y = make(21, 130, 16, device=dev, seed=3)
    b = torch.full((130,), -800.0, device=dev).requires_grad_()
    check(h, w, b, y, atol=1e-3, gatol=1e-3)


def test_batched_leading_dims(backend):
    dev = device_for(backend)
    h, w, b, y = make(2 * 13, 99, 20, bias=True, device=dev, seed=4, ignore=(0, 25))
    h3 = h.detach().view(2, 13, 20).requires_grad_()
    check(h3, w, b, y.view(2, 13))


def test_many_chunks(backend, monkeypatch):
    dev = device_for(backend)
    check(*make(45, 120, 24, bias=True, device=dev, seed=6, ignore=(44,)), chunk=120 * 7, monkeypatch=monkeypatch)


def test_bf16_inputs(backend):
    dev = device_for(backend)
    h, w, b, y = make(33, 200, 32, bias=True, dtype=torch.bfloat16, device=dev, seed=7, ignore=(1,))
    check(h, w, b, y, temperature=0.7, atol=2e-3, rtol=1e-3, gatol=3e-2, grtol=3e-2)


def test_frozen_head_gets_no_grad(backend, monkeypatch):
    dev = device_for(backend)
    h, w, _, y = make(11, 50, 8, device=dev)
    w.requires_grad_(False)
    asked = []
    real = logprob_mod._token_logprobs_backward_op

    def spy(*args):
        asked.append(list(args[10]))  # `needs`: which of (hidden, weight, bias) the backward computes
        return real(*args)
    monkeypatch.setattr(logprob_mod, "_token_logprobs_backward_op", spy)
    logp, _ = token_logprobs(h, w, y)
    (gh,) = torch.autograd.grad(logp.sum(), [h])
    if backend != "torch":  # the reference backend differentiates through plain torch ops
        assert asked == [[True, False, False]], "a frozen head must not cost a weight-gradient GEMM"
    rh = h.detach().cpu().double().requires_grad_()
    rlogp, _ = token_logprobs_reference(rh, w.cpu().double(), y.cpu())
    (want,) = torch.autograd.grad(rlogp.sum(), [rh])
    torch.testing.assert_close(gh.cpu().double(), want, atol=2e-4, rtol=1e-4)


def test_bad_inputs_are_named(backend):
    h, w, _, y = make(5, 10, 4)
    with pytest.raises(ValueError, match="labels: expected shape"):
        token_logprobs(h, w, y[:3])
    with pytest.raises(ValueError, match="weight: expected"):
        token_logprobs(h, w[:, :3], y)
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(h, w, y, temperature=0.0)


def test_native_rejects_out_of_range_label(monkeypatch):
    monkeypatch.setenv("CAI_ENGINE_BACKEND", "native")
    h, w, _, y = make(5, 10, 4)
    y[2] = 10
    with pytest.raises(ValueError, match=r"labels\[2\] = 10 is outside \[0, 10\)"):
        token_logprobs(h, w, y)


def test_backend_override_is_validated(monkeypatch):
    monkeypatch.setenv("CAI_ENGINE_BACKEND", "cuda-magic")
    h, w, _, y = make(5, 10, 4)
    with pytest.raises(ValueError, match="CAI_ENGINE_BACKEND='cuda-magic'"):
        token_logprobs(h, w, y)


def test_compiles_without_graph_breaks(monkeypatch):
    monkeypatch.setenv("CAI_ENGINE_BACKEND", "native")
    h, w, b, y = make(12, 40, 8, bias=True)

    def loss_fn(h, w, b, y):
        logp, ent = token_logprobs(h, w, y, bias=b, temperature=0.9, return_entropy=True)
        return -(logp.mean() + 0.01 * ent.mean())

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    loss = compiled(h, w, b, y)
    loss.backward()
    eager_h, eager_w, eager_b = (t.detach().clone().requires_grad_() for t in (h, w, b))
    loss_fn(eager_h, eager_w, eager_b, y).backward()
    torch.testing.assert_close(loss, loss_fn(eager_h, eager_w, eager_b, y))
    torch.testing.assert_close(h.grad, eager_h.grad)
    torch.testing.assert_close(w.grad, eager_w.grad)


# ---------------------------------------------------------------- bf16 operands: native kernel (AMX or VDPBF16PS) vs fp32 path

from cai_engine import _native  # noqa: E402

BF16_PATHS = [pytest.param("amx", marks=pytest.mark.skipif(not _native.amx_available(), reason="CPU lacks AMX-BF16")),
              pytest.param("vectors", marks=pytest.mark.skipif(not _native.bf16_kernels_available(),
                                                               reason="CPU lacks AVX512-BF16")),
              "fallback"]


@pytest.fixture(params=BF16_PATHS)
def bf16_path(request, monkeypatch):
    """bf16 operands on the native backend: the native kernel on AMX tiles or on VDPBF16PS vectors
    (CAI_ENGINE_AMX=0, what a CPU without AMX runs), or forced onto the fp32 path."""
    monkeypatch.setenv("CAI_ENGINE_BACKEND", "native")
    monkeypatch.setenv(logprob_mod.BF16_KERNELS_ENV, "0" if request.param == "fallback" else "1")
    monkeypatch.setenv("CAI_ENGINE_AMX", "0" if request.param == "vectors" else "1")
    calls = []
    for name in ("logprob_forward_bf16", "logprob_backward_bf16"):
        real = getattr(_native, name)
        monkeypatch.setattr(_native, name, lambda *a, _real=real, _name=name, **k: (calls.append(_name), _real(*a, **k))[1])
    yield request.param
    # the dispatch really went where the path says
    assert bool(calls) == (request.param != "fallback"), calls


def check_bf16(h, w, b, y, *, temperature=1.0, atol=1e-4):
    """Values within `atol` of float64 on the same bf16-rounded inputs (fp32 accumulation order is the only
    error); gradients, which are returned in bf16, within a few bf16 roundings of float64."""
    g = torch.Generator().manual_seed(1)
    a, c = torch.randn(y.shape, generator=g), torch.randn(y.shape, generator=g)
    logp, ent = token_logprobs(h, w, y, bias=b, temperature=temperature, return_entropy=True)
    params = [t for t in (h, w, b) if t is not None and t.requires_grad]
    grads = torch.autograd.grad((a * logp).sum() + (c * ent).sum(), params)
    ref = [t.detach().double().requires_grad_(t.requires_grad) for t in (h, w, b) if t is not None]
    rlogp, rent = token_logprobs_reference(ref[0], ref[1], y, ref[2] if b is not None else None, temperature, -100,
                                           True)
    rgrads = torch.autograd.grad((a.double() * rlogp).sum() + (c.double() * rent).sum(),
                                 [t for t in ref if t.requires_grad])
    assert (logp.double() - rlogp).abs().max() <= atol
    assert (ent.double() - rent).abs().max() <= atol
    for name, got, want, p in zip("hwb", grads, rgrads, params):
        assert got.dtype == p.dtype, name
        scale = want.abs().max().item()
        torch.testing.assert_close(got.double(), want, atol=1e-2 * scale, rtol=1e-2, msg=f"grad of {name}")
    return logp, ent, grads


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
def test_bf16_odd_sizes_bias_ignore_index(bf16_path, temperature):
    # N, V and d divide none of the kernel's tiles (32 rows, 16 tokens, 32-wide K steps)
    check_bf16(*make(37, 301, 41, bias=True, dtype=torch.bfloat16, seed=8, ignore=(0, 36)), temperature=temperature)


def test_bf16_aligned_sizes_without_bias(bf16_path):
    check_bf16(*make(64, 256, 64, dtype=torch.bfloat16, seed=9))


def test_bf16_logits_in_the_hundreds(bf16_path):
    h, w, b, y = make(29, 257, 24, scale=90.0, dtype=torch.bfloat16, seed=2)
    assert (h.detach().double() @ w.detach().double().T).abs().max() > 300
    # fp32 sums of logits near 300 carry ~2e-5 absolute rounding per add (ulp(256) = 3e-5): 1e-4 still holds
    check_bf16(h, w, b, y, atol=1e-4)


def test_bf16_rows_where_every_logit_is_very_negative(bf16_path):
    h, w, _, y = make(21, 130, 16, dtype=torch.bfloat16, seed=3)
    b = torch.full((130,), -800.0, dtype=torch.bfloat16).requires_grad_()
    check_bf16(h, w, b, y)


def test_bf16_large_positive_bias_with_padded_tokens(bf16_path):
    # N = 37 leaves padding lanes in the last 32-token tile; their logits are the bias alone, so a bias of
    # +300 would give exp overflow there (and NaN gradients) if the padding were not masked out
    h, w, _, y = make(37, 70, 24, dtype=torch.bfloat16, seed=12)
    b = torch.zeros(70)
    b[[3, 40]] = 300.0
    check_bf16(h, w, b.to(torch.bfloat16).requires_grad_(), y)


def test_bf16_frozen_head(bf16_path):
    h, w, _, y = make(19, 97, 33, dtype=torch.bfloat16, seed=10, ignore=(4,))
    w.requires_grad_(False)
    _, _, (gh,) = check_bf16(h, w, None, y)
    assert (gh[4] == 0).all()


def test_bf16_fallback_gives_the_same_results(monkeypatch):
    if not _native.bf16_kernels_available():
        pytest.skip("CPU lacks AVX512-BF16: only the fallback exists")
    monkeypatch.setenv("CAI_ENGINE_BACKEND", "native")
    h, w, b, y = make(45, 1000, 70, bias=True, dtype=torch.bfloat16, seed=11, ignore=(7,))
    out = {}
    for flag in ("1", "0"):
        monkeypatch.setenv(logprob_mod.BF16_KERNELS_ENV, flag)
        logp, ent = token_logprobs(h, w, y, bias=b, temperature=0.8, return_entropy=True)
        out[flag] = (logp, ent, *torch.autograd.grad(logp.sum() + 0.1 * ent.sum(), [h, w, b]))
    for name, k, f in zip(["logp", "entropy", "dh", "dW", "db"], out["1"], out["0"]):
        tol = 2e-5 if name in ("logp", "entropy") else 1e-2 * f.abs().max().item()  # grads: bf16 roundings apart
        torch.testing.assert_close(k.double(), f.double(), atol=tol, rtol=0, msg=name)
