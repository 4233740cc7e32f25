import numpy as np
import pytest
import torch

from cai_engine import _native


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (17, 1000), (5, 4099)])
def test_logsumexp_rows_matches_torch(shape):
    x = torch.randn(shape, dtype=torch.float64) * 50
    x[0] -= 400  # a row of very negative values
    got = _native.logsumexp_rows(x.float().numpy())
    ref = torch.logsumexp(x.float().double(), dim=1).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-4)


def test_logsumexp_rows_all_minus_inf_row():
    x = np.full((2, 4), -np.inf, dtype=np.float32)
    x[1] = [0, 1, 2, 3]
    got = _native.logsumexp_rows(x)
    assert got[0] == -np.inf
    np.testing.assert_allclose(got[1], np.log(np.exp(np.arange(4)).sum()), rtol=1e-6)


def test_logsumexp_rows_rejects_wrong_rank():
    with pytest.raises(ValueError, match="x: expected 2 dimensions, got 1"):
        _native.logsumexp_rows(np.zeros(3, dtype=np.float32))


def test_bf16_kernels_name_bad_operands():
    if not _native.bf16_kernels_available():
        pytest.skip("CPU lacks AVX512-BF16")
    h = np.zeros((4, 8), dtype=np.int16)
    w = np.zeros((10, 6), dtype=np.int16)
    out = [np.zeros(4, dtype=np.float32) for _ in range(3)]
    with pytest.raises(ValueError, match=r"weight: expected \[V, 8\], got \[10, 6\]"):
        _native.logprob_forward_bf16(h, w, None, np.zeros(4, dtype=np.int64), 1.0, -100, *out)
    with pytest.raises(ValueError, match=r"labels\[1\] = 10 is outside \[0, 10\)"):
        _native.logprob_forward_bf16(h, np.zeros((10, 8), dtype=np.int16), None, np.array([0, 10, 0, 0]), 1.0, -100,
                                     *out)
    with pytest.raises(ValueError, match="ref_hidden: expected size 4 on axis 0, got 3"):
        _native.kl_forward_bf16(h, np.zeros((10, 8), dtype=np.int16), None, np.zeros((3, 8), dtype=np.int16),
                                np.zeros((10, 8), dtype=np.int16), None, 1.0, *out)


def test_bf16_kernels_zero_inputs_give_uniform_distribution():
    # bf16 zero bits in, log(1/V) out: the packed-operand plumbing with no arithmetic to hide behind
    if not _native.bf16_kernels_available():
        pytest.skip("CPU lacks AVX512-BF16")
    logp, lse, ent = (np.zeros(3, dtype=np.float32) for _ in range(3))
    _native.logprob_forward_bf16(np.zeros((3, 5), dtype=np.int16), np.zeros((33, 5), dtype=np.int16), None,
                                 np.array([0, 32, -100]), 1.0, -100, logp, lse, ent)
    np.testing.assert_allclose(logp, [-np.log(33), -np.log(33), 0.0], rtol=1e-6)
    np.testing.assert_allclose(lse, np.log(33), rtol=1e-6)
    np.testing.assert_allclose(ent, [np.log(33), np.log(33), 0.0], rtol=1e-6)
