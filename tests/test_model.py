import pytest
import torch

from cai_engine import KVCache
from conftest import hf_and_ours, requires_cuda

ATOL = 1e-4
CASES = [("llama", True), ("llama", False), ("qwen2", True), ("qwen2", False), ("mistral", False)]


def hf_logits(hf, ids, **kw):
    with torch.no_grad():
        return hf(input_ids=ids, **kw).logits


@pytest.mark.parametrize("kind,tied", CASES)
def test_logits_match_transformers(kind, tied):
    hf, ours = hf_and_ours(kind, tied)
    ids = torch.randint(0, 300, (2, 23))
    with torch.no_grad():
        got = ours.logits(ids)
    assert (got - hf_logits(hf, ids)).abs().max() < ATOL
    assert ours.lm_head.shape == (300, 64)
    assert (ours.lm_head is ours.embed_tokens.weight) == tied


@pytest.mark.parametrize("kind,tied", CASES)
def test_right_padded_batch_matches_transformers(kind, tied):
    hf, ours = hf_and_ours(kind, tied, seed=1)
    lengths = [19, 7, 1]
    ids = torch.randint(0, 300, (3, 19))
    mask = torch.zeros(3, 19, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    ids = ids.masked_fill(mask == 0, 256)
    with torch.no_grad():
        got = ours.logits(ids, attention_mask=mask)
    for b, n in enumerate(lengths):  # every sequence equals itself run alone
        ref = hf_logits(hf, ids[b:b + 1, :n])[0]
        assert (got[b, :n] - ref).abs().max() < ATOL
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("kind,tied", CASES)
def test_packed_sequences_match_separate_runs(kind, tied):
    hf, ours = hf_and_ours(kind, tied, seed=2)
    lengths = [5, 11, 4, 1]
    seqs = [torch.randint(0, 300, (n,)) for n in lengths]
    ids = torch.cat(seqs)[None]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    seg = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    with torch.no_grad():
        got = ours.logits(ids, position_ids=pos, segment_ids=seg)[0]
    start = 0
    for s in seqs:
        ref = hf_logits(hf, s[None])[0]
        assert (got[start:start + len(s)] - ref).abs().max() < ATOL
        start += len(s)


def test_llama3_rope_scaling_matches_transformers():
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
    hf, ours = hf_and_ours("llama", False, rope_theta=500000.0, rope_scaling=scaling, max_position_embeddings=128)
    ids = torch.randint(0, 300, (1, 100))
    with torch.no_grad():
        assert (ours.logits(ids) - hf_logits(hf, ids)).abs().max() < ATOL


def test_sliding_window_matches_transformers():
    hf, ours = hf_and_ours("mistral", False, sliding_window=6, attn_implementation="eager")
    ids = torch.randint(0, 300, (1, 20))
    with torch.no_grad():
        assert (ours.logits(ids) - hf_logits(hf, ids)).abs().max() < ATOL


def test_sliding_window_counts_positions_in_a_shared_prompt_row():
    """[prompt | answer 1 | answer 2] packed as the PM and RL trainers pack it: the window measures each answer's
    distance to the prompt by position, so the second answer sees what it would see run alone."""
    from cai_engine.model.heads import pack_shared
    hf, ours = hf_and_ours("mistral", False, sliding_window=6, attn_implementation="eager")
    prompt, answers = torch.randint(0, 300, (5,)).tolist(), [torch.randint(0, 300, (n,)).tolist() for n in (7, 4)]
    packed = pack_shared([(prompt, answers)], pad_id=0)
    with torch.no_grad():
        got = ours.logits(packed.input_ids, position_ids=packed.position_ids, attn_mask=packed.attn_mask)[0]
    start = len(prompt)
    for answer in answers:
        ref = hf_logits(hf, torch.tensor([prompt + answer]))[0]
        assert (got[:len(prompt)] - ref[:len(prompt)]).abs().max() < ATOL
        assert (got[start:start + len(answer)] - ref[len(prompt):]).abs().max() < ATOL
        start += len(answer)


def test_kv_cache_decoding_matches_full_forward():
    _, ours = hf_and_ours("qwen2", False, seed=3)
    ids = torch.randint(0, 300, (2, 15))
    cache = KVCache(ours.config, 2, 32, torch.float32, "cpu")
    with torch.no_grad():
        full = ours(ids)
        parts = [ours(ids[:, :6], cache=cache), ours(ids[:, 6:11], cache=cache)]
        parts += [ours(ids[:, i:i + 1], cache=cache) for i in range(11, 15)]
    assert (torch.cat(parts, dim=1) - full).abs().max() < ATOL
    assert cache.length == 15


def test_hidden_states_are_differentiable():
    _, ours = hf_and_ours("llama", True)
    ids = torch.randint(0, 300, (2, 9))
    h = ours(ids)
    assert h.shape == (2, 9, 64)
    (h.float().pow(2).mean()).backward()
    assert ours.layers[0].self_attn.q_proj.weight.grad is not None


@requires_cuda
@pytest.mark.parametrize("kind,tied", [("llama", True), ("qwen2", False)])
def test_cuda_bf16_sdpa_close_to_fp32(kind, tied):
    hf, ours = hf_and_ours(kind, tied)
    ids = torch.randint(0, 300, (2, 31))
    ref = hf_logits(hf, ids)
    ours = ours.to("cuda", torch.bfloat16)
    ours.use_flash_attn = False
    mask = torch.ones(2, 31, dtype=torch.long)
    mask[1, 20:] = 0
    with torch.no_grad():
        got = ours.logits(ids.cuda()).float().cpu()
        padded = ours.logits(ids.cuda(), attention_mask=mask.cuda()).float().cpu()
    scale = ref.abs().max()
    assert (got - ref).abs().max() / scale < 5e-2
    assert (padded[1, :20] - hf_logits(hf, ids[1:, :20])[0]).abs().max() / scale < 5e-2


def saved_bytes(model, tokens: int) -> int:
    """Bytes autograd keeps for backward during one bf16-mixed training forward of `tokens` tokens (distinct
    storages: a tensor several ops save counts once)."""
    storages = {}

    def keep(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        model(ids)
    return sum(storages.values())


def test_bf16_mixed_training_keeps_only_what_backward_needs():
    """Per token and layer: the fp32 residual stream at both norms, bf16 norm outputs, q, k, v, the attention
    output (and its contiguous copy for o_proj), gate, up and their product, plus one rstd per norm and a
    log-sum-exp per head. Eager norms and SwiGLU would add fp32 intermediates and one bf16 cast per projection."""
    _, model = hf_and_ours("llama", tied=False)
    c = model.config
    d, q, kv, inter = c.hidden_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim, \
        c.intermediate_size
    ideal = 2 * 4 * d + 2 * 2 * d + 2 * (q + 2 * kv + 2 * q) + 2 * 3 * inter + 2 * 4 + 4 * c.num_attention_heads
    per_token_layer = (saved_bytes(model, 96) - saved_bytes(model, 32)) / 64 / c.num_hidden_layers
    assert per_token_layer <= 1.05 * ideal, (per_token_layer, ideal)


def test_activation_checkpointing_keeps_layer_inputs_only_and_gives_the_same_gradients():
    _, model = hf_and_ours("llama", tied=False)
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, 30:] = 0

    def grads():
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = model(ids, attention_mask=mask)
        (h.float().pow(2) * mask[..., None]).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    full = (saved_bytes(model, 96) - saved_bytes(model, 32)) / 64 / model.config.num_hidden_layers
    model.activation_checkpointing = True
    recomputed = grads()
    kept = (saved_bytes(model, 96) - saved_bytes(model, 32)) / 64 / model.config.num_hidden_layers
    assert plain.keys() == recomputed.keys()
    for name in plain:  # the same ops on the same inputs: the same bits
        assert torch.equal(plain[name], recomputed[name]), name
    # per token: each layer's fp32 input, plus the final norm's (its input and rstd) and the token id
    layers, d = model.config.num_hidden_layers, model.config.hidden_size
    assert kept * layers <= 4 * d * (layers + 1) + 16 and kept < full / 4
