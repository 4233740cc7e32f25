"""`python -m cai_engine.train` (or `cai-engine-train`): the whole Constitutional AI pipeline, or one stage.

With no stage it runs critique -> sft -> feedback -> pm -> rl -> report in one run folder, after printing
the plan (what each stage will do, and a time estimate); rerun the same command after a crash or a kill to
go on where it stopped. `--preset tiny|default|gpu` picks a starting config (default: `default`, the embedded
SmolLM2-135M sized for a 2-core CPU).

`python -m cai_engine.train STAGE ...` runs one stage. The config is resolved in this order, later wins:
defaults, the preset, `--config FILE.toml`, flags, `--set section.key=value`. Outputs go to
`<run-dir>/<stage>/`; the resolved config is saved as `<run-dir>/config.toml`. A stage run on its own
refuses a folder made with another config (unless `--resume-with-new-config`); the pipeline instead runs
that stage and the ones after it again, moving the old outputs to `<run-dir>/superseded/`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import __version__
from ..data.comparisons import DataError
from ..errors import CheckpointError
from ..io import atomic_write_text
from .config import ConfigError, RunConfig, field_help, resolve, to_toml
from .distributed import init_from_environment, is_main
from .loop import TrainingError
from .pipeline import run_pipeline
from .presets import PRESETS, apply_preset
from .stages import STAGES as PIPELINE_STAGES
from .stages import run_stage

# flags every stage takes, as aliases of shared config keys
SHARED_FLAGS = {"model": "model.name", "seed": "run.seed", "device": "run.device", "precision": "precision.mode",
                "optimizer": "optimizer.name", "weight_decay": "optimizer.weight_decay",
                "max_grad_norm": "optimizer.max_grad_norm", "schedule": "optimizer.schedule",
                "warmup_steps": "optimizer.warmup_steps", "checkpoint_every": "checkpoint.every",
                "keep_checkpoints": "checkpoint.keep"}
# flags of the pipeline command, as aliases of config keys (one flag may set several)
PIPELINE_FLAGS = {"model": ("model.name",), "feedback_model": ("feedback.feedback_model",), "pm_init": ("pm.init",),
                  "seed": ("run.seed",), "device": ("run.device",), "precision": ("precision.mode",),
                  "limit": ("critique.limit", "feedback.limit", "rl.limit")}
STAGES = {"critique": "sample answers, then critique and revise them against the constitution (SL-CAI)",
          "sft": "finetune the model on its revised answers (SL-CAI)",
          "feedback": "sample answer pairs from the SL-CAI model and label them by AI feedback (RL-CAI)",
          "pm": "train a preference model on comparisons JSONL",
          "rl": "PPO or RLOO against the preference model with a KL penalty (RL-CAI)",
          "report": "compare the initial, SL-CAI and RL-CAI models on held-out prompts -> report.md + plots"}


def stage_flags(stage: str) -> dict[str, str]:
    """flag name (underscored) -> config key, for one stage: its own section's keys, then the shared aliases."""
    section = getattr(RunConfig(), stage)
    flags = {name: f"{stage}.{name}" for name in section.__slots__}
    flags.update(SHARED_FLAGS)
    return flags


def add_common_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    defaults = apply_preset(RunConfig())
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="starting config: tiny (random tiny model, seconds), default (the embedded model "
                             "on a 2-core CPU), gpu (a 1-8B model on GPUs); see train/presets.py")
    parser.add_argument("--config", metavar="FILE", help="TOML run config (sections as in --print-config)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config key, typed by the config (repeatable), e.g. --set pm.lr=3e-5")
    parser.add_argument("--run-dir", metavar="DIR", help=f"run folder; {what} (default: the preset's, else "
                                                         f"{defaults.run.dir})")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as TOML and exit")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (metrics.jsonl is still written)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cai_engine.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"cai-engine {__version__}")
    add_common_arguments(parser, "each stage writes DIR/<stage>/")
    parser.add_argument("--stages", metavar="A,B", help=f"run only these stages, in pipeline order "
                                                         f"(default: all of {','.join(PIPELINE_STAGES)})")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and the estimates; run nothing")
    group = parser.add_argument_group("pipeline settings (each is also a config key)")
    defaults = apply_preset(RunConfig())
    for flag, keys in PIPELINE_FLAGS.items():
        text, value, _ = field_help(defaults, keys[0])
        label = f"{text} [{', '.join(keys)}; default: {value!r}]"
        group.add_argument("--" + flag.replace("_", "-"), dest=flag, default=None, metavar=keys[0].split(".")[1].upper(),
                           help=label)
    sub = parser.add_subparsers(dest="stage", metavar="STAGE", help="run one stage (default: the whole pipeline)")
    for stage, summary in STAGES.items():
        p = sub.add_parser(stage, help=summary, description=summary)
        add_common_arguments(p, f"this stage writes DIR/{stage}/")
        p.add_argument("--resume-with-new-config", action="store_true",
                       help="resume even though the run folder was made with other config values (on purpose)")
        group = p.add_argument_group(f"{stage} settings (each is also a config key)")
        for flag, key in stage_flags(stage).items():
            text, value, kind = field_help(defaults, key)
            option = "--" + flag.replace("_", "-")
            label = f"{text} [{key}; default: {value!r}]"
            if kind is bool:
                group.add_argument(option, dest=flag, default=None, action=argparse.BooleanOptionalAction, help=label)
            else:
                group.add_argument(option, dest=flag, default=None, metavar=key.split(".")[1].upper(), help=label,
                                   type=str)
    return parser


def resolve_args(args: argparse.Namespace) -> RunConfig:
    if args.stage:
        flags = {(key,): getattr(args, flag) for flag, key in stage_flags(args.stage).items()}
    else:
        flags = {keys: getattr(args, flag) for flag, keys in PIPELINE_FLAGS.items()}
    # flag values arrive as text: pass them through --set's typed parsing so errors read the same
    overrides = [f"{key}={value}" for keys, value in flags.items() for key in keys
                 if value is not None and not isinstance(value, bool)]
    booleans = {key: value for keys, value in flags.items() for key in keys if isinstance(value, bool)}
    if args.run_dir:
        overrides.insert(0, f"run.dir={args.run_dir}")
    base = apply_preset(RunConfig(), args.preset or "default")
    return resolve(config_file=args.config, flags=booleans, overrides=overrides + args.overrides, base=base)


def log(line: str) -> None:
    if is_main():  # under torchrun, rank 0 speaks for all
        print(line, flush=True)


def prepare_run_dir(config: RunConfig) -> None:
    if is_main():
        run_dir = Path(config.run.dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.toml", to_toml(config))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = RunConfig()
    try:
        config = resolve_args(args)
        init_from_environment()  # under torchrun: join the process group (gloo on CPU, nccl on CUDA)
        if args.print_config:
            print(to_toml(config), end="")
            return 0
        progress = not args.no_progress
        if args.stage:
            prepare_run_dir(config)
            log(run_stage(args.stage, config, allow_config_change=args.resume_with_new_config, progress=progress,
                          log=log))
            return 0
        stages = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else list(PIPELINE_STAGES)
        if not args.dry_run:
            prepare_run_dir(config)
        run_pipeline(config, stages, dry_run=args.dry_run, progress=progress, log=log)
        return 0
    except KeyboardInterrupt:
        print(f"\ninterrupted: run the same command again to resume from the last record or checkpoint in "
              f"{config.run.dir}",
              file=sys.stderr)
        return 130
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ConfigError, DataError, CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
