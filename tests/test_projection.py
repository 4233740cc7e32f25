"""The training linear layer under bf16-mixed (cai_engine.ops.projection) against float64 on the same bf16 operands:
values and the gradients of x, the fp32 master weight and the bias, on the AMX tiles, the VDPBF16PS vectors and the
torch path (autocast's nn.Linear), on awkward token counts (one token, odd counts, a count that fills no tile),
plus the dispatch: which layers take the kernel, and that the decoder's do in training."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cai_engine import _native
from cai_engine.model.config import ModelConfig
from cai_engine.model.decoder import Transformer
from cai_engine.ops import projection as projection_mod
from cai_engine.ops.projection import project

needs_kernels = pytest.mark.skipif(not _native.bf16_kernels_available(), reason="CPU lacks AVX512-BF16")
PATHS = [pytest.param("amx", marks=pytest.mark.skipif(not _native.amx_available(), reason="CPU lacks AMX-BF16")),
         pytest.param("vectors", marks=needs_kernels), "torch"]


@pytest.fixture
def kernel_calls(monkeypatch):
    calls = []
    real = _native.linear_weight_grad_bf16
    monkeypatch.setattr(_native, "linear_weight_grad_bf16", lambda *a: (calls.append(a[0].shape), real(*a))[1])
    return calls


@pytest.fixture(params=PATHS)
def path(request, monkeypatch, kernel_calls):
    """The native kernel on AMX tiles, on VDPBF16PS vectors (CAI_ENGINE_AMX=0, what an AMD CPU runs), or torch's
    autocast linear (CAI_ENGINE_BACKEND=torch). Checks afterwards that the weight gradient came from there."""
    monkeypatch.setenv("CAI_ENGINE_AMX", "0" if request.param == "vectors" else "1")
    monkeypatch.setenv("CAI_ENGINE_BACKEND", "torch" if request.param == "torch" else "native")
    monkeypatch.setattr(projection_mod, "kernel_preferred", lambda: True)  # the vectors too (an AMD CPU's path)
    yield request.param
    assert bool(kernel_calls) == (request.param != "torch"), kernel_calls


def layer(in_features: int, out_features: int, bias: bool, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias)


def reference(x: torch.Tensor, lin: nn.Linear, grad: torch.Tensor):
    """y and the gradients in float64 from the operands the bf16 GEMMs read (x, W and b rounded to bf16)."""
    x64 = x.detach().double().requires_grad_()
    w64 = lin.weight.detach().bfloat16().double().requires_grad_()
    b64 = None if lin.bias is None else lin.bias.detach().bfloat16().double().requires_grad_()
    y = F.linear(x64, w64, b64)
    y.backward(grad.double())
    return y, x64.grad, w64.grad, None if b64 is None else b64.grad


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.detach().double() - want.detach()).abs().max() / want.detach().abs().max())


@pytest.mark.parametrize("tokens", [1, 2, 37, 64, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_values_and_gradients_against_float64(path, tokens, bias):
    lin = layer(96, 160, bias)
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, 96, generator=g).bfloat16().requires_grad_()
    grad = torch.randn(tokens, 160, generator=g).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = project(x, lin)
    y.backward(grad)
    want_y, want_x, want_w, want_b = reference(x, lin, grad)
    assert y.dtype == torch.bfloat16 and lin.weight.grad.dtype == torch.float32
    # y and dx are bf16 results of fp32 sums (one rounding: 2^-8 relative); the weight gradient is an fp32 sum
    # over the tokens written in fp32 by the kernel (~1e-6), rounded to bf16 first on the torch path
    assert relative(y, want_y) < 8e-3
    assert relative(x.grad, want_x) < 8e-3
    assert relative(lin.weight.grad, want_w) < (1e-5 if path != "torch" else 8e-3)
    if bias:
        assert relative(lin.bias.grad, want_b) < (1e-5 if path != "torch" else 8e-3)


@needs_kernels
def test_forward_is_autocasts_and_weight_gradient_is_finer_than_its(kernel_calls, monkeypatch):
    """The same forward bits as autocast's nn.Linear (the same bf16 GEMM); the weight gradient from fp32 sums where
    autocast's is rounded to bf16: over 700 tokens the kernel's is ~1e-6 from float64, autocast's ~1e-3."""
    monkeypatch.setattr(projection_mod, "kernel_preferred", lambda: True)
    lin = layer(64, 192, bias=True, seed=1)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 175, 64, generator=g).bfloat16().requires_grad_()
    grad = torch.randn(4, 175, 192, generator=g).bfloat16()
    results = {}
    for backend in ("native", "torch"):
        monkeypatch.setenv("CAI_ENGINE_BACKEND", backend)
        lin.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = project(x, lin)
        y.backward(grad)
        results[backend] = (y.detach(), lin.weight.grad.clone())
    assert len(kernel_calls) == 1
    assert torch.equal(results["native"][0], results["torch"][0])
    _, _, want_w, _ = reference(x, lin, grad)
    assert relative(results["native"][1], want_w) < 1e-5 < relative(results["torch"][1], want_w)


