"""Fused training loss for transformers causal LMs of the Llama family: no [tokens, vocab] logits when labels are given.

The patched forward runs the model's own decoder, keeps only the positions whose (shifted) label counts, and feeds
their last hidden states and the LM head to `cai_engine.ops.token_logprobs`; the loss is -sum(log p) divided exactly
as transformers' `ForCausalLMLoss` divides it. Anything the fused path does not reproduce (a custom loss function,
return_dict=False callers asking for logits, ...) goes to the untouched original forward.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import types
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..ops import token_logprobs
from .attention import patch_attention, unpatch_attention
from .layers import patch_layers, unpatch_layers
from .scores import unwrap

# model_type -> (module, class). These share one forward: decoder -> slice(logits_to_keep) -> lm_head -> ForCausalLMLoss.
SUPPORTED = {
    "llama": ("transformers.models.llama.modeling_llama", "LlamaForCausalLM"),
    "mistral": ("transformers.models.mistral.modeling_mistral", "MistralForCausalLM"),
    "qwen2": ("transformers.models.qwen2.modeling_qwen2", "Qwen2ForCausalLM"),
}
PATCHED = "_cai_engine_original_forward"  # set on a patched instance or class: the forward it replaced


def causal_lm_loss(hidden: Tensor, head: nn.Linear, labels: Tensor | None, *, num_items_in_batch=None,
                   ignore_index: int = -100, shift_labels: Tensor | None = None, **_: Any) -> Tensor:
    """transformers' ForCausalLMLoss(lm_head(hidden), labels, ...) without the logits.

    Shift convention as there: position t predicts labels[t + 1] unless `shift_labels` (already aligned with the
    positions, as passed under packing/sequence parallelism) is given. Mean over non-ignored targets, or the sum
    divided by `num_items_in_batch` when given (gradient accumulation across micro-batches).
    """
    if shift_labels is None:
        shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    targets = shift_labels.to(hidden.device).reshape(-1)
    if targets.numel() != hidden.numel() // hidden.shape[-1]:
        raise ValueError(f"labels: expected {hidden.numel() // hidden.shape[-1]} targets to match hidden states "
                         f"{tuple(hidden.shape)}, got shape {tuple(shift_labels.shape)}")
    # Ignored positions (prompt, padding, the last token) never reach the LM head: only the counted rows are scored.
    keep = (targets != ignore_index).nonzero().squeeze(1)
    rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, keep)
    logp, _ = token_logprobs(rows, head.weight, targets.index_select(0, keep), bias=head.bias,
                             ignore_index=ignore_index)
    total = -logp.sum()
    if num_items_in_batch is None:
        return total / keep.numel()  # 0 / 0 = nan with no target, as cross_entropy(reduction="mean") gives
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def _uses_standard_loss(model: nn.Module) -> bool:
    """True when the model's loss is transformers' own ForCausalLMLoss (not a user override or another loss_type)."""
    from transformers.loss.loss_utils import ForCausalLMLoss
    return model.loss_function is ForCausalLMLoss


def check_supported(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        raise ValueError(f"{type(model).__name__}: model_type {model_type!r} is not supported by cai_engine.integrations "
                         f"(expected one of {sorted(SUPPORTED)})")
    if getattr(config, "final_logit_softcapping", None) is not None:
        raise ValueError(f"{type(model).__name__}: config.final_logit_softcapping is set; the fused loss has no softcap")
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise ValueError(f"{type(model).__name__}: expected the output embeddings to be nn.Linear, got {type(head).__name__}")


def fused_forward(model: nn.Module, original: Callable, signature: inspect.Signature, args: tuple, kwargs: dict):
    """One call of a patched model. Logits are skipped only when labels are given and the caller did not ask for
    them: `return_logits=True` forces them; by default they are skipped in training mode and kept in eval mode
    (Trainer.evaluate hands eval logits to compute_metrics)."""
    return_logits = kwargs.pop("return_logits", None)
    if return_logits is None:
        return_logits = not model.training
    if kwargs.get("labels") is None or return_logits or not _uses_standard_loss(model):
        return original(*args, **kwargs)
    call = signature.bind(*args, **kwargs).arguments
    for name, param in signature.parameters.items():  # fold the **kwargs dict back into plain keywords
        if param.kind is inspect.Parameter.VAR_KEYWORD and name in call:
            call.update(call.pop(name))
    labels = call.pop("labels", None)
    logits_to_keep = call.pop("logits_to_keep", 0)
    return_dict = call.pop("return_dict", None)
    outputs = model.base_model(**call)
    hidden = outputs.last_hidden_state
    if isinstance(logits_to_keep, int):
        hidden = hidden[:, -logits_to_keep:, :] if logits_to_keep else hidden
    else:
        hidden = hidden[:, logits_to_keep, :]
    loss = causal_lm_loss(hidden, model.get_output_embeddings(), labels, **call)
    from transformers.modeling_outputs import CausalLMOutputWithPast
    result = CausalLMOutputWithPast(loss=loss, logits=None,
                                    **{k: v for k, v in outputs.items() if k != "last_hidden_state"})
    if return_dict is False:
        return result.to_tuple()
    return result


def _wrap(cls_forward: Callable) -> Callable:
    signature = inspect.signature(cls_forward)
    signature = signature.replace(parameters=list(signature.parameters.values())[1:])  # drop self

    @functools.wraps(cls_forward)  # keep the signature: generate() and Trainer inspect it
    def forward(self, *args, **kwargs):
        return fused_forward(self, cls_forward.__get__(self), signature, args, kwargs)

    return forward


def patch(model: nn.Module) -> nn.Module:
    """Route this model's training loss through the fused log-prob op, its norms and SwiGLU MLPs through our
    fused ops while training (`layers.py`), and its SDPA attention through ours (`attention.py`); returns the
    model. Idempotent.

    A PEFT or DDP wrapper is looked through: the transformers model inside gets the fused forward."""
    inner = unwrap(model)
    check_supported(inner)
    patch_layers(inner)
    patch_attention(inner)
    if PATCHED in inner.__dict__ or PATCHED in type(inner).__dict__:
        return model
    original = inner.forward
    inner.forward = types.MethodType(_wrap(type(inner).forward), inner)
    setattr(inner, PATCHED, original)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    inner = unwrap(model)
    unpatch_layers(inner)
    unpatch_attention(inner)
    if PATCHED in inner.__dict__:
        inner.forward = inner.__dict__.pop(PATCHED)
    return model


def patch_classes() -> list[type]:
    """Patch the forward of every supported class (models created before and after); returns the classes patched."""
    patched = []
    for module_name, class_name in SUPPORTED.values():
        cls = getattr(importlib.import_module(module_name), class_name)
        if PATCHED not in cls.__dict__:
            original = cls.forward
            cls.forward = _wrap(original)
            setattr(cls, PATCHED, original)
        patched.append(cls)
    return patched


def unpatch_classes() -> None:
    for module_name, class_name in SUPPORTED.values():
        cls = getattr(importlib.import_module(module_name), class_name)
        if PATCHED in cls.__dict__:
            cls.forward = cls.__dict__[PATCHED]
            delattr(cls, PATCHED)
