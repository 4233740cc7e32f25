"""RL trainer (RL-CAI): PPO or RLOO against the preference model, with a KL penalty to the SFT model.

One rollout batch = `rl.prompts_per_batch` prompts x `rl.samples_per_prompt` answers, sampled by the paged
engine on the live policy. The trainer then scores every sampled token itself (log-probs, entropy and the
KL to the frozen reference from the fused ops, in its own precision) and corrects for the gap to the
sampler's bf16 log-probs with truncated importance weights. Reward = PM score at the end of the answer
minus beta times the per-token KL (k1, k3, or the exact KL over the vocabulary); beta fixed or adapted to a
target KL. PPO: GAE over those token rewards with a value model (a separate critic initialised from the PM,
or a head on the policy trunk), clipped surrogate, clipped value loss, entropy bonus, several epochs of
minibatches per rollout batch. RLOO: k samples per prompt, each baselined by the mean of the others' returns,
no critic. Each optimizer step is one step of the shared loop, so checkpoints, metrics and exact resume
(the rollout buffer and beta included) are the loop's.
"""
from __future__ import annotations

import copy
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from ..cai.critique import render_conversation
from ..data.comparisons import DataError
from ..data.prompts import Prompt, load_prompts
from ..engine import LLM, SamplingParams
from ..model.decoder import Transformer
from ..model.heads import RewardModel, pack_separate, pack_shared
from ..model.loading import load_model, save_model
from ..model.tokenizer import Tokenizer
from ..ops import full_kl, kl_penalty, token_logprobs
from .config import ConfigError, RLSection, RunConfig
from .loop import (MicroBatchResult, TrainSummary, TrainTask, epoch_order, preflight, run_training,
                   seed_everything, stage_settings)
from .precision import Precision

RewardFn = Callable[[list[int], list[list[int]]], Tensor]   # (prompt indices, answer token ids) -> [S] scores


