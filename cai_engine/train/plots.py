"""The run report's training curves: PNGs drawn with matplotlib (Agg) from each stage's `metrics.jsonl`.

One figure per training stage, one panel per quantity, each line a key of the metrics records (`eval.x` is
the held-out evaluation's `x`, logged at the steps the stage evaluated). A panel with no data is left out,
and a stage with no metrics gets no figure: a report on a run without that stage is not an error.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

from ..io import atomic_write_bytes
from .tensorboard_events import read_metrics

# stage -> (file, title, panels); a panel is (title, y label, [(metrics key, legend)])
FIGURES = {
    "sft": ("sft_loss.png", "SL-CAI finetuning", [
        ("loss", "mean token NLL", [("loss", "train"), ("eval.loss", "held-out")]),
    ]),
    "pm": ("pm.png", "Preference model", [
        ("pairwise accuracy", "accuracy", [("accuracy", "train"), ("eval.accuracy", "held-out")]),
        ("calibration", "expected calibration error", [("eval.ece", "held-out ECE")]),
    ]),
    "rl": ("rl.png", "RL-CAI", [
        ("reward", "per answer", [("reward", "reward (PM - beta KL)"), ("pm_score", "PM score")]),
        ("KL to the SFT model", "nats per answer", [("kl", "KL")]),
        ("entropy", "nats per token", [("entropy", "policy entropy")]),
        ("importance weights", "sampler -> trainer", [("is_weight_mean", "mean (truncated)"),
                                                       ("is_weight_max", "max (before truncation)")]),
    ]),
}


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metrics key; `eval.x` reads the nested evaluation results."""
    steps, values = [], []
    for record in records:
        table, name = (record.get("eval") or {}, key[5:]) if key.startswith("eval.") else (record, key)
        value = table.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            steps.append(int(record["step"]))
            values.append(float(value))
    return steps, values


def write_plots(run_dir: str | os.PathLike, out_dir: str | os.PathLike) -> list[tuple[str, Path]]:
    """Draw every figure whose stage has metrics into `out_dir`; returns (title, path) of those written."""
    import matplotlib
    matplotlib.use("Agg")  # files only, never a window (and no display needed)
    from matplotlib import pyplot
    from matplotlib.ticker import MaxNLocator

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    written = []
    for stage, (name, title, panels) in FIGURES.items():
        records = read_metrics(run_dir / stage / "metrics.jsonl")
        drawn = []
        for panel_title, ylabel, keys in panels:
            lines = [(legend, *series(records, key)) for key, legend in keys]
            lines = [line for line in lines if line[1]]  # keys this run did not log
            if lines:
                drawn.append((panel_title, ylabel, lines))
        if not drawn:
            continue
        columns = min(2, len(drawn))
        rows = -(-len(drawn) // columns)
        figure, axes = pyplot.subplots(rows, columns, figsize=(5 * columns, 3.6 * rows), squeeze=False)
        for axis in axes.flat[len(drawn):]:  # an odd panel count leaves one cell empty
            axis.set_visible(False)
        for axis, (panel_title, ylabel, lines) in zip(axes.flat, drawn):
            for legend, steps, values in lines:
                # a single point (one evaluation) would be an invisible line: mark every point
                axis.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=legend)
            axis.set(title=panel_title, xlabel="optimizer step", ylabel=ylabel)
            axis.xaxis.set_major_locator(MaxNLocator(integer=True))
            axis.grid(alpha=0.3)
            axis.legend(fontsize="small")
        figure.suptitle(title)
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=100)
        pyplot.close(figure)
        atomic_write_bytes(out_dir / name, buffer.getvalue())
        written.append((title, out_dir / name))
    return written
