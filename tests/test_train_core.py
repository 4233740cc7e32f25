"""The training core: run config, the one trainer loop, precision, checkpoints and exact resume."""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cai_engine import save_model
from cai_engine.io import read_jsonl
from cai_engine.ops import token_logprobs
from cai_engine.train.__main__ import main as train_main
from cai_engine.train.config import ConfigError, load_toml, resolve, to_toml
from cai_engine.train.config import CheckpointSection, OptimizerSection
from cai_engine.train.loop import LoopSettings, MicroBatchResult, TrainTask, run_training
from cai_engine.train.precision import Precision
from conftest import hf_and_ours, synthetic_comparisons, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pm_setup(tmp_path_factory):
    """A tiny base model in the HF layout and a comparisons file, shared by the CLI tests."""
    root = tmp_path_factory.mktemp("pm")
    _, backbone = hf_and_ours("llama", True)
    save_model(backbone, tiny_tokenizer(), root / "base")
    synthetic_comparisons(root / "data.jsonl", n=40)
    return root


def pm_args(root: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["pm", "--model", str(root / "base"), "--data", str(root / "data.jsonl"), "--run-dir", str(run_dir),
            "--batch-groups", "4", "--lr", "3e-3", "--no-progress", *extra]


# ----------------------------------------------------------------------------------------------- run config

def test_config_from_toml_overrides_and_print_round_trip(tmp_path):
    (tmp_path / "run.toml").write_text('[pm]\nlr = 2e-5\nepochs = 3\n[optimizer]\nschedule = "constant"\n')
    config = resolve(config_file=tmp_path / "run.toml", overrides=["pm.epochs=5", "pm.prefix_sharing=false"])
    assert (config.pm.lr, config.pm.epochs, config.pm.prefix_sharing) == (2e-5, 5, False)
    assert config.optimizer.schedule == "constant"
    (tmp_path / "again.toml").write_text(to_toml(config))
    again = resolve(config_file=tmp_path / "again.toml")
    assert again.to_dict() == config.to_dict()


@pytest.mark.parametrize("toml, message", [
    ("[pm]\nlrr = 1e-5\n", r"unknown key pm\.lrr; did you mean pm\.lr\?"),
    ("[optimiser]\nname = 'adamw'\n", r"unknown section \[optimiser\]; did you mean optimizer\?"),
    ("[pm]\nepochs = 'two'\n", r'pm\.epochs = "two": expected an integer'),
    ("[pm]\nlr = true\n", r"pm\.lr = True: expected a number"),
    ("[pm]\nlr = 0.0\n", r"pm\.lr = 0\.0: expected a value > 0"),
    ("[pm]\nbatch_groups = 0\n", r"pm\.batch_groups = 0: expected a value > 0"),
    ("[optimizer]\nwarmup_steps = -1\n", r"optimizer\.warmup_steps = -1: expected a value >= 0"),
    ("[pm]\neval_fraction = 2.0\n", r"pm\.eval_fraction = 2\.0: expected a value in \[0, 1\)"),
    ("[precision]\nmode = 'fp8'\n", r'precision\.mode = "fp8": expected one of auto, bf16-mixed, fp32'),
    ("[pm\nlr = 1\n", r"run\.toml: invalid TOML"),
])
def test_config_errors_name_the_key(tmp_path, toml, message):
    (tmp_path / "run.toml").write_text(toml)
    with pytest.raises(ConfigError, match=message):
        resolve(config_file=tmp_path / "run.toml")


@pytest.mark.parametrize("flags, message", [
    (["--batch-groups", "0"], "pm.batch_groups = 0: expected a value > 0"),
    (["--grad-accum", "0"], "pm.grad_accum = 0: expected a value > 0"),
    (["--epochs", "0"], "pm.epochs = 0: expected a value > 0"),
    (["--warmup-steps", "-2"], "optimizer.warmup_steps = -2: expected a value >= 0"),
    (["--max-grad-norm", "-1"], "optimizer.max_grad_norm = -1.0: expected a value >= 0"),
    (["--checkpoint-every", "-3"], "checkpoint.every = -3: expected a value >= 0"),
    (["--eval-fraction", "-0.5"], "pm.eval_fraction = -0.5: expected a value in [0, 1)"),
    (["--eval-fraction", "2"], "pm.eval_fraction = 2.0: expected a value in [0, 1)"),
    (["--precision", "foo"], 'precision.mode = "foo": expected one of auto, bf16-mixed, fp32'),
    (["--lr", "fast"], 'pm.lr = "fast": expected a number'),
    (["--set", "pm.lrr=1"], "unknown key pm.lrr; did you mean pm.lr?"),
])
def test_cli_refuses_bad_options_in_one_line(tmp_path, pm_setup, capsys, flags, message):
    assert train_main(pm_args(pm_setup, tmp_path / "run", *flags)) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "run" / "pm").exists()  # refused before any work


