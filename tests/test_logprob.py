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


def test_frozen_head_gets_no_grad(backend):
    dev = device_for(backend)
    h, w, _, y = make(11, 50, 8, device=dev)
    w.requires_grad_(False)
    logp, _ = token_logprobs(h, w, y)
    (gh,) = torch.autograd.grad(logp.sum(), [h])
    assert gh.shape == h.shape and w.grad is None


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
