"""The run configuration: nested slots dataclasses, one section per stage plus shared ones.

Resolved in this order, later wins: the dataclass defaults, a TOML file (`--config`), the stage's own
command-line flags, then `--set section.key=value`. Every key is typed by its dataclass field; an unknown
key or section is an error that names it and suggests the closest valid one, and impossible values are
refused before any work starts. `to_toml()` prints the resolved config (`--print-config`) and is what a
run folder keeps beside its outputs.
"""
from __future__ import annotations

import difflib
import json
import math
import sys
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from ..cai.critique import CritiqueConfig
from ..cai.feedback import FeedbackConfig
from ..model.loading import DEFAULT_MODEL


class ConfigError(ValueError):
    """A config file, key or value that cannot be used; the message names it and what was expected."""


def setting(default: Any, help: str, *, check: str = "", choices: tuple = ()) -> Any:
    """A config field with its one-line help and the rule its value must obey.

    check: "positive" (> 0), "non_negative" (>= 0), "fraction" ([0, 1)), "probability" ([0, 1]) or "".
    """
    meta = {"help": help, "check": check, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(slots=True)
class RunSection:
    dir: str = setting("runs/cai", "run folder: each stage writes <dir>/<stage>/")
    seed: int = setting(0, "seed of every random choice (data order, sampling, initialisation)")
    device: str = setting("auto", "auto (CUDA when present, else CPU), cpu, cuda or cuda:N")
    parallel: str = setting("ddp", "training stages under torchrun: ddp (a whole model per rank) or fsdp (FSDP2: "
                            "parameters, gradients and optimizer state sharded over the ranks; sft and pm)",
                            choices=("ddp", "fsdp"))
    activation_checkpointing: bool = setting(False, "training stages keep only each decoder layer's input and "
                                             "recompute the layer in backward: a fraction of the activation "
                                             "memory for about a third more compute; results are unchanged")


@dataclass(slots=True)
class ModelSection:
    name: str = setting(DEFAULT_MODEL, "initial model: the embedded default, an HF directory or a .gguf file")


@dataclass(slots=True)
class PrecisionSection:
    mode: str = setting("auto", "bf16-mixed (fp32 master weights, bf16 matmuls), fp32, or auto: bf16-mixed where "
                        "bf16 matmuls are fast (CUDA; CPUs with AVX512-BF16 or AMX), fp32 elsewhere",
                        choices=("auto", "bf16-mixed", "fp32"))


@dataclass(slots=True)
class OptimizerSection:
    name: str = setting("adamw", "adamw (the fused kernel) or adamw8bit (bitsandbytes, CUDA only)",
                        choices=("adamw", "adamw8bit"))
    weight_decay: float = setting(0.0, "decoupled weight decay", check="non_negative")
    beta1: float = setting(0.9, "Adam beta1", check="fraction")
    beta2: float = setting(0.999, "Adam beta2", check="fraction")
    eps: float = setting(1e-8, "Adam epsilon", check="positive")
    max_grad_norm: float = setting(1.0, "clip the global gradient norm to this (0 = no clipping)", check="non_negative")
    schedule: str = setting("cosine", "learning-rate schedule after warmup", choices=("cosine", "constant"))
    warmup_steps: int = setting(0, "optimizer steps of linear warmup", check="non_negative")


@dataclass(slots=True)
class CheckpointSection:
    every: int = setting(0, "write a checkpoint every N optimizer steps (0 = only at the end)", check="non_negative")
    keep: int = setting(2, "checkpoints kept per stage (older ones are deleted)", check="positive")


@dataclass(slots=True)
class PMSection:
    data: str = setting("", "comparisons JSONL, our format or HH-RLHF chosen/rejected (empty = "
                        "<run.dir>/feedback/comparisons.jsonl)")
    eval_data: str = setting("", "held-out comparisons JSONL (empty = split eval_fraction off the data)")
    eval_fraction: float = setting(0.1, "share of the data held out for evaluation when eval_data is empty",
                                   check="fraction")
    init: str = setting("", "checkpoint the PM starts from (empty = model.name)")
    epochs: int = setting(1, "passes over the training data", check="positive")
    batch_groups: int = setting(4, "prompts (with all their responses) per micro-batch", check="positive")
    grad_accum: int = setting(1, "micro-batches per optimizer step", check="positive")
    lr: float = setting(1e-5, "peak learning rate", check="positive")
    center_coef: float = setting(0.0, "weight of the penalty that keeps rewards centred at 0", check="non_negative")
    max_prompt_tokens: int = setting(1024, "prompt tokens kept (the end of a long conversation)", check="positive")
    max_response_tokens: int = setting(512, "response tokens kept, EOS included", check="positive")
    prefix_sharing: bool = setting(True, "encode each prompt once for all its responses")
    eval_every: int = setting(0, "evaluate every N optimizer steps (0 = at the end of each epoch)",
                              check="non_negative")


def library_default(cls, name: str) -> Any:
    """The default of a library config field (cai/ owns its defaults; the run config adds help and rules)."""
    return cls.__dataclass_fields__[name].default


@dataclass(slots=True)
class CritiqueSection:
    constitution: str = setting("", "constitution: a TOML/JSON file, a folder of the paper's files, or empty for ours")
    prompts: str = setting("", "prompts JSONL (prompt / messages / HH transcript per line); empty = the built-in "
                           "train split")
    limit: int = setting(library_default(CritiqueConfig, "limit"), "only the first N prompts (0 = all)",
                         check="non_negative")
    rounds: int = setting(library_default(CritiqueConfig, "rounds"), "critique -> revision rounds per prompt",
                          check="positive")
    max_new_tokens: int = setting(library_default(CritiqueConfig, "max_new_tokens"),
                                  "tokens per generation (answer, critique, revision)", check="positive")
    temperature: float = setting(library_default(CritiqueConfig, "temperature"), "sampling temperature",
                                 check="non_negative")
    top_p: float = setting(library_default(CritiqueConfig, "top_p"), "nucleus sampling", check="positive")
    revise_only: bool = setting(library_default(CritiqueConfig, "revise_only"),
                                "revise directly from the revision request, without a critique")
    few_shot: int = setting(library_default(CritiqueConfig, "few_shot"),
                            "few-shot examples in front (-1 = all of the constitution's)")
    batch_size: int = setting(library_default(CritiqueConfig, "batch_size"),
                              "prompts generated together (records are written after each batch)", check="positive")
    kv_cache_mb: int = setting(1024, "the sampler's KV cache", check="positive")


@dataclass(slots=True)
class FeedbackSection:
    prompts: str = setting("", "prompts JSONL; empty = the built-in train split")
    limit: int = setting(0, "only the first N prompts (0 = all)", check="non_negative")
    policy: str = setting("", "model that samples the answer pairs (empty = <run.dir>/sft/final, else model.name)")
    feedback_model: str = setting("", "model that judges the pairs (empty = model.name, the initial model)")
    max_new_tokens: int = setting(128, "answer tokens sampled at most", check="positive")
    temperature: float = setting(1.0, "sampling temperature of the answers", check="positive")
    top_p: float = setting(0.95, "nucleus sampling of the answers", check="positive")
    principles_per_pair: int = setting(library_default(FeedbackConfig, "principles_per_pair"),
                                       "comparison principles per pair, probabilities averaged (1 = no ensemble)",
                                       check="positive")
    position_swap: bool = setting(library_default(FeedbackConfig, "position_swap"),
                                  "score both orders of the answers and average (removes the letter bias)")
    chain_of_thought: bool = setting(library_default(FeedbackConfig, "chain_of_thought"),
                                     "the feedback model reasons first, then the options are scored")
    clamp_low: float = setting(library_default(FeedbackConfig, "clamp_low"),
                               "chain-of-thought probabilities are clamped to [clamp_low, clamp_high]",
                               check="probability")
    clamp_high: float = setting(library_default(FeedbackConfig, "clamp_high"), "see clamp_low", check="probability")
    chat_template: bool = setting(library_default(FeedbackConfig, "chat_template"),
                                  "wrap the question in the feedback model's chat template (raw text otherwise)")
    batch_pairs: int = setting(library_default(FeedbackConfig, "batch_pairs"),
                               "pairs per scoring call (and per fsync of the output)", check="positive")
    kv_cache_mb: int = setting(512, "the sampler's KV cache", check="positive")


@dataclass(slots=True)
class SFTSection:
    data: str = setting("", "critique records JSONL (empty = <run.dir>/critique/revisions.jsonl)")
    targets: str = setting("final", "train on the final revision only, or on every round's revision",
                           choices=("final", "all"))
    skip_flags: list[str] = setting(["empty", "cut", "echo"], "leave out revisions flagged with any of these "
                                    "(empty, cut at max tokens, echoing the request, unchanged); flags of the "
                                    "answer and critiques before them do not count")
    helpful_data: str = setting("", "JSONL of helpfulness samples ({prompt or messages, response}) mixed in")
    eval_fraction: float = setting(0.05, "share of the examples held out for evaluation", check="fraction")
    max_seq_len: int = setting(1024, "tokens per packed row (examples are packed, attention kept apart)",
                               check="positive")
    epochs: int = setting(1, "passes over the training data", check="positive")
    batch_rows: int = setting(4, "packed rows per micro-batch", check="positive")
    grad_accum: int = setting(1, "micro-batches per optimizer step", check="positive")
    lr: float = setting(1e-5, "peak learning rate", check="positive")
    eval_every: int = setting(0, "evaluate every N optimizer steps (0 = at the end of each epoch)",
                              check="non_negative")


@dataclass(slots=True)
class RLSection:
    algorithm: str = setting("ppo", "ppo (value model, GAE, clipped surrogate) or rloo (leave-one-out baseline)",
                             choices=("ppo", "rloo"))
    prompts: str = setting("", "prompts JSONL; empty = the built-in train split")
    limit: int = setting(0, "only the first N prompts (0 = all)", check="non_negative")
    policy: str = setting("", "policy and frozen reference (empty = <run.dir>/sft/final, else model.name)")
    reward_model: str = setting("", "preference model (empty = <run.dir>/pm/final)")
    value_model: str = setting("critic", "PPO's value model: a separate critic initialised from the PM, or a "
                               "head on the policy trunk", choices=("critic", "head"))
    epochs: int = setting(1, "passes over the prompts", check="positive")
    prompts_per_batch: int = setting(16, "prompts per rollout batch", check="positive")
    samples_per_prompt: int = setting(2, "answers sampled per prompt (RLOO needs >= 2)", check="positive")
    share_prompts: bool = setting(True, "run each prompt once for all its answers in the trainer's forward passes "
                                  "(the answers attend to the prompt and to themselves; one row each when false); "
                                  "PPO minibatches then hold whole prompts' answers")
    max_new_tokens: int = setting(128, "answer tokens sampled at most", check="positive")
    max_prompt_tokens: int = setting(512, "prompt tokens kept (the end of a long conversation)", check="positive")
    temperature: float = setting(1.0, "sampling temperature (the trainer scores at the same one)", check="positive")
    top_p: float = setting(1.0, "nucleus sampling (1 = off; the importance weights correct for it)",
                           check="positive")
    epochs_per_batch: int = setting(2, "passes over each rollout batch", check="positive")
    minibatches: int = setting(2, "optimizer steps per pass over a rollout batch", check="positive")
    # 16: each forward/backward pays ~0.75 s of per-pass costs at the 135M model (casting both models' weights,
    # writing their fp32 gradients, the LM head's layout) whatever its rows; 16 rows instead of 8 made a PPO
    # iteration of bench_rl 1.9 s faster (27.9 -> 26.0 s) at 0.7 GB more peak memory without checkpointing
    micro_rows: int = setting(16, "sequences per forward/backward (gradient accumulation inside a minibatch); "
                              "fewer save activation memory", check="positive")
    lr: float = setting(1e-6, "peak learning rate", check="positive")
    kl_coef: float = setting(0.05, "beta: weight of the per-token KL to the reference in the reward",
                             check="non_negative")
    kl_estimator: str = setting("k1", "per-token KL: k1 (log ratio), k3 (unbiased, positive), or full (exact, "
                                "over the whole vocabulary)", choices=("k1", "k3", "full"))
    kl_target: float = setting(0.0, "adapt beta towards this KL per answer (0 = fixed beta)", check="non_negative")
    kl_horizon: int = setting(10000, "answers over which the adaptive beta moves by its error", check="positive")
    clip_range: float = setting(0.2, "PPO ratio clip", check="positive")
    value_clip: float = setting(0.2, "PPO value clip", check="positive")
    vf_coef: float = setting(0.1, "weight of the value loss", check="non_negative")
    entropy_coef: float = setting(0.0, "entropy bonus", check="non_negative")
    gamma: float = setting(1.0, "discount", check="probability")
    lam: float = setting(0.95, "GAE lambda", check="probability")
    whiten_rewards: bool = setting(False, "standardise the PM scores over each rollout batch")
    whiten_advantages: bool = setting(True, "standardise the advantages over each rollout batch")
    is_truncation: float = setting(2.0, "cap of the sampler -> trainer importance weights", check="positive")
    kv_cache_mb: int = setting(512, "the sampler's KV cache", check="positive")


@dataclass(slots=True)
class ReportSection:
    prompts: str = setting("", "prompts JSONL; empty = the built-in held-out split (red-team and helpful, "
                           "reported apart)")
    limit: int = setting(0, "only the first N prompts of each kind (0 = all)", check="non_negative")
    max_new_tokens: int = setting(128, "answer tokens generated at most", check="positive")
    temperature: float = setting(0.0, "sampling temperature of the answers (0 = greedy)", check="non_negative")
    judge: str = setting("", "model that judges win rates (empty = feedback.feedback_model, else model.name)")
    mc_evals: list[str] = setting([], "multiple-choice eval JSONL files (prompt, corrects, incorrects) run on "
                                  "every model")
    samples: int = setting(3, "prompts shown side by side (every model's answer) in report.md",
                           check="non_negative")
    batch_size: int = setting(16, "prompts answered together (answers are appended after each batch)",
                              check="positive")
    kv_cache_mb: int = setting(512, "the sampler's KV cache", check="positive")


@dataclass(slots=True)
class RunConfig:
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    precision: PrecisionSection = field(default_factory=PrecisionSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    critique: CritiqueSection = field(default_factory=CritiqueSection)
    sft: SFTSection = field(default_factory=SFTSection)
    feedback: FeedbackSection = field(default_factory=FeedbackSection)
    pm: PMSection = field(default_factory=PMSection)
    rl: RLSection = field(default_factory=RLSection)
    report: ReportSection = field(default_factory=ReportSection)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return asdict(self)

    def section(self, name: str) -> dict[str, Any]:
        return asdict(getattr(self, name))


SHARED_SECTIONS = ("run", "model", "precision", "optimizer", "checkpoint")


# ---------------------------------------------------------------------------------------------------------
# reading, overriding, validating


def sections(config: RunConfig) -> dict[str, Any]:
    return {f.name: getattr(config, f.name) for f in fields(config)}


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def apply_mapping(config: RunConfig, mapping: dict[str, Any], source: str) -> None:
    """Set every `section.key` of a parsed TOML document on the config (values checked by type)."""
    for section_name, values in mapping.items():
        section = _section(config, section_name, source)
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: [{section_name}] must be a table of keys, got {_show(values)}")
        for key, value in values.items():
            _assign(section, section_name, key, value, source, from_text=False)


def apply_override(config: RunConfig, assignment: str) -> None:
    """`section.key=value` from the command line; the value is read as the field's type."""
    source = f"--set {assignment}"
    name, sep, value = assignment.partition("=")
    if not sep or "." not in name:
        raise ConfigError(f"{source}: expected section.key=value, for example pm.lr=3e-5")
    section_name, key = name.strip().split(".", 1)
    _assign(_section(config, section_name, source), section_name, key.strip(), value.strip(), source, from_text=True)


def set_value(config: RunConfig, dotted: str, value: Any, source: str) -> None:
    section_name, key = dotted.split(".", 1)
    _assign(_section(config, section_name, source), section_name, key, value, source, from_text=False)


def validate(config: RunConfig) -> None:
    """Refuse impossible values before any work starts: one error naming the key, the value and the rule."""
    for section_name, section in sections(config).items():
        for f in fields(section):
            value = getattr(section, f.name)
            key = f"{section_name}.{f.name}"
            check, choices = f.metadata.get("check", ""), f.metadata.get("choices", ())
            if choices and value not in choices:
                raise ConfigError(f"{key} = {_show(value)}: expected one of {', '.join(map(str, choices))}")
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{key} = {value}: expected a finite number")
            rule = {"positive": (lambda v: v > 0, "> 0"), "non_negative": (lambda v: v >= 0, ">= 0"),
                    "fraction": (lambda v: 0 <= v < 1, "in [0, 1)"),
                    "probability": (lambda v: 0 <= v <= 1, "in [0, 1]")}.get(check)
            if rule and not rule[0](value):
                raise ConfigError(f"{key} = {_show(value)}: expected a value {rule[1]}")


def to_toml(config: RunConfig) -> str:
    lines = []
    for section_name, section in sections(config).items():
        lines.append(f"[{section_name}]")
        for f in fields(section):
            lines.append(f"{f.name} = {_toml_value(getattr(section, f.name))}")
        lines.append("")
    return "\n".join(lines)


def diff(old: dict[str, dict[str, Any]], new: dict[str, dict[str, Any]]) -> list[str]:
    """`section.key` of every value that differs between two resolved configs (as dicts)."""
    out = []
    for section_name in sorted(set(old) | set(new)):
        a, b = old.get(section_name, {}), new.get(section_name, {})
        for key in sorted(set(a) | set(b)):
            if a.get(key, MISSING) != b.get(key, MISSING):
                out.append(f"{section_name}.{key} ({_show(a.get(key))} -> {_show(b.get(key))})")
    return out


def field_help(config: RunConfig, dotted: str) -> tuple[str, Any, type]:
    """Help text, current value and type of one key (for command-line flags)."""
    section_name, key = dotted.split(".", 1)
    section = getattr(config, section_name)
    f = next(f for f in fields(section) if f.name == key)
    return f.metadata["help"], getattr(section, key), _field_type(section, f)


def _section(config: RunConfig, name: str, source: str):
    names = [f.name for f in fields(config)]
    if name not in names:
        raise ConfigError(f"{source}: unknown section [{name}]{_suggest(name, names)}")
    return getattr(config, name)


def _assign(section, section_name: str, key: str, value: Any, source: str, *, from_text: bool) -> None:
    names = [f.name for f in fields(section)]
    if key not in names:
        raise ConfigError(f"{source}: unknown key {section_name}.{key}{_suggest(key, names, section_name + '.')}")
    f = next(f for f in fields(section) if f.name == key)
    kind = _field_type(section, f)
    converted = _convert(value, kind, from_text)
    if converted is _BAD:
        raise ConfigError(f"{source}: {section_name}.{key} = {_show(value)}: expected {_type_name(kind)}")
    setattr(section, key, converted)


_BAD = object()


def _field_type(section, f) -> Any:
    hints = typing.get_type_hints(type(section))
    return hints[f.name]


def _convert(value: Any, kind: Any, from_text: bool) -> Any:
    origin = typing.get_origin(kind)
    if origin is list:
        (item,) = typing.get_args(kind)
        if from_text:
            text = value.strip()
            if text.startswith("["):
                try:
                    value = tomllib.loads(f"v = {text}")["v"]
                except tomllib.TOMLDecodeError:
                    return _BAD
            else:
                value = [v.strip() for v in text.split(",") if v.strip()]
        if not isinstance(value, list):
            return _BAD
        items = [_convert(v, item, from_text and isinstance(v, str) and item is not str) for v in value]
        return _BAD if any(i is _BAD for i in items) else items
    if kind is bool:
        if isinstance(value, bool):
            return value
        if from_text and isinstance(value, str):
            return {"true": True, "1": True, "yes": True, "on": True,
                    "false": False, "0": False, "no": False, "off": False}.get(value.lower(), _BAD)
        return _BAD
    if kind is int:
        if isinstance(value, bool):
            return _BAD
        if isinstance(value, int):
            return value
        if from_text and isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                return _BAD
        return _BAD
    if kind is float:
        if isinstance(value, bool):
            return _BAD
        if isinstance(value, (int, float)):
            return float(value)
        if from_text and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                return _BAD
        return _BAD
    if kind is str:
        return value if isinstance(value, str) else _BAD
    raise TypeError(f"config fields of type {kind} are not supported")


def _type_name(kind: Any) -> str:
    if typing.get_origin(kind) is list:
        return f"a list of {_type_name(typing.get_args(kind)[0])}s"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(kind, str(kind))


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid TOML basic string


def _show(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (str, list)) else str(value)


def _suggest(name: str, options: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f"; did you mean {prefix}{close[0]}?" if close else f"; valid: {', '.join(options)}"


def resolve(*, config_file: str | None = None, flags: dict[str, Any] | None = None,
            overrides: list[str] | None = None, base: RunConfig | None = None) -> RunConfig:
    """Defaults (or `base`), then the TOML file, then flags ({"pm.lr": 3e-5}), then `--set` overrides; validated."""
    config = base or RunConfig()
    if config_file:
        apply_mapping(config, load_toml(config_file), str(config_file))
    for dotted, value in (flags or {}).items():
        if value is not None:
            set_value(config, dotted, value, "--" + dotted.split(".", 1)[1].replace("_", "-"))
    for assignment in overrides or []:
        apply_override(config, assignment)
    validate(config)
    return config


# the sections each stage's results depend on, beside its own section, the model and the seed; a stage whose
# part of the config changed is stale (refused by a stage command, rerun with the stages after it by the pipeline)
STAGE_INPUTS = {"critique": ("precision",), "sft": ("precision", "optimizer"),
                "feedback": ("critique.constitution", "precision"), "pm": ("precision", "optimizer"),
                "rl": ("precision", "optimizer"), "report": ("feedback.feedback_model", "precision")}


def stage_key(config: RunConfig, stage: str) -> dict[str, dict[str, Any]]:
    """The part of the resolved config a stage's outputs depend on (saved beside them, compared on rerun)."""
    key: dict[str, dict[str, Any]] = {"model": config.section("model"), stage: config.section(stage),
                                      "run": {"seed": config.run.seed}}
    for name in STAGE_INPUTS.get(stage, ()):
        section_name, _, field_name = name.partition(".")
        values = config.section(section_name)
        key[section_name] = {field_name: values[field_name]} if field_name else values
    return key


__all__ = ["CheckpointSection", "ConfigError", "ModelSection", "OptimizerSection", "PMSection", "PrecisionSection",
           "RLSection", "ReportSection", "RunConfig", "RunSection", "SFTSection", "apply_mapping", "apply_override",
           "diff", "field_help", "load_toml", "resolve", "setting", "stage_key", "to_toml", "validate"]
