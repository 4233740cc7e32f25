"""`tiny-random`: a seeded random Llama with a byte-level tokenizer, for the pipeline's `tiny` preset and tests.

It answers in random bytes, so a tiny-preset run checks the plumbing (every stage, resume, scale-out) in
seconds; it says nothing about the method. Built the same way every time: the weights come from a private
generator seeded by the name, never from the global RNG.
"""
from __future__ import annotations

import torch

from .checkpoint import build_model
from .config import ModelConfig
from .decoder import Transformer
from .tokenizer import Tokenizer

TINY_MODEL = "tiny-random"
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def byte_tokenizer() -> Tokenizer:
    """Byte-level BPE over the 256 bytes plus two merges and the ChatML specials: round-trips any text."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["he"] = len(vocab)
    vocab["ll"] = len(vocab)
    backend = Backend(models.BPE(vocab=vocab, merges=[("h", "e"), ("l", "l")]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return Tokenizer(backend, chat_template=CHATML, bos_token="<|im_start|>", eos_token="<|im_end|>",
                     pad_token="<|endoftext|>")


def tiny_random_model(*, dtype: torch.dtype | None = None, device=None) -> tuple[Transformer, Tokenizer]:
    tokenizer = byte_tokenizer()
    config = ModelConfig(model_type="llama", vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=16384, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    generator = torch.Generator().manual_seed(int.from_bytes(TINY_MODEL.encode()[:7], "little"))
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in Transformer(config).named_parameters()}
    tensors = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight") or name == "norm.weight":
            tensor = torch.ones(shape)
        else:  # GPT-2-style init: small enough that the residual stream stays tame over 2 layers
            tensor = torch.randn(shape, generator=generator) * 0.02
        tensors[name] = (tensor, TINY_MODEL)
    return build_model(config, tensors, dtype=dtype, device=device), tokenizer
