"""In-process sampling engine over the paged KV cache: continuous batching, chunked prefill, prefix
caching, preemption by recompute, n samples sharing their prompt's blocks.

It samples from the weights training updates. The trainer calls `update_weights()` after each optimizer
step: that refreshes the engine's low-precision copy of the weights in place (when it holds one) and
drops the prefix cache, whose KV came from the old weights. `sleep()` frees the KV cache while the
trainer needs the memory; `wake()` brings it back.
"""
from __future__ import annotations

import itertools
import sys
from collections import deque
from dataclasses import dataclass, field

import torch

from .._native import BlockManager
from ..ops.linear import linear
from ..ops.paged_attention import PagedBatch
from .kv_cache import PagedKVCache, blocks_for_budget
from ..model.decoder import Transformer
from .sampling import SamplingParams, draw
from ..model.tokenizer import Tokenizer


@dataclass(slots=True)
class Completion:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)            # raw: log softmax of the model's logits
    processed_logprobs: list[float] = field(default_factory=list)  # after penalties / temperature / top-k/p
    finish_reason: str | None = None                               # "stop" | "length"
    # A stop string cuts text, token_ids and both log-prob lists alike: token_ids keeps the tokens whose
    # decoded text lies wholly before the stop string (a token straddling it is dropped).


@dataclass(slots=True)
class RequestOutput:
    prompt_token_ids: list[int]
    outputs: list[Completion]
    error: str | None = None

    @property
    def text(self) -> str:
        return self.outputs[0].text if self.outputs else ""


@dataclass(slots=True, eq=False)  # compared by identity: `seq in running` must not compare token lists
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

    @property
    def length(self) -> int:  # len(tokens) without building the list (a long prompt is copied otherwise)
        return len(self.prompt) + len(self.out.token_ids)

    @property
    def last_token(self) -> int:
        return self.out.token_ids[-1] if self.out.token_ids else self.prompt[-1]

    def token_slice(self, start: int, stop: int) -> list[int]:
        p = len(self.prompt)
        return self.prompt[start:stop] + self.out.token_ids[max(start - p, 0):max(stop - p, 0)]


