"""In-process sampling engine over the paged KV cache: continuous batching, chunked prefill, prefix
caching, preemption by recompute, n samples sharing their prompt's blocks.

It runs on the very model object training updates: when any parameter changed since the last call
(an optimizer step bumps tensor versions), the prefix cache is dropped before sampling.
"""
from __future__ import annotations

import itertools
import sys
from collections import deque
from dataclasses import dataclass, field

import torch

from .._native import BlockManager
from ..ops.paged_attention import PagedBatch
from .kv_cache import PagedKVCache, blocks_for_budget
from ..model.decoder import Transformer
from .sampling import SamplingParams, process_logits, sample
from ..model.tokenizer import Tokenizer


@dataclass(slots=True)
class Completion:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)            # raw: log softmax of the model's logits
    processed_logprobs: list[float] = field(default_factory=list)  # after penalties / temperature / top-k/p
    finish_reason: str | None = None                               # "stop" | "length"


@dataclass(slots=True)
class RequestOutput:
    prompt_token_ids: list[int]
    outputs: list[Completion]
    error: str | None = None

    @property
    def text(self) -> str:
        return self.outputs[0].text if self.outputs else ""


@dataclass(slots=True)
class _Seq:
    id: int
    request: int
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator
    out: Completion
    computed: int = 0            # tokens whose KV is in the cache
    children: int = 0            # samples still to fork off this one after its prefill (n > 1)

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.out.token_ids


