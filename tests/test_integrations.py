"""cai_engine.integrations: transformers causal LMs and TRL trainers computing their losses through our fused op."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from cai_engine import integrations  # noqa: E402
from cai_engine.integrations import causal_lm, layers, trl_head  # noqa: E402
from conftest import hf_config, tiny_tokenizer  # noqa: E402

KINDS = ["llama", "mistral", "qwen2"]
CLASSES = {"llama": transformers.LlamaForCausalLM, "mistral": transformers.MistralForCausalLM,
           "qwen2": transformers.Qwen2ForCausalLM}


def tiny_model(kind: str, seed: int = 0, dtype=torch.float32, tied: bool | None = None):
    torch.manual_seed(seed)
    cfg = hf_config(kind, kind != "mistral" if tied is None else tied)
    model = CLASSES[kind](cfg).to(dtype).train()
    with torch.no_grad():  # non-trivial norms and biases (Qwen2's q/k/v) so that a mix-up shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.5)
    return model


def padded_batch(seed: int = 1):
    """Right padding, prompt tokens masked out of the labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (3, 13), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    mask[2, 5:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :4] = -100
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def packed_batch(seed: int = 2):
    """Three sequences in one row, position_ids restarting at each (padding-free packing, no attention mask)."""
    g = torch.Generator().manual_seed(seed)
    lengths = [6, 9, 4]
    ids = torch.randint(0, 256, (1, sum(lengths)), generator=g)
    position_ids = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    labels = ids.clone()
    labels[0, 0] = labels[0, 6] = labels[0, 15] = -100  # each sequence's first token: no cross-sequence target
    return dict(input_ids=ids, position_ids=position_ids, labels=labels)


def loss_and_grads(model, batch, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(**batch, **kwargs)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def assert_same(reference, patched, atol, rtol):
    (out0, g0), (out1, g1) = reference, patched
    torch.testing.assert_close(out1.loss, out0.loss, atol=atol, rtol=rtol)
    assert g0.keys() == g1.keys()
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=atol, rtol=rtol, msg=name)


@pytest.fixture
def spy(monkeypatch):
    """Counts calls of our op from the integrations, so a test sees that the fused path really ran."""
    calls = []
    for module in (causal_lm, trl_head, integrations.scores):
        original = module.token_logprobs

        def counted(*args, _original=original, **kwargs):
            calls.append(args[0].shape[0])
            return _original(*args, **kwargs)
        monkeypatch.setattr(module, "token_logprobs", counted)
    return calls


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", [padded_batch, packed_batch], ids=["padded", "packed"])
def test_patched_loss_and_gradients_equal_unpatched(kind, layout, spy):
    model, batch = tiny_model(kind), layout()
    reference = loss_and_grads(model, batch)
    assert reference[0].logits is not None
    integrations.patch(model)
    patched = loss_and_grads(model, batch)
    assert spy and patched[0].logits is None  # the fused path ran and built no logits
    # only counted targets reach the LM head
    assert spy[-1] == int((torch.nn.functional.pad(batch["labels"], (0, 1), value=-100)[:, 1:] != -100).sum())
    assert_same(reference, patched, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_loss_kwargs_num_items_ignore_index_shift_labels(kind, spy):
    model, batch = tiny_model(kind), padded_batch()
    labels = batch["labels"].masked_fill(batch["labels"] == -100, -1)
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-1)[:, 1:].contiguous()
    variants = [dict(num_items_in_batch=torch.tensor(57)), dict(labels=labels, ignore_index=-1),
                dict(labels=labels, ignore_index=-1, shift_labels=shifted, num_items_in_batch=31)]
    for extra in variants:
        call = {**batch, **extra}
        integrations.unpatch(model)
        reference = loss_and_grads(model, call)
        integrations.patch(model)
        before = len(spy)
        patched = loss_and_grads(model, call)
        assert len(spy) == before + 1
        assert_same(reference, patched, atol=1e-5, rtol=1e-5)


