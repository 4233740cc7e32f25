import pytest
import torch

from cai_engine.ops import pairwise_pm_loss
from cai_engine.ops.pm_loss import (pairs_from_chosen_rejected, pairs_from_ranking, pairs_from_soft_matrix,
                                    pairwise_pm_loss_reference)
from conftest import device_for


def k_wise_batch(ks, seed=0, scale=1.0, soft=True):
    """Groups of K responses each (K = 1 gives a group with no pairs), all pairs, random soft labels."""
    g = torch.Generator().manual_seed(seed)
    ranks = [torch.randperm(k, generator=g).tolist() for k in ks]
    pairs, prob, group = pairs_from_ranking(ranks)
    if soft:
        prob = torch.rand(prob.shape, generator=g)
        prob[::5] = 0.5  # labels of exactly 0.5
    rewards = torch.randn(sum(ks), generator=g) * scale
    return rewards, pairs, prob, group


def run(backend, rewards, pairs, prob, group, *, reduction="mean", weight=None, margin=None, center=0.0, atol=1e-5,
        num_groups=None):
    dev = device_for(backend)
    r = rewards.to(dev).requires_grad_()
    move = lambda t: None if t is None else t.to(dev)
    loss, metrics = pairwise_pm_loss(r, move(pairs), prob=move(prob), weight=move(weight), margin=move(margin),
                                     group=move(group), center_coef=center, reduction=reduction,
                                     num_groups=num_groups)
    upstream = torch.randn(loss.shape, generator=torch.Generator().manual_seed(9)).to(dev) if loss.dim() else 1.0
    (grad,) = torch.autograd.grad((loss * upstream).sum(), [r])

    r64 = rewards.double().requires_grad_()
    ng = num_groups or (int(group.max()) + 1 if len(group) else 1)
    ones = torch.ones(len(pairs), dtype=torch.float64)
    ref = pairwise_pm_loss_reference(r64, pairs, prob.double(), ones if weight is None else weight.double(),
                                     0 * ones if margin is None else margin.double(), group, ng, center, reduction)
    up64 = upstream.double().cpu() if loss.dim() else 1.0
    (rgrad,) = torch.autograd.grad((ref * up64).sum(), [r64])
    torch.testing.assert_close(loss.detach().cpu().double(), ref.detach(), atol=atol, rtol=1e-5)
    torch.testing.assert_close(grad.cpu().double(), rgrad, atol=atol, rtol=1e-4)
    return loss, metrics


@pytest.mark.parametrize("reduction", ["mean", "sum", "group_mean", "none"])
def test_all_reductions_match_float64(backend, reduction):
    rewards, pairs, prob, group = k_wise_batch([2, 4, 1, 16, 3, 1, 7])
    w = torch.rand(len(pairs), generator=torch.Generator().manual_seed(3)) + 0.5
    m = torch.rand(len(pairs), generator=torch.Generator().manual_seed(4)) * 0.3
    run(backend, rewards, pairs, prob, group, reduction=reduction)
    run(backend, rewards, pairs, prob, group, reduction=reduction, weight=w, margin=m,
        center=0.0 if reduction == "none" else 0.01)


def test_group_mean_counts_every_prompt_once(backend):
    rewards, pairs, prob, group = k_wise_batch([16, 2], soft=False)
    loss, _ = run(backend, rewards, pairs, prob, group, reduction="group_mean")
    per_group = [pairwise_pm_loss_reference(rewards, pairs[group == g], prob[group == g], torch.ones(int((group == g).sum())),
                                            torch.zeros(int((group == g).sum())), group[group == g] * 0, 1)
                 for g in (0, 1)]
    torch.testing.assert_close(loss.detach().cpu(), torch.stack(per_group).mean(), atol=1e-5, rtol=1e-5)


def test_groups_with_no_pairs_contribute_nothing(backend):
    rewards, pairs, prob, group = k_wise_batch([3, 1, 1, 4])
    a, _ = run(backend, rewards, pairs, prob, group, reduction="group_mean", num_groups=10)
    b, _ = run(backend, rewards, pairs, prob, group, reduction="group_mean")
    torch.testing.assert_close(a, b)


