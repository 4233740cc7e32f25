"""The engine step's linear layers (cai_engine.ops.linear) against float64 on the same bf16 inputs: the native
AMX / VDPBF16PS tile kernel and the torch composition, on awkward shapes (rows that fill no tile, outputs that
fill no 32-row block, bias, residual, the fused input norm, fp32 logits)."""
import pytest
import torch
import torch.nn.functional as F

from cai_engine import _native
from cai_engine.ops import linear as linear_mod
from cai_engine.ops.linear import gated_linear, linear, linears
from cai_engine.ops.rms_norm import rms_norm_reference

PATHS = [pytest.param("amx", marks=pytest.mark.skipif(not _native.amx_available(), reason="CPU lacks AMX-BF16")),
         pytest.param("vectors", marks=pytest.mark.skipif(not _native.bf16_kernels_available(),
                                                          reason="CPU lacks AVX512-BF16")),
         "torch"]


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    """Where the ops run: the native kernel on AMX tiles, on VDPBF16PS vectors (CAI_ENGINE_AMX=0, what an AMD CPU
    runs), or the torch composition (CAI_ENGINE_BACKEND=torch). Checks the dispatch went there."""
    monkeypatch.setenv("CAI_ENGINE_AMX", "0" if request.param == "vectors" else "1")
    if request.param == "torch":
        monkeypatch.setenv("CAI_ENGINE_BACKEND", "torch")
    else:
        monkeypatch.setenv("CAI_ENGINE_BACKEND", "native")
        monkeypatch.setattr(linear_mod, "tiles_preferred", lambda: True)  # the vectors too, on an Intel CPU
    calls = []
    for name in ("linear_bf16", "gated_linear_bf16"):
        real = getattr(_native, name)
        monkeypatch.setattr(_native, name, lambda *a, _real=real, _name=name, **k: (calls.append(_name), _real(*a, **k))[1])
    yield request.param
    assert bool(calls) == (request.param != "torch"), calls


def bf16(*shape, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).bfloat16()


def tolerance(path: str) -> dict:
    """The inputs are bf16 on both sides, so the float64 reference differs by fp32 accumulation (negligible) and
    the roundings to bf16, 2^-9 relative each: one on the native path (after bias, residual, SwiGLU), up to three
    on the torch path (the gate and up products, then the SwiGLU; or product then residual add). Outputs are O(1):
    the absolute term covers values near zero."""
    return dict(rtol=2 ** -8 if path != "torch" else 2 ** -6, atol=2e-2)


@pytest.mark.parametrize("rows", [1, 5, 17, 33, 64])
@pytest.mark.parametrize("n_out", [40, 96, 300])
def test_linear_with_bias_and_residual_matches_float64(path, rows, n_out):
    x, w = bf16(rows, 96, seed=1), bf16(n_out, 96, scale=0.1, seed=2)
    bias, residual = torch.randn(n_out), bf16(rows, n_out, seed=3)
    out = linear(x, w, bias=bias, residual=residual)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, n_out)
    ref = x.double() @ w.double().T + bias.double() + residual.double()
    torch.testing.assert_close(out.double(), ref, **tolerance(path))


@pytest.mark.parametrize("rows", [1, 3, 31])
def test_fp32_output_is_not_rounded_to_bf16(path, rows):
    """The LM head's logits come out in fp32: on the native path straight from the fp32 accumulators."""
    x, w = bf16(rows, 64, seed=4), bf16(1000, 64, scale=0.2, seed=5)
    out = linear(x, w, out_dtype=torch.float32)
    ref = x.double() @ w.double().T
    assert out.dtype == torch.float32
    tol = dict(rtol=1e-5, atol=1e-5) if path != "torch" else tolerance(path)  # torch rounds the product first
    torch.testing.assert_close(out.double(), ref, **tol)


@pytest.mark.parametrize("rows", [1, 7, 40])
def test_linears_share_one_normalised_input(path, rows):
    """q, k and v from one call, with the layer's input RMSNorm fused: each equals its own float64 product of the
    normalised (bf16-rounded) input, biases included."""
    x = bf16(rows, 64, scale=3.0, seed=6)
    weights = [bf16(n, 64, scale=0.1, seed=7 + i) for i, n in enumerate((64, 32, 32))]
    biases = [torch.randn(64), None, torch.randn(32)]
    norm_weight = torch.rand(64) + 0.5
    outs = linears(x, weights, biases, norm=(norm_weight, 1e-5))
    h = rms_norm_reference(x, norm_weight, 1e-5).double()   # the norm's bits: fp32 arithmetic, rounded to bf16
    for out, w, b in zip(outs, weights, biases):
        ref = h @ w.double().T + (0 if b is None else b.double())
        assert out.shape == (rows, w.shape[0])
        torch.testing.assert_close(out.double(), ref, **tolerance(path))