def test_bf16_loss_and_gradients_within_stated_tolerance():
    """bf16: the unpatched loss rounds the logits to bf16 before the softmax, ours computes them in fp32 from the
    same bf16 operands, so both sit near the fp32 loss and within 1e-2 (relative) of each other; gradients in bf16
    agree to 2e-2 relative in norm."""
    model, batch = tiny_model("llama", dtype=torch.bfloat16), padded_batch()
    reference = loss_and_grads(model, batch)
    integrations.patch(model)
    patched = loss_and_grads(model, batch)
    torch.testing.assert_close(patched[0].loss, reference[0].loss, atol=0, rtol=1e-2)
    for name, g in reference[1].items():
        diff = (patched[1][name].float() - g.float()).norm() / g.float().norm()
        assert diff < 2e-2, (name, float(diff))


def test_bf16_mixed_mlp_projections_take_the_weight_gradient_kernel(monkeypatch):
    """fp32 weights under bf16 autocast (bf16-mixed training): a patched SiLU MLP's gate, up and down projections
    take the weight gradient from our tile kernel (in fp32, where autocast rounds it to bf16 first), so the MLP
    weights' gradients agree with the unpatched model's to bf16 rounding (2e-2 relative in norm)."""
    from cai_engine import _native
    from cai_engine.ops import projection
    if not _native.bf16_kernels_available():
        pytest.skip("CPU lacks AVX512-BF16")
    monkeypatch.setattr(projection, "kernel_preferred", lambda: True)
    calls = []
    real = _native.linear_weight_grad_bf16
    monkeypatch.setattr(_native, "linear_weight_grad_bf16", lambda *a: calls.append(a[0].shape) or real(*a))
    model = tiny_model("llama")
    model.config.intermediate_size = 128  # projections tile by 32: rebuild the MLPs at a width that does
    for layer in model.model.layers:
        layer.mlp = type(layer.mlp)(model.config)
    batch = padded_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = loss_and_grads(model, batch)
        integrations.patch(model)
        patched = loss_and_grads(model, batch)
    assert len(calls) == 3 * model.config.num_hidden_layers
    torch.testing.assert_close(patched[0].loss, reference[0].loss, atol=0, rtol=1e-2)
    for name, g in reference[1].items():
        diff = (patched[1][name].float() - g.float()).norm() / g.float().norm()
        assert diff < 2e-2, (name, float(diff))


def test_logits_still_computed_when_asked(spy):
    model, batch = tiny_model("llama"), padded_batch()
    reference = model(**batch)
    integrations.patch(model)
    asked = model(**batch, return_logits=True)
    assert not spy and asked.logits is not None
    torch.testing.assert_close(asked.logits, reference.logits)
    model.eval()  # eval mode keeps the logits by default (Trainer.evaluate hands them to compute_metrics)
    assert model(**batch).logits is not None and not spy
    assert model(**batch, return_logits=False).logits is None and spy
    no_labels = {k: v for k, v in batch.items() if k != "labels"}
    assert model.train()(**no_labels).logits is not None
    assert model(**batch, return_dict=False)[0].shape == ()  # tuple callers get (loss, ...)


def test_custom_loss_function_goes_to_the_original_forward(spy):
    model, batch = tiny_model("llama"), padded_batch()
    integrations.patch(model)
    model.loss_function = lambda logits, labels, vocab_size, **kw: logits.float().mean()
    out = model(**batch)
    assert not spy and out.logits is not None
    torch.testing.assert_close(out.loss, out.logits.float().mean())


def test_patch_transformers_applies_to_new_models_and_unpatches(spy, layer_spy):
    batch = padded_batch()
    reference = loss_and_grads(tiny_model("mistral"), batch)
    integrations.patch_transformers()
    try:
        patched = loss_and_grads(tiny_model("mistral"), batch)
        assert spy and patched[0].logits is None
        assert layer_spy.count("rms_norm") == 5 and layer_spy.count("swiglu") == 2  # 2 layers + the final norm
    finally:
        integrations.unpatch_transformers()
    assert_same(reference, patched, atol=1e-5, rtol=1e-5)
    layer_spy.clear()
    assert tiny_model("mistral")(**batch).logits is not None and not layer_spy