@needs_kernels
def test_dispatch(kernel_calls, monkeypatch):
    """The kernel only where it applies: bf16 autocast on CPU, an fp32 weight that wants its gradient, feature
    counts that fill 32-wide tiles. Everything else is the module itself."""
    monkeypatch.setenv("CAI_ENGINE_BACKEND", "native")
    monkeypatch.setattr(projection_mod, "kernel_preferred", lambda: True)
    x = torch.randn(5, 64).bfloat16().requires_grad_()

    def runs_kernel(lin: nn.Linear, inputs: torch.Tensor = x, autocast: bool = True, grad: bool = True) -> bool:
        kernel_calls.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), torch.set_grad_enabled(grad):
            y = project(inputs, lin)
        if y.requires_grad:
            y.float().sum().backward()
        return bool(kernel_calls)

    assert runs_kernel(layer(64, 32, bias=False))
    assert not runs_kernel(layer(64, 1, bias=True))  # a score / value head: one output

    class Scaled(nn.Linear):  # a subclass computes what it likes (a quantized or adapter layer): it runs itself
        def forward(self, x):
            return 2 * super().forward(x)
    subclass = Scaled(64, 32)
    assert not runs_kernel(subclass)
    assert not runs_kernel(layer(64, 32, bias=False), inputs=x.float(), autocast=False)  # fp32 training
    assert not runs_kernel(layer(64, 32, bias=False), grad=False)  # evaluation, rollout scoring
    assert not runs_kernel(layer(64, 32, bias=False).requires_grad_(False), inputs=x.detach())  # a frozen model
    monkeypatch.setenv("CAI_ENGINE_BACKEND", "torch")
    assert not runs_kernel(layer(64, 32, bias=False))


@needs_kernels
def test_decoder_layers_train_through_the_kernel(kernel_calls, monkeypatch):
    """A bf16-mixed training step of the decoder takes the kernel for every one of its seven projections a layer,
    and gives the torch path's loss and gradients up to the bf16 rounding of autocast's weight gradients."""
    monkeypatch.setattr(projection_mod, "kernel_preferred", lambda: True)
    config = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    torch.manual_seed(0)
    model = Transformer(config)
    tokens = torch.randint(0, 96, (3, 21))
    grads = {}
    for backend in ("native", "torch"):
        monkeypatch.setenv("CAI_ENGINE_BACKEND", backend)
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = model(tokens)
        hidden.float().square().mean().backward()
        grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert len(kernel_calls) == 7 * config.num_hidden_layers
    for name, got in grads["native"].items():
        assert relative(got, grads["torch"][name].double()) < 2e-2, name


def test_native_refuses_shapes_it_cannot_tile():
    if not _native.bf16_kernels_available():
        pytest.skip("CPU lacks AVX512-BF16")
    dy = torch.zeros(4, 40, dtype=torch.bfloat16).view(torch.int16).numpy()
    x = torch.zeros(4, 64, dtype=torch.bfloat16).view(torch.int16).numpy()
    with pytest.raises(ValueError, match="multiples of 32, got 40 and 64"):
        _native.linear_weight_grad_bf16(dy, x, torch.zeros(40, 64).numpy())
    dy = torch.zeros(4, 32, dtype=torch.bfloat16).view(torch.int16).numpy()
    with pytest.raises(ValueError, match="out: expected size 32 on axis 0"):
        _native.linear_weight_grad_bf16(dy, x, torch.zeros(64, 64).numpy())
