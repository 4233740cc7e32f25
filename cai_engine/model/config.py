from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import CheckpointError

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(slots=True)
class ModelConfig:
    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_hidden_layers: int = 2
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)  # unused keys, kept for saving

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            raise CheckpointError(f"rope_scaling type {rope_type!r} is not supported (supported: {ROPE_TYPES})")

    @property
    def architecture(self) -> str:
        return ARCHITECTURES[self.model_type]

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        model_type = cfg.get("model_type")
        if model_type not in ARCHITECTURES:
            archs = cfg.get("architectures")
            raise CheckpointError(
                f"{source}: model_type={model_type!r} (architectures={archs}) is not supported; "
                f"expected one of {sorted(ARCHITECTURES)}")
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise CheckpointError(f"{source}: hidden_act={act!r} cannot be honoured; only 'silu' (SwiGLU) is supported")
        if cfg.get("mlp_bias"):
            raise CheckpointError(f"{source}: mlp_bias=true cannot be honoured")
        if cfg.get("pretraining_tp", 1) not in (1, None):
            raise CheckpointError(f"{source}: pretraining_tp={cfg['pretraining_tp']} cannot be honoured")
        rope = _rope_from_hf(cfg, source)
        sliding = cfg.get("sliding_window")
        if model_type == "qwen2" and not cfg.get("use_sliding_window", False):
            sliding = None
        attention_bias = cfg.get("attention_bias", model_type == "qwen2")
        known = set(cls.__dataclass_fields__) | {
            "architectures", "hidden_act", "mlp_bias", "pretraining_tp", "rope_parameters",
            "use_sliding_window", "torch_dtype", "dtype", "transformers_version"}
        try:
            return cls(
                model_type=model_type,
                vocab_size=cfg["vocab_size"],
                hidden_size=cfg["hidden_size"],
                intermediate_size=cfg["intermediate_size"],
                num_hidden_layers=cfg["num_hidden_layers"],
                num_attention_heads=cfg["num_attention_heads"],
                num_key_value_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
                head_dim=cfg.get("head_dim"),
                max_position_embeddings=cfg.get("max_position_embeddings", 2048),
                rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
                rope_theta=rope[0],
                rope_scaling=rope[1],
                tie_word_embeddings=cfg.get("tie_word_embeddings", False),
                attention_bias=bool(attention_bias),
                sliding_window=sliding,
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_id=cfg.get("eos_token_id"),
                pad_token_id=cfg.get("pad_token_id"),
                extra={k: v for k, v in cfg.items() if k not in known},
            )
        except KeyError as e:
            raise CheckpointError(f"{source}: required key {e.args[0]!r} is missing") from None
        except CheckpointError as e:
            raise CheckpointError(f"{source}: {e}") from None

    def to_hf(self) -> dict[str, Any]:
        d = asdict(self)
        extra = d.pop("extra")
        d.update({
            "architectures": [self.architecture],
            "hidden_act": "silu",
            "torch_dtype": "float32",
        })
        if d["rope_scaling"] is None:
            d.pop("rope_scaling")
        if self.model_type == "qwen2":
            d.pop("attention_bias")
            d["use_sliding_window"] = self.sliding_window is not None
        for k, v in extra.items():
            d.setdefault(k, v)
        return d


def _rope_from_hf(cfg: dict[str, Any], source: str) -> tuple[float, dict[str, Any] | None]:
    params = cfg.get("rope_parameters")
    if params is not None:  # transformers >= 5 folds theta and scaling into one dict
        params = dict(params)
        theta = params.pop("rope_theta", cfg.get("rope_theta", 10000.0))
        scaling = params if params.get("rope_type", "default") != "default" else None
    else:
        theta = cfg.get("rope_theta", 10000.0)
        scaling = cfg.get("rope_scaling")
    if scaling is not None:
        scaling = dict(scaling)
        rope_type = scaling.pop("type", None) or scaling.get("rope_type", "default")
        scaling["rope_type"] = rope_type
        if rope_type not in ROPE_TYPES:
            raise CheckpointError(f"{source}: rope_scaling type {rope_type!r} cannot be honoured (supported: {ROPE_TYPES})")
        if rope_type == "default":
            scaling = None
    return float(theta), scaling