@pytest.fixture
def layer_spy(monkeypatch):
    """Names of our fused layer ops as the patched transformers norms and MLPs call them."""
    calls = []
    for name in ("rms_norm", "swiglu"):
        original = getattr(layers, name)
        monkeypatch.setattr(layers, name, lambda *a, _o=original, _n=name, **k: calls.append(_n) or _o(*a, **k))
    return calls


@pytest.mark.parametrize("kind", KINDS)
def test_norms_and_swiglu_run_our_ops_with_and_without_gradients(kind, layer_spy):
    """Every RMSNorm and SwiGLU MLP goes through our ops, keeping transformers' result dtype and values (fp32:
    1e-5, in test_patched_loss_and_gradients_equal_unpatched); under no_grad too, with the same bits, so a frozen
    reference scores like the policy; a non-SiLU MLP runs its own code."""
    model, batch = tiny_model(kind), padded_batch()
    norm = next(m for m in model.modules() if type(m).__name__.endswith("RMSNorm"))
    x = torch.randn(3, 64, requires_grad=True)
    dtype = norm(x).dtype
    integrations.patch(model)
    loss_and_grads(model, batch)
    layers_count = model.config.num_hidden_layers
    assert layer_spy.count("rms_norm") == 2 * layers_count + 1 and layer_spy.count("swiglu") == layers_count
    assert norm(x).dtype == dtype
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with_grad = model(**inputs, return_logits=True).logits
    layer_spy.clear()
    with torch.no_grad():
        without = model(**inputs, return_logits=True).logits
    assert layer_spy.count("swiglu") == layers_count and torch.equal(with_grad, without)
    layer_spy.clear()
    model.model.layers[0].mlp.act_fn = torch.nn.GELU()
    loss_and_grads(model, batch)
    assert layer_spy.count("swiglu") == layers_count - 1
    integrations.unpatch(model)
    layer_spy.clear()
    loss_and_grads(model, batch)
    assert not layer_spy


def test_patch_looks_through_a_wrapper(spy):
    class Wrapper(torch.nn.Module):  # the shape of DDP / accelerate wrappers: the model under `.module`
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, **kwargs):
            return self.module(**kwargs)

    model, batch = tiny_model("llama"), padded_batch()
    wrapped = integrations.patch(Wrapper(model))
    assert wrapped(**batch).logits is None and spy
    integrations.unpatch(wrapped)
    assert wrapped(**batch).logits is not None


def test_unsupported_model_is_refused():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="GPT2LMHeadModel: model_type 'gpt2' is not supported"):
        integrations.patch(gpt2)


# ---------------------------------------------------------------- per-token log-probs and reward/value reads

@pytest.mark.parametrize("full_width", [False, True], ids=["completion-columns", "all-columns"])
def test_selective_logprobs_match_log_softmax_of_logits(full_width, spy):
    model, batch = tiny_model("qwen2"), padded_batch()
    ids, mask, temperature = batch["input_ids"], batch["attention_mask"], 0.7
    completion = mask.clone()
    completion[:, :4] = 0
    if not full_width:
        completion = completion[:, 3:]
    logits = model(input_ids=ids, attention_mask=mask).logits.double() / temperature
    logp_all = torch.log_softmax(logits, -1)[:, :-1]
    pad = lambda t: torch.nn.functional.pad(t, (1, 0))  # token 0 has no predictor: column of zeros
    want = pad(logp_all.gather(-1, ids[:, 1:, None]).squeeze(-1))
    want_entropy = pad(-(logp_all.exp() * logp_all).sum(-1))
    width = completion.shape[1]
    m = completion.bool()
    want, want_entropy = (want[:, -width:] * m).float(), (want_entropy[:, -width:] * m).float()
    logp, entropy = integrations.selective_logprobs(model, ids, mask, completion, temperature, return_entropy=True)
    assert spy[-1] == int(m.sum()) and logp.shape == completion.shape
    torch.testing.assert_close(logp, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, want_entropy, atol=1e-5, rtol=1e-5)
    # gradients too: d(sum logp)/d(params) equals the dense computation's
    model.zero_grad()
    logp.sum().backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    dense = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float() / temperature, -1)[:, :-1]
    (pad(dense.gather(-1, ids[:, 1:, None]).squeeze(-1))[:, -width:] * m).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(fused[n], p.grad, atol=1e-5, rtol=1e-5, msg=n)


