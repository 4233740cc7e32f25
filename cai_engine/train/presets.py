"""Presets: named starting points for the run config, applied before `--config`, flags and `--set`.

- `tiny`: the seeded random tiny model (`tiny-random`), a handful of prompts, fp32: the whole pipeline in
  seconds. It checks the plumbing (every stage, resume, scale-out); its outputs are random bytes.
- `default`: the embedded SmolLM2-135M-Instruct sized for a 2-core CPU: the whole pipeline in about 9
  minutes on the 2-vCPU machine of `bench/RESULTS.md` (bench_e2e). Large enough for every stage to do real work,
  far too small for the report's differences to mean much: it says so. A stage command run without
  `--preset` starts from it too.
- `gpu`: a starting point for a 1-8B chat model on one or more GPUs (torchrun for more): the paper's four
  critique rounds over every built-in prompt, longer answers, bigger batches and KV caches, and PPO with a
  separate critic. It keeps `model.name` unless you set it (`--model DIR`): point it at the helpful chat model
  you start from, and `feedback.feedback_model` at a larger judge if you have one.
"""
from __future__ import annotations

from typing import Any

from ..model.tiny import TINY_MODEL
from .config import ConfigError, RunConfig, apply_mapping

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "run": {"dir": "runs/tiny"},
        "model": {"name": TINY_MODEL},
        "precision": {"mode": "fp32"},  # exact: a resumed run ends bit for bit where an uninterrupted one does
        "checkpoint": {"every": 1},
        "critique": {"limit": 6, "rounds": 1, "max_new_tokens": 8, "few_shot": 1, "batch_size": 2,
                     "kv_cache_mb": 16},
        # random bytes are always cut at max_new_tokens: keep them, or SFT would have nothing to learn from
        "sft": {"skip_flags": [], "epochs": 2, "batch_rows": 1, "max_seq_len": 1024, "eval_fraction": 0.2,
                "lr": 1e-3},
        "feedback": {"limit": 6, "max_new_tokens": 8, "principles_per_pair": 2, "batch_pairs": 2,
                     "kv_cache_mb": 16},
        "pm": {"epochs": 2, "batch_groups": 2, "eval_fraction": 0.2, "lr": 1e-3},
        "rl": {"limit": 4, "prompts_per_batch": 2, "max_new_tokens": 6, "epochs_per_batch": 1, "minibatches": 1,
               "micro_rows": 2, "lr": 1e-4, "kv_cache_mb": 16},
        # sampled: the random model's greedy answer is all special tokens, an empty text
        "report": {"limit": 2, "max_new_tokens": 8, "temperature": 1.0, "batch_size": 2, "kv_cache_mb": 16},
    },
    # also the base of a stage command run without --preset, so the two agree on what a run folder holds
    "default": {
        "critique": {"limit": 48, "rounds": 2, "max_new_tokens": 96, "batch_size": 16, "kv_cache_mb": 768},
        "sft": {"epochs": 3, "batch_rows": 2, "max_seq_len": 512, "lr": 2e-5},
        "feedback": {"limit": 64, "max_new_tokens": 96, "principles_per_pair": 2, "batch_pairs": 8},
        "rl": {"value_model": "head", "limit": 32, "prompts_per_batch": 8, "max_new_tokens": 64,
               "epochs_per_batch": 1, "lr": 2e-6},
        "report": {"limit": 16, "max_new_tokens": 96},
    },
    "gpu": {
        # 8B: 16 bytes of masters, gradients and AdamW per parameter already fill most of an 80 GB card, so the
        # activations of 8 x 2,048-token rows must be recomputed rather than kept
        "run": {"dir": "runs/gpu", "activation_checkpointing": True},
        "precision": {"mode": "bf16-mixed"},
        "checkpoint": {"every": 50, "keep": 2},
        "critique": {"limit": 0, "rounds": 4, "max_new_tokens": 256, "batch_size": 64, "kv_cache_mb": 16384},
        "sft": {"epochs": 2, "batch_rows": 8, "max_seq_len": 2048, "grad_accum": 4, "lr": 1e-5},
        "feedback": {"limit": 0, "max_new_tokens": 256, "principles_per_pair": 4, "batch_pairs": 32,
                     "kv_cache_mb": 16384},
        "pm": {"epochs": 1, "batch_groups": 16, "grad_accum": 2, "lr": 1e-5},
        "rl": {"algorithm": "ppo", "value_model": "critic", "limit": 0, "prompts_per_batch": 64,
               "samples_per_prompt": 4, "max_new_tokens": 256, "epochs_per_batch": 2, "minibatches": 4,
               "micro_rows": 16, "lr": 1e-6, "kv_cache_mb": 16384},
        "report": {"limit": 0, "max_new_tokens": 256, "batch_size": 64, "kv_cache_mb": 16384},
    },
}


def apply_preset(config: RunConfig, name: str = "default") -> RunConfig:
    if name not in PRESETS:
        raise ConfigError(f"--preset {name}: unknown preset; expected one of {', '.join(PRESETS)}")
    apply_mapping(config, PRESETS[name], f"preset {name}")
    return config
