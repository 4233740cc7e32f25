"""The whole pipeline end to end: wall time and peak memory of each stage of a preset, beside the plan's estimate.

Each stage runs as its own `python -m cai_engine.train --stages STAGE` process in one run folder (the same
folder, the same files, the same config as the one-command run), so `wait4` gives each stage's own peak RSS.
Stage times also land in `<run>/<stage>/done.json`. The plan's estimates come from the same command with
`--dry-run` on an empty folder.

    python bench/bench_e2e.py                       # the default preset (embedded SmolLM2-135M), ~15 min here
    python bench/bench_e2e.py --preset tiny         # seconds
    python bench/bench_e2e.py --set critique.limit=8 --json e2e.json
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cai_engine.train.stages import STAGES  # noqa: E402


def estimates(args: list[str]) -> dict[str, float]:
    """Seconds per stage from the plan (`--dry-run` on an empty folder)."""
    out = subprocess.run([sys.executable, "-m", "cai_engine.train", *args, "--dry-run"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    found = {}
    for line in out.splitlines():
        m = re.match(r"\s+(\w+)\s+run\s+([\d.]+)(min|s)\s", line)
        if m:
            found[m.group(1)] = float(m.group(2)) * (60 if m.group(3) == "min" else 1)
    return found


def run_stage(args: list[str], stage: str, log: Path) -> tuple[float, float, int]:
    """(wall seconds, peak RSS MiB, exit code) of one stage in its own process."""
    with open(log, "a") as out:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "cai_engine.train", *args, "--stages", stage], cwd=ROOT,
                                stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - start, usage.ru_maxrss / 1024, proc.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="default")
    parser.add_argument("--run-dir", help="default: a fresh temporary folder")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--json", help="also write the figures here")
    opts = parser.parse_args()
    run_dir = Path(opts.run_dir or tempfile.mkdtemp(prefix="cai-e2e-")) / "run"
    args = ["--preset", opts.preset, "--run-dir", str(run_dir), "--no-progress"]
    for assignment in opts.overrides:
        args += ["--set", assignment]
    planned = estimates(args)
    log = run_dir.parent / "e2e.log"
    log.parent.mkdir(parents=True, exist_ok=True)  # a --run-dir that does not exist yet
    rows, total = [], 0.0
    for stage in STAGES:
        seconds, peak, code = run_stage(args, stage, log)
        if code != 0:
            print(f"{stage} failed (exit {code}); see {log}", file=sys.stderr)
            return 1
        total += seconds
        rows.append({"stage": stage, "seconds": round(seconds, 1), "estimate": planned.get(stage),
                     "peak_rss_mib": round(peak), "summary": json.loads((run_dir / stage / "done.json").read_text())
                     ["summary"]})
        print(f"{stage:<9} {seconds:8.1f} s  (plan {planned.get(stage, 0):6.0f} s)  peak RSS {peak:7.0f} MiB", flush=True)
    print(f"{'total':<9} {total:8.1f} s  (plan {sum(planned.values()):6.0f} s)  run folder {run_dir}")
    if opts.json:
        Path(opts.json).write_text(json.dumps({"preset": opts.preset, "overrides": opts.overrides, "stages": rows,
                                               "total_seconds": round(total, 1)}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