def test_reward_gaps_of_hundreds_are_stable(backend):
    rewards, pairs, prob, group = k_wise_batch([4, 8, 2], scale=300.0, seed=5)
    loss, _ = run(backend, rewards, pairs, prob, group, reduction="group_mean", atol=1e-3)
    assert torch.isfinite(loss)


def test_hard_labels_match_the_usual_reward_model_loss(backend):
    torch.manual_seed(0)
    chosen, rejected = torch.randn(6), torch.randn(6)
    rewards = torch.stack([chosen, rejected], 1).flatten()
    pairs, prob, group = pairs_from_chosen_rejected(6)
    loss, metrics = run(backend, rewards, pairs, prob, group)
    torch.testing.assert_close(loss.detach().cpu(), -torch.nn.functional.logsigmoid(chosen - rejected).mean())
    torch.testing.assert_close(metrics["accuracy"].cpu(), (chosen > rejected).float().mean())


def test_metrics(backend):
    dev = device_for(backend)
    rewards = torch.tensor([3.0, 1.0, 2.0, 0.0, 5.0], device=dev)
    pairs = torch.tensor([[0, 1], [1, 2], [0, 2], [3, 4]], device=dev)
    prob = torch.tensor([1.0, 1.0, 0.5, 0.2], device=dev)
    group = torch.tensor([0, 0, 0, 1], device=dev)
    _, m = pairwise_pm_loss(rewards, pairs, prob=prob, group=group)
    torch.testing.assert_close(m["group_accuracy"].cpu(), torch.tensor([0.5, 1.0]))
    torch.testing.assert_close(m["accuracy"].cpu(), torch.tensor(2 / 3))
    torch.testing.assert_close(m["group_margin"].cpu(), torch.tensor([(2.0 - 1.0 + 0.0) / 3, 0.6 * 5.0]))
    torch.testing.assert_close(m["group_pairs"].cpu(), torch.tensor([3.0, 1.0]))


def test_pair_builders():
    pairs, prob, group = pairs_from_ranking([[1, 0, 1], [0]])
    assert pairs.tolist() == [[0, 1], [0, 2], [1, 2]] and prob.tolist() == [0.0, 0.5, 1.0] and group.tolist() == [0] * 3
    m = torch.tensor([[0.5, 0.9], [0.1, 0.5]])
    pairs, prob, group = pairs_from_soft_matrix([m, m])
    assert pairs.tolist() == [[0, 1], [2, 3]] and torch.allclose(prob, torch.tensor([0.9, 0.9]))
    with pytest.raises(ValueError, match=r"matrices\[0\]: M\[a, b\] \+ M\[b, a\] must be 1"):
        pairs_from_soft_matrix([torch.tensor([[0.5, 0.9], [0.9, 0.5]])])


def test_bad_inputs(backend):
    r = torch.randn(4)
    with pytest.raises(ValueError, match="pairs: expected"):
        pairwise_pm_loss(r, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"prob: expected \[1\]"):
        pairwise_pm_loss(r, torch.tensor([[0, 1]]), prob=torch.ones(2))
    with pytest.raises(ValueError, match="group_mean"):
        pairwise_pm_loss(r, torch.tensor([[0, 1]]), reduction="group_mean")
    if backend != "triton":
        with pytest.raises(ValueError, match=r"pairs.*outside|indices must be in"):
            pairwise_pm_loss(r, torch.tensor([[0, 4]]))
        with pytest.raises(ValueError, match="probability"):
            pairwise_pm_loss(r, torch.tensor([[0, 1]]), prob=torch.tensor([1.5]))


def test_compiles_without_graph_breaks(monkeypatch):
    monkeypatch.setenv("CAI_ENGINE_BACKEND", "native")
    rewards, pairs, prob, group = k_wise_batch([3, 4])
    r = rewards.clone().requires_grad_()

    def fn(r):
        loss, metrics = pairwise_pm_loss(r, pairs, prob=prob, group=group, reduction="group_mean", num_groups=2)
        return loss, metrics["accuracy"]

    torch._dynamo.reset()
    loss, acc = torch.compile(fn, backend="aot_eager", fullgraph=True)(r)
    loss.backward()
    r2 = rewards.clone().requires_grad_()
    ref, ref_acc = fn(r2)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(r.grad, r2.grad)
    torch.testing.assert_close(acc, ref_acc)
