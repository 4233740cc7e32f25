"""`python -m cai_engine.train`: the whole pipeline on the tiny preset: plan, skip, rerun on change, resume
after SIGKILL inside every stage, and one-line errors before any work is lost."""
from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cai_engine.io import read_jsonl
from cai_engine.model.loading import load_model
from cai_engine.train import pipeline
from cai_engine.train.__main__ import main as train_main
from cai_engine.train.stages import STAGES

ROOT = Path(__file__).resolve().parents[1]
# every file a stage leaves as its result: equal bytes after kills and reruns means nothing was lost or doubled
OUTPUTS = {"critique": ["critique/revisions.jsonl"],
           "sft": ["sft/final/model.safetensors", "sft/metrics.jsonl"],
           "feedback": ["feedback/pairs.jsonl", "feedback/comparisons.jsonl"],
           "pm": ["pm/final/model.safetensors", "pm/metrics.jsonl"],
           "rl": ["rl/final/model.safetensors", "rl/metrics.jsonl"],
           "report": ["report/answers.jsonl"]}


def tiny(run: Path, *extra: str) -> list[str]:
    return ["--preset", "tiny", "--run-dir", str(run), "--no-progress", *extra]


def outputs(run: Path) -> dict[str, bytes]:
    files = [f for stage in STAGES for f in OUTPUTS[stage]]
    return {f: _strip_times(run / f) for f in files}


def _strip_times(path: Path) -> bytes:
    """metrics.jsonl lines carry wall-clock fields (seconds, tokens/s, memory); everything else must match."""
    if path.suffix != ".jsonl" or "metrics" not in path.name:
        return path.read_bytes()
    volatile = ("seconds", "per_s", "memory", "_mb", "elapsed")
    records = [{k: v for k, v in r.items() if not (k.endswith("_s") or any(word in k for word in volatile))}
               for r in read_jsonl(path)]
    return repr(records).encode()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("pipeline") / "run"
    assert train_main(tiny(run)) == 0
    return run


def test_the_tiny_preset_runs_every_stage_in_order(finished_run, capsys):
    for stage in STAGES:
        assert (finished_run / stage / "done.json").is_file(), stage
        for name in OUTPUTS[stage]:
            assert (finished_run / name).is_file(), name
    assert (finished_run / "config.toml").is_file()
    # checkpoints are Hugging Face folders: the last one loads and holds the final weights
    last = max((finished_run / "sft").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    model, _ = load_model(last)
    assert (last / "model.safetensors").read_bytes() == (finished_run / "sft" / "final" / "model.safetensors").read_bytes()
    # rerun: every stage is finished with this config, so nothing runs
    assert train_main(tiny(finished_run)) == 0
    out = capsys.readouterr().out
    assert all(f"{stage}: skipped" in out for stage in STAGES), out
    assert "starting" not in out and "resuming" not in out


def test_a_changed_stage_reruns_with_the_stages_after_it(finished_run, tmp_path, capsys):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = outputs(run)
    assert train_main(tiny(run, "--set", "pm.lr=0.002")) == 0
    out = capsys.readouterr().out
    assert "pm.lr (0.001 -> 0.002)" in out and "rl" in out and "pm runs again" in out
    for stage in ("critique", "sft", "feedback"):
        assert f"{stage}: skipped" in out
    after = outputs(run)
    assert after["critique/revisions.jsonl"] == before["critique/revisions.jsonl"]
    assert after["pm/final/model.safetensors"] != before["pm/final/model.safetensors"]
    superseded = sorted(p.name.split("-")[0] for p in (run / "superseded").iterdir())
    assert superseded == sorted(s for s in STAGES if STAGES.index(s) >= STAGES.index("pm"))
    # the old outputs are kept whole, not mixed into the new ones
    old_pm = next((run / "superseded").glob("pm-*"))
    assert (old_pm / "final" / "model.safetensors").read_bytes() == before["pm/final/model.safetensors"]


def test_dry_run_prints_the_plan_and_runs_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    assert train_main(tiny(run, "--dry-run", "--stages", "critique,sft")) == 0
    out = capsys.readouterr().out
    assert "critique  run" in out and "sft       run" in out and "feedback" not in out
    assert "<= 144 tokens to generate" in out  # 6 prompts x (answer + critique + revision) x 8 tokens
    assert "total ~" in out
    assert not run.exists()


@pytest.mark.parametrize("flags, mode, slowdown, basis", [
    ({"amx_bf16", "avx512_bf16"}, "bf16-mixed", 1.0, "calibrated on a 2-vCPU Sapphire Rapids, AMX"),
    ({"avx512_bf16"}, "bf16-mixed", pipeline.NO_AMX_SLOWDOWN, "calibrated on a 2-vCPU AMD Zen 4, AVX512-BF16"),
    ({"avx2", "fma"}, "bf16-mixed", pipeline.FP32_AVX2_SLOWDOWN, "bf16 on a CPU without bf16 units: not calibrated"),
    ({"avx2", "fma"}, "fp32", pipeline.FP32_AVX2_SLOWDOWN, "calibrated on a 2-vCPU AMD Zen 3 in fp32"),
    (None, "fp32", pipeline.FP32_AVX2_SLOWDOWN, "fp32: not calibrated on this CPU"),
    ({"amx_bf16", "avx512_bf16"}, "fp32", pipeline.FP32_AVX2_SLOWDOWN, "fp32: not calibrated on this CPU")])
def test_the_plan_scales_its_estimates_to_the_cpu_class(tmp_path, capsys, monkeypatch, flags, mode, slowdown, basis):
    """Calibrated on three CPUs: AMX and Zen 4 in bf16-mixed (1.87x apart), Zen 3 in fp32 (8.35x the AMX one's
    time): the estimate follows the CPU's class and precision, and says where it is not calibrated."""
    monkeypatch.setattr(pipeline, "cpu_flags", lambda: flags)
    work = pipeline.Workload(prompts=8, generated_tokens=1024, trained_tokens=4096, model_loads=1, concurrency=8)
    speed, _ = pipeline.machine_speed(torch.device("cpu"), mode)
    assert pipeline.estimate_seconds(work, 135e6, speed) == pytest.approx(
        slowdown * pipeline.estimate_seconds(work, 135e6, 1.0))
    assert train_main(tiny(tmp_path / "run", "--dry-run", "--set", f"precision.mode={mode}")) == 0
    assert f"(estimates {basis}" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--stages", "critique,polish"], "--stages: unknown stage 'polish'"),
    (["--model", "/nonexistent/model"], "'/nonexistent/model': no such file or directory"),
    (["--feedback-model", "/nonexistent/judge"], "feedback.feedback_model: '/nonexistent/judge': no such file"),
    (["--set", "rl.kl_coef=-1"], "rl.kl_coef = -1.0: expected a value >= 0"),
])
def test_bad_input_is_one_line_before_any_work(tmp_path, capsys, argv, message):
    run = tmp_path / "run"
    assert train_main(tiny(run, *argv)) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert len([line for line in err.splitlines() if line.startswith("error")]) == 1
    assert not (run / "critique").exists()


