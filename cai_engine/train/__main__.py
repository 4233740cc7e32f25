"""`python -m cai_engine.train <stage>` (or `cai-engine-train <stage>`): run one stage of the pipeline.

Every stage reads the run config: defaults, then `--config FILE.toml`, then the stage's flags, then
`--set section.key=value`. Outputs go to `<run-dir>/<stage>/`; the resolved config is saved as
`<run-dir>/config.toml`. Rerunning the same command resumes where a killed run stopped; a run folder made
with another config is refused unless `--resume-with-new-config` says so.
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
from .stages import run_stage

# flags every stage takes, as aliases of shared config keys
SHARED_FLAGS = {"model": "model.name", "seed": "run.seed", "device": "run.device", "precision": "precision.mode",
                "optimizer": "optimizer.name", "weight_decay": "optimizer.weight_decay",
                "max_grad_norm": "optimizer.max_grad_norm", "schedule": "optimizer.schedule",
                "warmup_steps": "optimizer.warmup_steps", "checkpoint_every": "checkpoint.every",
                "keep_checkpoints": "checkpoint.keep"}
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cai_engine.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"cai-engine {__version__}")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    defaults = RunConfig()
    for stage, summary in STAGES.items():
        p = sub.add_parser(stage, help=summary, description=summary)
        p.add_argument("--config", metavar="FILE", help="TOML run config (sections as in --print-config)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override one config key, typed by the config (repeatable), e.g. --set pm.lr=3e-5")
        p.add_argument("--run-dir", metavar="DIR", help=f"run folder; this stage writes DIR/{stage}/ "
                                                        f"(default: {defaults.run.dir})")
        p.add_argument("--print-config", action="store_true", help="print the resolved config as TOML and exit")
        p.add_argument("--resume-with-new-config", action="store_true",
                       help="resume even though the run folder was made with other config values (on purpose)")
        p.add_argument("--no-progress", action="store_true", help="no progress bar (metrics.jsonl is still written)")
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
    flags = {key: getattr(args, flag) for flag, key in stage_flags(args.stage).items()}
    if args.run_dir:
        flags["run.dir"] = args.run_dir
    # flag values arrive as text: pass them through --set's typed parsing so errors read the same
    overrides = [f"{key}={value}" for key, value in flags.items() if value is not None and not isinstance(value, bool)]
    booleans = {key: value for key, value in flags.items() if isinstance(value, bool)}
    return resolve(config_file=args.config, flags=booleans, overrides=overrides + args.overrides)


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
        prepare_run_dir(config)
        log(run_stage(args.stage, config, allow_config_change=args.resume_with_new_config,
                      progress=not args.no_progress, log=log))
        return 0
    except KeyboardInterrupt:
        where = Path(config.run.dir) / args.stage
        print(f"\ninterrupted: run the same command again to resume from the last checkpoint in {where}",
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
