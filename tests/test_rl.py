"""RL trainer: PPO and RLOO raise a synthetic reward; a large beta keeps the policy near the reference;
GAE / leave-one-out / the sampler-vs-trainer log-probs against direct computations."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cai_engine import LLM, SamplingParams, save_model
from cai_engine.io import read_jsonl
from cai_engine.model.heads import RewardModel
from cai_engine.train.config import resolve
from cai_engine.train.precision import Precision
from cai_engine.train.rl import gae, leave_one_out, score_answers, sequences, train_rl
from conftest import hf_and_ours, tiny_tokenizer

TARGET = set(range(100, 150))  # the synthetic reward: the share of answer tokens drawn from these 50 ids


def share_of_target(prompts, answers) -> torch.Tensor:
    return torch.tensor([sum(t in TARGET for t in a) / max(len(a), 1) for a in answers])


@pytest.fixture(scope="module")
def rl_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl")
    _, policy = hf_and_ours("llama", True)
    save_model(policy, tiny_tokenizer(), root / "policy")
    RewardModel(policy).save(root / "pm", tiny_tokenizer())
    with open(root / "prompts.jsonl", "w") as f:
        for i in range(8):
            f.write(json.dumps({"prompt": f"say something {i}"}) + "\n")
    return root


def rl_config(root: Path, run: Path, *sets: str):
    return resolve(overrides=[f"run.dir={run}", f"rl.policy={root / 'policy'}", f"rl.reward_model={root / 'pm'}",
                              f"rl.prompts={root / 'prompts.jsonl'}", "precision.mode=fp32", "rl.prompts_per_batch=4",
                              "rl.samples_per_prompt=4", "rl.max_new_tokens=6", "rl.micro_rows=8",
                              "optimizer.schedule=constant", "rl.kv_cache_mb=4", *sets])


def scores(run: Path) -> list[float]:
    return [r["pm_score"] for r in read_jsonl(run / "rl" / "metrics.jsonl")]


RLOO = ["rl.algorithm=rloo", "rl.lr=3e-2", "rl.epochs=8", "rl.epochs_per_batch=1", "rl.minibatches=1",
        "rl.kl_estimator=k1"]


@pytest.fixture(scope="module")
def rloo_unpenalised(rl_setup, tmp_path_factory):
    run = tmp_path_factory.mktemp("rloo")
    train_rl(rl_config(rl_setup, run, *RLOO, "rl.kl_coef=0.0"), reward=share_of_target, log=lambda _: None,
             progress=False)
    return read_jsonl(run / "rl" / "metrics.jsonl")


def rises(records) -> bool:
    got = [r["pm_score"] for r in records]
    return sum(got[-4:]) / 4 > sum(got[:4]) / 4 + 0.25  # from ~1/6 of the answer towards all of it


def test_rloo_raises_a_synthetic_reward(rloo_unpenalised):
    assert rises(rloo_unpenalised), [r["pm_score"] for r in rloo_unpenalised]


def test_ppo_raises_a_synthetic_reward(tmp_path, rl_setup):
    config = rl_config(rl_setup, tmp_path, "rl.algorithm=ppo", "rl.value_model=head", "rl.epochs_per_batch=2",
                       "rl.minibatches=2", "rl.lr=3e-2", "rl.kl_coef=0.0", "rl.epochs=8")
    train_rl(config, reward=share_of_target, log=lambda _: None, progress=False)
    records = read_jsonl(tmp_path / "rl" / "metrics.jsonl")
    assert len(records) == 8 * 2 * 4  # 2 rollout batches an epoch, 4 optimizer steps each
    assert rises(records[::4]), [r["pm_score"] for r in records[::4]]
    assert (tmp_path / "rl" / "final" / "config.json").is_file()


def test_a_large_beta_keeps_the_policy_near_the_reference(tmp_path, rl_setup, rloo_unpenalised):
    """Same run with beta = 5: the KL to the reference (k1, averaged over the last 4 rollouts) stays under
    a quarter of the unpenalised run's (measured: 3.2 against 29.6 nats) and under 5 nats per 6-token answer."""
    train_rl(rl_config(rl_setup, tmp_path, *RLOO, "rl.kl_coef=5.0"), reward=share_of_target, log=lambda _: None,
             progress=False)
    penalised = read_jsonl(tmp_path / "rl" / "metrics.jsonl")
    late = lambda records: sum(r["kl"] for r in records[-4:]) / 4
    assert late(penalised) < 0.25 * late(rloo_unpenalised) and late(penalised) < 5.0, \
        (late(penalised), late(rloo_unpenalised))


