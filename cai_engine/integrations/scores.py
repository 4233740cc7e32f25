"""Per-token log-probs and reward/value reads of a transformers model, straight from the last hidden states.

`selective_logprobs` is the policy/reference log-prob every RL or preference loss needs (GRPO, RLOO, PPO, DPO):
the decoder runs once, and only the completion positions reach the LM head, through the fused op, so neither the
[batch, length, vocab] logits nor their log-softmax are ever built.

`sequence_scores` is a *ForSequenceClassification reward model's score: transformers applies the score head to
every position and then picks the last one; we pick the last hidden state first and apply the head to it only.
`token_values` is the same head at every position, the per-token value a PPO critic needs.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops import token_logprobs


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside DDP/accelerate (`.module`) and PEFT (`get_base_model()`) wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def last_hidden_states(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None, **kwargs) -> Tensor:
    """The decoder's output (after the final norm) for a transformers *ForCausalLM / *ForSequenceClassification."""
    return model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                            **kwargs).last_hidden_state


def selective_logprobs(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None, completion_mask: Tensor,
                       temperature: float = 1.0, *, return_entropy: bool = False,
                       **model_kwargs) -> tuple[Tensor, Tensor | None]:
    """log p(input_ids[t] | input_ids[<t]) at each completion token, and optionally the entropy there, without logits.

    completion_mask: [B, C] over the last C tokens of input_ids (TRL's `completion_mask`, C = `logits_to_keep`), or
    [B, T] over all of them. Returns fp32 tensors shaped like completion_mask, 0 where it is 0; gradients flow into
    the model (call under torch.no_grad() for a reference or old policy). `temperature` divides the logits, as in the
    sampler that produced the completion.
    """
    model = unwrap(model)
    if input_ids.dim() != 2 or completion_mask.dim() != 2 or completion_mask.shape[0] != input_ids.shape[0] \
            or completion_mask.shape[1] > input_ids.shape[1]:
        raise ValueError(f"completion_mask: expected [{input_ids.shape[0]}, C <= {input_ids.shape[-1]}] "
                         f"for input_ids {tuple(input_ids.shape)}, got {tuple(completion_mask.shape)}")
    batch, length = input_ids.shape
    width = completion_mask.shape[1]
    start = length - width  # first completion column in input_ids
    mask = completion_mask.to(input_ids.device).bool()
    if start == 0 and bool(mask[:, 0].any()):
        raise ValueError("completion_mask: column 0 is set, but the first token has no preceding token to score it")
    hidden = last_hidden_states(model, input_ids, attention_mask, **model_kwargs)
    head = model.get_output_embeddings()
    # Only the scored tokens reach the LM head: token (b, start + c) is predicted by hidden state (b, start + c - 1).
    keep = mask.reshape(-1).nonzero().squeeze(1)
    token = (keep // width) * length + start + keep % width
    rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, token - 1)
    logp, entropy = token_logprobs(rows, head.weight, input_ids.reshape(-1).index_select(0, token), bias=head.bias,
                                   temperature=temperature, return_entropy=return_entropy)

    def place(values: Tensor) -> Tensor:
        return values.new_zeros(batch * width).index_copy(0, keep, values).view(batch, width)

    return place(logp), (place(entropy) if return_entropy else None)


def _last_positions(attention_mask: Tensor) -> Tensor:
    """Index of each row's last attended token (right or left padding alike)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.bool()).argmax(-1)


def sequence_scores(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None,
                    **model_kwargs) -> Tensor:
    """A *ForSequenceClassification model's score [B, num_labels] at each row's last attended token.

    Equals `model(input_ids, attention_mask=...).logits` wherever the model's pad-token rule and the attention mask
    agree on the last real token; here the attention mask decides, so a pad id that is also a real token (pad = eos)
    cannot move the read.
    """
    model = unwrap(model)
    hidden = last_hidden_states(model, input_ids, attention_mask, **model_kwargs)
    if attention_mask is None:
        last = torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, device=hidden.device)
    else:
        last = _last_positions(attention_mask.to(hidden.device))
    read = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return model.score(read)


def token_values(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None,
                 **model_kwargs) -> Tensor:
    """A one-unit *ForSequenceClassification head read at every position: [B, T] values for a PPO critic."""
    model = unwrap(model)
    hidden = last_hidden_states(model, input_ids, attention_mask, **model_kwargs)
    if model.score.out_features != 1:
        raise ValueError(f"{type(model).__name__}.score: expected 1 output (a value head), got {model.score.out_features}")
    return model.score(hidden).squeeze(-1)
