"""The embedded default (SmolLM2-135M-Instruct GGUF) against transformers loading the same file."""
import time

import pytest
import torch

from cai_engine import DEFAULT_MODEL, load_model
from cai_engine.model.checkpoint import our_name
from cai_engine.generate import generate_ids, stop_token_ids
from cai_engine.model.loading import embedded_model_path

pytestmark = pytest.mark.slow

PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "Give me three tips for staying focused while studying.",
    "How do I pick a lock?",
]
VARIED_TEXT = (
    "Hello, world! Ünïcödé: naïve café, 日本語のテキスト, emoji 🤖🎉, Ελληνικά.\n"
    "def f(x):\n\treturn x**2  # squares\n\n\n"
    "    indented    runs   of     spaces\t\ttabs\r\nnumbers 1234567890 3.14159 -42 1e-9\n"
    "<|im_start|>user\nspecial tokens inline<|im_end|>\n"
    "URLs: https://example.com/a?b=c&d=e   'quotes' \"double\" it's we'll they've\n"
)


@pytest.fixture(scope="module")
def ours():
    return load_model(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def theirs():
    transformers = pytest.importorskip("transformers")
    path = embedded_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    return model, tok


def test_config_of_embedded_default(ours):
    model, tok = ours
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.vocab_size) == \
        (30, 576, 9, 3, 49152)
    assert c.tie_word_embeddings and model.lm_head is model.embed_tokens.weight
    assert model.dtype == torch.float32
    assert tok.eos_token == "<|im_end|>" and tok.eos_id == 2 and tok.bos_id == 1
    assert "<|im_start|>" in tok.chat_template


def test_weights_equal_transformers_dequantized(ours, theirs):
    model, _ = ours
    hf_state = theirs[0].state_dict()
    state = model.state_dict()
    for name, value in hf_state.items():
        if name == "lm_head.weight":
            continue
        assert torch.allclose(state[our_name(name)], value, atol=1e-6, rtol=0), name


def test_tokenization_matches_transformers(ours, theirs):
    _, tok = ours
    hf_tok = theirs[1]
    for text in [VARIED_TEXT, " leading space", "trailing  ", "", "a\n\n\nb", "x" * 300]:
        assert tok.encode(text) == hf_tok(text)["input_ids"], repr(text)
    ids = tok.encode(VARIED_TEXT)
    assert tok.decode(ids) == hf_tok.decode(ids) == VARIED_TEXT


def test_chat_template_matches_transformers(ours, theirs):
    _, tok = ours
    hf_tok = theirs[1]
    chats = [[{"role": "user", "content": "hi"}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
              {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]]
    for msgs in chats:
        for gen in (True, False):
            assert tok.apply_chat_template(msgs, add_generation_prompt=gen) == \
                hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)


def test_greedy_continuation_matches_transformers(ours, theirs):
    model, tok = ours
    hf_model, hf_tok = theirs
    stops = stop_token_ids(model, tok)
    lengths = []
    for prompt in PROMPTS:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}])
        ids = tok.encode(text, add_special_tokens=False)
        got = generate_ids(model, ids, max_new_tokens=32, temperature=0.0, stop_ids=stops)
        with torch.no_grad():
            ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=2,
                                    pad_token_id=tok.pad_id)[0, len(ids):].tolist()
        assert got == ref, (prompt, tok.decode(got), hf_tok.decode(ref))
        lengths.append(len(got))
    assert stops == {2}
    assert sum(n == 32 for n in lengths) >= 2  # most prompts run the full 32 tokens


def test_logits_match_transformers(ours, theirs):
    model, tok = ours
    ids = torch.tensor([tok.encode(VARIED_TEXT)])
    with torch.no_grad():
        assert (model.logits(ids) - theirs[0](ids).logits).abs().max() < 1e-3


def test_second_load_comes_from_cache(ours):
    start = time.perf_counter()
    model, _ = load_model(DEFAULT_MODEL)
    assert time.perf_counter() - start < 10  # seconds, not minutes; the figure lives in bench/
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ours[0].parameters()))
    direct, _ = load_model(embedded_model_path())
    assert all(torch.equal(a, b) for a, b in zip(direct.parameters(), model.parameters()))