class ActorCritic(nn.Module):
    """What the optimizer steps: the policy, plus the value model PPO needs (none for RLOO)."""

    def __init__(self, policy: Transformer, critic: RewardModel | None = None, value_head: nn.Linear | None = None):
        super().__init__()
        self.policy, self.critic, self.value_head = policy, critic, value_head

    def forward(self, batch: dict[str, Tensor], precision: Precision, temperature: float
                ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Log-probs and entropy [S, T] of the answer tokens, and the values (or None): the trainer's one forward,
        called through the DDP wrapper so that its gradient all-reduce is prepared."""
        logp, entropy, hidden, _ = score_answers(self.policy, self.policy.lm_head, batch, precision, temperature,
                                                 entropy=True)
        return logp, entropy, self.values(hidden, batch)

    def values(self, policy_hidden: Tensor, batch: dict[str, Tensor]) -> Tensor | None:
        """Per-position value estimates [S, T] (fp32), or None without a value model."""
        if self.value_head is not None:
            return self.value_head(policy_hidden).squeeze(-1).float()
        if self.critic is not None:
            hidden = row_hidden(self.critic.backbone, batch)
            return self.critic.score(hidden).squeeze(-1).float()
        return None


def sequences(prompts: Sequence[list[int]], answers: Sequence[list[int]], pad_id: int) -> dict[str, Tensor]:
    """Right-padded prompt + answer rows; `answer_mask[s, t]` marks positions whose next token is an answer
    token, `labels[s, t]` that token (the positions the policy is scored at)."""
    width = max(len(p) + len(a) for p, a in zip(prompts, answers))
    S = len(prompts)
    tokens = torch.full((S, width), pad_id, dtype=torch.long)
    attention = torch.zeros(S, width, dtype=torch.long)
    answer_mask = torch.zeros(S, width, dtype=torch.bool)
    labels = torch.zeros(S, width, dtype=torch.long)
    for s, (p, a) in enumerate(zip(prompts, answers)):
        row = list(p) + list(a)
        tokens[s, :len(row)] = torch.tensor(row)
        attention[s, :len(row)] = 1
        answer_mask[s, len(p) - 1:len(row) - 1] = True
        labels[s, len(p) - 1:len(row) - 1] = torch.tensor(list(a))
    return {"tokens": tokens, "attention_mask": attention, "answer_mask": answer_mask, "labels": labels}


# Rows per no-grad forward of the rollout's scoring, as padded tokens. Each chunk pays per-call costs (the fused
# log-prob op lays out the LM head on every call; the weights' bf16 casts were per chunk then too): a PPO rollout
# of 32 x 174 tokens scored in chunks of 8 rows took ~1.5 s longer than in one.
ROLLOUT_CHUNK_TOKENS = 8192


def length_chunks(lengths: Tensor, max_rows: int, max_tokens: int = 0, groups: Tensor | None = None
                  ) -> list[list[int]]:
    """Row indices, shortest rows first, in chunks of at most `max_rows` rows and (beyond one unit) `max_tokens`
    padded tokens if given: a chunk is padded only to its own longest row. With `groups` (a rollout group id per
    row: the answers to one prompt), a group's rows stay in one chunk, so its prompt is run once (`row_hidden`);
    a group of more than `max_rows` rows is cut into pieces of `max_rows`."""
    units: dict[int, list[int]] = {}
    for row, key in enumerate(groups.tolist() if groups is not None else range(len(lengths))):
        units.setdefault(key, []).append(row)
    pieces = [rows[i:i + max_rows] for rows in units.values() for i in range(0, len(rows), max_rows)]
    longest = [max(int(lengths[r]) for r in piece) for piece in pieces]
    chunks: list[list[int]] = [[]]
    for p in sorted(range(len(pieces)), key=longest.__getitem__):  # stable: equal lengths keep their order
        rows = len(chunks[-1]) + len(pieces[p])
        if chunks[-1] and (rows > max_rows or 0 < max_tokens < rows * longest[p]):  # this piece is the longest
            chunks.append([])
        chunks[-1].extend(pieces[p])
    return chunks


def trimmed(batch: dict[str, Tensor], rows: list[int]) -> dict[str, Tensor]:
    """The batch's `rows`, cut after the last token of the longest: with right padding no earlier position reads
    the columns cut (causal attention), so every per-token result is the untrimmed batch's. With rollout groups
    the chunk's packing (`shared_prompt_rows`) comes with it, made once for every model that reads the chunk."""
    picked = {k: v[rows] for k, v in batch.items() if not k.startswith("packed_")}
    width = int(picked["attention_mask"].sum(1).max())
    chunk = {k: v[:, :width] if v.dim() == 2 else v for k, v in picked.items()}
    return chunk | shared_prompt_rows(chunk) if "group" in chunk else chunk


def shared_prompt_rows(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The batch's rows packed one row per rollout group (`batch["group"]`, rows of the same prompt tokens):
    [prompt | answer_1 | answer_2 | ...], each answer attending to the prompt and to itself (`pack_shared`, as the
    PM trainer packs), as `packed_*` tensors on the batch's device, with `packed_index` [S, W]: for each row
    position the flat index of its packed position (padding reads the row's last token). Empty when no two rows
    share a prompt."""
    tokens, lengths = batch["tokens"].cpu(), batch["attention_mask"].sum(1).tolist()
    prompt_lengths = (batch["answer_mask"].long().argmax(1) + 1).tolist()  # the last prompt token starts the mask
    groups: dict[tuple, list[int]] = {}
    for row, group in enumerate(batch["group"].tolist()):
        groups.setdefault((group, tuple(tokens[row, :prompt_lengths[row]].tolist())), []).append(row)
    if len(groups) == len(lengths):
        return {}
    packed = pack_shared([(list(prompt), [tokens[r, len(prompt):lengths[r]].tolist() for r in rows])
                          for (_, prompt), rows in groups.items()], pad_id=0)
    width, packed_width = tokens.shape[1], packed.input_ids.shape[1]
    index = torch.empty(len(lengths), width, dtype=torch.long)
    for g, ((_, prompt), rows) in enumerate(groups.items()):
        start = len(prompt)  # where the group's next answer begins in its packed row
        for r in rows:
            answer = lengths[r] - len(prompt)
            columns = torch.cat([torch.arange(len(prompt)), torch.arange(start, start + answer)])
            index[r] = g * packed_width + torch.cat([columns, columns[-1:].expand(width - lengths[r])])
            start += answer
    device = batch["tokens"].device
    return {"packed_tokens": packed.input_ids.to(device), "packed_positions": packed.position_ids.to(device),
            "packed_attention_mask": packed.attention_mask.to(device), "packed_attn_mask": packed.attn_mask.to(device),
            "packed_index": index.to(device)}


def row_hidden(model: Transformer, batch: dict[str, Tensor]) -> Tensor:
    """Final hidden states [S, W, d] of the batch's prompt + answer rows. With `batch["group"]` the answers to
    one prompt run as one packed row, the prompt once (`shared_prompt_rows`; `trimmed` packs a chunk once for
    all its models), and are gathered back into the row layout: each state is the unpacked row's up to
    rounding, and the gather's backward sums a prompt position's gradient over its answers. One row per answer
    without groups (`rl.share_prompts = false`) or when no two rows share a prompt."""
    packed = batch if "packed_index" in batch or "group" not in batch else shared_prompt_rows(batch)
    if "packed_index" not in packed:
        return model(batch["tokens"], attention_mask=batch["attention_mask"])
    hidden = model(packed["packed_tokens"], position_ids=packed["packed_positions"],
                   attention_mask=packed["packed_attention_mask"], attn_mask=packed["packed_attn_mask"])
    return hidden.reshape(-1, hidden.shape[-1])[packed["packed_index"]]


def score_answers(model: Transformer, head: Tensor, batch: dict[str, Tensor], precision: Precision,
                  temperature: float, *, entropy: bool = False) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """Log-probs (and entropy) [S, T] of the answer tokens, zero elsewhere; also the hidden states [S, T, d]
    and the flat hidden rows of the answer positions (for the exact KL)."""
    hidden = row_hidden(model, batch)
    mask = batch["answer_mask"]
    rows, weight = precision.op_inputs(hidden[mask], head)
    logp, ent = token_logprobs(rows, weight, batch["labels"][mask], temperature=temperature, return_entropy=entropy)
    out = torch.zeros(mask.shape, dtype=torch.float32, device=hidden.device)
    logp_full = out.masked_scatter(mask, logp)
    ent_full = out.masked_scatter(mask, ent) if entropy else None
    return logp_full, ent_full, hidden, rows


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> Tensor:
    """Generalised advantage estimates over the answer positions of each row (0 elsewhere)."""
    S, T = rewards.shape
    advantages = torch.zeros_like(rewards)
    last = torch.zeros(S, dtype=rewards.dtype, device=rewards.device)
    next_value = torch.zeros(S, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(T)):
        m = mask[:, t].to(rewards.dtype)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * m + last * (1 - m)
        advantages[:, t] = last * m
        next_value = values[:, t] * m + next_value * (1 - m)
    return advantages


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    values = x[mask]
    if values.numel() < 2:
        return x
    mean, std = values.mean(), values.std()
    out = (x - mean) / (std + 1e-8) if shift_mean else x / (std + 1e-8)
    return out * mask


def leave_one_out(returns: Tensor, groups: Tensor, k: int) -> Tensor:
    """RLOO baseline: each sample's return minus the mean of the other k - 1 samples of its prompt."""
    totals = torch.zeros(int(groups.max()) + 1, dtype=returns.dtype).index_add_(0, groups, returns)
    return returns - (totals[groups] - returns) / max(k - 1, 1)


def request_seed(seed: int, step: int, prompt_index: int) -> int:
    """A sampling seed per (run seed, rollout step, prompt): independent of batching and of resume."""
    digest = hashlib.sha256(f"{seed}/{step}/{prompt_index}".encode()).digest()
    return int.from_bytes(digest[:7], "little")


def reward_model_scores(reward_model: RewardModel, tokenizer: Tokenizer, prompts: Sequence[Prompt],
                        precision: Precision, device, share_prompts: bool = True) -> RewardFn:
    """PM scores of answers, reading each conversation as the PM was trained on it (the feedback stage's
    "\n\nHuman: ...\n\nAssistant:" text, then the answer ending in EOS); the answers to one prompt (adjacent
    in the call) packed behind one copy of it, as the PM trainer packs them, with `share_prompts`."""
    texts = [tokenizer.encode(render_conversation(p.context, p.text, "").rstrip()) for p in prompts]
    eos, pad = tokenizer.eos_id, tokenizer.pad_id if tokenizer.pad_id is not None else 0

    @torch.no_grad()
    def score(indices: list[int], answers: list[list[int]]) -> Tensor:
        ended = [a if (eos is None or (a and a[-1] == eos)) else a + [eos] for a in answers]
        groups: list[tuple[int, list[list[int]]]] = []
        for i, answer in zip(indices, ended):
            if share_prompts and groups and groups[-1][0] == i:
                groups[-1][1].append(answer)
            else:
                groups.append((i, [answer]))
        pack = pack_shared if len(groups) < len(ended) else pack_separate  # plain causal rows when nothing is shared
        batch = pack([(texts[i], group) for i, group in groups], pad)
        with precision.autocast(device):
            return reward_model(batch.to(device)).float().cpu()
    return score


def encode_prompts(prompts: Sequence[Prompt], tokenizer: Tokenizer, max_prompt_tokens: int) -> list[list[int]]:
    """The policy's view of each prompt: its chat template, ending where the answer starts."""
    return [tokenizer.encode(tokenizer.apply_chat_template(p.messages(), add_generation_prompt=True),
                             add_special_tokens=False)[-max_prompt_tokens:] for p in prompts]


@dataclass(slots=True)
class RLTrainer:
    """The rollout buffer and the per-batch computations of one RL run (the loop calls plan / loss)."""
    settings: RLSection
    model: ActorCritic
    reference: Transformer
    llm: LLM
    reward: RewardFn
    prompts: list[list[int]]
    precision: Precision
    device: torch.device
    seed: int
    pad_id: int
    eos_id: int | None
    beta: float = 0.0
    buffer: dict[str, Tensor] | None = None
    buffer_step: int = -1
    stats: dict[str, float] | None = None

    @property
    def updates_per_batch(self) -> int:
        return self.settings.epochs_per_batch * self.settings.minibatches

    # ------------------------------------------------------------------ rollout

    @torch.no_grad()
    def rollout(self, step: int, prompt_indices: list[int]) -> None:
        s = self.settings
        tick = time.perf_counter()
        self.llm.update_weights()  # the policy changed since the last rollout: sample from the new weights
        self.llm.wake()
        params = [SamplingParams(n=s.samples_per_prompt, temperature=s.temperature, top_p=s.top_p,
                                 max_tokens=s.max_new_tokens, seed=request_seed(self.seed, step, i))
                  for i in prompt_indices]
        outputs = self.llm.generate([self.prompts[i] for i in prompt_indices], params, progress=False)
        self.llm.sleep()  # KV memory back to the trainer for the backward passes
        generation_s = time.perf_counter() - tick
        prompts, answers, sampler_logp, groups, owners = [], [], [], [], []
        for g, out in enumerate(outputs):
            if out.error:
                raise DataError(f"rollout prompt {prompt_indices[g]}: {out.error}")
            for c in out.outputs:
                answer = list(c.token_ids) or ([self.eos_id] if self.eos_id is not None else [self.pad_id])
                prompts.append(out.prompt_token_ids)
                answers.append(answer)
                sampler_logp.append(list(c.processed_logprobs) or [0.0])
                groups.append(g)
                owners.append(prompt_indices[g])
        batch = sequences(prompts, answers, self.pad_id)
        if s.share_prompts:
            batch["group"] = torch.tensor(groups)
        mask = batch["answer_mask"]
        sampled = torch.zeros(mask.shape).masked_scatter(mask, torch.tensor([x for row in sampler_logp for x in row]))
        batch = {k: v.to(self.device) for k, v in batch.items()}
        old_logp, entropy, kl, values = self.score_rollout(batch)
        mask = batch["answer_mask"]
        scores = self.reward(owners, answers).to(self.device)
        if s.whiten_rewards:
            scores = (scores - scores.mean()) / (scores.std() + 1e-8) if scores.numel() > 1 else scores
        last = mask.long().cumsum(1).argmax(1)  # the last answer position of every row
        token_rewards = -self.beta * kl
        token_rewards[torch.arange(len(answers)), last] += scores
        group = torch.tensor(groups, device=self.device)
        if s.algorithm == "rloo":
            returns = token_rewards.sum(1)
            advantages = leave_one_out(returns.cpu(), group.cpu(), s.samples_per_prompt).to(self.device)
            advantages = advantages[:, None] * mask
            value_targets = torch.zeros_like(advantages)
        else:
            values = values * mask
            advantages = gae(token_rewards, values, mask, s.gamma, s.lam)
            value_targets = advantages + values
        if s.whiten_advantages:
            advantages = whiten(advantages, mask)
        # truncated importance weights: the sampler (bf16, top-p) is the behaviour policy, not the trainer
        log_w = (old_logp - sampled.to(self.device)) * mask
        is_weights = log_w.clamp(max=float(torch.tensor(s.is_truncation).log())).exp() * mask
        self.buffer = {**batch, "old_logp": old_logp, "advantages": advantages, "value_targets": value_targets,
                       "old_values": values if values is not None else torch.zeros_like(old_logp),
                       "is_weights": is_weights, "scores": scores, "kl": kl, "entropy": entropy * mask}
        self.buffer_step = step
        n_tokens = float(mask.sum())
        seq_kl = kl.sum(1)
        self.stats = {"pm_score": float(scores.mean()), "reward": float(token_rewards.sum(1).mean()),
                      "kl": float(seq_kl.mean()), "entropy": float((entropy * mask).sum() / n_tokens),
                      "response_length": n_tokens / len(answers), "beta": self.beta,
                      "is_weight_mean": float(is_weights.sum() / n_tokens),
                      "is_weight_max": float(log_w.exp().masked_select(mask).max()),
                      "sampler_logprob_gap": float(log_w.abs().sum() / n_tokens), "generation_s": generation_s}
        if s.kl_target > 0:  # adaptive beta (Ziegler et al.): move towards the KL target, 20% a batch at most
            error = max(-0.2, min(0.2, float(seq_kl.mean()) / s.kl_target - 1))
            self.beta *= 1 + error * len(answers) / s.kl_horizon

    def score_rollout(self, batch: dict[str, Tensor], chunk_tokens: int = ROLLOUT_CHUNK_TOKENS
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """The policy's log-probs and entropy, the KL to the reference and the values (None without a value
        model), each [S, T] and zero off the answers, computed in chunks of rows by length (answers that stop
        early at EOS leave the chunks of short rows short)."""
        s, mask = self.settings, batch["answer_mask"]
        out = [torch.zeros(mask.shape, device=self.device) for _ in range(4)]
        has_values = self.model.value_head is not None or self.model.critic is not None
        lengths = batch["attention_mask"].sum(1)
        # one autocast region for every chunk: each weight is cast to bf16 once per rollout, not once per chunk
        with self.precision.autocast(self.device):
            for rows in length_chunks(lengths, len(lengths), chunk_tokens, batch.get("group")):
                chunk = trimmed(batch, rows)
                logp, entropy, hidden, policy_rows = score_answers(self.model.policy, self.model.policy.lm_head,
                                                                   chunk, self.precision, s.temperature, entropy=True)
                ref_logp, _, _, ref_rows = score_answers(self.reference, self.reference.lm_head, chunk,
                                                         self.precision, s.temperature)
                values = self.model.values(hidden, chunk)
                chunk_mask = chunk["answer_mask"]
                if s.kl_estimator == "full":
                    h, w = self.precision.op_inputs(policy_rows, self.model.policy.lm_head)
                    rh, rw = self.precision.op_inputs(ref_rows, self.reference.lm_head)
                    kl = torch.zeros(chunk_mask.shape, device=self.device).masked_scatter(
                        chunk_mask, full_kl(h, w, rh, rw, temperature=s.temperature))
                else:
                    kl = kl_penalty(logp, ref_logp, s.kl_estimator) * chunk_mask
                width = chunk_mask.shape[1]
                for target, part in zip(out, (logp, entropy, kl, values)):
                    if part is not None:
                        target[rows, :width] = part
        old_logp, entropy, kl, values = out
        return old_logp, entropy, kl, values if has_values else None

    # ------------------------------------------------------------------ the loop's hooks

    def plan(self, step: int, update: int, examples: list[int]) -> list[list[int]]:
        if update == 0 or self.buffer is None or self.buffer_step != step - update:
            self.rollout(step - update, examples)
        s, groups = self.settings, self.buffer.get("group")
        rows = self.buffer["tokens"].shape[0]
        if groups is not None and len(set(groups.tolist())) < s.minibatches:
            groups = None  # too few prompts (an epoch's last rollout) to give every minibatch a whole group
        # minibatches of whole rollout groups (of rows without sharing), so that a group's prompt runs once
        owners = groups.tolist() if groups is not None else list(range(rows))
        units = sorted(set(owners))
        epoch, minibatch = divmod(update, s.minibatches)
        order = epoch_order(len(units), self.seed + 7919 * self.buffer_step, epoch)
        # fewer rows than minibatches (one answer a prompt, a last rollout of few prompts): a minibatch that would
        # be empty takes a row a second time rather than stepping on nothing
        picked = {units[i] for i in order[minibatch::s.minibatches]} or {units[order[minibatch % len(units)]]}
        chosen = [row for row, owner in enumerate(owners) if owner in picked]
        lengths = self.buffer["attention_mask"][chosen].sum(1)
        chunks = length_chunks(lengths, s.micro_rows, groups=None if groups is None else groups[chosen])
        return [[chosen[i] for i in chunk] for chunk in chunks]

    def loss(self, trained: ActorCritic, rows: list[int]) -> MicroBatchResult:
        s, b = self.settings, trimmed(self.buffer, rows)
        mask = b["answer_mask"]
        logp, entropy, values = trained(b, self.precision, s.temperature)
        ratio = (logp - b["old_logp"]).exp()
        adv = b["advantages"]
        surrogate = torch.max(-adv * ratio, -adv * ratio.clamp(1 - s.clip_range, 1 + s.clip_range))
        policy_loss = (surrogate * b["is_weights"] * mask).sum()
        loss = policy_loss - s.entropy_coef * (entropy * mask).sum()
        value_loss = torch.zeros((), device=logp.device)
        if s.algorithm == "ppo":
            values = values * mask
            clipped = b["old_values"] + (values - b["old_values"]).clamp(-s.value_clip, s.value_clip)
            value_loss = 0.5 * torch.max((values - b["value_targets"]).square(),
                                         (clipped - b["value_targets"]).square()).mul(mask).sum()
            loss = loss + s.vf_coef * value_loss
        n = float(mask.sum())
        with torch.no_grad():
            log_ratio = (logp - b["old_logp"]) * mask
            metrics = {"policy_loss": float(policy_loss), "value_loss": float(value_loss),
                       "clip_fraction": float((((ratio - 1).abs() > s.clip_range) & mask).sum()),
                       "approx_kl": float(((log_ratio.exp() - 1) - log_ratio).mul(mask).sum())}
            metrics.update({k: v * n for k, v in (self.stats or {}).items()})
        return MicroBatchResult(loss, n, int(b["attention_mask"].sum()), metrics)

    def state(self) -> dict[str, Tensor]:
        extra = {"beta": torch.tensor(self.beta, dtype=torch.float64),
                 "buffer_step": torch.tensor(self.buffer_step, dtype=torch.int64)}
        if self.buffer is not None:
            extra.update({f"buffer.{k}": v for k, v in self.buffer.items()})
            extra.update({f"stats.{k}": torch.tensor(v, dtype=torch.float64) for k, v in (self.stats or {}).items()})
        return extra

    def load_state(self, extra: dict[str, Tensor]) -> None:
        self.beta = float(extra["beta"])
        self.buffer_step = int(extra["buffer_step"])
        buffer = {k[7:]: v.to(self.device) for k, v in extra.items() if k.startswith("buffer.")}
        self.buffer = buffer or None
        self.stats = {k[6:]: float(v) for k, v in extra.items() if k.startswith("stats.")} or None



def train_rl(config: RunConfig, *, reward: RewardFn | None = None, allow_config_change: bool = False,
             log: Callable[[str], None] = print, progress: bool = True) -> TrainSummary:
    s = config.rl
    run_dir = Path(config.run.dir)
    policy_path = s.policy or (str(run_dir / "sft" / "final") if (run_dir / "sft" / "final").is_dir()
                               else config.model.name)
    pm_path = s.reward_model or str(run_dir / "pm" / "final")
    if reward is None and not Path(pm_path).is_dir():
        raise ConfigError(f"rl.reward_model = {pm_path!r}: not found (train the PM stage first, or set it)")
    if s.prompts and not Path(s.prompts).is_file():
        raise ConfigError(f"rl.prompts = {s.prompts!r}: file not found")
    if s.algorithm == "rloo" and s.samples_per_prompt < 2:
        raise ConfigError("rl.samples_per_prompt must be >= 2 for RLOO (the leave-one-out baseline)")
    if config.run.parallel == "fsdp":  # the sampler copies the policy's weights whole on every rank
        raise ConfigError("run.parallel = fsdp: the rl stage runs ddp only (its sampler needs whole weights per rank)")
    loop = stage_settings(config, "rl", allow_config_change=allow_config_change, progress=progress)
    device, precision = loop.device, loop.precision
    finished = preflight(loop, log)
    if finished is not None:
        return finished
    log(f"loading policy {policy_path} ...")
    seed_everything(config.run.seed)
    policy, tokenizer = load_model(policy_path, dtype=torch.float32, device=device)
    reference = copy.deepcopy(policy).requires_grad_(False).eval()
    if precision.mode == "bf16-mixed":
        reference = reference.to(torch.bfloat16)  # frozen: bf16 halves its memory, autocast computes the same
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    critic = value_head = None
    if s.algorithm == "ppo" and s.value_model == "critic":
        if reward is not None and not Path(pm_path).is_dir():
            raise ConfigError("rl.value_model = critic needs a PM checkpoint to start from (rl.reward_model)")
        critic, _ = RewardModel.load(pm_path, dtype=torch.float32, device=device)
    elif s.algorithm == "ppo":
        value_head = nn.Linear(policy.config.hidden_size, 1, device=device)
        nn.init.zeros_(value_head.weight)
        nn.init.zeros_(value_head.bias)
    prompts = load_prompts(s.prompts, split="train")
    prompts = prompts[:s.limit] if s.limit else prompts
    if reward is None:
        log(f"loading reward model {pm_path} ...")
        reward_model, _ = RewardModel.load(pm_path, dtype=torch.float32, device=device)
        reward_model.requires_grad_(False).eval()
        if precision.mode == "bf16-mixed":
            reward_model = reward_model.to(torch.bfloat16)
        reward = reward_model_scores(reward_model, tokenizer, prompts, precision, device, s.share_prompts)
    model = ActorCritic(policy, critic, value_head)
    llm = LLM(policy, tokenizer, dtype=precision.compute_dtype, kv_cache_bytes=s.kv_cache_mb << 20)
    trainer = RLTrainer(s, model, reference, llm, reward, encode_prompts(prompts, tokenizer, s.max_prompt_tokens),
                        precision, device, config.run.seed, pad,
                        tokenizer.eos_id, beta=s.kl_coef)
    log(f"{len(prompts)} prompts; {s.algorithm}: {s.prompts_per_batch} prompts x {s.samples_per_prompt} samples "
        f"per rollout, {trainer.updates_per_batch} optimizer step(s) per rollout")
    task = TrainTask(name="rl", model=model, num_examples=len(prompts), micro_batch=s.prompts_per_batch, grad_accum=1,
                     epochs=s.epochs, lr=s.lr, loss=trainer.loss, export=lambda m, d: save_model(m.policy, tokenizer, d),
                     updates_per_batch=trainer.updates_per_batch, plan=trainer.plan, state=trainer.state,
                     load_state=trainer.load_state)
    return run_training(task, loop, log)
