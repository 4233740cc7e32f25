"""TensorBoard event files rebuilt from the stages' `metrics.jsonl`: `tensorboard --logdir <run.dir>/tensorboard`.

`metrics.jsonl` stays the record of truth (exact resume trims it to the last checkpoint); the event files are
a view of it. Each call rewrites `<run.dir>/tensorboard/<stage>/` whole from the stage's current metrics:
written into a hidden temporary folder, then swapped in, so a resumed or rerun stage never shows a step twice
and a killed call leaves the old view in place.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

BOARD = "tensorboard"


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The whole records of a metrics file, read-only ([] when missing): a torn last line is skipped, not
    repaired, because the stage that owns the file may still be appending to it."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_bytes().split(b"\n")[:-1]  # the part after the last newline is not a whole record
    records = []
    for lineno, line in enumerate(lines, start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON record: {e.msg}") from None
    return records


def scalars(record: dict[str, Any], prefix: str = "") -> list[tuple[str, float, int]]:
    """(tag, value, step) of every number in a metrics record; a nested table (the `eval` results) gives
    `eval/<key>` tags at its own step."""
    step = int(record.get("step", 0))
    out = []
    for key, value in record.items():
        if key == "step":
            continue
        if isinstance(value, dict):
            out += scalars({"step": step, **value}, f"{prefix}{key}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append((f"{prefix}{key}", float(value), step))
    return out


def write_tensorboard(run_dir: str | os.PathLike) -> list[str]:
    """(Re)write the event files of every stage folder of `run_dir` that holds a `metrics.jsonl`; returns the
    stages written."""
    from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package; only here

    run_dir = Path(run_dir)
    board = run_dir / BOARD
    written = []
    for metrics in sorted(run_dir.glob("*/metrics.jsonl")):
        stage = metrics.parent.name
        records = read_metrics(metrics)
        if not records:
            continue
        board.mkdir(parents=True, exist_ok=True)
        for leftover in board.glob(f".{stage}.*"):  # temporary folders of a killed call
            shutil.rmtree(leftover, ignore_errors=True)
        fresh = board / f".{stage}.new"  # one writer per run folder (rank 0), so a fixed name will do
        fresh.mkdir()
        writer = SummaryWriter(log_dir=str(fresh))
        for record in records:
            for tag, value, step in scalars(record):
                writer.add_scalar(tag, value, step)
        writer.close()
        target, old = board / stage, board / f".{stage}.old"
        if target.exists():
            target.rename(old)
        fresh.rename(target)
        shutil.rmtree(old, ignore_errors=True)
        written.append(stage)
    return written