def test_cli_refuses_missing_data_and_absent_device(tmp_path, pm_setup, capsys):
    args = pm_args(pm_setup, tmp_path / "run")
    args[args.index("--data") + 1] = str(tmp_path / "nope.jsonl")
    assert train_main(args) == 2
    assert "pm.data" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert train_main(pm_args(pm_setup, tmp_path / "run", "--device", "cuda")) == 2
        assert "run.device" in capsys.readouterr().err


def test_cli_help_version_and_print_config(capsys):
    with pytest.raises(SystemExit):
        train_main(["pm", "--help"])
    text = capsys.readouterr().out
    for flag in ("--data", "--lr", "--batch-groups", "--grad-accum", "--precision", "--checkpoint-every"):
        assert flag in text
    assert "default: 1e-05" in text  # every option says its default
    with pytest.raises(SystemExit):
        train_main(["--version"])
    assert "cai-engine" in capsys.readouterr().out
    assert train_main(["pm", "--print-config", "--lr", "7e-5"]) == 0
    printed = capsys.readouterr().out
    assert "[pm]" in printed and "lr = 7e-05" in printed


# ----------------------------------------------------------------------------------------------- PM on the loop

def test_pm_learns_and_writes_a_complete_run_folder(tmp_path, pm_setup):
    """Held-out loss falls well below its starting value (fails at lr 0); checkpoints keep K, final holds
    the model only, files are not private, a stale temp folder is removed, metrics have one line per step."""
    run = tmp_path / "run"
    (run / "pm" / ".checkpoint-3.tmp-999").mkdir(parents=True)
    assert train_main(pm_args(pm_setup, run, "--epochs", "2", "--checkpoint-every", "2", "--eval-every", "1",
                              "--precision", "fp32")) == 0
    summary = json.loads((run / "pm" / "summary.json").read_text())
    history = summary["history"]
    assert [h["step"] for h in history] == list(range(1, 19))
    assert history[-1]["loss"] < 0.5 * history[0]["loss"] and history[-1]["accuracy"] == 1.0
    names = sorted(p.name for p in (run / "pm").iterdir())
    assert names == ["checkpoint-16", "checkpoint-18", "done.json", "final", "metrics.jsonl", "stage.json", "summary.json"]
    final = sorted(p.name for p in (run / "pm" / "final").iterdir())
    assert "optimizer.safetensors" not in final and "model.safetensors" in final and "config.json" in final
    umask = os.umask(0)
    os.umask(umask)
    for path in [*(run / "pm" / "checkpoint-18").iterdir(), *(run / "pm" / "final").iterdir()]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
    records = read_jsonl(run / "pm" / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 19))
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "peak_memory_mb", "accuracy"} <= set(records[0])
    assert (run / "config.toml").is_file() and load_toml(run / "config.toml")["pm"]["lr"] == 3e-3


def test_every_record_is_used_and_the_lr_logged_is_the_one_applied(tmp_path, pm_setup):
    """36 train prompts, 4 x 2 per step: 5 steps, the last with 4 (none dropped); warmup 2 then cosine."""
    run = tmp_path / "run"
    assert train_main(pm_args(pm_setup, run, "--grad-accum", "2", "--warmup-steps", "2", "--precision", "fp32")) == 0
    records = read_jsonl(run / "pm" / "metrics.jsonl")
    assert [r["examples"] for r in records] == [8, 8, 8, 8, 4]
    lrs = [r["lr"] for r in records]
    assert lrs[0] == pytest.approx(3e-3 / 3) and lrs[1] == pytest.approx(2 * 3e-3 / 3)
    assert lrs[2] == pytest.approx(3e-3) and 0 < lrs[4] < lrs[3] < lrs[2]


