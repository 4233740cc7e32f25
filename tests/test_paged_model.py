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


# ---------------------------------------------------------------- a decode step's layers as one native call each

import copy  # noqa: E402

import pytest  # noqa: E402

from cai_engine import LLM, SamplingParams, _native  # noqa: E402
from cai_engine.model import decoder as decoder_mod  # noqa: E402
from cai_engine.ops import linear as linear_mod  # noqa: E402
from conftest import tiny_tokenizer  # noqa: E402


@pytest.mark.skipif(not _native.bf16_kernels_available(), reason="CPU lacks AVX512-BF16")
@pytest.mark.parametrize("amx", ["1", "0"])
def test_fused_decode_layers_equal_the_per_op_path_and_float64(monkeypatch, amx):
    """bf16 engine, 16-token blocks, head_dim 32: pure decode steps run each layer as one native call (plain and
    cascade over a shared 64-token prefix). Greedy tokens equal the per-op path's, log-probs within 2e-3 of it (the
    same kernels and rounding points; only the fp32 merge of the cascade partials is written differently, which
    may flip a bf16 rounding), and each within 0.02 nats of a float64 recompute over the same bf16 weights (several
    bf16 roundings of the hidden state through 2 layers; the per-op path is held to the same bound)."""
    if amx == "1" and not _native.amx_available():
        pytest.skip("CPU lacks AMX-BF16")
    monkeypatch.setenv("CAI_ENGINE_AMX", amx)
    monkeypatch.setattr(linear_mod, "tiles_preferred", lambda: True)
    _, model = hf_and_ours("qwen2", False, seed=14, hidden_size=64, num_attention_heads=2, num_key_value_heads=1,
                           intermediate_size=96, max_position_embeddings=256)
    model = model.to(torch.bfloat16)
    calls = []
    real = _native.decode_layer
    monkeypatch.setattr(_native, "decode_layer", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    shared = list(range(20, 84))                                     # 4 full blocks: a cascade group
    prompts = [list(range(5, 12)), shared + list(range(100, 112)), shared + [3] * 15, shared + list(range(200, 220))]
    fused = greedy_jobs(model, prompts, block_size=16)
    assert len(calls) >= 2 * 11 * 2                                  # 2 layers x 11 decode steps x 2 jobs
    monkeypatch.setattr(decoder_mod, "fusable", lambda *a: False)
    calls.clear()
    per_op = greedy_jobs(model, prompts, block_size=16)
    assert not calls
    assert_agree_and_exact(model, prompts, fused, per_op, agree=2e-3, exact=2e-2)


def greedy_jobs(model, prompts, block_size):
    """(token ids, log-probs) of 12 greedy tokens per prompt: the first prompt alone, then the rest as one job."""
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    llm = LLM(model, tiny_tokenizer(), kv_cache_bytes=1 << 22, block_size=block_size)
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in llm.generate([prompts[0]], params)
            + llm.generate(prompts[1:], params)]


def assert_agree_and_exact(model, prompts, fused, per_op, agree, exact):
    """The fused and per-op runs' greedy tokens are equal, their log-probs within `agree` of each other and each
    within `exact` of a float64 recompute over the same weights."""
    ref = copy.deepcopy(model).double()
    for prompt, (tokens, logprobs), (tokens_op, logprobs_op) in zip(prompts, fused, per_op):
        assert tokens == tokens_op
        torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(logprobs_op), atol=agree, rtol=0)
        with torch.no_grad():
            z = ref.logits(torch.tensor([prompt + tokens]))[0, len(prompt) - 1:-1].log_softmax(-1)
        want = z.gather(1, torch.tensor(tokens)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(logprobs, dtype=torch.float64), want, atol=exact, rtol=0)
        torch.testing.assert_close(torch.tensor(logprobs_op, dtype=torch.float64), want, atol=exact, rtol=0)


@pytest.mark.skipif(not _native.bf16_kernels_available(), reason="CPU lacks AVX512-BF16")
def test_fused_decode_layer_names_bad_inputs():
    i16 = lambda t: t.view(torch.int16).numpy()
    d, H, KV, D, I, T = 64, 2, 1, 32, 96, 2
    bf = lambda *shape: torch.zeros(*shape).bfloat16()
    weights = [bf(H * D, d), bf(KV * D, d), bf(KV * D, d), bf(d, H * D), bf(I, d), bf(I, d), bf(d, I)]
    cache = bf(8, 16, KV, D)
    rot = torch.zeros(T, D).numpy()

    def call(weights=weights, tables=((0, 1), (2, 3)), lens=(20, 20), shared=0):
        _native.decode_layer(i16(bf(T, d)), [i16(w) for w in weights], [None] * 3, torch.ones(d).numpy(),
                             torch.ones(d).numpy(), 1e-5, rot, rot, i16(cache), i16(cache),
                             torch.tensor([19, 35]).numpy(), torch.tensor(tables, dtype=torch.int32).numpy(),
                             torch.tensor(lens, dtype=torch.int32).numpy(), shared, H, 0.2)

    call()  # well formed
    with pytest.raises(ValueError, match=r"down_weight: expected size 96 on axis 1, got 95"):
        call(weights=weights[:6] + [bf(d, I - 1)])
    with pytest.raises(ValueError, match=r"block_tables\[1\]\[1\] is not a block of the cache"):
        call(tables=((0, 1), (2, 9)))
    with pytest.raises(ValueError, match="shared_blocks: row 1 does not share them"):
        call(shared=1)


needs_avx2 = pytest.mark.skipif(not _native.linear_f32_available(), reason="CPU lacks AVX2 + FMA")


