"""Preference (reward) model: the decoder plus one linear unit read at each response's last token.

Saved in the Hugging Face layout as *ForSequenceClassification with num_labels=1 (the `score.weight`
head), so transformers loads it as a sequence-classification model.

Prefix-shared encoding packs a prompt and its K responses into one row in which each response attends
to the prompt and to itself only: the prompt is encoded once instead of K times.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open
from torch import Tensor, nn

from .checkpoint import save_hf_dir, weight_files
from ..errors import CheckpointError
from .loading import load_model
from .decoder import Transformer
from .tokenizer import Tokenizer

HEAD = "score.weight"


@dataclass(slots=True)
class PackedBatch:
    input_ids: Tensor          # [B, T]
    position_ids: Tensor       # [B, T]
    attention_mask: Tensor     # [B, T] 1 = real token
    attn_mask: Tensor | None   # [B, T, T] extra restriction (prefix sharing); None = plain causal rows
    read_index: Tensor         # [R] flat index into B*T of each response's last token, in input order

    def to(self, device) -> "PackedBatch":
        move = lambda t: None if t is None else t.to(device)
        return PackedBatch(*(move(getattr(self, f)) for f in self.__slots__))


def pack_shared(groups: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]], pad_id: int) -> PackedBatch:
    """One row per group: [prompt | response_1 | ... | response_K]; responses see the prompt and themselves."""
    rows, positions, segments, reads = [], [], [], []
    for prompt, responses in groups:
        if not responses:
            raise ValueError("a group needs at least one response")
        ids, pos, seg = list(prompt), list(range(len(prompt))), [0] * len(prompt)
        for k, resp in enumerate(responses, start=1):
            if not resp:
                raise ValueError("empty response: every response needs at least one token")
            ids += resp
            pos += range(len(prompt), len(prompt) + len(resp))
            seg += [k] * len(resp)
            reads.append((len(rows), len(ids) - 1))
        rows.append(ids)
        positions.append(pos)
        segments.append(seg)
    batch = _pad(rows, positions, pad_id, reads)
    seg = torch.zeros_like(batch.input_ids)
    for b, s in enumerate(segments):
        seg[b, : len(s)] = torch.tensor(s)
    batch.attn_mask = (seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None])
    return batch


def pack_separate(groups: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]], pad_id: int) -> PackedBatch:
    """One row per response, each with its own copy of the prompt (the baseline prefix sharing beats)."""
    rows, positions, reads = [], [], []
    for prompt, responses in groups:
        for resp in responses:
            if not resp:
                raise ValueError("empty response: every response needs at least one token")
            ids = list(prompt) + list(resp)
            reads.append((len(rows), len(ids) - 1))
            rows.append(ids)
            positions.append(list(range(len(ids))))
    return _pad(rows, positions, pad_id, reads)


def _pad(rows, positions, pad_id, reads) -> PackedBatch:
    T = max(len(r) for r in rows)
    B = len(rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    pos = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, (r, p) in enumerate(zip(rows, positions)):
        ids[b, : len(r)] = torch.tensor(r)
        pos[b, : len(p)] = torch.tensor(p)
        mask[b, : len(r)] = 1
    read = torch.tensor([b * T + t for b, t in reads], dtype=torch.long)
    return PackedBatch(ids, pos, mask, None, read)


class RewardModel(nn.Module):
    def __init__(self, backbone: Transformer):
        super().__init__()
        self.backbone = backbone
        self.score = nn.Linear(backbone.config.hidden_size, 1, bias=False,
                               dtype=backbone.dtype, device=backbone.device)
        nn.init.normal_(self.score.weight, std=1.0 / (backbone.config.hidden_size + 1) ** 0.5)

    @property
    def config(self):
        return self.backbone.config

    def forward(self, batch: PackedBatch) -> Tensor:
        """One fp32 reward per response, in the order the batch was packed."""
        full_rows = batch.attn_mask is None and bool(batch.attention_mask.all())
        hidden = self.backbone(batch.input_ids, position_ids=batch.position_ids,
                               attention_mask=None if full_rows else batch.attention_mask,
                               attn_mask=batch.attn_mask)
        last = hidden.reshape(-1, hidden.shape[-1])[batch.read_index]
        return self.score(last).squeeze(-1).float()

    def save(self, directory: str | os.PathLike, tokenizer: Tokenizer) -> None:
        """HF *ForSequenceClassification layout. transformers reads the score at the last token that is not
        `pad_token_id`; we read it at the response's last token, its EOS. Where pad == EOS (SmolLM2, Llama 3)
        transformers would read the token before the EOS, so the export names a pad token that differs."""
        arch = self.config.architecture.replace("ForCausalLM", "ForSequenceClassification")
        tokenizer = distinct_pad(tokenizer)
        save_hf_dir(self.backbone, tokenizer, directory, extra_tensors={HEAD: self.score.weight},
                    config_overrides={"architectures": [arch], "num_labels": 1, "pad_token_id": tokenizer.pad_id,
                                      "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}})

    @classmethod
    def load(cls, name_or_path: str | os.PathLike, *, dtype=None, device=None) -> tuple["RewardModel", Tokenizer]:
        """From a saved reward model (with its head), or from any checkpoint load_model takes (new head)."""
        backbone, tokenizer = load_model(name_or_path, dtype=dtype, device=device)
        model = cls(backbone)
        head = _read_head(Path(name_or_path))
        if head is not None:
            if head.shape != model.score.weight.shape:
                raise CheckpointError(f"{name_or_path}: tensor {HEAD!r} has shape {tuple(head.shape)}, "
                                      f"expected {tuple(model.score.weight.shape)}")
            with torch.no_grad():
                model.score.weight.copy_(head)
        return model, tokenizer


def distinct_pad(tokenizer: Tokenizer) -> Tokenizer:
    """The tokenizer, or a copy whose pad token is a special token other than EOS and BOS (one named like a
    pad token first, then an end-of-text token, then any other): never the token the reward is read at."""
    if tokenizer.pad_id is not None and tokenizer.pad_id not in (tokenizer.eos_id, tokenizer.bos_id):
        return tokenizer
    taken = {tokenizer.eos_id, tokenizer.bos_id}
    specials = [t.content for i, t in sorted(tokenizer.backend.get_added_tokens_decoder().items())
                if t.special and i not in taken]
    ranked = sorted(specials, key=lambda t: (0 if "pad" in t.lower() else 1 if "endoftext" in t.lower() else 2))
    if not ranked:
        raise CheckpointError("reward model export: the tokenizer has no special token other than EOS/BOS to pad "
                              "with, so transformers would score the token before the EOS")
    out = copy.copy(tokenizer)
    out.pad_token = ranked[0]
    return out


def _read_head(path: Path) -> Tensor | None:
    if not path.is_dir():
        return None
    for file in weight_files(path):
        with safe_open(str(file), framework="pt") as f:
            if HEAD in f.keys():
                return f.get_tensor(HEAD)
    return None