def test_activation_checkpointing_trains_the_same_weights_bit_for_bit(tmp_path, pm_setup):
    """run.activation_checkpointing reaches the decoder (its saved activations shrink) and changes no result."""
    from safetensors.torch import load_file
    from cai_engine.model.decoder import Transformer
    seen = []
    original = Transformer.forward

    def spy(self, *args, **kwargs):
        seen.append(self.activation_checkpointing and torch.is_grad_enabled())
        return original(self, *args, **kwargs)

    finals = []
    for flag in ("false", "true"):
        run = tmp_path / flag
        Transformer.forward = spy
        try:
            assert train_main(pm_args(pm_setup, run, "--precision", "bf16-mixed", "--set",
                                      f"run.activation_checkpointing={flag}")) == 0
        finally:
            Transformer.forward = original
        finals.append(load_file(run / "pm" / "final" / "model.safetensors"))
    assert any(seen) and not all(seen)  # on in the second run's training steps only
    assert finals[0].keys() == finals[1].keys()
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])


def test_a_run_folder_made_with_another_config_is_refused(tmp_path, pm_setup, capsys):
    run = tmp_path / "run"
    assert train_main(pm_args(pm_setup, run, "--precision", "fp32")) == 0
    assert train_main(pm_args(pm_setup, run, "--precision", "fp32")) == 0
    assert "already finished" in capsys.readouterr().out
    assert train_main(pm_args(pm_setup, run, "--precision", "fp32", "--lr", "1e-3")) == 2  # a config error, refused before any work
    err = capsys.readouterr().err
    assert "pm.lr (0.003 -> 0.001)" in err and "--resume-with-new-config" in err
    # on purpose: a longer run goes on from the last checkpoint
    assert train_main(pm_args(pm_setup, run, "--precision", "fp32", "--epochs", "2",
                              "--resume-with-new-config")) == 0
    assert "resuming pm from checkpoint-9" in capsys.readouterr().out
    assert [r["step"] for r in read_jsonl(run / "pm" / "metrics.jsonl")] == list(range(1, 19))


def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(tmp_path, pm_setup, capsys):
    run = tmp_path / "run"
    code = train_main(pm_args(pm_setup, run, "--lr", "1e10", "--precision", "fp32", "--checkpoint-every", "1",
                              "--max-grad-norm", "0"))
    err = capsys.readouterr().err
    assert code == 1 and "step" in err and ("loss is" in err or "gradient norm is" in err)
    assert not (run / "pm" / "final").exists()
    for checkpoint in (run / "pm").glob("checkpoint-*"):
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        assert all(torch.isfinite(t).all() for t in
                   __import__("safetensors.torch").torch.load_file(str(checkpoint / "trainer_weights.safetensors")).values())
        assert state["step"] >= 1


def test_metrics_log_survives_a_torn_line_and_drops_steps_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}, {"step": 3}]
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n{"step": 3}\n'
    assert read_jsonl(path, keep=lambda r: r["step"] <= 2) == [{"step": 1}, {"step": 2}]
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        read_jsonl(path)


# ----------------------------------------------------------------------------------------------- exact resume