def test_selective_logprobs_rejects_a_mask_on_the_first_token():
    model, batch = tiny_model("llama"), padded_batch()
    with pytest.raises(ValueError, match="completion_mask: column 0"):
        integrations.selective_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["attention_mask"])


def test_sequence_scores_and_token_values_match_sequence_classification():
    torch.manual_seed(0)
    cfg = hf_config("llama", True, num_labels=1)
    model = transformers.LlamaForSequenceClassification(cfg).eval()
    batch = padded_batch()
    ids = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, cfg.pad_token_id)
    ids[ids == cfg.pad_token_id] = torch.where(batch["attention_mask"] == 1, 7, cfg.pad_token_id)[ids == cfg.pad_token_id]
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits
        scores = integrations.sequence_scores(model, ids, batch["attention_mask"])
        hidden = model.model(input_ids=ids, attention_mask=batch["attention_mask"]).last_hidden_state
        values = integrations.token_values(model, ids, batch["attention_mask"])
    torch.testing.assert_close(scores, want)
    torch.testing.assert_close(values, model.score(hidden).squeeze(-1))


# ---------------------------------------------------------------- TRL trainers

trl = pytest.importorskip("trl")

# Inside TRL's training loop the decoder's own forward is not bit-stable: with the same weights and batch it gives
# losses 5e-5 (relative) away from a plain forward, and the offset moves with the run's allocation pattern (a shim
# that only copies TRL's head inputs, without our op, moves it as much as the patch does). Three Adam steps at
# lr 1e-2 grow that to ~5e-4, so the runs are compared at 2e-3; a wrong loss (e.g. a dropped temperature or
# shift) misses by far more.
TRL_RTOL = 2e-3


def hf_tokenizer():
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tiny_tokenizer().backend, eos_token="<|im_end|>",
                                               pad_token="<|endoftext|>", bos_token="<|im_start|>")
    return tok


def training_args(config_cls, tmp_path, **extra):
    return config_cls(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2,
                      logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0,
                      dataloader_num_workers=0, disable_tqdm=True, **extra)


def trained_losses(make_trainer, patched: bool) -> list[float]:
    if patched:
        integrations.patch_transformers()
    try:
        trainer = make_trainer()
        trainer.train()
    finally:
        integrations.unpatch_transformers()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_trl_sft_trainer_matches_unpatched(tmp_path, spy):
    from datasets import Dataset
    texts = ["hello world, this is a tiny corpus", "the model learns nothing much here",
             "constitutional ai says hello", "short", "a longer line of plain text to pad the batch out"]
    dataset = Dataset.from_dict({"text": texts * 2})

    def make():
        args = training_args(trl.SFTConfig, tmp_path, max_length=32, gradient_accumulation_steps=2)
        return trl.SFTTrainer(model=tiny_model("llama"), args=args, train_dataset=dataset,
                              processing_class=hf_tokenizer())

    reference = trained_losses(make, patched=False)
    assert not spy
    patched = trained_losses(make, patched=True)
    assert spy, "the patched SFT run never reached our op"
    assert len(reference) == 3 and reference[0] != reference[-1]  # it trains
    assert patched == pytest.approx(reference, rel=TRL_RTOL)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_trl_dpo_trainer_matches_unpatched(tmp_path, spy, bf16):
    from datasets import Dataset
    rows = {"prompt": ["say hi", "be kind", "what is 2+2", "name a colour"],
            "chosen": [" hi there", " of course, always", " 4", " blue"],
            "rejected": [" go away", " no", " 5, probably", " loud"]}
    dataset = Dataset.from_dict({k: v * 2 for k, v in rows.items()})

    def make():
        args = training_args(trl.DPOConfig, tmp_path, max_length=32, beta=0.5, bf16=bf16)
        return trl.DPOTrainer(model=tiny_model("qwen2"), ref_model=tiny_model("qwen2"), args=args,
                              train_dataset=dataset, processing_class=hf_tokenizer())

    reference = trained_losses(make, patched=False)
    assert not spy
    patched = trained_losses(make, patched=True)
    assert spy, "the patched DPO run never reached our op"
    assert len(reference) == 3 and reference[0] != reference[-1]
    # policy and reference score with the same ops, so the first loss is exactly log 2 in both runs
    assert patched[0] == reference[0] == pytest.approx(0.6931471805599453, abs=1e-6)
    # bf16: our SwiGLU rounds its product once where the eager MLP rounds twice; AdamW at lr 1e-2 turns those
    # bf16-ulp gradient differences on near-zero gradients into lr-sized steps, so later losses drift by <= 1%
    assert patched == pytest.approx(reference, rel=1e-2 if bf16 else TRL_RTOL, abs=1e-5)


