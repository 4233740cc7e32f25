"""Tokenizer: the `tokenizers` library for text <-> ids, jinja2 for the checkpoint's own chat template."""
from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from ..errors import CheckpointError
from ..io import atomic_write_text, read_json

# Pre-tokenizer split patterns as llama.cpp names them in `tokenizer.ggml.pre`.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


class Tokenizer:
    def __init__(self, backend: Backend, *, chat_template: str | None = None, bos_token: str | None = None,
                 eos_token: str | None = None, pad_token: str | None = None, config: dict[str, Any] | None = None):
        self.backend = backend
        self.chat_template = chat_template
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.config = dict(config or {})
        self._template = None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self.token_to_id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return self.token_to_id(self.eos_token)

    @property
    def pad_id(self) -> int | None:
        pad = self.token_to_id(self.pad_token)
        return self.eos_id if pad is None else pad

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True,
                            tokenize: bool = False, **kwargs) -> str | list[int]:
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template (tokenizer_config.json / GGUF tokenizer.chat_template)")
        if self._template is None:
            self._template = _jinja_env().from_string(self.chat_template)
        text = self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs)
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def save(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        atomic_write_text(directory / "tokenizer.json", self.backend.to_str(pretty=True))
        added = {str(i): {"content": t.content, "lstrip": t.lstrip, "rstrip": t.rstrip, "normalized": t.normalized,
                          "single_word": t.single_word, "special": t.special}
                 for i, t in sorted(self.backend.get_added_tokens_decoder().items())}
        cfg = dict(self.config)
        cfg.update({"tokenizer_class": "PreTrainedTokenizerFast", "added_tokens_decoder": added,
                    "bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token,
                    "clean_up_tokenization_spaces": False})
        if self.chat_template is not None:
            cfg["chat_template"] = self.chat_template
        atomic_write_text(directory / "tokenizer_config.json", json.dumps(cfg, indent=2, ensure_ascii=False))
        special = {k: v for k, v in (("bos_token", self.bos_token), ("eos_token", self.eos_token),
                                     ("pad_token", self.pad_token)) if v is not None}
        atomic_write_text(directory / "special_tokens_map.json", json.dumps(special, indent=2, ensure_ascii=False))

    @classmethod
    def from_dir(cls, directory: str | os.PathLike) -> "Tokenizer":
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(f"{path}: tokenizer file is missing (only tokenizer.json is supported)")
        try:
            backend = Backend.from_file(str(path))
        except Exception as e:
            raise CheckpointError(f"{path}: cannot be parsed by the tokenizers library: {e}") from None
        cfg_path = directory / "tokenizer_config.json"
        cfg = read_json(cfg_path) if cfg_path.is_file() else {}
        template = cfg.pop("chat_template", None)
        jinja_path = directory / "chat_template.jinja"
        if template is None and jinja_path.is_file():
            template = jinja_path.read_text(encoding="utf-8")
        if isinstance(template, list):  # named templates: use the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
        tokens = {k: _token_content(cfg.pop(k, None)) for k in ("bos_token", "eos_token", "pad_token")}
        for k in ("added_tokens_decoder", "tokenizer_class"):
            cfg.pop(k, None)
        return cls(backend, chat_template=template, config=cfg, **tokens)

    @classmethod
    def from_gguf_fields(cls, meta: dict[str, Any], source: str) -> "Tokenizer":
        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise CheckpointError(f"{source}: GGUF tokenizer model {kind!r} is not supported (only byte-level BPE, "
                                  "'gpt2'); load the Hugging Face directory of this model instead")
        tokens: list[str] = meta["tokenizer.ggml.tokens"]
        types: list[int] = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
        backend = Backend(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                     fuse_unk=False, byte_fallback=False))
        backend.pre_tokenizer = _gguf_pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"), source)
        backend.decoder = decoders.ByteLevel()
        # llama.cpp token types: 3 = control (special), 4 = user defined (added, not special)
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                    for t, ty in zip(tokens, types) if ty == 3])
        backend.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == 4])

        def tok(key):
            i = meta.get(f"tokenizer.ggml.{key}_token_id")
            return None if i is None else tokens[int(i)]

        bos, eos, pad = tok("bos"), tok("eos"), tok("padding")
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
        if add_bos and bos is not None:
            backend.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokens.index(bos))])
        cfg = {"add_bos_token": add_bos, "unk_token": tok("unknown"),
               "model_max_length": meta.get("context_length", 2048)}
        return cls(backend, chat_template=meta.get("tokenizer.chat_template"), bos_token=bos, eos_token=eos,
                   pad_token=pad, config=cfg)


def _token_content(tok):
    return tok.get("content") if isinstance(tok, dict) else tok


def _gguf_pre_tokenizer(pre: str, source: str):
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre in ("default", "gpt2", "gpt-2"):
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    split = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}.get(pre)
    if split is None:
        raise CheckpointError(f"{source}: GGUF pre-tokenizer {pre!r} is not supported "
                              "(supported: default/gpt2, smollm, llama-bpe, qwen2)")
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"), byte_level])


def _raise(message):
    raise TemplateError(message)


def _jinja_env() -> ImmutableSandboxedEnvironment:
    # The same environment transformers renders chat templates in, so outputs agree.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env