def _launch(args: list[str], env) -> subprocess.Popen:
    # a suite started in the background (`cmd &` in a script) ignores SIGINT, and children inherit that: Python
    # then installs no KeyboardInterrupt handler, so give the child the default disposition back
    return subprocess.Popen([sys.executable, "-m", "cai_engine.train", *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed"])
def test_sigkill_at_any_moment_then_rerun_gives_bit_identical_weights(tmp_path, pm_setup, precision):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = lambda run: pm_args(pm_setup, run, "--epochs", "2", "--checkpoint-every", "1", "--precision", precision,
                               "--eval-every", "4")
    reference = subprocess.run([sys.executable, "-m", "cai_engine.train", *args(tmp_path / "ref")], env=env,
                               cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert reference.returncode == 0, reference.stdout + reference.stderr
    run = tmp_path / "killed"
    metrics = run / "pm" / "metrics.jsonl"
    resumed_at = []
    for kill_after in (3, 8, 14):  # mid-epoch (9 steps an epoch), across the epoch boundary, and late
        proc = _launch(args(run), env)
        deadline = time.time() + 300
        while _lines(metrics) < kill_after and proc.poll() is None and time.time() < deadline:
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        out = proc.communicate()[0]
        resumed_at += [line for line in out.splitlines() if line.startswith("resuming pm")]
    final = subprocess.run([sys.executable, "-m", "cai_engine.train", *args(run)], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stdout + final.stderr
    resumed_at += [line for line in final.stdout.splitlines() if line.startswith("resuming pm")]
    assert len(resumed_at) >= 2, resumed_at  # the kills really interrupted the run
    for name in ("final/model.safetensors", "checkpoint-18/model.safetensors", "checkpoint-18/optimizer.safetensors"):
        assert (run / "pm" / name).read_bytes() == (tmp_path / "ref" / "pm" / name).read_bytes(), name
    assert [r["step"] for r in read_jsonl(metrics)] == list(range(1, 19))
    ours = json.loads((run / "pm" / "summary.json").read_text())["history"]
    theirs = json.loads((tmp_path / "ref" / "pm" / "summary.json").read_text())["history"]
    assert [h["loss"] for h in ours] == [h["loss"] for h in theirs]
    assert not [p for p in (run / "pm").iterdir() if p.name.startswith(".")]


# ----------------------------------------------------------------------------------------------- precision

def _lm_task(model, tokens: torch.Tensor, precision: Precision, lr: float) -> TrainTask:
    """Next-token loss on a fixed set of sequences through the fused log-prob op."""
    def loss(trained, indices):
        ids = tokens[indices]
        hidden = trained(ids[:, :-1])
        hidden, weight = precision.op_inputs(hidden.reshape(-1, hidden.shape[-1]), trained.lm_head)
        logprobs, _ = token_logprobs(hidden, weight, ids[:, 1:].reshape(-1))
        return MicroBatchResult(-logprobs.sum(), float(logprobs.numel()), int(ids.numel()))
    return TrainTask(name="lm", model=model, num_examples=tokens.shape[0], micro_batch=4, grad_accum=1, epochs=12,
                     lr=lr, loss=loss, export=lambda m, d: None)


def _train_lm(tmp_path, precision: Precision, *, dtype=torch.float32, lr=1e-5, seed=0) -> tuple[list[float], dict]:
    _, model = hf_and_ours("llama", False, seed=seed)
    model = model.to(dtype)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    tokens = torch.randint(3, 250, (8, 24), generator=torch.Generator().manual_seed(1))
    settings = LoopSettings(stage_dir=tmp_path, device=torch.device("cpu"), precision=precision,
                            optimizer=OptimizerSection(schedule="constant", max_grad_norm=0.0),
                            checkpoint=CheckpointSection(every=0, keep=1), seed=0, config={}, progress=False)
    run_training(_lm_task(model, tokens, precision, lr), settings, log=lambda _: None)
    losses = [r["loss"] for r in read_jsonl(tmp_path / "metrics.jsonl")]
    changed = {n: float((p.detach() != start[n]).float().mean()) for n, p in model.named_parameters()}
    return losses, changed


def test_bf16_mixed_learns_where_pure_bf16_does_not(tmp_path):
    """lr 1e-5: AdamW on bf16 weights rounds most updates away; fp32 masters keep every one."""
    mixed = Precision("bf16-mixed", "test")
    losses_mixed, changed_mixed = _train_lm(tmp_path / "mixed", mixed)
    losses_pure, changed_pure = _train_lm(tmp_path / "pure", mixed, dtype=torch.bfloat16)
    share = lambda changed: sum(changed.values()) / len(changed)
    assert share(changed_mixed) > 0.95          # every master weight moved
    assert share(changed_pure) < 0.25           # most bf16 weights never moved
    drop_mixed, drop_pure = losses_mixed[0] - losses_mixed[-1], losses_pure[0] - losses_pure[-1]
    assert drop_mixed > 0 and drop_mixed > 2 * max(drop_pure, 0.0)


def test_bf16_mixed_loss_curve_tracks_fp32(tmp_path):
    """Same data and seed at lr 1e-3: every step's loss within 1% (bf16 rounds matmul inputs to 8 bits of
    mantissa, ~0.4% relative per product; the sums stay fp32, so the loss moves far less than that)."""
    fp32, _ = _train_lm(tmp_path / "fp32", Precision("fp32", "test"), lr=1e-3)
    bf16, _ = _train_lm(tmp_path / "bf16", Precision("bf16-mixed", "test"), lr=1e-3)
    assert fp32[-1] < 0.9 * fp32[0]
    for a, b in zip(fp32, bf16):
        assert abs(a - b) <= 0.01 * a


def test_bf16_op_inputs_send_gradients_to_fp32_masters():
    _, model = hf_and_ours("llama", False)
    precision = Precision("bf16-mixed", "test")
    ids = torch.randint(3, 250, (2, 10))
    with precision.autocast(torch.device("cpu")):
        hidden = model(ids[:, :-1])
        h, w = precision.op_inputs(hidden.reshape(-1, hidden.shape[-1]), model.lm_head)
        assert h.dtype == w.dtype == torch.bfloat16
        out, _ = token_logprobs(h, w, ids[:, 1:].reshape(-1))
    assert out.dtype == torch.float32
    out.sum().backward()
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32, name
        assert p.grad.abs().sum() > 0, name


# ----------------------------------------------------------------------------------------------- scale-out, Ctrl-C

def test_torchrun_two_processes_match_one(tmp_path, pm_setup):
    """DDP over gloo: each rank takes half of every step's examples; the gradient is the same sum over the
    whole step, so the losses equal a single process's up to summation order."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = lambda run: pm_args(pm_setup, run, "--batch-groups", "3", "--grad-accum", "2", "--precision", "fp32")
    multi = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                            "-m", "cai_engine.train", *args(tmp_path / "ddp")], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=600)
    assert multi.returncode == 0, multi.stdout + multi.stderr
    assert multi.stdout.count("pm: 6 steps") == 1  # rank 0 speaks for both
    assert train_main(args(tmp_path / "single")) == 0
    ddp, single = (read_jsonl(tmp_path / run / "pm" / "metrics.jsonl") for run in ("ddp", "single"))
    assert [r["examples"] for r in ddp] == [r["examples"] for r in single] == [6] * 6
    for a, b in zip(ddp, single):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)


def test_ctrl_c_prints_how_to_resume_without_a_traceback(tmp_path, pm_setup):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = tmp_path / "run"
    # a checkpoint every step keeps the run long enough (seconds, not milliseconds) for the signal to land in it
    proc = _launch(pm_args(pm_setup, run, "--epochs", "40", "--checkpoint-every", "1", "--precision", "fp32"), env)
    deadline = time.time() + 300
    while _lines(run / "pm" / "metrics.jsonl") < 6 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    assert proc.poll() is None, "the run ended before the interrupt"
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, out
    assert "interrupted: run the same command again to resume" in out and "Traceback" not in out
    assert not [p for p in (run / "pm").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("when", ["as mkdir returns", "inside the write"])
def test_an_interrupted_folder_write_leaves_nothing_behind(tmp_path, monkeypatch, when):
    """Ctrl-C at either point of write_folder (CI once caught one as the temporary folder's mkdir returned):
    no hidden temporary folder stays, the interrupt goes on up, and no final folder appears."""
    from cai_engine.train import checkpoints as ckpt
    real_mkdir = Path.mkdir

    def mkdir_then_interrupt(self, *args, **kwargs):
        real_mkdir(self, *args, **kwargs)
        if ".tmp-" in self.name:
            raise KeyboardInterrupt

    def write(directory: Path) -> None:
        (directory / "weights.bin").write_bytes(b"x" * 100)
        if when == "inside the write":
            raise KeyboardInterrupt

    if when == "as mkdir returns":
        monkeypatch.setattr(Path, "mkdir", mkdir_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        ckpt.write_folder(tmp_path, "checkpoint-3", write)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("max_norm", [0.05, 1e9])  # clipping on, and off
def test_scale_and_clip_equals_scaling_then_clipping(fused, max_norm):
    """The loop's one-pass gradient scaling + clipping (the factor applied inside fused AdamW) steps the weights as
    multiplying the gradients, clipping them with torch and stepping would."""
    from cai_engine.train.optim import scale_and_clip_
    torch.manual_seed(0)
    weights = [torch.randn(300, 7), torch.randn(11)]
    grads = [torch.randn_like(w) for w in weights]
    stepped, norms = [], []
    for ours in (True, False):
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        # eps as large as the gradients: the update depends on their scale (at eps ~0 one Adam step would not)
        optimizer = torch.optim.AdamW(params, lr=0.1, eps=1.0, fused=fused, foreach=None if fused else True)
        if ours:
            norms.append(scale_and_clip_(optimizer, params, 0.25, max_norm, sharded=False))
        else:
            for p in params:
                p.grad.mul_(0.25)
            norms.append(float(torch.nn.utils.clip_grad_norm_(params, max_norm)))
        optimizer.step()
        stepped.append(params)
    assert norms[0] == pytest.approx(norms[1], rel=1e-6)
    for a, b in zip(*stepped):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-6)