def test_trl_head_outputs_match_trl_kernel():
    """Every output TRL's fused head can ask for, against TRL's own kernel, with a temperature and a logit scale."""
    from trl.kernels import ChunkedLogProbFunction
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(37, 64, generator=g, requires_grad=True)
    weight = (torch.randn(300, 64, generator=g) * 0.4).requires_grad_()
    bias = torch.randn(300, generator=g).requires_grad_()
    targets = torch.randint(0, 300, (37,), generator=g)
    targets[:5] = (hidden[:5].detach() @ weight.detach().T + bias.detach()).argmax(-1)  # some top-1 hits
    outputs = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
    results = []
    for fn in (ChunkedLogProbFunction, trl_head.FusedLogProbFunction):
        got = fn.apply(hidden, weight, bias, targets, 0.8, 128, None, 1.3, outputs)
        (got[0].sum() + 0.5 * got[1].sum()).backward()
        results.append((got, [t.grad.clone() for t in (hidden, weight, bias)]))
        for t in (hidden, weight, bias):
            t.grad = None
    (theirs, their_grads), (ours, our_grads) = results
    assert bool(ours[4][:5].all())
    for name, a, b in zip(outputs, ours, theirs):
        if name == "is_top1":
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)
    for a, b in zip(our_grads, their_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_sdpa_attention_runs_ours_in_bf16_and_unpatches(monkeypatch):
    """patch(model) switches a model that runs SDPA to our attention (bf16 here, so our kernels run where the CPU
    has them; elsewhere our op takes its torch path): the loss and every gradient stay within bf16 rounding of
    transformers' SDPA; patch_transformers does it for new models; unpatching gives SDPA back."""
    from cai_engine import _native
    from cai_engine.integrations import attention as attention_integration
    from cai_engine.ops.attention import _native_fits
    kernels = _native.bf16_kernels_available()
    calls = []
    original = attention_integration.attention
    monkeypatch.setattr(attention_integration, "attention",
                        lambda q, *a, **k: calls.append(_native_fits(q, a[0], a[1], k.get("mask"), k["causal"]))
                        or original(q, *a, **k))

    def model():  # head_dim 32: the kernels' smallest
        torch.manual_seed(0)
        return CLASSES["llama"](hf_config("llama", True, hidden_size=128)).to(torch.bfloat16).train()

    for batch in (padded_batch(), {k: v[:1, :9] for k, v in padded_batch().items()}):  # a bool mask; causal
        reference = loss_and_grads(model(), batch)
        patched_model = integrations.patch(model())
        assert patched_model.config._attn_implementation == attention_integration.NAME
        patched = loss_and_grads(patched_model, batch)
        assert len(calls) == 2 and all(calls) == kernels  # both layers, each on our kernels where they run
        torch.testing.assert_close(patched[0].loss, reference[0].loss, atol=0.02, rtol=0.01)
        for name, grad in reference[1].items():
            error = float((patched[1][name].float() - grad.float()).abs().max() / grad.float().abs().max())
            assert error < 0.05, f"{name}: {error:.3f} of its largest entry"
        integrations.unpatch(patched_model)
        assert patched_model.config._attn_implementation == "sdpa"
        calls.clear()
        loss_and_grads(patched_model, batch)
        assert not calls
    integrations.patch_transformers()
    try:
        loss_and_grads(model(), padded_batch())
        assert len(calls) == 2
    finally:
        integrations.unpatch_transformers()
    calls.clear()
    loss_and_grads(model(), padded_batch())
    assert not calls
