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


# ------------------------------------------------------------------ fp32 steps: the AVX2 kernel (CPUs without bf16)

needs_avx2 = pytest.mark.skipif(not _native.linear_f32_available(), reason="CPU lacks AVX2 + FMA")


@pytest.fixture
def f32_calls(monkeypatch):
    """Forces the fp32 kernel's dispatch (on any AVX2 CPU: it is only preferred where bf16 is slow) and counts
    its calls."""
    monkeypatch.setenv("CAI_ENGINE_BACKEND", "native")
    monkeypatch.setattr(linear_mod, "f32_kernel_preferred", lambda: True)
    calls = []
    real = _native.linear_f32
    monkeypatch.setattr(_native, "linear_f32", lambda *a: (calls.append(a[0].shape), real(*a))[1])
    return calls


@needs_avx2
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 7, 32])
@pytest.mark.parametrize("n_out", [1, 3, 6, 40, 301])
@pytest.mark.parametrize("k", [8, 72, 576, 1544])
def test_fp32_kernel_matches_float64(f32_calls, rows, n_out, k):
    """Every remainder of the kernel's 4-row x 3-token register blocks, with and without bias and residual: fp32
    accumulation over K, against float64 of the same inputs. K = 1,544 goes in three pieces of 520, 520 and 504 from
    3 rows on (the bias added once, the later pieces accumulated)."""
    g = torch.Generator().manual_seed(rows * 1000 + n_out)
    x, weight = torch.randn(rows, k, generator=g), torch.randn(n_out, k, generator=g)
    bias, residual = torch.randn(n_out, generator=g), torch.randn(rows, n_out, generator=g)
    want = x.double() @ weight.double().T + bias.double()
    bound = dict(rtol=1e-5, atol=1e-5 * k ** 0.5)
    torch.testing.assert_close(linear(x, weight, bias).double(), want, **bound)
    torch.testing.assert_close(linear(x, weight).double(), want - bias.double(), **bound)
    torch.testing.assert_close(linear(x, weight, bias, residual=residual).double(), want + residual.double(), **bound)
    assert len(f32_calls) == 3


@needs_avx2
def test_fp32_engine_ops_take_the_kernel_at_step_sizes_only(f32_calls):
    """linears (with its input norm), gated_linear and the fp32 logits of a step run the kernel; more rows than a
    step (a prefill chunk), autograd, bf16 and a K that is no multiple of 8 run torch's GEMM."""
    g = torch.Generator().manual_seed(0)
    x, norm = torch.randn(5, 64, generator=g), torch.rand(64, generator=g) + 0.5
    weights = [torch.randn(n, 64, generator=g) for n in (64, 16, 16)]
    got = linears(x, weights, norm=(norm, 1e-5))
    h = rms_norm_reference(x.double(), norm.double(), 1e-5)
    for y, w in zip(got, weights):
        torch.testing.assert_close(y.double(), h @ w.double().T, rtol=1e-5, atol=1e-5)
    gate, up = torch.randn(96, 64, generator=g), torch.randn(96, 64, generator=g)
    torch.testing.assert_close(gated_linear(x, gate, up).double(),
                               F.silu(x.double() @ gate.double().T) * (x.double() @ up.double().T), rtol=1e-5, atol=1e-5)
    assert len(f32_calls) == 5
    f32_calls.clear()
    linear(torch.randn(65, 64), weights[0])                    # a prefill chunk
    linear(x.requires_grad_(), weights[0])                      # autograd
    linear(x.detach().bfloat16(), weights[0].bfloat16())        # bf16: the tiles or torch
    linear(torch.randn(5, 60), torch.randn(8, 60))              # K not a multiple of 8
    assert not f32_calls
    head = torch.empty(8192, 576)  # 18 MiB: the LM head, which no cache holds, takes the kernel up to 128 rows
    linear(torch.randn(128, 576), head, out_dtype=torch.float32)
    assert len(f32_calls) == 1
    linear(torch.randn(129, 576), head, out_dtype=torch.float32)
    assert len(f32_calls) == 1


@needs_avx2
def test_fp32_kernel_takes_empty_products():
    """No rows, no outputs or no inputs (K = 0: every output is its bias) are well formed, not a crash."""
    _native.linear_f32(torch.zeros(0, 16).numpy(), torch.ones(4, 16).numpy(), None, torch.zeros(0, 4).numpy())
    _native.linear_f32(torch.ones(5, 16).numpy(), torch.zeros(0, 16).numpy(), None, torch.zeros(5, 0).numpy())
    out = torch.full((5, 3), 7.0)
    _native.linear_f32(torch.zeros(5, 0).numpy(), torch.zeros(3, 0).numpy(), torch.arange(3.0).numpy(), out.numpy())
    assert out.tolist() == [[0.0, 1.0, 2.0]] * 5


@needs_avx2
def test_fp32_kernel_names_bad_inputs():
    x, out = torch.zeros(2, 12).numpy(), torch.zeros(2, 4).numpy()
    with pytest.raises(ValueError, match="multiple of 8, got 12"):
        _native.linear_f32(x, torch.zeros(4, 12).numpy(), None, out)
    with pytest.raises(ValueError, match="weight: expected size 16 on axis 1, got 8"):
        _native.linear_f32(torch.zeros(2, 16).numpy(), torch.zeros(4, 8).numpy(), None, out)