def test_ppo_with_a_critic_from_the_pm_runs_and_logs_everything(tmp_path, rl_setup):
    config = rl_config(rl_setup, tmp_path, "rl.algorithm=ppo", "rl.value_model=critic", "rl.epochs=1",
                       "rl.kl_target=0.5", "rl.kl_estimator=k3")
    train_rl(config, log=lambda _: None, progress=False)  # reward from the PM folder
    record = read_jsonl(tmp_path / "rl" / "metrics.jsonl")[-1]
    for key in ("reward", "pm_score", "kl", "entropy", "clip_fraction", "value_loss", "approx_kl",
                "response_length", "is_weight_mean", "is_weight_max", "tokens_per_s", "generation_s", "beta"):
        assert key in record, key


@pytest.mark.parametrize("samples, prompts_per_batch, minibatches, repeated", [(2, 3, 3, 0), (1, 5, 4, 1)])
def test_a_rollout_of_fewer_prompts_than_minibatches_trains_every_row(tmp_path, rl_setup, samples,
                                                                      prompts_per_batch, minibatches, repeated):
    """The epoch's last rollout (8 prompts: 3 + 3 + 2, or 5 + 3) holds fewer prompts than minibatches: they are
    drawn from rows then, and with fewer rows than minibatches (3 rows, 4 minibatches) one row trains twice."""
    config = rl_config(rl_setup, tmp_path, "rl.algorithm=ppo", "rl.value_model=head", "rl.epochs=1",
                       f"rl.samples_per_prompt={samples}", f"rl.prompts_per_batch={prompts_per_batch}",
                       f"rl.minibatches={minibatches}", "rl.epochs_per_batch=1")
    train_rl(config, reward=share_of_target, log=lambda _: None, progress=False)
    records = read_jsonl(tmp_path / "rl" / "metrics.jsonl")
    rollouts = -(-8 // prompts_per_batch)
    assert len(records) == rollouts * minibatches
    assert all(r["examples"] > 0 for r in records)
    assert sum(r["examples"] for r in records) == 8 * samples + repeated  # every sampled answer trained


def test_sampler_and_trainer_logprobs_agree_in_fp32(rl_setup, tokenizer):
    """The engine's log-probs of its sampled tokens equal the trainer's recomputation (fp32, temperature 1):
    the importance weights are then exactly 1, and in bf16 they measure the gap the trainer corrects."""
    from cai_engine import load_model
    policy, tok = load_model(rl_setup / "policy")
    llm = LLM(policy, tok, kv_cache_bytes=1 << 24)
    prompt = tok.encode("say something", add_special_tokens=False)
    out = llm.generate([prompt], SamplingParams(n=3, seed=5, max_tokens=8))[0]
    answers = [c.token_ids for c in out.outputs]
    batch = sequences([prompt] * 3, answers, 0)
    with torch.no_grad():
        logp, _, _, _ = score_answers(policy, policy.lm_head, batch, Precision("fp32", "t"), 1.0)
    for s, c in enumerate(out.outputs):
        torch.testing.assert_close(logp[s][batch["answer_mask"][s]], torch.tensor(c.logprobs), atol=1e-4, rtol=0)


def test_gae_and_leave_one_out_match_direct_sums():
    torch.manual_seed(0)
    rewards, values = torch.randn(3, 6), torch.randn(3, 6)
    mask = torch.tensor([[0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    gamma, lam = 0.9, 0.8
    got = gae(rewards, values, mask, gamma, lam)
    for s in range(3):
        idx = mask[s].nonzero().squeeze(1).tolist()
        for i, t in enumerate(idx):
            expect = 0.0
            for j, u in enumerate(idx[i:]):
                nxt = values[s, idx[i + j + 1]] if i + j + 1 < len(idx) else 0.0
                expect += (gamma * lam) ** j * (rewards[s, u] + gamma * nxt - values[s, u])
            assert abs(float(got[s, t]) - float(expect)) < 1e-5
    assert float(got[~mask].abs().sum()) == 0
    returns = torch.tensor([1.0, 2.0, 6.0, 0.0, 4.0, 8.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    torch.testing.assert_close(leave_one_out(returns, groups, 3), torch.tensor([-3.0, -1.5, 4.5, -6.0, 0.0, 6.0]))


def test_rl_resumes_exactly_mid_rollout_batch(tmp_path, rl_setup):
    """Interrupted inside a rollout batch (after 3 of its 4 PPO updates), then rerun: the rollout buffer and
    beta come back from the checkpoint and the final policy is bit-identical to an uninterrupted run's."""
    sets = ["rl.algorithm=ppo", "rl.value_model=head", "rl.epochs=1", "rl.lr=1e-2", "checkpoint.every=1",
            "rl.kl_target=0.5"]
    train_rl(rl_config(rl_setup, tmp_path / "ref", *sets), reward=share_of_target, log=lambda _: None, progress=False)
    calls = {"n": 0}

    def crashing(prompts, answers):
        calls["n"] += 1
        if calls["n"] == 2:  # the second rollout batch: its first 4 steps are done and checkpointed
            raise KeyboardInterrupt
        return share_of_target(prompts, answers)
    with pytest.raises(KeyboardInterrupt):
        train_rl(rl_config(rl_setup, tmp_path / "cut", *sets), reward=crashing, log=lambda _: None, progress=False)
    assert (tmp_path / "cut" / "rl" / "checkpoint-4").is_dir()
    logs = []
    train_rl(rl_config(rl_setup, tmp_path / "cut", *sets), reward=share_of_target, log=logs.append, progress=False)
    assert any("resuming rl from checkpoint-4" in line for line in logs)
    for name in ("final/model.safetensors", "checkpoint-8/model.safetensors", "checkpoint-8/optimizer.safetensors"):
        assert (tmp_path / "cut" / "rl" / name).read_bytes() == (tmp_path / "ref" / "rl" / name).read_bytes(), name
    from safetensors.torch import load_file
    cut, ref = (load_file(str(tmp_path / run / "rl" / "checkpoint-8" / "task_state.safetensors")) for run in ("cut", "ref"))
    assert set(cut) == set(ref)
    for key in set(cut) - {"stats.generation_s"}:  # a wall-clock time is the one thing allowed to differ
        assert torch.equal(cut[key], ref[key]), key


@pytest.mark.parametrize("estimator,mode", [("k3", "fp32"), ("full", "fp32"), ("k3", "bf16-mixed")])
def test_rollout_scored_in_length_chunks_equals_one_padded_batch(rl_setup, estimator, mode):
    """The rollout is scored in chunks of rows by length, each chunk cut after its longest row, and each PPO
    micro-batch is cut the same way: every per-token result equals the whole padded batch's (fp32: to rounding;
    bf16-mixed, under the autocast the loop opens: to bf16 rounding, as the chunks' GEMMs differ in shape)."""
    import copy

    from cai_engine import load_model
    from cai_engine.ops import full_kl, kl_penalty
    from cai_engine.train.rl import ActorCritic, RLTrainer, length_chunks, trimmed
    policy, _ = load_model(rl_setup / "policy")
    reference = copy.deepcopy(policy)
    with torch.no_grad():  # a reference that differs, so that the KL is not zero
        for p in reference.parameters():
            p.add_(0.01 * torch.randn_like(p))
    critic, _ = RewardModel.load(rl_setup / "pm")
    settings = rl_config(rl_setup, Path("unused"), f"rl.kl_estimator={estimator}").rl
    model = ActorCritic(policy, critic)
    trainer = RLTrainer(settings, model, reference, None, None, [], Precision(mode, "t"), torch.device("cpu"),
                        0, 0, None)
    # bf16: the chunks' GEMMs round differently from the whole batch's; measured here up to 1e-3 on log-probs and
    # 8e-3 on values (read from bf16 hidden states, 2^-8 relative), far below a row scattered to the wrong place
    tolerance = {"atol": 2e-5, "rtol": 1e-5} if mode == "fp32" else {"atol": 2e-2, "rtol": 0.0}
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 200, (n,), generator=generator).tolist() for n in (3, 9, 5, 2, 7)]
    answers = [torch.randint(3, 200, (n,), generator=generator).tolist() for n in (12, 1, 6, 3, 9)]
    batch = sequences(prompts, answers, 0)
    with torch.no_grad():
        assert length_chunks(batch["attention_mask"].sum(1), 5, 24) == [[3, 1], [2], [0], [4]]  # 2 x 10, 11, 15, 16 tokens
        got = trainer.score_rollout(batch, chunk_tokens=24)
    with torch.no_grad(), trainer.precision.autocast(trainer.device):
        logp, entropy, hidden, rows = score_answers(policy, policy.lm_head, batch, trainer.precision, 1.0, entropy=True)
        ref_logp, _, _, ref_rows = score_answers(reference, reference.lm_head, batch, trainer.precision, 1.0)
        mask = batch["answer_mask"]
        kl = (torch.zeros(mask.shape).masked_scatter(mask, full_kl(*trainer.precision.op_inputs(rows, policy.lm_head),
                                                                   *trainer.precision.op_inputs(ref_rows, reference.lm_head)))
              if estimator == "full" else kl_penalty(logp, ref_logp, estimator) * mask)
        values = model.values(hidden, batch)
    for name, a, b in zip(("log-probs", "entropy", "kl", "values"), got, (logp, entropy, kl, values)):
        torch.testing.assert_close(a * mask, b * mask, **tolerance, msg=name)
    # a micro-batch of the update reads its rows cut to the longest of them, and scores them as the whole batch does
    cut = trimmed(batch, [3, 2])
    assert cut["tokens"].shape[1] == max(len(prompts[i]) + len(answers[i]) for i in (3, 2)) < batch["tokens"].shape[1]
    with torch.no_grad(), trainer.precision.autocast(trainer.device):
        part, _, _, _ = score_answers(policy, policy.lm_head, cut, trainer.precision, 1.0)
    torch.testing.assert_close(part, logp[[3, 2], :cut["tokens"].shape[1]], **tolerance)


@pytest.mark.parametrize("mode", ["fp32", "bf16-mixed"])
def test_shared_prompts_score_and_train_as_separate_rows(rl_setup, mode):
    """With `rl.share_prompts` the answers to one prompt run as one packed row (the prompt once, each answer
    attending to it and to itself) and are gathered back into the row layout: log-probs, entropy, KL and values,
    and the gradients of the policy and the critic, equal one row per answer (fp32: to rounding; bf16: to bf16
    rounding, the packed attention and GEMMs having other shapes), for groups of 3, 2 and 1 answers whose rows
    are not adjacent, with the packed forward running fewer tokens."""
    import copy

    from cai_engine import load_model
    from cai_engine.train.rl import ActorCritic, RLTrainer, length_chunks, shared_prompt_rows
    policy, _ = load_model(rl_setup / "policy")
    reference = copy.deepcopy(policy)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.01 * torch.randn_like(p))
    critic, _ = RewardModel.load(rl_setup / "pm")
    model = ActorCritic(policy, critic)
    trainer = RLTrainer(rl_config(rl_setup, Path("unused")).rl, model, reference, None, None, [],
                        Precision(mode, "t"), torch.device("cpu"), 0, 0, None)
    tolerance = {"atol": 2e-5, "rtol": 1e-5} if mode == "fp32" else {"atol": 3e-2, "rtol": 0.0}
    generator = torch.Generator().manual_seed(1)
    prompt_of = [torch.randint(3, 200, (n,), generator=generator).tolist() for n in (7, 3, 5)]
    groups = [0, 1, 0, 2, 1, 0]  # group 0 has three answers, 1 two, 2 one; rows of a group apart
    answers = [torch.randint(3, 200, (n,), generator=generator).tolist() for n in (4, 9, 1, 6, 2, 11)]
    separate = sequences([prompt_of[g] for g in groups], answers, 0)
    shared = {**separate, "group": torch.tensor(groups)}
    packed_tokens = int(shared_prompt_rows(shared)["packed_attention_mask"].sum())
    assert packed_tokens == sum(map(len, prompt_of)) + sum(map(len, answers)) < int(separate["attention_mask"].sum())
    lengths = separate["attention_mask"].sum(1)  # 11, 12, 8, 11, 5, 18: groups' longest 18, 12, 11
    assert length_chunks(lengths, 3, groups=shared["group"]) == [[3, 1, 4], [0, 2, 5]]
    assert length_chunks(lengths, 2, groups=shared["group"]) == [[0, 2], [3], [1, 4], [5]]  # group 0 cut in two
    mask = separate["answer_mask"]
    with torch.no_grad():
        for name, a, b in zip(("log-probs", "entropy", "kl", "values"), trainer.score_rollout(shared),
                              trainer.score_rollout(separate)):
            torch.testing.assert_close(a * mask, b * mask, **tolerance, msg=name)
    weights = torch.randn(mask.shape, generator=generator) * mask

    def gradients(batch):
        model.zero_grad()
        with trainer.precision.autocast(trainer.device):
            logp, entropy, values = model(batch, trainer.precision, 1.0)
        ((logp + 0.3 * entropy + values) * weights).sum().backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    got, want = gradients(shared), gradients(separate)
    assert len(got) == len(want) > 0
    for a, b in zip(got, want):
        scale = b.abs().max().clamp(min=1e-6)
        torch.testing.assert_close(a / scale, b / scale, **tolerance)


def test_pm_scores_with_shared_prompts_equal_one_row_per_answer(rl_setup):
    """The PM reads the answers to one prompt behind one copy of it (as the PM trainer packs them): the same
    scores as one row per answer, in the order given; a call with no repeated prompt packs plain rows."""
    from cai_engine.data.prompts import load_prompts
    from cai_engine.train.rl import reward_model_scores
    reward_model, tokenizer = RewardModel.load(rl_setup / "pm")
    with torch.no_grad():
        reward_model.score.weight.normal_()  # a head that reads the whole hidden state
    prompts = load_prompts(str(rl_setup / "prompts.jsonl"), split="train")
    precision, cpu = Precision("fp32", "t"), torch.device("cpu")
    generator = torch.Generator().manual_seed(2)
    answers = [torch.randint(3, 200, (n,), generator=generator).tolist() for n in (5, 2, 9, 1, 4)]
    indices = [0, 0, 0, 3, 3]
    shared = reward_model_scores(reward_model, tokenizer, prompts, precision, cpu)(indices, answers)
    separate = reward_model_scores(reward_model, tokenizer, prompts, precision, cpu, False)(indices, answers)
    assert shared.shape == (5,) and shared.std() > 0
    torch.testing.assert_close(shared, separate, atol=2e-5, rtol=1e-5)
