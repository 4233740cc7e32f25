"""The SL-CAI critique -> revision loop over the sampling engine.

For each prompt: an initial answer through the model's chat template, then R rounds, each under a principle
drawn at random: a critique of the latest answer, then a revision. Critiques and revisions are written in
the paper's transcript format with the constitution's few-shot examples in front:

    <few-shot transcripts>\\n\\nHuman: {prompt}\\n\\nAssistant: {initial}
    \\n\\nCritiqueRequest: {request}\\n\\nCritique: {critique}\\n\\nRevisionRequest: {request}\\n\\nRevision: {revision}
    \\n\\nCritiqueRequest: ...                                   (next round, appended to the same history)

Every request of a round goes to the engine in one `generate` call for the whole batch of prompts. Each
conversation's token ids are built by appending separately encoded pieces, so every prompt of round r+1
starts with the exact ids of its prompt in round r, and all start with the same few-shot ids: the engine's
prefix cache serves them (the hit rate is logged).

Randomness is derived from (seed, prompt id, what), never from the batch: the principles drawn and every
sample of a prompt are the same whichever prompts share its batch, so a resumed run equals an
uninterrupted one. Records go to JSONL one whole prompt at a time (`cai_engine.io.append_jsonl`).
"""
from __future__ import annotations

import hashlib
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from ..data.prompts import Prompt
from ..engine import LLM, SamplingParams
from ..io import append_jsonl, read_jsonl
from ..model.tokenizer import Tokenizer
from .constitution import Constitution, CritiqueExample, CritiquePrinciple

# A critique or revision ends where the model starts the next section of the transcript on its own.
STOPS = ["CritiqueRequest:", "RevisionRequest:", "\nHuman:", "\nAssistant:", "\nUser:", "\nCritique:", "\nRevision:"]