class LLM:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, *, kv_cache_bytes: int = 1 << 30,
                 block_size: int = 16, max_batch_tokens: int = 2048, max_num_seqs: int = 256,
                 prefix_caching: bool = True):
        self.model, self.tokenizer = model, tokenizer
        blocks = blocks_for_budget(model.config, kv_cache_bytes, block_size, model.dtype)
        self.blocks = BlockManager(blocks, block_size, prefix_caching)
        self.prefix_caching = prefix_caching
        self.cache = PagedKVCache(model.config, blocks, block_size, model.dtype, model.device)
        self.max_batch_tokens, self.max_num_seqs = max_batch_tokens, max_num_seqs
        self.max_len = model.config.max_position_embeddings
        if model.config.sliding_window:  # the paged kernels attend the whole context: exact within the window
            self.max_len = min(self.max_len, model.config.sliding_window)
        self.eos = {tokenizer.eos_id} - {None}
        self._ids = itertools.count()
        self._weights_version = None
        self.preemptions = 0

    # ------------------------------------------------------------------ public

    def encode_prompt(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
            text = self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
            return self.tokenizer.encode(text, add_special_tokens=False)
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return list(prompt)
        raise ValueError("a prompt is a string, a list of chat messages, or a list of token ids")

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None,
                 progress: bool | None = None) -> list[RequestOutput]:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        params = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} SamplingParams for {len(prompts)} prompts")
        self._drop_stale_prefix_cache()
        results: list[RequestOutput] = []
        waiting: deque[_Seq] = deque()
        for r, (prompt, p) in enumerate(zip(prompts, params)):
            try:
                ids = self.encode_prompt(prompt)
                p.validate()
                if not ids:
                    raise ValueError("prompt is empty")
                if len(ids) >= self.max_len:
                    raise ValueError(f"prompt has {len(ids)} tokens; the engine's context is {self.max_len}"
                                     + (" (the model's sliding window)" if self.model.config.sliding_window else ""))
                if -(-len(ids) // self.blocks.block_size) > self.blocks.num_blocks:
                    raise ValueError("prompt does not fit in the KV cache")
                results.append(RequestOutput(ids, [Completion() for _ in range(p.n)]))
                seed = p.seed if p.seed is not None else int(torch.randint(0, 2**62, (1,)))
                waiting.append(self._new_seq(r, ids, p, seed, results[r].outputs[0], children=p.n - 1))
            except ValueError as e:
                results.append(RequestOutput([], [], error=str(e)))
        total = sum(len(r.outputs) for r in results)
        show = progress if progress is not None else total >= 64 and sys.stderr.isatty()
        running: list[_Seq] = []
        done = 0
        while waiting or running:
            finished = self._step(waiting, running, results)
            done += finished
            if show and finished:
                print(f"\rgenerate: {done}/{total}", end="", file=sys.stderr, flush=True)
        if show:
            print(file=sys.stderr)
        return results

    def reset_prefix_cache(self) -> None:
        self.blocks.reset_prefix_cache()

    # ------------------------------------------------------------------ internals

    def _drop_stale_prefix_cache(self) -> None:
        version = sum(p._version for p in self.model.parameters())
        if self._weights_version is not None and version != self._weights_version:
            self.reset_prefix_cache()
        self._weights_version = version

    def _new_seq(self, request, prompt, params, seed, out, children=0) -> _Seq:
        gen = torch.Generator().manual_seed(seed)
        return _Seq(next(self._ids), request, list(prompt), params, gen, out, children=children)

    def _schedule(self, waiting: deque, running: list) -> list[tuple[_Seq, int]]:
        """(sequence, number of new tokens) for this step: decodes first, then prefill chunks."""
        budget = self.max_batch_tokens
        work = []
        for seq in list(running):
            if seq not in running:
                continue  # preempted to make room for a sequence before it
            if self.blocks.num_tokens(seq.id) == len(seq.tokens):
                continue  # every token has a slot already: a prefill, handled below
            while not self.blocks.can_append(seq.id):
                victim = running[-1]
                self._preempt(victim, running, waiting)
                if victim is seq:
                    break
            if seq not in running:
                continue  # it was the only candidate left and went back to the queue
            self.blocks.append(seq.id, seq.tokens[-1])
            work.append((seq, 1))
            budget -= 1
        scheduled = {s.id for s, _ in work}
        for seq in running:  # continue chunked prefills
            todo = len(seq.tokens) - seq.computed
            if seq.id in scheduled or todo == 0:
                continue
            if budget <= 0:
                break
            n = min(todo, budget)
            work.append((seq, n))
            budget -= n
        while waiting and budget > 0 and len(running) < self.max_num_seqs:
            seq = waiting[0]
            if not self.blocks.can_allocate(seq.tokens) or self._prefix_in_flight(seq, running):
                break
            waiting.popleft()
            seq.computed = self.blocks.allocate(seq.id, seq.tokens)
            running.append(seq)
            n = min(len(seq.tokens) - seq.computed, budget)
            work.append((seq, n))
            budget -= n
        return work

    def _prefix_in_flight(self, seq: _Seq, running: list) -> bool:
        """Whether a running prefill is still computing blocks this sequence could share: admitting it
        now would recompute them (and its copies would not be shared by the batch's cascade attention)."""
        if not self.prefix_caching:
            return False
        bs, tokens = self.blocks.block_size, seq.tokens
        for other in running:
            if other.computed >= len(other.prompt) + len(other.out.token_ids):
                continue  # prefill done: its blocks are in the prefix cache already
            theirs = other.tokens
            if theirs[:bs] != tokens[:bs]:
                continue
            shared = next((i for i, (a, b) in enumerate(zip(tokens, theirs)) if a != b), min(len(tokens), len(theirs)))
            if shared // bs > other.computed // bs:
                return True
        return False

    def _preempt(self, seq: _Seq, running: list, waiting: deque) -> None:
        """Free a sequence's blocks and queue it to recompute its prompt and output so far."""
        running.remove(seq)
        self.blocks.free(seq.id)
        seq.computed = 0
        waiting.appendleft(seq)
        self.preemptions += 1

    @torch.no_grad()
    def _step(self, waiting: deque, running: list, results: list[RequestOutput]) -> int:
        work = self._schedule(waiting, running)
        if not work:
            raise RuntimeError("the KV cache cannot hold even one sequence; raise kv_cache_bytes")
        ids, pos, slots, lens = [], [], [], []
        bs = self.blocks.block_size
        block_tables = [self.blocks.block_table(seq.id) for seq, _ in work]
        for (seq, n), table in zip(work, block_tables):
            start = seq.computed
            ids += seq.tokens[start:start + n]
            pos += range(start, start + n)
            slots += [table[p // bs] * bs + p % bs for p in range(start, start + n)]
            lens.append(start + n)
        tables = torch.zeros(len(work), max(map(len, block_tables)), dtype=torch.int32)
        for b, table in enumerate(block_tables):
            tables[b, : len(table)] = torch.tensor(table, dtype=torch.int32)
        dev = self.model.device
        batch = PagedBatch(self.cache, torch.tensor(slots, device=dev), tables.to(dev),
                           torch.tensor(lens, dtype=torch.int32, device=dev), [n for _, n in work])
        hidden = self.model(torch.tensor([ids], device=dev), position_ids=torch.tensor([pos], device=dev),
                            paged=batch)[0]
        ends = torch.tensor([n for _, n in work], device=dev).cumsum(0) - 1
        ready = []  # sequences whose prompt is fully computed: each samples a token this step
        for b, (seq, n) in enumerate(work):
            seq.computed += n
            self.blocks.mark_computed(seq.id, seq.computed)
            if seq.computed == len(seq.tokens):  # else mid-prefill: no token yet
                ready += [(b, s) for s in [seq] + self._fork_children(seq, results, running)]
        if not ready:
            return 0
        done = sorted({b for b, _ in ready})  # n > 1 samples share their parent's row
        logits = (hidden[ends[done]] @ self.model.lm_head.T).float().cpu()
        logits = logits[[done.index(b) for b, _ in ready]]
        raw_logprobs = logits.log_softmax(-1)
        seqs = [s for _, s in ready]
        processed = process_logits(logits, [s.params for s in seqs],
                                   [s.tokens if s.params.repetition_penalty != 1.0 else [] for s in seqs],
                                   [s.out.token_ids for s in seqs], [self._banned(s) for s in seqs])
        tokens = sample(processed, [s.generator for s in seqs])
        return sum(self._append(s, t, float(raw_logprobs[i, t]), float(processed[i, t]), running)
                   for i, (s, t) in enumerate(zip(seqs, tokens)))

    def _fork_children(self, seq: _Seq, results, running) -> list[_Seq]:
        kids = []
        for k in range(seq.children):
            out = results[seq.request].outputs[len(results[seq.request].outputs) - seq.children + k]
            child = self._new_seq(seq.request, seq.prompt, seq.params, seq.generator.initial_seed() + k + 1, out)
            self.cache.copy_blocks(self.blocks.fork(seq.id, child.id))
            child.computed = seq.computed
            running.append(child)
            kids.append(child)
        seq.children = 0
        return kids

    def _text(self, out: Completion, stops: set[int]) -> str:
        return self.tokenizer.decode([t for t in out.token_ids if t not in stops], skip_special_tokens=True)

    def _banned(self, seq: _Seq) -> list[int]:
        p = seq.params
        if len(seq.out.token_ids) >= p.min_tokens:
            return []
        return sorted((set() if p.ignore_eos else self.eos) | set(p.stop_token_ids))

    def _append(self, seq: _Seq, token: int, logprob: float, processed_logprob: float, running: list) -> int:
        """Record a sampled token; finish the sequence on a stop token, stop string or length (returns 1)."""
        p, out = seq.params, seq.out
        out.token_ids.append(token)
        out.logprobs.append(logprob)
        out.processed_logprobs.append(processed_logprob)
        stops = set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos)
        reason, text = None, None
        if token in stops:  # banned until min_tokens, so only sampled after it
            reason = "stop"
        elif p.stop:  # stop strings need the text so far
            text = self._text(out, stops)
            hits = [text.find(s) for s in p.stop if s in text]
            if hits:
                text, reason = text[:min(hits)], "stop"
        if reason is None and (len(out.token_ids) >= p.max_tokens or len(seq.tokens) >= self.max_len):
            reason = "length"
        if reason is None:
            return 0
        out.text = text if text is not None else self._text(out, stops)
        out.finish_reason = reason
        running.remove(seq)
        self.blocks.free(seq.id)
        return 1
