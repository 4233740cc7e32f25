"""The engine step's fused RoPE + KV-cache write (cai_engine.ops.rope.rope_store_) against a float64 rotation."""
import math

import pytest
import torch

from cai_engine.ops.rope import rope_store_


def rotations(positions: list[int], D: int):
    """cos and signed sin [T, D] (first half of sin negated), float64."""
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    freqs = torch.tensor(positions, dtype=torch.float64)[:, None] * inv
    emb = torch.cat((freqs, freqs), -1)
    sin = emb.sin()
    sin[:, : D // 2] *= -1
    return emb.cos(), sin


def rotate64(x: torch.Tensor, cos, sin) -> torch.Tensor:
    """x [T, heads, D] in float64: x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin over the two halves."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :half], -sin[:, None, :half]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), -1)


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("dtype,cache_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                               (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("T", [1, 5, 40])
def test_rotates_q_and_k_and_writes_k_v_to_their_slots(monkeypatch, backend, dtype, cache_dtype, T):
    monkeypatch.setenv("CAI_ENGINE_BACKEND", backend)
    H, KV, D, blocks, block_size = 6, 2, 16, 20, 4
    g = torch.Generator().manual_seed(T)
    q64, k64, v64 = (torch.randn(T, n, D, generator=g, dtype=torch.float64).to(dtype).double() for n in (H, KV, KV))
    positions = [int(p) for p in torch.randint(0, 5000, (T,), generator=g)]   # large angles
    cos, sin = rotations(positions, D)
    slots = torch.randperm(blocks * block_size, generator=g)[:T]
    k_cache = torch.full((blocks, block_size, KV, D), math.nan, dtype=cache_dtype)
    v_cache = torch.full_like(k_cache, math.nan)
    q, k, v = q64.to(dtype), k64.to(dtype), v64.to(dtype)
    q_out, k_out = rope_store_(q, k, v, cos.float(), sin.float(), k_cache, v_cache, slots)
    # fp32 cos / sin carry 2^-24 relative error into the products: 1e-6 for fp32 outputs; one bf16 rounding else
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2 ** -8, atol=1e-6)
    q_ref, k_ref = rotate64(q64, cos, sin), rotate64(k64, cos, sin)
    torch.testing.assert_close(q_out.double(), q_ref, **tol)
    torch.testing.assert_close(k_out.double(), k_ref, **tol)
    cache_tol = tol if cache_dtype == dtype else dict(rtol=2 ** -8, atol=1e-6)
    torch.testing.assert_close(k_cache.view(-1, KV, D)[slots].double(), k_ref, **cache_tol)
    torch.testing.assert_close(v_cache.view(-1, KV, D)[slots].double(), v64, **cache_tol)
    untouched = torch.ones(blocks * block_size, dtype=torch.bool)
    untouched[slots] = False
    assert k_cache.view(-1, KV, D)[untouched].isnan().all() and v_cache.view(-1, KV, D)[untouched].isnan().all()


def test_a_slot_outside_the_cache_is_refused(monkeypatch):
    monkeypatch.setenv("CAI_ENGINE_BACKEND", "native")
    q, k = torch.zeros(2, 4, 8), torch.zeros(2, 2, 8)
    cos, sin = torch.ones(2, 8), torch.zeros(2, 8)
    cache = torch.zeros(3, 4, 2, 8)
    with pytest.raises(ValueError, match=r"slots\[1\] = 12 is not a row of the cache \(12 rows\)"):
        rope_store_(q, k, k.clone(), cos, sin, cache, cache.clone(), torch.tensor([0, 12]))


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_rotation_and_its_gradient_match_float64(monkeypatch, backend, dtype):
    """ops.rope (the decoder's rotation under autograd) on q as the projections lay it out ([B, heads, T, D] views of
    [B, T, heads, D] rows): values and the gradient (the inverse rotation) against float64."""
    from cai_engine.ops.rope import rope
    monkeypatch.setenv("CAI_ENGINE_BACKEND", backend)
    B, T, H, D = 2, 7, 3, 16
    g = torch.Generator().manual_seed(0)
    x64 = torch.randn(B, T, H, D, generator=g, dtype=torch.float64).to(dtype).double()
    grad64 = torch.randn(B, T, H, D, generator=g, dtype=torch.float64).to(dtype).double()
    positions = torch.randint(0, 5000, (B, T), generator=g)
    cos, sin = rotations(positions.flatten().tolist(), D)
    cos, sin = cos.view(B, T, D), sin.view(B, T, D)
    x = x64.to(dtype).transpose(1, 2).requires_grad_()
    out = rope(x, cos.float(), sin.float())
    (grad_x,) = torch.autograd.grad(out, x, grad64.to(dtype).transpose(1, 2))
    flat = lambda t: t.reshape(B * T, H, D)
    expected = rotate64(flat(x64), cos.view(B * T, D), sin.view(B * T, D)).view(B, T, H, D).transpose(1, 2)
    expected_grad = rotate64(flat(grad64), cos.view(B * T, D), -sin.view(B * T, D)).view(B, T, H, D).transpose(1, 2)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2 ** -8, atol=1e-6)
    assert out.dtype == grad_x.dtype == dtype
    torch.testing.assert_close(out.double(), expected, **tol)
    torch.testing.assert_close(grad_x.double(), expected_grad, **tol)


def test_training_rotation_has_the_engine_steps_bits(monkeypatch):
    """A token's rotated q carries the same bits whether the decoder (training, evaluation) or the engine rotates."""
    from cai_engine.ops.rope import rope
    monkeypatch.setenv("CAI_ENGINE_BACKEND", "native")
    T, H, D = 9, 4, 32
    g = torch.Generator().manual_seed(1)
    q = torch.randn(T, H, D, generator=g).bfloat16()
    cos, sin = (t.float() for t in rotations(list(range(100, 100 + T)), D))
    decoder = rope(q[None].transpose(1, 2), cos[None], sin[None]).transpose(1, 2)[0]
    k_cache = torch.zeros(4, 4, 1, D, dtype=torch.bfloat16)
    engine, _ = rope_store_(q.clone(), torch.zeros(T, 1, D, dtype=torch.bfloat16),
                            torch.zeros(T, 1, D, dtype=torch.bfloat16), cos, sin, k_cache, k_cache.clone(),
                            torch.arange(T))
    assert torch.equal(decoder, engine)
