"""Our fused RMSNorm and SwiGLU inside transformers' Llama-family decoders, as Liger-Kernel swaps in its own.

Each RMSNorm runs `cai_engine.ops.rms_norm` (one pass each way, keeping x and one rstd per row instead of the
fp32 intermediates of the eager code) and each SiLU MLP runs `cai_engine.ops.swiglu` (keeping gate and up, not
silu(gate) too), its three projections `cai_engine.ops.projection` (under bf16 autocast on AMX CPUs, the weight
gradients in fp32 from our tile kernel); an MLP with another activation runs its own forward. With and without
autograd alike, so a policy and its frozen reference (DPO, KL penalties) score tokens with the same bits. The result dtype is the one
transformers gives (the weight's and the input's promotion), so nothing downstream changes; the values differ
from the eager code by float rounding only (one bf16 rounding where the eager code rounds twice).
"""
from __future__ import annotations

import importlib
import types
from typing import Callable

import torch
from torch import Tensor, nn

from ..ops import project, rms_norm, swiglu

# model_type -> (module, RMSNorm class, MLP class)
LAYER_CLASSES = {
    "llama": ("transformers.models.llama.modeling_llama", "LlamaRMSNorm", "LlamaMLP"),
    "mistral": ("transformers.models.mistral.modeling_mistral", "MistralRMSNorm", "MistralMLP"),
    "qwen2": ("transformers.models.qwen2.modeling_qwen2", "Qwen2RMSNorm", "Qwen2MLP"),
}
ORIGINAL = "_cai_engine_original_forward"  # on a patched instance or class: the forward it replaced


def norm_forward(module: nn.Module, hidden_states: Tensor, original: Callable[[Tensor], Tensor]) -> Tensor:
    out_dtype = torch.promote_types(module.weight.dtype, hidden_states.dtype)
    return rms_norm(hidden_states, module.weight, module.variance_epsilon, out_dtype=out_dtype)


def mlp_forward(module: nn.Module, x: Tensor, original: Callable[[Tensor], Tensor]) -> Tensor:
    if not is_silu(module):
        return original(x)
    return project(swiglu(project(x, module.gate_proj), project(x, module.up_proj)), module.down_proj)


def is_silu(mlp: nn.Module) -> bool:
    """The activation module itself decides (a config can be edited after the model is built)."""
    act = getattr(mlp, "act_fn", None)
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"  # transformers' own SiLU


NORM_NAMES = {norm for _, norm, _ in LAYER_CLASSES.values()}
MLP_NAMES = {mlp for _, _, mlp in LAYER_CLASSES.values()}


def _norms_and_mlps(model: nn.Module):
    for module in model.modules():
        name = type(module).__name__
        if name in NORM_NAMES:
            yield module, norm_forward
        elif name in MLP_NAMES:
            yield module, mlp_forward


def patch_layers(model: nn.Module) -> int:
    """Route one model's norms and SwiGLU MLPs through our ops; returns how many modules were patched."""
    count = 0
    for module, replacement in _norms_and_mlps(model):
        if ORIGINAL in module.__dict__ or ORIGINAL in type(module).__dict__:
            continue
        original = module.forward
        module.forward = types.MethodType(lambda self, x, _r=replacement, _o=original: _r(self, x, _o), module)
        setattr(module, ORIGINAL, original)
        count += 1
    return count


def unpatch_layers(model: nn.Module) -> None:
    for module, _ in _norms_and_mlps(model):
        if ORIGINAL in module.__dict__:
            module.forward = module.__dict__.pop(ORIGINAL)


def _classes() -> list[tuple[type, Callable]]:
    out = []
    for module_name, norm, mlp in LAYER_CLASSES.values():
        module = importlib.import_module(module_name)
        out += [(getattr(module, norm), norm_forward), (getattr(module, mlp), mlp_forward)]
    return out


def patch_layer_classes() -> None:
    """The same for every supported norm and MLP class (instances made before and after)."""
    for cls, replacement in _classes():
        if ORIGINAL not in cls.__dict__:
            original = cls.forward
            cls.forward = lambda self, x, _r=replacement, _o=original: _r(self, x, _o.__get__(self))
            setattr(cls, ORIGINAL, original)


def unpatch_layer_classes() -> None:
    for cls, _ in _classes():
        if ORIGINAL in cls.__dict__:
            cls.forward = cls.__dict__[ORIGINAL]
            delattr(cls, ORIGINAL)
