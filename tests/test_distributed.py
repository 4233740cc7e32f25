"""Scale-out: the pipeline's stages under real `torchrun --nproc_per_node 2` (gloo) against one process.

Generation stages (critique, feedback) shard the prompts by rank and gather them in order: their files must be
byte-identical to a single process's. That holds because every record depends only on its prompt and the seed,
and because these runs sample in fp32 (`--precision fp32`): in bf16 a prefix-cache hit reads K/V that were
rounded into the cache, a fresh prefill does not, and which prefixes a process has cached depends on which
prompts it ran, so a few bf16 records differ. Training stages (sft, pm) run DDP: each rank sums half of every
step's examples, so the losses equal one process's up to summation order (rel 1e-4); so do FSDP2's
(`run.parallel = fsdp`).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cai_engine.io import read_jsonl
from cai_engine.train.__main__ import main as train_main
from cai_engine.train.config import ConfigError
from cai_engine.train.shards import block, gather, open_shards, shard_path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TINY = ["--model", "tiny-random", "--no-progress", "--precision", "fp32"]
CRITIQUE = ["critique", *TINY, "--limit", "7", "--rounds", "1", "--max-new-tokens", "8", "--few-shot", "1"]
SFT = ["sft", *TINY, "--skip-flags", "", "--epochs", "2", "--max-seq-len", "256", "--eval-fraction", "0",
       "--lr", "1e-3", "--set", "sft.batch_rows=2"]
# the pairs come from tiny-random itself, not from each run's own SFT model (whose weights differ in the last bits)
FEEDBACK = ["feedback", *TINY, "--limit", "7", "--max-new-tokens", "6", "--principles-per-pair", "2",
            "--policy", "tiny-random", "--batch-pairs", "2"]
PM = ["pm", *TINY, "--eval-fraction", "0", "--batch-groups", "3", "--lr", "1e-3"]


def torchrun(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "cai_engine.train", *args], env=ENV, cwd=ROOT, capture_output=True, text=True,
                          timeout=300, **kwargs)


def losses(run: Path, stage: str) -> list[float]:
    return [r["loss"] for r in read_jsonl(run / stage / "metrics.jsonl")]


def test_pipeline_on_two_processes_matches_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    for args in (CRITIQUE, SFT, FEEDBACK, PM):
        multi = torchrun([*args, "--run-dir", str(two)])
        assert multi.returncode == 0, multi.stdout + multi.stderr
        assert train_main([*args, "--run-dir", str(one)]) == 0
        stage = args[0]
        if stage == "critique":
            assert (two / "critique" / "revisions.jsonl").read_bytes() == \
                (one / "critique" / "revisions.jsonl").read_bytes()
            assert "on rank 0 of 2" in multi.stdout and multi.stdout.count("records at") == 1  # rank 0 speaks
        elif stage == "feedback":
            for name in ("pairs.jsonl", "comparisons.jsonl"):
                assert (two / "feedback" / name).read_bytes() == (one / "feedback" / name).read_bytes(), name
            records = read_jsonl(two / "feedback" / "comparisons.jsonl")
            assert [r["feedback"]["index"] for r in records] == list(range(7))  # global numbers, not per block
        else:
            single, ddp = losses(one, stage), losses(two, stage)
            assert len(single) == len(ddp) >= 3 and single[-1] != single[0]
            assert ddp == pytest.approx(single, rel=1e-4)
        assert not [p.name for p in (two / stage).iterdir() if ".rank" in p.name]  # shards gone once gathered
    # FSDP2 over gloo: the same steps on sharded parameters, gradients and optimizer state
    fsdp = tmp_path / "fsdp"
    for stage in ("critique", "feedback"):
        shutil.copytree(two / stage, fsdp / stage)
    for args in (SFT, PM):
        sharded = torchrun([*args, "--run-dir", str(fsdp), "--set", "run.parallel=fsdp", "--checkpoint-every", "2"])
        assert sharded.returncode == 0, sharded.stdout + sharded.stderr
        assert losses(fsdp, args[0]) == pytest.approx(losses(one, args[0]), rel=1e-4)
    # its checkpoints hold whole tensors: resuming SFT from step 2 (sharding them again) ends bit-identical
    final = (fsdp / "sft" / "final" / "model.safetensors").read_bytes()
    for path in ("final", "summary.json", "checkpoint-4"):
        shutil.rmtree(fsdp / "sft" / path) if (fsdp / "sft" / path).is_dir() else (fsdp / "sft" / path).unlink()
    resumed = torchrun([*SFT, "--run-dir", str(fsdp), "--set", "run.parallel=fsdp", "--checkpoint-every", "2"])
    assert "resuming sft from checkpoint-2" in resumed.stdout, resumed.stdout + resumed.stderr
    assert (fsdp / "sft" / "final" / "model.safetensors").read_bytes() == final
    assert train_main(["rl", *TINY, "--run-dir", str(one), "--set", "run.parallel=fsdp"]) == 2  # refused: see rl.py


def _killed_mid_critique(run: Path, args: list[str]) -> None:
    """Start a 2-process critique and SIGKILL every process of it once rank 0's shard holds a whole record.
    Rank 1 may be anywhere by then, from nothing written to its whole block done and waiting at the gather:
    the two ranks are not in step (a busy machine can let one run its whole block before the other's first)."""
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "cai_engine.train", *args], env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    first = shard_path(run / "critique" / "revisions.jsonl", 0, 2)
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline and not (first.is_file() and b"\n" in first.read_bytes()):
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed; give it more prompts"
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both workers: its own session
    proc.wait(timeout=30)


