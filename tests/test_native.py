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
