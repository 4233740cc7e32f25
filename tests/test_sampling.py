import pytest
import torch

from cai_engine.sampling import SamplingParams, _top_p, process_logits, sample


def test_top_p_keeps_the_sorted_prefix():
    torch.manual_seed(0)
    for top_p in (0.1, 0.5, 0.9, 0.999):
        z = torch.randn(5000) * 3
        probs = z.softmax(-1)
        sorted_p, order = probs.sort(descending=True)
        expected = set(order[(sorted_p.cumsum(0) - sorted_p) < top_p].tolist())
        kept = set(torch.isfinite(_top_p(z, top_p)).nonzero().squeeze(1).tolist())
        assert kept == expected


def test_sample_follows_the_distribution():
    logp = torch.tensor([0.5, 0.3, 0.2]).log()
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.tensor([sample(logp, g) for _ in range(20000)]), minlength=3).float() / 20000
    torch.testing.assert_close(counts, logp.exp(), atol=0.015, rtol=0)


def test_processing_steps():
    z = torch.tensor([2.0, 1.0, 0.0, -1.0, 3.0])
    greedy = process_logits(z, SamplingParams(temperature=0), torch.empty(0, dtype=torch.long), [], [])
    assert int(greedy.argmax()) == 4 and torch.isinf(greedy).sum() == 4
    top2 = process_logits(z, SamplingParams(top_k=2), torch.empty(0, dtype=torch.long), [], [])
    assert torch.isfinite(top2).nonzero().squeeze(1).tolist() == [0, 4]
    minp = process_logits(z, SamplingParams(min_p=0.3), torch.empty(0, dtype=torch.long), [], [])
    assert torch.isfinite(minp).nonzero().squeeze(1).tolist() == [0, 4]
    banned = process_logits(z, SamplingParams(), torch.empty(0, dtype=torch.long), [], [4])
    assert banned[4] == float("-inf")
    rep = process_logits(z, SamplingParams(repetition_penalty=2.0, temperature=0), torch.tensor([4]), [], [])
    assert int(rep.argmax()) == 0          # 3 / 2 = 1.5 < 2
    pres = process_logits(z, SamplingParams(presence_penalty=5.0, temperature=0), torch.empty(0, dtype=torch.long),
                          [4, 4], [])
    assert int(pres.argmax()) == 0
    torch.testing.assert_close(process_logits(z, SamplingParams(temperature=2.0), torch.empty(0, dtype=torch.long),
                                              [], []), (z / 2).log_softmax(-1))


@pytest.mark.parametrize("bad,match", [(dict(n=0), "n must"), (dict(temperature=-1), "temperature"),
                                       (dict(top_p=0), "top_p"), (dict(min_tokens=5, max_tokens=2), "min_tokens"),
                                       (dict(stop=[""]), "stop")])
def test_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**bad).validate()
