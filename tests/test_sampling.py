import pytest
import torch

from cai_engine.engine.sampling import SamplingParams, _top_p, draw, process_logits, sample


def uniforms(generators):
    return torch.cat([torch.rand(1, generator=g) for g in generators])


def test_top_p_keeps_the_sorted_prefix():
    torch.manual_seed(0)
    for top_p in (0.1, 0.5, 0.9, 0.999):
        z = torch.randn(5000) * 3
        probs = z.softmax(-1)
        sorted_p, order = probs.sort(descending=True)
        expected = set(order[(sorted_p.cumsum(0) - sorted_p) < top_p].tolist())
        kept = set(torch.isfinite(_top_p(z[None], torch.tensor([top_p]))[0]).nonzero().squeeze(1).tolist())
        assert kept == expected


def test_sample_follows_the_distribution():
    logp = torch.tensor([0.5, 0.3, 0.2]).log()
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.tensor(sample(logp.expand(20000, 3), uniforms([g] * 20000))), minlength=3).float() / 20000
    torch.testing.assert_close(counts, logp.exp(), atol=0.015, rtol=0)


def one(z, params, tokens=(), output=(), banned=()):
    return process_logits(z[None], [params], [list(tokens)], [list(output)], [list(banned)])[0]


def test_processing_steps():
    z = torch.tensor([2.0, 1.0, 0.0, -1.0, 3.0])
    greedy = one(z, SamplingParams(temperature=0))
    assert int(greedy.argmax()) == 4 and torch.isinf(greedy).sum() == 4
    top2 = one(z, SamplingParams(top_k=2))
    assert torch.isfinite(top2).nonzero().squeeze(1).tolist() == [0, 4]
    minp = one(z, SamplingParams(min_p=0.3))
    assert torch.isfinite(minp).nonzero().squeeze(1).tolist() == [0, 4]
    banned = one(z, SamplingParams(), banned=[4])
    assert banned[4] == float("-inf")
    rep = one(z, SamplingParams(repetition_penalty=2.0, temperature=0), tokens=[4])
    assert int(rep.argmax()) == 0          # 3 / 2 = 1.5 < 2
    pres = one(z, SamplingParams(presence_penalty=5.0, temperature=0), output=[4, 4])
    assert int(pres.argmax()) == 0
    torch.testing.assert_close(one(z, SamplingParams(temperature=2.0)), (z / 2).log_softmax(-1))