def test_sharded_critique_killed_resumes_to_the_same_output(tmp_path, capsys):
    args = ["critique", *TINY, "--limit", "12", "--rounds", "1", "--max-new-tokens", "24", "--few-shot", "1",
            "--batch-size", "1"]
    assert train_main([*args, "--run-dir", str(tmp_path / "one")]) == 0
    run = tmp_path / "two"
    _killed_mid_critique(run, [*args, "--run-dir", str(run)])
    out = run / "critique" / "revisions.jsonl"
    assert not out.exists() and 0 < len(read_jsonl(shard_path(out, 0, 2))) < 6  # rank 0 stopped mid-block
    capsys.readouterr()
    assert train_main([*args, "--run-dir", str(run)]) == 2  # another world size: refused, naming the shards
    err = capsys.readouterr().err
    assert "revisions.rank0-of-2.jsonl" in err and "--nproc_per_node 2" in err
    resumed = torchrun([*args, "--run-dir", str(run)])
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "already there" in resumed.stdout and "(0 already there)" not in resumed.stdout
    assert out.read_bytes() == (tmp_path / "one" / "critique" / "revisions.jsonl").read_bytes()


# ------------------------------------------------------------------ the shard bookkeeping, in one process

def _write_shards(output: Path, keys: list[str], world: int, whole: bool = True) -> None:
    for index in range(world):
        lines = [json.dumps({"id": keys[i]}) + "\n" for i in block(len(keys), index, world)]
        shard_path(output, index, world).write_text("".join(lines if whole or index else lines[:-1]))


def test_complete_shards_of_another_world_size_are_gathered_in_order(tmp_path):
    output, keys = tmp_path / "out.jsonl", [f"p{i}" for i in range(7)]
    _write_shards(output, keys, 3)
    shards = open_shards(output, keys, key_of=lambda r: r["id"])  # one process: world size 1
    assert shards.finished and [r["id"] for r in read_jsonl(output)] == keys
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]
    assert [len(block(7, i, 3)) for i in range(3)] == [2, 2, 3] and block(7, 2, 3).stop == 7


def test_unfinished_shards_of_another_world_size_are_refused(tmp_path):
    output, keys = tmp_path / "out.jsonl", [f"p{i}" for i in range(6)]
    _write_shards(output, keys, 2, whole=False)
    with pytest.raises(ConfigError, match=r"unfinished shards of a 2-process run: out\.rank0-of-2\.jsonl, "
                                          r"out\.rank1-of-2\.jsonl"):
        open_shards(output, keys, key_of=lambda r: r["id"])
    shard_path(output, 0, 2).unlink()
    shard_path(output, 1, 2).unlink()
    output.write_text(json.dumps({"id": "p0"}) + "\n")  # a single process's unfinished output is its own shard
    shards = open_shards(output, keys, key_of=lambda r: r["id"])
    assert not shards.finished and shards.path == output and list(shards.items) == list(range(6))
    gather(shards)  # nothing to gather for one process
    assert len(read_jsonl(output)) == 1


def test_the_tiny_preset_pipeline_on_two_processes_matches_one(tmp_path):
    """`torchrun ... -m cai_engine.train --preset tiny`: every stage, against the same command in one process."""
    one, two = tmp_path / "one", tmp_path / "two"
    single = subprocess.run([sys.executable, "-m", "cai_engine.train", "--preset", "tiny", "--no-progress",
                             "--run-dir", str(one)], env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stdout + single.stderr
    multi = torchrun(["--preset", "tiny", "--no-progress", "--run-dir", str(two)])
    assert multi.returncode == 0, multi.stdout + multi.stderr
    assert multi.stdout.count("plan: run folder") == 1  # rank 0 speaks for both
    for name in ("critique/revisions.jsonl", "feedback/pairs.jsonl", "feedback/comparisons.jsonl"):
        assert (two / name).read_bytes() == (one / name).read_bytes(), name  # fp32: sharding changes no bit
    for stage in ("sft", "pm", "rl"):  # DDP: the same steps, summed in another order
        assert losses(two, stage) == pytest.approx(losses(one, stage), rel=1e-4), stage
    answers = read_jsonl(two / "report" / "answers.jsonl")  # written once, by rank 0
    assert sorted((a["model"], a["prompt_id"]) for a in answers) == \
        sorted((a["model"], a["prompt_id"]) for a in read_jsonl(one / "report" / "answers.jsonl"))
    assert (two / "report.md").is_file() and not list(two.rglob("*.rank*-of-*"))
