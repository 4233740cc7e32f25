import pytest
import torch

from cai_engine.ops.swiglu import swiglu, swiglu_reference
from conftest import device_for


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 1000), (2, 7, 4099), (1,)])
def test_values_and_gradients_match_float64(backend, dtype, shape):
    dev = device_for(backend)
    g = torch.Generator().manual_seed(0)
    gate64 = (torch.randn(shape, generator=g, dtype=torch.float64) * 6).to(dtype).double()
    gate64.view(-1)[:3] = torch.tensor([-120.0, 95.0, 0.0])[: gate64.numel()]  # saturated sigmoid, and zero
    up64 = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).double()
    upstream = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    gate, up = gate64.to(dev, dtype).requires_grad_(), up64.to(dev, dtype).requires_grad_()
    out = swiglu(gate, up)
    assert out.dtype == dtype and out.shape == gate.shape
    grad_gate, grad_up = torch.autograd.grad(out, (gate, up), upstream.to(dev))
    assert torch.isfinite(grad_gate).all() and torch.isfinite(grad_up).all()

    gate64.requires_grad_()
    up64.requires_grad_()
    ref = swiglu_reference(gate64, up64)
    ref_gate, ref_up = torch.autograd.grad(ref, (gate64, up64), upstream.double())
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2 ** -7, atol=1e-3)
    torch.testing.assert_close(out.double().cpu(), ref.detach(), **tol)
    torch.testing.assert_close(grad_gate.double().cpu(), ref_gate, **tol)
    torch.testing.assert_close(grad_up.double().cpu(), ref_up, **tol)


def test_mismatched_inputs_are_refused():
    with pytest.raises(ValueError, match="gate and up must match"):
        swiglu(torch.ones(2, 3), torch.ones(2, 4))
    with pytest.raises(ValueError, match="gate and up must match"):
        swiglu(torch.ones(2, 3), torch.ones(2, 3, dtype=torch.bfloat16))