def test_rows_do_not_depend_on_each_other():
    """A batch of mixed parameters gives each row exactly what it gets alone."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(6, 300, generator=g) * 4
    params = [SamplingParams(temperature=0), SamplingParams(top_p=0.8, temperature=0.7), SamplingParams(top_k=5),
              SamplingParams(min_p=0.1, top_p=0.95), SamplingParams(repetition_penalty=1.3, temperature=1.5),
              SamplingParams(presence_penalty=0.5, frequency_penalty=0.2)]
    tokens = [[], [], [], [], [1, 2, 3], []]
    outputs = [[], [], [], [], [], [7, 7, 9]]
    banned = [[0], [], [], [2], [], []]
    batch = process_logits(z, params, tokens, outputs, banned)
    for i in range(6):
        assert torch.equal(batch[i], process_logits(z[i:i + 1], [params[i]], [tokens[i]], [outputs[i]],
                                                    [banned[i]])[0])
    gens = [torch.Generator().manual_seed(s) for s in range(6)]
    drawn = sample(batch, uniforms(gens))
    again = [sample(batch[i:i + 1], uniforms([torch.Generator().manual_seed(i)]))[0] for i in range(6)]
    assert drawn == again


def test_top_p_torch_bisection_matches_native():
    z = torch.randn(4, 3000, generator=torch.Generator().manual_seed(4)) * 3
    top_p = torch.tensor([0.1, 0.5, 0.9, 0.99])
    native = _top_p(z, top_p)                  # float32 on CPU: the native bisection
    plain = _top_p(z.double(), top_p)          # any other dtype or device: the torch one
    probs = z.softmax(-1)
    for i, p in enumerate(top_p.tolist()):
        sorted_p, order = probs[i].sort(descending=True)
        expected = set(order[(sorted_p.cumsum(0) - sorted_p) < p].tolist())
        assert set(torch.isfinite(native[i]).nonzero().squeeze(1).tolist()) == expected
        assert set(torch.isfinite(plain[i]).nonzero().squeeze(1).tolist()) == expected


@pytest.mark.parametrize("bad,match", [(dict(n=0), "n must"), (dict(temperature=-1), "temperature"),
                                       (dict(top_p=0), "top_p"), (dict(min_tokens=5, max_tokens=2), "min_tokens"),
                                       (dict(stop=[""]), "stop")])
def test_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**bad).validate()


def test_native_draws_equal_the_torch_cdf_inversion_and_skip_masked_tokens():
    """The native two-pass sampler (CPU float32) against the torch cumsum + searchsorted path (float64):
    the same uniform picks the same token, and a masked (-inf) token is never drawn."""
    g = torch.Generator().manual_seed(13)
    z = torch.randn(64, 3000, generator=g) * 4
    z[:, ::3] = float("-inf")                                  # masked, as top-k/top-p/min-p leave them
    z[0, :-1] = float("-inf")                                  # all the mass on the last token
    z[1, 2:] = float("-inf")                                   # ... on the second (the first is masked)
    logprobs = z.log_softmax(-1)
    u = uniforms([torch.Generator().manual_seed(s) for s in range(64)])
    native, plain = sample(logprobs, u), sample(logprobs.double(), u)
    assert native[0] == 2999 and native[1] == 1
    assert all(i % 3 != 0 for i in native[2:])
    assert sum(a != b for a, b in zip(native, plain)) <= 1     # a uniform right at a CDF step may round apart


def gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def _general(z, params, seeds):
    n = len(params)
    processed = process_logits(z, params, [[]] * n, [[]] * n, [[]] * n)
    picked = sample(processed, uniforms(gens(seeds)))
    rows, index = torch.arange(n), torch.tensor(picked)
    return picked, (z[rows, index] - z.logsumexp(-1)).tolist(), processed[rows, index].tolist()


def test_native_nucleus_draw_equals_processing_then_sampling():
    """Temperature + top-p rows go through the native nucleus sampler: the same tokens as process_logits +
    sample at the same uniforms (a uniform right at a CDF step may round apart), the same two log-probs."""
    g = torch.Generator().manual_seed(5)
    z = torch.randn(48, 5000, generator=g) * 3
    z[:, 7] = float("-inf")                                    # a masked token is never drawn
    z[3, :] = z[3, 0]                                          # a flat row: ties at the cut are kept
    z[5, :] = 0.0                                              # a far tail holding 2e-4 of the mass: the nucleus
    z[5, 0] = 17.0                                             # cut lies below the candidates (the full histogram)
    params = [SamplingParams(temperature=t, top_p=p) for t, p in
              zip([0.3, 0.7, 1.0, 1.5] * 12, [0.05, 0.5, 0.9, 0.95, 1.0, 0.999] * 8)]
    params[5] = SamplingParams(temperature=1.0, top_p=0.99999)
    seeds = list(range(48))
    native = draw(z, params, [[]] * 48, [[]] * 48, [[]] * 48, gens(seeds))
    general = _general(z, params, seeds)
    assert sum(a != b for a, b in zip(native[0], general[0])) <= 1 and 7 not in native[0]
    same = [i for i in range(48) if native[0][i] == general[0][i]]
    for k in (1, 2):
        torch.testing.assert_close(torch.tensor(native[k])[same], torch.tensor(general[k])[same], atol=1e-4, rtol=0)


def test_native_nucleus_keeps_the_sorted_prefix_and_follows_its_distribution():
    """Over many draws of one row, every token drawn lies in the nucleus (the sorted prefix reaching top_p) and
    the frequencies follow the renormalised nucleus."""
    z = torch.tensor([[2.0, 0.5, 1.0, -1.0, 0.0, -3.0, 1.5]])
    top_p, temperature = 0.8, 0.9
    probs = (z[0] / temperature).softmax(-1)
    sorted_p, order = probs.sort(descending=True)
    nucleus = order[(sorted_p.cumsum(0) - sorted_p) < top_p]
    expected = torch.zeros(7)
    expected[nucleus] = probs[nucleus] / probs[nucleus].sum()
    params = [SamplingParams(temperature=temperature, top_p=top_p)] * 20000
    tokens, _, processed = draw(z.expand(20000, 7), params, [[]] * 20000, [[]] * 20000, [[]] * 20000,
                                gens(range(20000)))
    counts = torch.bincount(torch.tensor(tokens), minlength=7).float() / 20000
    torch.testing.assert_close(counts, expected, atol=0.012, rtol=0)
    torch.testing.assert_close(torch.tensor(processed), expected[tokens].log(), atol=1e-5, rtol=0)


def test_native_nucleus_names_a_row_without_a_finite_maximum():
    z = torch.randn(3, 50)
    z[1] = float("nan")
    with pytest.raises(ValueError, match="logits row 1: no finite maximum"):
        draw(z, [SamplingParams(top_p=0.9)] * 3, [[]] * 3, [[]] * 3, [[]] * 3, gens(range(3)))