def test_a_run_folder_that_cannot_hold_the_plan_is_refused_before_work(tmp_path, capsys, monkeypatch):
    import shutil
    from collections import namedtuple
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 100_000, 100_000))
    run = tmp_path / "run"
    assert train_main(tiny(run)) == 2
    err = capsys.readouterr().err
    assert f"{run}: the plan writes up to" in err and "GB free" in err
    assert not (run / "pm").exists()


def _launch(args: list[str], env: dict, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cai_engine.train", *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


# (stage, file whose lines show progress, lines to wait for): each kill lands inside that stage
KILL_POINTS = [("critique", "critique/revisions.jsonl", 1), ("sft", "sft/metrics.jsonl", 1),
               ("feedback", "feedback/comparisons.jsonl", 1), ("pm", "pm/metrics.jsonl", 2),
               ("rl", "rl/metrics.jsonl", 1), ("report", "report/answers.jsonl", 1)]


def test_sigkill_inside_every_stage_then_rerun_ends_with_the_same_outputs(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same threads in every run: the same float sums
    reference = subprocess.run([sys.executable, "-m", "cai_engine.train", *tiny(tmp_path / "reference")], env=env,
                               cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert reference.returncode == 0, reference.stdout + reference.stderr
    run = tmp_path / "killed"
    logs = []
    for stage, progress_file, lines in (k for k in KILL_POINTS if k[0] in STAGES):
        proc = _launch(tiny(run), env)
        deadline = time.time() + 300
        while _lines(run / progress_file) < lines and proc.poll() is None and time.time() < deadline:
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        logs.append(proc.communicate()[0])
        assert proc.returncode == -signal.SIGKILL, f"the run ended before the kill in {stage}:\n{logs[-1]}"
        assert not (run / stage / "done.json").exists(), f"killed after {stage} finished"
    final = subprocess.run([sys.executable, "-m", "cai_engine.train", *tiny(run)], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stdout + final.stderr
    logs.append(final.stdout)
    # every stage was found interrupted by a later command and resumed, never started over
    resumed = {line.split()[1].rstrip(":") for log in logs for line in log.splitlines() if ": resuming" in line}
    assert resumed == set(STAGES), (resumed, logs)
    assert not (run / "superseded").exists()
    assert outputs(run) == outputs(tmp_path / "reference")


def test_a_failed_write_names_the_file_and_keeps_what_was_done(tmp_path):
    """A size limit makes the first checkpoint write fail (as a full disk would): one line naming the file;
    the finished stages stay, and a rerun without the limit resumes from them."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = tmp_path / "run"

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    proc = _launch(tiny(run, "--stages", "critique,sft"), env, preexec_fn=limit_file_size)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 2, out
    error = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and str(run / "sft") in error[0] and "File too large" in error[0], out
    assert (run / "critique" / "done.json").is_file()
    again = subprocess.run([sys.executable, "-m", "cai_engine.train", *tiny(run, "--stages", "critique,sft")],
                           env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "critique: skipped" in again.stdout


@pytest.mark.slow
def test_the_default_preset_first_stage_on_a_few_prompts(tmp_path, capsys):
    """The embedded default through the pipeline command: the plan, then real critiques of two prompts."""
    run = tmp_path / "run"
    assert train_main(["--run-dir", str(run), "--no-progress", "--stages", "critique", "--limit", "2",
                       "--set", "critique.rounds=1", "--set", "critique.max_new_tokens=24"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m-instruct (134.5M parameters)" in out and "critique  run" in out
    records = read_jsonl(run / "critique" / "revisions.jsonl")
    assert len(records) == 2 and all(r["initial"].strip() and r["final"].strip() for r in records)
    assert all(len(r["rounds"]) == 1 and r["rounds"][0]["critique"].strip() for r in records)