class LLM:
    """Sampling engine. `model` holds the weights training updates (the master weights, any dtype);
    `dtype` is the precision the engine runs in: when it differs from the model's, the engine keeps its
    own copy of the weights in that dtype (refreshed in place by `update_weights`). Attention scores,
    softmax and sampling are float32 whatever `dtype` is."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, *, dtype: torch.dtype | None = None,
                 kv_cache_bytes: int = 1 << 30, block_size: int = 16, max_batch_tokens: int = 2048,
                 max_num_seqs: int = 256, prefix_caching: bool = True):
        self.master, self.tokenizer = model, tokenizer
        self.model = model if dtype in (None, model.dtype) else _copy_in(model, dtype)
        blocks = blocks_for_budget(model.config, kv_cache_bytes, block_size, self.model.dtype)
        self.blocks = BlockManager(blocks, block_size, prefix_caching)
        self.prefix_caching = prefix_caching
        self.cache = PagedKVCache(model.config, blocks, block_size, self.model.dtype, model.device)
        self.max_batch_tokens, self.max_num_seqs = max_batch_tokens, max_num_seqs
        self.max_len = model.config.max_position_embeddings
        if model.config.sliding_window:  # the paged kernels attend the whole context: exact within the window
            self.max_len = min(self.max_len, model.config.sliding_window)
        self.vocab_size = self.model.embed_tokens.num_embeddings
        self.eos = eos_ids(tokenizer, getattr(model, "generation_config", None))
        self._ids = itertools.count()
        self._weights_version = self._master_version()
        self._reserved: dict[int, int] = {}  # blocks held back for the forks of n > 1 parents, by parent id
        self.asleep = False
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
        if self.asleep:
            raise RuntimeError("the engine is asleep (its KV cache is freed): call llm.wake() before generate()")
        if self._master_version() != self._weights_version:  # a safety net only: p.data.copy_() bumps no version
            raise RuntimeError("the model's parameters changed since the engine last read them: call "
                               "llm.update_weights() after each optimizer step")
        results: list[RequestOutput] = []
        waiting: deque[_Seq] = deque()
        for r, (prompt, p) in enumerate(zip(prompts, params)):
            try:
                ids = self.encode_prompt(prompt)
                self._validate(ids, p)
                results.append(RequestOutput(ids, [Completion() for _ in range(p.n)]))
                # an unseeded request draws its seed from the global RNG (so torch.manual_seed reproduces
                # a run); a seeded one never touches it
                seed = p.seed if p.seed is not None else int(torch.randint(0, 2**62, (1,)))
                waiting.append(self._new_seq(r, ids, p, seed, results[r].outputs[0], children=p.n - 1))
            except ValueError as e:
                results.append(RequestOutput([], [], error=str(e)))
        total = sum(len(r.outputs) for r in results)
        show = progress if progress is not None else total >= 64 and sys.stderr.isatty()
        running: list[_Seq] = []
        done = 0
        try:
            while waiting or running:
                finished = self._step(waiting, running, results)
                done += finished
                if show and finished:
                    print(f"\rgenerate: {done}/{total}", end="", file=sys.stderr, flush=True)
        finally:  # whatever stopped the loop, no sequence keeps its blocks
            for seq in itertools.chain(running, waiting):
                if self.blocks.has(seq.id):
                    self.blocks.free(seq.id)
            self._reserved.clear()
            if show:
                print(file=sys.stderr)
        return results

    @torch.no_grad()
    def update_weights(self) -> None:
        """Call after each optimizer step: the engine's copy of the weights (if it keeps one in another
        dtype) is refreshed in place from the model, and the prefix cache, whose KV the old weights
        computed, is dropped. The next generate() samples from the new weights."""
        if self.model is not self.master:
            ours = dict(self.model.named_parameters())
            for name, p in self.master.named_parameters():
                ours[name].copy_(p)
        self.reset_prefix_cache()
        self._weights_version = self._master_version()

    def sleep(self) -> None:
        """Free the KV cache's memory (e.g. while the trainer runs its backward pass); the prefix cache goes
        with it. generate() refuses to run until wake()."""
        self.reset_prefix_cache()
        self.cache.release()
        self.asleep = True

    def wake(self) -> None:
        """Allocate the KV cache again after sleep()."""
        self.cache.allocate()
        self.asleep = False

    def reset_prefix_cache(self) -> None:
        self.blocks.reset_prefix_cache()

    # ------------------------------------------------------------------ internals

    def _master_version(self) -> int:
        return sum(p._version for p in self.master.parameters())

    def _validate(self, ids: list[int], p: SamplingParams) -> None:
        """A bad request raises ValueError, which becomes that request's error; the others still run."""
        p.validate()
        if not ids:
            raise ValueError("prompt is empty")
        for what, tokens in (("prompt", ids), ("stop_token_ids", p.stop_token_ids)):
            bad = next((t for t in tokens if not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise ValueError(f"{what} holds token id {bad}, outside the model's vocabulary [0, {self.vocab_size})")
        if len(ids) >= self.max_len:
            raise ValueError(f"prompt has {len(ids)} tokens; the engine's context is {self.max_len}"
                             + (" (the model's sliding window)" if self.model.config.sliding_window else ""))
        if self._blocks_needed(ids, p.n) > self.blocks.num_blocks:
            raise ValueError("prompt does not fit in the KV cache" + (f" with its {p.n} samples" if p.n > 1 else ""))

    def _blocks_needed(self, tokens: list[int], n: int) -> int:
        """Blocks to admit a prompt: its own, plus one per extra sample when forks copy a partial last block."""
        bs = self.blocks.block_size
        return -(-len(tokens) // bs) + (n - 1) * (len(tokens) % bs != 0)

    def _free_blocks(self) -> int:
        return self.blocks.num_free - sum(self._reserved.values())

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
            if self.blocks.num_tokens(seq.id) == seq.length:
                continue  # every token has a slot already: a prefill, handled below
            while not self._can_append(seq):
                victim = running[-1]
                self._preempt(victim, running, waiting)
                if victim is seq:
                    break
            if seq not in running:
                continue  # it was the only candidate left and went back to the queue
            self.blocks.append(seq.id, seq.last_token)
            work.append((seq, 1))
            budget -= 1
        scheduled = {s.id for s, _ in work}
        for seq in running:  # continue chunked prefills
            todo = seq.length - seq.computed
            if seq.id in scheduled or todo == 0:
                continue
            if budget <= 0:
                break
            n = min(todo, budget)
            work.append((seq, n))
            budget -= n
        while waiting and budget > 0 and len(running) < self.max_num_seqs:
            seq = waiting[0]
            if (self._blocks_needed(seq.tokens, seq.children + 1) > self._free_blocks()
                    or self._prefix_in_flight(seq, running)):
                break
            waiting.popleft()
            seq.computed = self.blocks.allocate(seq.id, seq.tokens)
            if seq.children and len(seq.tokens) % self.blocks.block_size:
                self._reserved[seq.id] = seq.children  # its forks copy the partial last block: keep those free
            running.append(seq)
            n = min(seq.length - seq.computed, budget)
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

    def _can_append(self, seq: _Seq) -> bool:
        """Room for the sequence's next token without touching blocks reserved for forks."""
        return self.blocks.num_tokens(seq.id) % self.blocks.block_size != 0 or self._free_blocks() > 0

    def _preempt(self, seq: _Seq, running: list, waiting: deque) -> None:
        """Free a sequence's blocks and queue it to recompute its prompt and output so far."""
        running.remove(seq)
        self.blocks.free(seq.id)
        self._reserved.pop(seq.id, None)
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
            ids += seq.token_slice(start, start + n)
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
            if seq.computed == seq.length:  # else mid-prefill: no token yet
                ready += [(b, s) for s in [seq] + self._fork_children(seq, results, running)]
        if not ready:
            return 0
        done = sorted({b for b, _ in ready})  # n > 1 samples share their parent's row
        # the LM head runs in the engine's dtype (fp32 accumulation, fp32 logits); everything from them on is fp32
        # and stays on the model's device: only the drawn tokens and their two log-probs come back
        logits = linear(hidden[ends[done]], self.model.lm_head, out_dtype=torch.float32)
        if len(done) != len(ready):
            logits = logits[torch.tensor([done.index(b) for b, _ in ready], device=logits.device)]
        seqs = [s for _, s in ready]
        tokens, raw, chosen = draw(logits, [s.params for s in seqs],
                                   [s.tokens if s.params.repetition_penalty != 1.0 else [] for s in seqs],
                                   [s.out.token_ids for s in seqs], [self._banned(s) for s in seqs],
                                   [s.generator for s in seqs])
        return sum(self._append(s, t, raw[i], chosen[i], running) for i, (s, t) in enumerate(zip(seqs, tokens)))

    def _fork_children(self, seq: _Seq, results, running) -> list[_Seq]:
        self._reserved.pop(seq.id, None)  # the forks below take the blocks held back for them
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

    def _cut_at_text(self, out: Completion, text: str, stops: set[int]) -> None:
        """Keep the longest run of leading tokens whose text lies within `text` (the output cut before a
        stop string), so a trainer never scores tokens the text does not hold."""
        keep = len(out.token_ids)
        while keep and not text.startswith(self.tokenizer.decode(
                [t for t in out.token_ids[:keep] if t not in stops], skip_special_tokens=True)):
            keep -= 1
        del out.token_ids[keep:], out.logprobs[keep:], out.processed_logprobs[keep:]

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
                self._cut_at_text(out, text, stops)
        if reason is None and (len(out.token_ids) >= p.max_tokens or seq.length >= self.max_len):
            reason = "length"
        if reason is None:
            return 0
        out.text = text if text is not None else self._text(out, stops)
        out.finish_reason = reason
        running.remove(seq)
        self.blocks.free(seq.id)
        return 1


def eos_ids(tokenizer: Tokenizer, generation_config: dict | None) -> set[int]:
    """Every id that ends a generation: the tokenizer's EOS and the checkpoint's generation_config.json
    `eos_token_id` (an id or a list: Llama-3-Instruct ends turns with <|eot_id|>, not <|end_of_text|>)."""
    ids = {tokenizer.eos_id}
    extra = (generation_config or {}).get("eos_token_id")
    ids |= set(extra) if isinstance(extra, (list, tuple)) else {extra}
    return {int(i) for i in ids if i is not None}


@torch.no_grad()
def _copy_in(model: Transformer, dtype: torch.dtype) -> Transformer:
    """The engine's own copy of the model's weights in `dtype` (RoPE frequencies stay float32), built
    without a second full-precision copy."""
    with torch.device("meta"):
        copy = Transformer(model.config)
    copy = copy.to(dtype=dtype).to_empty(device=model.device).eval().requires_grad_(False)
    ours = dict(copy.named_parameters())
    for name, p in model.named_parameters():
        ours[name].copy_(p)
    copy.inv_freq = model.inv_freq.float().clone()
    copy.generation_config = getattr(model, "generation_config", {})
    copy.use_flash_attn = model.use_flash_attn
    return copy
