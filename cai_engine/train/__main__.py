"""Training entry point: `python -m cai_engine.train <stage> ...`.

Stages so far: `pm` (preference model from JSONL comparisons).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import MISSING, fields

from ..data.comparisons import DataError
from .pm import PMConfig, train_pm


def _add_dataclass_args(parser: argparse.ArgumentParser, cls) -> None:
    for f in fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else None
        if f.type in ("bool", bool):
            parser.add_argument(flag, default=default, action=argparse.BooleanOptionalAction)
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            parser.add_argument(flag, type=kind, default=default, required=f.name == "data")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cai_engine.train", description=__doc__)
    sub = parser.add_subparsers(dest="stage", required=True)
    pm = sub.add_parser("pm", help="train a preference model on JSONL comparisons")
    _add_dataclass_args(pm, PMConfig)
    args = vars(parser.parse_args(argv))
    stage = args.pop("stage")
    try:
        if stage == "pm":
            summary = train_pm(PMConfig(**args))
            print(f"done: {summary['steps']} steps in {summary['seconds']:.1f}s; model at {summary['final']}")
    except (DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
