"""AI feedback: soft preference labels from a feedback model answering multiple-choice questions.

For each answer pair the feedback model sees the paper's layout (Bai et al. 2022, section 4.1):

    <few-shot comparison examples>
    Consider the following conversation between a human and an assistant:
    <conversation>
    <one comparison principle>
    Options:
    (A) <answer>
    (B) <answer>
    The answer is:

and " (A)" / " (B)" are scored by teacher forcing; normalising the two probabilities gives
P(A is better). On by default: several principles per pair (ensembling: their probabilities are
averaged) and both orders of the answers (position-swap debiasing: P(first answer better) from each
order, averaged). In chain-of-thought mode the options are followed by "Let's think step by step:",
the feedback model writes its reasoning through the engine, and the options are scored after it;
those probabilities are clamped (default [0.4, 0.6]) because chain-of-thought labels are
overconfident. Principles are drawn per pair from a seeded generator keyed by the pair's index, so a
resumed run draws exactly what an uninterrupted one would.

Output records are the preference-model comparison format (`prompt`, `responses`, `soft_labels` =
P(responses[0] beats responses[1])) plus a `feedback` provenance object.
"""
from __future__ import annotations

import math
import os
import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from ..engine.llm import LLM
from ..engine.sampling import SamplingParams
from ..io import append_jsonl, read_jsonl
from ..model.decoder import Transformer
from ..model.tokenizer import Tokenizer
from .multiple_choice import ANSWER_LEAD, chat_wrap, score_continuations

COT_LEAD = "Let's think step by step:"
OPTIONS = (" (A)", " (B)")
# Reasoning ends where the model starts to state its answer (that is scored instead) or a new turn begins.
COT_STOPS = ["The answer is", "the answer is", "\n\nHuman:", "\n\n\n"]