@dataclass(slots=True)
class CritiqueConfig:
    rounds: int = 4                 # critique -> revision rounds per prompt (the paper's default)
    max_new_tokens: int = 256       # per generation (initial answer, each critique, each revision)
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int = 0
    limit: int = 0                  # only the first N prompts; 0 = all
    revise_only: bool = False       # revise directly from the revision request, without a critique
    few_shot: int = -1              # how many few-shot examples go in front; -1 = all of the constitution's
    batch_size: int = 64            # prompts whose rounds are generated together; records land after each batch

    def validate(self) -> None:
        checks = [(self.rounds >= 1, "rounds must be >= 1"), (self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
                  (self.temperature >= 0, "temperature must be >= 0"), (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
                  (self.limit >= 0, "limit must be >= 0 (0 = all)"), (self.few_shot >= -1, "few_shot must be >= -1"),
                  (self.batch_size >= 1, "batch_size must be >= 1")]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"critique config: {message}")


@dataclass(slots=True)
class CritiqueStats:
    prompts: int = 0                # prompts finished by this call
    skipped: int = 0                # prompts already in the output (resume)
    generations: int = 0
    generated_tokens: int = 0
    prompt_tokens: int = 0          # tokens of every request sent to the engine
    prefix_hit_tokens: int = 0      # of those, tokens whose KV came from the prefix cache
    seconds: float = 0.0

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


# ---------------------------------------------------------------------- prompt format

def render_conversation(context, prompt: str, answer: str) -> str:
    turns = "".join(f"\n\n{'Human' if role == 'user' else 'Assistant'}: {content.strip()}"
                    for role, content in context if role != "system")
    return f"{turns}\n\nHuman: {prompt.strip()}\n\nAssistant: {answer.strip()}"


def hh_prompt(prompt: Prompt) -> str:
    """The conversation as the feedback model and the PM read it: "\\n\\nHuman: ...\\n\\nAssistant:"."""
    return render_conversation(prompt.context, prompt.text, "").rstrip()


def critique_request(principle: CritiquePrinciple | CritiqueExample) -> str:
    return f"\n\nCritiqueRequest: {principle.critique_request}\n\nCritique:"


def revision_request(principle: CritiquePrinciple | CritiqueExample) -> str:
    return f"\n\nRevisionRequest: {principle.revision_request}\n\nRevision:"


def render_example(example: CritiqueExample, revise_only: bool = False) -> str:
    text = render_conversation(example.context, example.prompt, example.response)
    if not revise_only:
        text += critique_request(example) + " " + example.critique
    return text + revision_request(example) + " " + example.revision


def few_shot_prefix(constitution: Constitution, count: int = -1, revise_only: bool = False) -> str:
    examples = constitution.critique_few_shot if count < 0 else constitution.critique_few_shot[:count]
    return "".join(render_example(e, revise_only) for e in examples)


# ---------------------------------------------------------------------- the loop

def derive_seed(seed: int, prompt_id: str, what: str) -> int:
    """A 62-bit seed from (run seed, prompt id, what it is for): independent of batching and order."""
    digest = hashlib.sha256(f"{seed}\x00{prompt_id}\x00{what}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2


def draw_principles(constitution: Constitution, config: CritiqueConfig, prompt_id: str) -> list[str]:
    """The principle of each round for one prompt: distinct while the constitution has enough of them."""
    rng = random.Random(derive_seed(config.seed, prompt_id, "principles"))
    ids = [p.id for p in constitution.critique_principles]
    return rng.sample(ids, config.rounds) if config.rounds <= len(ids) else [rng.choice(ids) for _ in range(config.rounds)]


@dataclass(slots=True)
class _Conversation:
    prompt: Prompt
    principles: list[str]
    ids: list[int] = field(default_factory=list)     # the transcript so far, as token ids
    answer: str = ""                                 # the latest answer (initial or revision)
    record: dict = field(default_factory=dict)
    alive: bool = True                               # false once a request failed (too long for the context)

    def flag(self, kind: str, where: str) -> None:
        self.record["flags"].setdefault(kind, []).append(where)


def run_critique(llm: LLM, tokenizer: Tokenizer, constitution: Constitution, prompts: list[Prompt],
                 config: CritiqueConfig, out_path: str | Path, log: Callable[[dict], None] | None = None,
                 model_name: str = "", progress: bool = False) -> CritiqueStats:
    """Critique and revise every prompt not yet in `out_path` (JSONL, one record per prompt, in prompt order);
    `progress`: a bar over the prompts, moved after each batch."""
    config.validate()
    log = log or _print_metrics
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    settings = {"model": model_name, "constitution": constitution.source, "seed": config.seed,
                "num_rounds": config.rounds, "revise_only": config.revise_only, "few_shot": config.few_shot,
                "sampling": {"temperature": config.temperature, "top_p": config.top_p,
                             "max_new_tokens": config.max_new_tokens}}
    done = _check_resume(read_jsonl(out_path), settings, out_path)
    selected = prompts[: config.limit] if config.limit else prompts
    stats = CritiqueStats(skipped=sum(p.id in done for p in selected))
    prefix = few_shot_prefix(constitution, config.few_shot, config.revise_only)
    # encoded once: every conversation's ids start with exactly these (BOS, where the model has one, first)
    prefix_ids = tokenizer.encode(prefix, add_special_tokens=True) if prefix else []
    start = time.perf_counter()
    bar = tqdm(total=len(selected), initial=stats.skipped, desc="critique", unit="prompt", disable=not progress)
    # batches sit on fixed boundaries of the prompt list, so a resumed run generates every prompt in the same
    # company as an uninterrupted one; a batch a kill cut short runs whole again and writes what is missing
    for first in range(0, len(selected), config.batch_size):
        batch = selected[first: first + config.batch_size]
        if all(p.id in done for p in batch):
            continue
        # every batch starts from an empty prefix cache, as the first batch of a resumed run does: a cached
        # prefix and a recomputed one can differ in the last bits, enough to flip a sampled token
        llm.reset_prefix_cache()
        conversations = _run_batch(llm, tokenizer, constitution, batch, config, prefix_ids, settings, stats)
        missing = [c for c in conversations if c.prompt.id not in done]
        for c in missing:
            append_jsonl(out_path, c.record)
        stats.prompts += len(missing)
        stats.seconds = time.perf_counter() - start
        bar.update(len(missing))
        log({"stage": "critique", "prompts_done": stats.skipped + stats.prompts, "prompts_total": len(selected),
             "generations": stats.generations, "generated_tokens": stats.generated_tokens,
             "prompt_tokens": stats.prompt_tokens, "prefix_hit_tokens": stats.prefix_hit_tokens,
             "prefix_hit_rate": round(stats.prefix_hit_rate, 4), "seconds": round(stats.seconds, 2)})
    bar.close()
    return stats


def _run_batch(llm, tokenizer, constitution, batch, config, prefix_ids, settings, stats) -> list[_Conversation]:
    conversations = []
    for p in batch:
        record = {"id": p.id, "prompt": p.text, "context": [{"role": r, "content": c} for r, c in p.context],
                  "kind": p.kind, "category": p.category, "initial": "", "rounds": [], "final": "", "flags": {},
                  **settings}
        conversations.append(_Conversation(p, draw_principles(constitution, config, p.id), record=record))

    outs = _generate(llm, [c.prompt.messages() for c in conversations], conversations, "initial", config, [], stats)
    for c, out in zip(conversations, outs):
        if out is None:
            continue
        c.answer = c.record["initial"] = out.text.strip()
        _flag_output(c, out, "initial", c.prompt.text)
        c.ids = prefix_ids + _encode(tokenizer, render_conversation(c.prompt.context, c.prompt.text, c.answer),
                                     first=not prefix_ids)

    for r in range(config.rounds):
        live = [c for c in conversations if c.alive]
        principles = [constitution.critique_principle(c.principles[r]) for c in live]
        critiques = [""] * len(live)
        if not config.revise_only:
            for c, p in zip(live, principles):
                c.ids = c.ids + _encode(tokenizer, critique_request(p))
            outs = _generate(llm, [c.ids for c in live], live, f"critique {r + 1}", config, STOPS, stats)
            for i, (c, p, out) in enumerate(zip(live, principles, outs)):
                if out is None:
                    continue
                critiques[i] = out.text.strip()
                _flag_output(c, out, f"critique {r + 1}", p.critique_request)
                c.ids = c.ids + _encode(tokenizer, " " + critiques[i])
        for c, p in zip(live, principles):
            if c.alive:
                c.ids = c.ids + _encode(tokenizer, revision_request(p))
        still = [(c, p, crit) for c, p, crit in zip(live, principles, critiques) if c.alive]
        outs = _generate(llm, [c.ids for c, _, _ in still], [c for c, _, _ in still], f"revision {r + 1}", config,
                         STOPS, stats)
        for (c, p, crit), out in zip(still, outs):
            if out is None:
                continue
            revision = out.text.strip()
            _flag_output(c, out, f"revision {r + 1}", p.revision_request)
            if _normalise(revision) == _normalise(c.answer):
                c.flag("unchanged", f"revision {r + 1}")
            c.record["rounds"].append({"principle": p.id, "critique": crit, "revision": revision})
            c.answer = revision
            c.ids = c.ids + _encode(tokenizer, " " + revision)
    for c in conversations:
        c.record["final"] = c.answer
    return conversations


def _generate(llm: LLM, requests: list, conversations: list[_Conversation], what: str, config: CritiqueConfig,
              stop: list[str], stats: CritiqueStats) -> list:
    """One engine call for a whole round; a request the engine rejects (too long) ends its conversation."""
    if not requests:
        return []
    params = [SamplingParams(temperature=config.temperature, top_p=config.top_p, max_tokens=config.max_new_tokens,
                             seed=derive_seed(config.seed, c.prompt.id, what), stop=list(stop)) for c in conversations]
    hits_before = llm.blocks.hit_tokens
    outs = llm.generate(requests, params)
    stats.prefix_hit_tokens += llm.blocks.hit_tokens - hits_before
    results = []
    for c, o in zip(conversations, outs):
        stats.prompt_tokens += len(o.prompt_token_ids)
        if o.error:
            c.alive = False
            c.flag("error", f"{what}: {o.error}")
            results.append(None)
            continue
        stats.generations += 1
        stats.generated_tokens += len(o.outputs[0].token_ids)
        results.append(o.outputs[0])
    return results


def _encode(tokenizer: Tokenizer, text: str, first: bool = False) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=first)


def _normalise(text: str) -> str:
    return re.sub(r"\W+", " ", text.lower()).strip()


def _flag_output(c: _Conversation, out, where: str, request: str) -> None:
    """Degenerate outputs, flagged for the SFT filter: empty, cut at max tokens, echoing the request."""
    text, asked = _normalise(out.text), _normalise(request)
    if not text:
        c.flag("empty", where)
    if out.finish_reason == "length":
        c.flag("cut", where)
    if text and asked and (text == asked or (len(asked) >= 20 and asked in text)):
        c.flag("echo", where)


def _check_resume(records: list[dict], settings: dict, path: Path) -> set[str]:
    for i, r in enumerate(records):
        for key, value in settings.items():
            if r.get(key) != value:
                raise ValueError(f"{path}: record {i + 1} was made with {key}={r.get(key)!r}, this run has "
                                 f"{value!r}; resume with the same settings or write to a new path")
    return {r["id"] for r in records}


def _print_metrics(metrics: dict) -> None:
    print(f"critique: {metrics['prompts_done']}/{metrics['prompts_total']} prompts, "
          f"{metrics['generated_tokens']} tokens generated, prefix-cache hit rate "
          f"{100 * metrics['prefix_hit_rate']:.1f}% of {metrics['prompt_tokens']} prompt tokens, "
          f"{metrics['seconds']:.1f}s", file=sys.stderr, flush=True)
