"""The decoder over the paged KV cache: batched prefill (chunked, over cached prefixes) and decode steps
give the same greedy tokens and logits as recomputing every sequence from scratch."""
import torch

from cai_engine._native import BlockManager
from cai_engine.engine.kv_cache import PagedKVCache
from cai_engine.ops.paged_attention import PagedBatch
from conftest import hf_and_ours

BS = 4


class Runner:
    def __init__(self, model, num_blocks=64, prefix_caching=True):
        self.model = model
        self.bm = BlockManager(num_blocks, BS, prefix_caching)
        self.cache = PagedKVCache(model.config, num_blocks, BS, torch.float32, "cpu")

    def step(self, work):
        """work: [(seq id, new tokens)] -> last-position logits per sequence."""
        ids, pos, slots, lens, qlens = [], [], [], [], []
        for seq, toks in work:
            start = self.bm.num_tokens(seq) - len(toks)
            ids += toks
            pos += range(start, start + len(toks))
            slots += [self.bm.slot(seq, p) for p in range(start, start + len(toks))]
            lens.append(self.bm.num_tokens(seq))
            qlens.append(len(toks))
        width = max(len(self.bm.block_table(s)) for s, _ in work)
        tables = torch.zeros(len(work), width, dtype=torch.int32)
        for b, (s, _) in enumerate(work):
            t = self.bm.block_table(s)
            tables[b, : len(t)] = torch.tensor(t)
        batch = PagedBatch(self.cache, torch.tensor(slots), tables, torch.tensor(lens), qlens)
        with torch.no_grad():
            h = self.model(torch.tensor([ids]), position_ids=torch.tensor([pos]), paged=batch)[0]
        ends = torch.tensor(qlens).cumsum(0) - 1
        return h[ends] @ self.model.lm_head.T


def reference_greedy(model, prompt, steps):
    ids = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(model.logits(torch.tensor([ids]))[0, -1].argmax())
            out.append(nxt)
            ids.append(nxt)
    return out


def test_batched_prefill_and_decode_equal_full_recompute():
    _, model = hf_and_ours("qwen2", False, seed=11)
    prompts = [[5, 6, 7], list(range(10, 27)), [9] * 9, [1]]
    runner = Runner(model)
    for s, p in enumerate(prompts):
        runner.bm.allocate(s, p)
    logits = runner.step([(s, p) for s, p in enumerate(prompts)])
    outs = [[int(t)] for t in logits.argmax(-1)]
    for _ in range(6):
        work = []
        for s, o in enumerate(outs):
            runner.bm.append(s, o[-1])
            work.append((s, [o[-1]]))
        for s, t in enumerate(runner.step(work).argmax(-1)):
            outs[s].append(int(t))
    for s, p in enumerate(prompts):
        assert outs[s] == reference_greedy(model, p, 7), s


def test_chunked_prefill_and_cached_prefix_give_the_same_logits():
    _, model = hf_and_ours("llama", True, seed=12)
    prompt = list(range(30, 52))                    # 22 tokens
    runner = Runner(model)
    runner.bm.allocate(0, prompt)
    full = runner.step([(0, prompt)])
    runner.bm.mark_computed(0, len(prompt))
    # the same prompt again: 20 tokens (5 full blocks) come from the prefix cache
    cached = runner.bm.allocate(1, prompt)
    assert cached == 20 and runner.bm.hit_tokens == 20
    again = runner.step([(1, prompt[cached:])])
    torch.testing.assert_close(again, full, atol=1e-4, rtol=1e-4)
    # a prompt processed in two chunks (the scheduler's chunked prefill)
    other = Runner(model, prefix_caching=False)
    other.bm.allocate(0, prompt)
    # fill the first 9 positions' KV, then the rest; the block manager already holds all 22 slots
    ids, pos = prompt[:9], list(range(9))
    slots = torch.tensor([other.bm.slot(0, p) for p in pos])
    table = torch.tensor([other.bm.block_table(0)], dtype=torch.int32)
    with torch.no_grad():
        model(torch.tensor([ids]), position_ids=torch.tensor([pos]),
              paged=PagedBatch(other.cache, slots, table, torch.tensor([9]), [9]))
        pos2 = list(range(9, 22))
        slots2 = torch.tensor([other.bm.slot(0, p) for p in pos2])
        h = model(torch.tensor([prompt[9:]]), position_ids=torch.tensor([pos2]),
                  paged=PagedBatch(other.cache, slots2, table, torch.tensor([22]), [13]))[0]
    torch.testing.assert_close(h[-1:] @ model.lm_head.T, full, atol=1e-4, rtol=1e-4)