@pytest.mark.parametrize("rows", [1, 9, 50])
def test_gated_linear_matches_silu_gate_times_up(path, rows):
    x = bf16(rows, 64, seed=11)
    gate, up = bf16(112, 64, scale=0.3, seed=12), bf16(112, 64, scale=0.3, seed=13)
    norm_weight = torch.rand(64) + 0.5
    for norm in (None, (norm_weight, 1e-6)):
        h = x.double() if norm is None else rms_norm_reference(x, norm_weight, 1e-6).double()
        ref = F.silu(h @ gate.double().T) * (h @ up.double().T)
        out = gated_linear(x, gate, up, norm=norm)
        assert out.dtype == torch.bfloat16 and out.shape == (rows, 112)
        torch.testing.assert_close(out.double(), ref, **tolerance(path))


def test_saturated_gates_stay_finite(path):
    """silu at |gate| = 96: sigmoid from exp(-|g|), never an overflow (up = 32: 3072 and -3e-39)."""
    x = torch.ones(2, 32).bfloat16()
    gate = torch.full((16, 32), 3.0).bfloat16()
    gate[8:] = -3.0
    up = torch.ones(16, 32).bfloat16()
    out = gated_linear(x, gate, up).double()
    torch.testing.assert_close(out[:, :8], torch.full((2, 8), 3072.0, dtype=torch.float64), rtol=2 ** -8, atol=0)
    assert torch.isfinite(out).all() and out[:, 8:].abs().max() < 1e-30


def test_torch_path_for_what_the_kernel_does_not_take(monkeypatch):
    """fp32, widths that are not a multiple of 32, prefill-sized row counts and autograd go to torch."""
    monkeypatch.setattr(linear_mod, "tiles_preferred", lambda: True)
    calls = []
    real = _native.linear_bf16
    monkeypatch.setattr(_native, "linear_bf16", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    w = bf16(8, 48)
    linear(bf16(2, 48), w)                                      # K = 48
    linear(bf16(2, 64).float(), bf16(8, 64).float())            # fp32
    linear(bf16(linear_mod.MAX_ROWS + 1, 64), bf16(8, 64))      # a prefill chunk
    x = bf16(2, 64).requires_grad_()
    out = linear(x, bf16(8, 64))                                # training
    out.float().sum().backward()
    assert x.grad is not None and not calls
    if _native.bf16_kernels_available():
        linear(bf16(2, 64), bf16(8, 64))
        assert calls == [1]


@pytest.mark.skipif(not _native.bf16_kernels_available(), reason="CPU lacks AVX512-BF16")
def test_native_entry_point_names_bad_inputs():
    i16 = lambda t: t.view(torch.int16).numpy()
    x, w = bf16(2, 64), bf16(8, 64)
    out = torch.empty(2, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"weights\[0\]: expected size 64 on axis 1, got 32"):
        _native.linear_bf16(i16(x), [i16(bf16(8, 32))], [None], [i16(out)])
    with pytest.raises(ValueError, match=r"outs\[0\]: expected size 8 on axis 1, got 9"):
        _native.linear_bf16(i16(x), [i16(w)], [None], [i16(torch.empty(2, 9, dtype=torch.bfloat16))])
    with pytest.raises(ValueError, match=r"x: expected bfloat16"):
        _native.linear_bf16(x.float().numpy(), [i16(w)], [None], [i16(out)])
    with pytest.raises(ValueError, match=r"residual: expected size 2 on axis 0, got 3"):
        _native.linear_bf16(i16(x), [i16(w)], [None], [i16(out)], residual=i16(bf16(3, 8)))
    with pytest.raises(ValueError, match=r"norm_weight: expected size 64 on axis 0, got 63"):
        _native.gated_linear_bf16(i16(x), i16(w), i16(w), i16(out), norm_weight=torch.ones(63).numpy(), eps=1e-5)
