import torch

from cai_engine import LLM, SamplingParams
from conftest import hf_and_ours, tiny_tokenizer


def engine(seed=21, **kw):
    _, model = hf_and_ours("llama", False, seed=seed, max_position_embeddings=256)
    kw.setdefault("kv_cache_bytes", 1 << 20)
    kw.setdefault("block_size", 4)
    return LLM(model, tiny_tokenizer(), **kw), model


def reference_greedy(model, prompt, steps):
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(steps):
            out.append(int(model.logits(torch.tensor([ids]))[0, -1].argmax()))
            ids.append(out[-1])
    return out


PROMPTS = [[5, 6, 7], list(range(10, 37)), [9] * 9, [1], list(range(100, 111))]
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def test_greedy_mixed_lengths_equal_full_recompute():
    llm, model = engine(max_batch_tokens=16)       # forces chunked prefill of the 27-token prompt
    outs = llm.generate(PROMPTS, GREEDY)
    for prompt, out in zip(PROMPTS, outs):
        assert out.outputs[0].token_ids == reference_greedy(model, prompt, 8)
        assert out.outputs[0].finish_reason == "length"


def test_tiny_kv_budget_forces_preemption_with_identical_outputs():
    big, _ = engine()
    small, _ = engine(kv_cache_bytes=18 * 2 * 2 * 4 * 2 * 16 * 4)   # 18 blocks of 4 tokens
    a = big.generate(PROMPTS, GREEDY)
    b = small.generate(PROMPTS, GREEDY)
    assert small.preemptions > 0
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]
    assert small.blocks.num_free == small.blocks.num_blocks   # every block is free or cached, refcount 0


def test_shared_prefix_is_computed_once():
    llm, _ = engine()
    prefix = list(range(40, 72))                             # 8 full blocks
    llm.generate([prefix + [1, 2]], GREEDY)
    before = llm.blocks.hit_tokens
    llm.generate([prefix + [3], prefix + [4, 5, 6]], GREEDY)
    assert llm.blocks.hit_tokens - before == 2 * 32
    assert llm.blocks.num_free == llm.blocks.num_blocks


def test_seeded_sampling_is_reproducible_and_batch_independent():
    llm, _ = engine()
    p = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=7, max_tokens=10, ignore_eos=True)
    alone = llm.generate([PROMPTS[1]], p)[0].outputs[0].token_ids
    crowd = llm.generate(PROMPTS, [SamplingParams(seed=i, max_tokens=12, ignore_eos=True) for i in range(5)][:1]
                         + [p] + [SamplingParams(seed=3, max_tokens=5, ignore_eos=True)] * 3)[1]
    assert crowd.outputs[0].token_ids == alone
    n = llm.generate([PROMPTS[0]], SamplingParams(n=3, seed=1, max_tokens=10, ignore_eos=True))[0]
    assert len(n.outputs) == 3 and len({tuple(o.token_ids) for o in n.outputs}) > 1
    assert llm.blocks.num_free == llm.blocks.num_blocks


def test_logprobs_and_processing():
    llm, model = engine()
    out = llm.generate([PROMPTS[0]], SamplingParams(temperature=0.7, top_k=5, seed=0, max_tokens=6,
                                                     ignore_eos=True))[0].outputs[0]
    ids = PROMPTS[0] + out.token_ids
    with torch.no_grad():
        logp = model.logits(torch.tensor([ids]))[0].log_softmax(-1)
    raw = [float(logp[len(PROMPTS[0]) - 1 + i, t]) for i, t in enumerate(out.token_ids)]
    torch.testing.assert_close(torch.tensor(out.logprobs), torch.tensor(raw), atol=1e-4, rtol=1e-4)
    assert all(p >= r - 1e-6 for p, r in zip(out.processed_logprobs, out.logprobs))  # top-k renormalises up


def test_stop_tokens_strings_min_tokens_and_penalties():
    llm, model = engine()
    first = reference_greedy(model, PROMPTS[2], 6)
    out = llm.generate([PROMPTS[2]], SamplingParams(temperature=0, max_tokens=6, stop_token_ids=[first[2]],
                                                    ignore_eos=True))[0].outputs[0]
    assert out.token_ids == first[:3] and out.finish_reason == "stop"
    out = llm.generate([PROMPTS[2]], SamplingParams(temperature=0, max_tokens=6, min_tokens=4,
                                                    stop_token_ids=[first[2]], ignore_eos=True))[0].outputs[0]
    assert first[2] not in out.token_ids[:4]
    text = llm.generate([PROMPTS[2]], GREEDY)[0].outputs[0].text
    if len(text) > 2:
        cut = llm.generate([PROMPTS[2]], SamplingParams(temperature=0, max_tokens=8, stop=[text[1:3]],
                                                        ignore_eos=True))[0].outputs[0]
        assert cut.finish_reason == "stop" and cut.text == text[:text.find(text[1:3])]
    rep = llm.generate([[7] * 12], SamplingParams(temperature=0, max_tokens=6, repetition_penalty=50.0,
                                                  frequency_penalty=5.0, ignore_eos=True))[0].outputs[0]
    assert 7 not in rep.token_ids and len(set(rep.token_ids)) > 1


def test_bad_requests_get_errors_and_the_others_run():
    llm, _ = engine()
    outs = llm.generate([[], list(range(300)), PROMPTS[0], PROMPTS[3]],
                        [GREEDY, GREEDY, GREEDY, SamplingParams(top_p=0.0)])
    assert outs[0].error == "prompt is empty"
    assert "context is 256" in outs[1].error
    assert outs[2].error is None and len(outs[2].outputs[0].token_ids) == 8
    assert "top_p" in outs[3].error


def test_chat_prompts_and_weight_updates_invalidate_the_prefix_cache():
    llm, model = engine()
    chat = [{"role": "user", "content": "hello there, general"}]
    a = llm.generate([chat], GREEDY)[0]
    assert a.prompt_token_ids == llm.tokenizer.encode(llm.tokenizer.apply_chat_template(chat),
                                                      add_special_tokens=False)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)                                  # stands in for an optimizer step
    b = llm.generate([chat], GREEDY)[0]
    assert b.outputs[0].token_ids == reference_greedy(model, a.prompt_token_ids, 8)


def test_sliding_window_caps_the_context_and_is_exact_within_it():
    _, model = hf_and_ours("mistral", False, seed=3, max_position_embeddings=256, sliding_window=24)
    llm = LLM(model, tiny_tokenizer(), kv_cache_bytes=1 << 20, block_size=4)
    prompt = list(range(10, 26))
    outs = llm.generate([prompt, list(range(30))], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    assert "context is 24 (the model's sliding window)" in outs[1].error
    out = outs[0].outputs[0]
    assert out.finish_reason == "length" and len(prompt) + len(out.token_ids) == 24
    assert out.token_ids == reference_greedy(model, prompt, len(out.token_ids))
