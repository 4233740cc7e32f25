import pytest
import torch

from cai_engine.ops.rms_norm import rms_norm, rms_norm_reference
from conftest import device_for

BF16_RTOL = 2 ** -7  # one bf16 rounding of the result, with room for the fp32 arithmetic before it


def awkward_rows(rows: int, d: int, seed: int = 0) -> torch.Tensor:
    """Rows of very different scales (1e-3 .. 1e3), one all-zero row (rstd = 1/sqrt(eps)) and one huge entry."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, d, generator=g, dtype=torch.float64)
    x *= torch.logspace(-3, 3, rows, dtype=torch.float64)[torch.randperm(rows, generator=g)][:, None]
    x[rows // 3] = 0
    x[rows // 2, d // 2] = 5e3
    return x


@pytest.mark.parametrize("x_dtype,out_dtype", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                               (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("shape", [(70, 77), (2, 35, 576), (1, 1)])
def test_values_and_gradients_match_float64(backend, x_dtype, out_dtype, shape):
    dev = device_for(backend)
    d, rows = shape[-1], int(torch.tensor(shape[:-1]).prod())
    x64 = awkward_rows(rows, d).reshape(shape).to(x_dtype).double()  # the reference sees the same rounded inputs
    w64 = torch.rand(d, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.5
    upstream = torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(out_dtype)
    x = x64.to(dev, x_dtype).requires_grad_()
    w = w64.to(dev, torch.float32).requires_grad_()
    y = rms_norm(x, w, 1e-5, out_dtype=out_dtype)
    assert y.dtype == out_dtype and y.shape == x.shape
    grad_x, grad_w = torch.autograd.grad(y, (x, w), upstream.to(dev))
    assert grad_x.dtype == x_dtype and grad_w.dtype == torch.float32

    x64.requires_grad_()
    w64.requires_grad_()
    ref = rms_norm_reference(x64, w64, 1e-5)
    ref_x, ref_w = torch.autograd.grad(ref, (x64, w64), upstream.double())
    exact = x_dtype == out_dtype == torch.float32
    rtol = 1e-5 if exact else BF16_RTOL
    torch.testing.assert_close(y.double().cpu(), ref.detach(), rtol=rtol, atol=1e-6 if exact else 1e-3)
    # grad_x = rstd * (dy * w - xhat * mean(dy * w * xhat)): measure the error against the size of the terms that
    # cancel there (rows span 1e-3 .. 1e3, and a 1-wide row cancels to almost nothing)
    rstd = torch.rsqrt(x64.detach().pow(2).mean(-1, keepdim=True) + 1e-5)
    scale = rstd * (upstream.double() * w64.detach()).abs().amax(-1, keepdim=True)
    torch.testing.assert_close((grad_x.double().cpu() / scale), ref_x / scale, rtol=0, atol=1e-5 if exact else 2e-2)
    torch.testing.assert_close(grad_w.double().cpu(), ref_w, rtol=1e-4 if exact else 2e-2,
                               atol=1e-4 * float(ref_w.abs().max()))


def test_weight_gradient_is_deterministic(backend):
    """The weight gradient is summed in a fixed order: exact resume compares weights bit for bit."""
    dev = device_for(backend)
    x = torch.randn(1000, 96, generator=torch.Generator().manual_seed(0)).to(dev).requires_grad_()
    w = torch.ones(96, device=dev, requires_grad=True)
    g = torch.randn(1000, 96, generator=torch.Generator().manual_seed(1)).to(dev)
    first = torch.autograd.grad(rms_norm(x, w, 1e-6), (x, w), g)
    second = torch.autograd.grad(rms_norm(x, w, 1e-6), (x, w), g)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_weight_of_the_wrong_size_is_named():
    with pytest.raises(ValueError, match=r"weight: expected \[8\]"):
        rms_norm(torch.ones(3, 8), torch.ones(7), 1e-5)