@needs_avx2
@pytest.mark.parametrize("block_size, heads, kv_heads, intermediate", [(16, 2, 1, 96), (8, 4, 2, 1544)])
def test_fused_fp32_decode_layers_equal_the_per_op_path_and_float64(monkeypatch, block_size, heads, kv_heads,
                                                                    intermediate):
    """fp32 engine on AVX2: pure decode steps run each layer as one native call, plain (one job of a single sequence)
    and cascade (five sequences behind a shared 64-token prefix: a token-block remainder of 2 in the linear kernel),
    with q/k/v biases, GQA, a block size other than 16 and a down projection whose K (1,544) goes in three pieces
    added onto the residual stream in place. Greedy tokens equal the per-op path's and log-probs agree within 1e-4
    (the same kernels; only the order of fp32 sums differs: norm, merge), and both within 1e-4 of a float64
    recompute (fp32 rounding over 2 layers of a 64-wide model is ~1e-6)."""
    monkeypatch.setenv("CAI_ENGINE_BACKEND", "native")
    monkeypatch.setattr(linear_mod, "f32_kernel_preferred", lambda: True)
    _, model = hf_and_ours("qwen2", False, seed=15, hidden_size=64, num_attention_heads=heads,
                           num_key_value_heads=kv_heads, intermediate_size=intermediate, max_position_embeddings=256)
    calls = []  # each call's shared_blocks: 0 for the plain job, > 0 for the cascade
    real = _native.decode_layer
    monkeypatch.setattr(_native, "decode_layer", lambda *a, **k: (calls.append(a[13]), real(*a, **k))[1])
    shared = list(range(20, 84))
    prompts = [list(range(5, 12))] + [shared + list(range(100 + 20 * i, 107 + 20 * i + i)) for i in range(5)]
    fused = greedy_jobs(model, prompts, block_size)
    assert calls.count(0) >= 2 * 11                                  # plain: 2 layers x 11 decode steps
    assert sum(shared == 64 // block_size for shared in calls) >= 2 * 11  # cascade over the prefix's blocks
    monkeypatch.setattr(decoder_mod, "fusable", lambda *a: False)
    calls.clear()
    per_op = greedy_jobs(model, prompts, block_size)
    assert not calls
    assert_agree_and_exact(model, prompts, fused, per_op, agree=1e-4, exact=1e-4)


@needs_avx2
def test_fused_fp32_decode_layer_names_bad_inputs():
    d, H, KV, D, I, T = 64, 2, 1, 32, 96, 2
    f32 = lambda *shape: torch.zeros(*shape).numpy()
    weights = [f32(H * D, d), f32(KV * D, d), f32(KV * D, d), f32(d, H * D), f32(I, d), f32(I, d), f32(d, I)]
    rot = f32(T, D)

    def call(weights=weights, cache=f32(8, 8, KV, D), x=f32(T, d), heads=H):
        _native.decode_layer(x, weights, [None] * 3, torch.ones(d).numpy(), torch.ones(d).numpy(), 1e-5, rot, rot,
                             cache, cache, torch.tensor([19, 35]).numpy(),
                             torch.tensor(((0, 1, 2), (3, 4, 5)), dtype=torch.int32).numpy(),
                             torch.tensor((20, 20), dtype=torch.int32).numpy(), 0, heads, 0.2)

    call()  # well formed: float32 throughout, 8-token blocks
    with pytest.raises(ValueError, match="up_weight: expected float32, got dtype int16"):
        call(weights=weights[:5] + [torch.zeros(I, d).bfloat16().view(torch.int16).numpy(), weights[6]])
    with pytest.raises(ValueError, match="k_cache: expected float32, got dtype float64"):
        call(cache=torch.zeros(8, 8, KV, D, dtype=torch.float64).numpy())
    with pytest.raises(ValueError, match="float32 needs head_dim a multiple of 16"):
        call(cache=f32(8, 8, KV, 24), heads=H)
    with pytest.raises(ValueError, match="gate_weight: expected size 64 on axis 1, got 56"):
        call(weights=weights[:4] + [f32(I, 56)] + weights[5:])
    with pytest.raises(ValueError, match="at most 48 query heads per KV head"):
        call(weights=[f32(49 * D, d), *weights[1:3], f32(d, 49 * D), *weights[4:]], heads=49)
    with pytest.raises(ValueError, match="intermediate sizes multiples of 8"):
        call(weights=weights[:4] + [f32(92, d), f32(92, d), f32(d, 92)])
    with pytest.raises(ValueError, match="v_cache: expected float32, got dtype int16"):
        _native.decode_layer(f32(T, d), weights, [None] * 3, torch.ones(d).numpy(), torch.ones(d).numpy(), 1e-5, rot,
                             rot, f32(8, 8, KV, D), torch.zeros(8, 8, KV, D).bfloat16().view(torch.int16).numpy(),
                             torch.tensor([19, 35]).numpy(), torch.zeros(2, 3, dtype=torch.int32).numpy(),
                             torch.tensor((20, 20), dtype=torch.int32).numpy(), 0, H, 0.2)
    with pytest.raises(ValueError, match="shared_blocks >= 0"):
        _native.decode_layer(f32(T, d), weights, [None] * 3, torch.ones(d).numpy(), torch.ones(d).numpy(), 1e-5, rot,
                             rot, f32(8, 8, KV, D), f32(8, 8, KV, D), torch.tensor([19, 35]).numpy(),
                             torch.zeros(2, 3, dtype=torch.int32).numpy(),
                             torch.tensor((20, 20), dtype=torch.int32).numpy(), -1, H, 0.2)