@dataclass(slots=True)
class FeedbackConfig:
    principles_per_pair: int = 4         # ensembling: distinct principles drawn per pair (1 = off)
    position_swap: bool = True           # score both orders of the answers and average
    chain_of_thought: bool = False
    clamp_low: float = 0.4               # chain-of-thought probabilities are clamped to [low, high]
    clamp_high: float = 0.6
    cot_max_tokens: int = 256
    cot_temperature: float = 0.0         # 0 = greedy reasoning
    chat_template: bool = False          # raw text by default, as in the paper
    seed: int = 0
    batch_pairs: int = 16                # pairs per scoring call (and per fsync of the output)
    max_batch_tokens: int = 8192

    def validate(self) -> None:
        checks = [
            (self.principles_per_pair >= 1, "principles_per_pair must be >= 1"),
            (0 <= self.clamp_low <= self.clamp_high <= 1, "need 0 <= clamp_low <= clamp_high <= 1"),
            (self.cot_max_tokens >= 1, "cot_max_tokens must be >= 1"),
            (self.cot_temperature >= 0, "cot_temperature must be >= 0"),
            (self.batch_pairs >= 1, "batch_pairs must be >= 1"),
            (self.max_batch_tokens >= 1, "max_batch_tokens must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"FeedbackConfig: {message}")

    def provenance(self) -> dict:
        """The settings that change the labels (recorded in every record, checked on resume)."""
        keys = ["principles_per_pair", "position_swap", "chain_of_thought", "chat_template", "seed"]
        if self.chain_of_thought:
            keys += ["clamp_low", "clamp_high", "cot_max_tokens", "cot_temperature"]
        full = asdict(self)
        return {k: full[k] for k in keys}


def build_question(conversation: str, principle: str, first: str, second: str, few_shot: str = "",
                   lead: str = ANSWER_LEAD) -> str:
    """The multiple-choice question in the paper's layout, raw text ending in `lead`."""
    conversation = conversation.rstrip()
    if conversation.endswith("Assistant:"):  # a PM prompt ends in the empty assistant turn the options fill
        conversation = conversation[: -len("Assistant:")].rstrip()
    prefix = few_shot.rstrip() + "\n\n" if few_shot.strip() else ""
    return (f"{prefix}Consider the following conversation between a human and an assistant:\n"
            f"{conversation.strip()}\n{principle.strip()}\nOptions:\n(A) {first.strip()}\n(B) {second.strip()}\n{lead}")


def check_inputs(pairs: Sequence[tuple[str, str, str]], principles: Sequence[tuple[str, str]]) -> None:
    if not principles:
        raise ValueError("principles: need at least one (id, instruction) comparison principle")
    for i, p in enumerate(principles):
        if not (isinstance(p, (tuple, list)) and len(p) == 2 and all(isinstance(x, str) and x.strip() for x in p)):
            raise ValueError(f"principles[{i}]: expected an (id, instruction) pair of non-empty strings")
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 3 and all(isinstance(x, str) for x in pair)):
            raise ValueError(f"pairs[{i}]: expected (prompt, first answer, second answer) strings")
        if not pair[0].strip() or not pair[1].strip() or not pair[2].strip():
            raise ValueError(f"pairs[{i}]: prompt and both answers must be non-empty")


def draw_principles(count: int, index: int, config: FeedbackConfig) -> list[int]:
    """Distinct principle indices for pair `index`, from a generator keyed by (seed, index): resumable."""
    rng = random.Random(f"feedback:{config.seed}:{index}")
    return rng.sample(range(count), min(config.principles_per_pair, count))


def _prob_a(logprob_a: float, logprob_b: float) -> float:
    """P(A) normalised over the two options: a sigmoid of the log-prob gap (stable for any magnitude)."""
    gap = logprob_a - logprob_b
    return 1 / (1 + math.exp(-gap)) if gap >= 0 else math.exp(gap) / (1 + math.exp(gap))


def label_batch(model: Transformer, tokenizer: Tokenizer, pairs: Sequence[tuple[str, str, str]],
                principles: Sequence[tuple[str, str]], few_shot: str, config: FeedbackConfig, *,
                first_index: int = 0, llm: LLM | None = None, progress: bool | None = False) -> list[dict]:
    """Comparison records (with provenance) for `pairs`, the first being pair number `first_index`."""
    config.validate()
    check_inputs(pairs, principles)
    orders = [(0, 1), (1, 0)] if config.position_swap else [(0, 1)]
    lead = COT_LEAD if config.chain_of_thought else ANSWER_LEAD
    plan = []  # (pair, principle index, order) per question
    texts = []
    for p, (conversation, *answers) in enumerate(pairs):
        for k in draw_principles(len(principles), first_index + p, config):
            for order in orders:
                text = build_question(conversation, principles[k][1], answers[order[0]], answers[order[1]],
                                      few_shot, lead)
                texts.append(chat_wrap(tokenizer, text, lead) if config.chat_template else text)
                plan.append((p, k, order))
    thoughts = [None] * len(texts)
    if config.chain_of_thought:
        llm = llm if llm is not None else LLM(model, tokenizer)
        # one sampling seed per question, keyed like the principle draws so a resumed run samples the same
        seeds = [random.Random(f"cot:{config.seed}:{first_index + p}:{k}:{order}").getrandbits(62) for p, k, order in plan]
        params = [SamplingParams(temperature=config.cot_temperature, max_tokens=config.cot_max_tokens,
                                 stop=COT_STOPS, seed=seed) for seed in seeds]
        outputs = llm.generate(texts, params, progress=progress)
        for q, out in enumerate(outputs):
            if out.error:
                raise ValueError(f"pairs[{first_index + plan[q][0]}]: chain of thought: {out.error}")
        thoughts = [out.text.strip() for out in outputs]
        texts = [f"{t} {thought}\n{ANSWER_LEAD}" for t, thought in zip(texts, thoughts)]
    scores = score_continuations(model, tokenizer, [(t, list(OPTIONS)) for t in texts],
                                 max_batch_tokens=config.max_batch_tokens, progress=progress, description="feedback")
    records = [{"prompt": conversation, "responses": list(answers), "votes": {}}
               for conversation, *answers in pairs]
    for (p, k, order), (logprob_a, logprob_b), thought in zip(plan, scores, thoughts):
        prob_a = _prob_a(logprob_a, logprob_b)
        first_better = prob_a if order == (0, 1) else 1 - prob_a  # P(responses[0] is the better answer)
        if config.chain_of_thought:
            first_better = min(max(first_better, config.clamp_low), config.clamp_high)
        vote = records[p]["votes"].setdefault(k, {"principle": principles[k][0], "orders": []})
        entry = {"first_as": "A" if order == (0, 1) else "B", "logprobs": [logprob_a, logprob_b],
                 "probability": first_better}
        if config.chain_of_thought:
            entry["chain_of_thought"] = thought
        vote["orders"].append(entry)
    out = []
    for p, record in enumerate(records):
        votes = list(record.pop("votes").values())
        for vote in votes:
            vote["probability"] = sum(o["probability"] for o in vote["orders"]) / len(vote["orders"])
        label = sum(v["probability"] for v in votes) / len(votes)
        out.append({**record, "soft_labels": label,
                    "feedback": {"index": first_index + p, "principles": [v["principle"] for v in votes],
                                 "votes": votes, "config": config.provenance()}})
    return out


def label_pairs(model: Transformer, tokenizer: Tokenizer, pairs: Sequence[tuple[str, str, str]],
                principles: Sequence[tuple[str, str]], few_shot: str, out_path: str | os.PathLike,
                config: FeedbackConfig | None = None, *, llm: LLM | None = None,
                progress: bool | None = None, first_index: int = 0) -> dict:
    """Label every (prompt, first, second) pair into `out_path`, appending whole records as they are done.

    Resumes: a torn last line is dropped, records already written are checked against the input pairs
    and the config, and labelling continues after them. `first_index` is the number of pairs[0] in a longer
    list this is one block of: principles are drawn by that number, so a block's labels are the ones the whole
    list would get. Returns {"written": n, "skipped": n}.
    """
    config = config or FeedbackConfig()
    config.validate()
    check_inputs(pairs, principles)
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    done = read_jsonl(out_path)
    if len(done) < len(pairs) and len(done) % config.batch_pairs:
        # a kill while a batch's records were appended: redo that whole batch, since a batch's makeup changes
        # the last bits of its scores and an unkilled run scores these pairs together
        whole = len(done) - len(done) % config.batch_pairs
        done = read_jsonl(out_path, keep=lambda r: (r.get("feedback") or {}).get("index", 0) < first_index + whole)
    if len(done) > len(pairs):
        raise ValueError(f"{out_path}: holds {len(done)} records but there are only {len(pairs)} pairs")
    for i, record in enumerate(done):
        if not isinstance(record, dict) or [record.get("prompt")] + list(record.get("responses") or []) != list(pairs[i]):
            raise ValueError(f"{out_path}:{i + 1}: the record does not match pairs[{first_index + i}]; "
                             "remove the file to relabel different pairs")
        if (record.get("feedback") or {}).get("config") != config.provenance():
            raise ValueError(f"{out_path}:{i + 1}: written with another feedback config "
                             f"({(record.get('feedback') or {}).get('config')}); remove the file to relabel")
    if config.chain_of_thought and llm is None:
        llm = LLM(model, tokenizer)  # one engine for every batch: its prefix cache keeps the few-shot prefix
    written = 0
    with tqdm(total=len(pairs), initial=len(done), desc="feedback", disable=not _show(progress)) as bar:
        # batches sit on fixed boundaries, so a resumed run packs and scores every pair exactly as an
        # uninterrupted one (other neighbours in a batch change the last bits); a batch a kill cut short is
        # scored whole again and only its missing records are written
        for start in range(len(done) - len(done) % config.batch_pairs, len(pairs), config.batch_pairs):
            batch = pairs[start:start + config.batch_pairs]
            if llm is not None:
                llm.reset_prefix_cache()  # as at the start of a resumed run
            records = label_batch(model, tokenizer, batch, principles, few_shot, config, first_index=first_index + start, llm=llm,
                                  progress=False)
            for record in records[max(0, len(done) - start):]:
                append_jsonl(out_path, record)
                written += 1
            bar.update(len(records) - max(0, len(done) - start))
    return {"written": written, "skipped": len(done)}


def _show(progress: bool | None) -> bool:
    return progress if progress is not None else sys.stderr.isatty()
