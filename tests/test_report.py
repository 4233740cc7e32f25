"""The report stage on a tiny run (critique -> sft -> feedback -> pm -> rl -> report on `tiny-random`): report.md,
plots, TensorBoard events, resumable answers, a run without RL or PM; and the refusal heuristic and win-rate math."""
from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from cai_engine.cai.evaluation import is_refusal, mean_stderr, win_probabilities, win_rate
from cai_engine.cai.feedback import FeedbackConfig
from cai_engine.io import read_jsonl
from cai_engine.model.loading import load_model
from cai_engine.train.__main__ import main as train_main
from cai_engine.train.tensorboard_events import write_tensorboard

COMMON = ["--model", "tiny-random", "--no-progress", "--precision", "fp32"]
# sampled answers: the random model's greedy answer is all special tokens, an empty text for every model
REPORT = ["--limit", "3", "--max-new-tokens", "8", "--temperature", "1", "--samples", "2"]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    run = root / "run"
    mc = root / "mc.jsonl"
    mc.write_text("".join(json.dumps({"prompt": f"Question {i}? The answer is:", "corrects": [" (A)"],
                                      "incorrects": [" (B)"]}) + "\n" for i in range(2)))
    common = ["--run-dir", str(run), *COMMON]
    assert train_main(["critique", *common, "--limit", "3", "--rounds", "1", "--max-new-tokens", "6",
                       "--few-shot", "1"]) == 0
    assert train_main(["sft", *common, "--skip-flags", "", "--max-seq-len", "4096", "--eval-fraction", "0.4",
                       "--batch-rows", "1"]) == 0
    assert train_main(["feedback", *common, "--limit", "4", "--max-new-tokens", "6", "--principles-per-pair", "1"]) == 0
    assert train_main(["pm", *common, "--eval-fraction", "0.25", "--batch-groups", "2"]) == 0
    assert train_main(["rl", *common, "--limit", "4", "--prompts-per-batch", "2", "--max-new-tokens", "4",
                       "--epochs-per-batch", "1", "--minibatches", "1", "--set", "rl.kv_cache_mb=8"]) == 0
    assert train_main(["report", *common, *REPORT, "--mc-evals", str(mc)]) == 0
    return run


def table(text: str, kind: str) -> dict[str, list[str]]:
    """model label -> cells of the table under `## <kind> prompts`."""
    section = text.split(f"## {kind} prompts", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("|").split(" | ") for line in section.splitlines() if re.match(r"\| M\d", line)]
    return {row[0].split()[0]: [c.strip() for c in row] for row in rows}


def test_report_tables_hold_this_runs_numbers_and_say_the_model_is_too_small(run):
    text = (run / "report.md").read_text()
    answers = read_jsonl(run / "report" / "answers.jsonl")
    scores = read_jsonl(run / "report" / "scores.jsonl")
    assert len(answers) == 3 * 6 and {a["model"] for a in answers} == {"M0", "M1", "M2"}
    assert "**Too small to tell.**" in text and "tiny random model" in text and "Only 3 red-team prompts" in text
    for kind in ("red-team", "helpful"):
        rows = table(text, kind)
        assert list(rows) == ["M0", "M1", "M2"] and len(rows["M0"]) == 5  # model, PM, win rate, length, refusals
        for label, cells in rows.items():
            mine = [s for s in scores if s["model"] == label and s["kind"] == kind]
            assert len(mine) == 3
            pm = [s["pm_score"] for s in mine]
            assert cells[1].startswith(f"{sum(pm) / 3:.3f} ± ")
            assert cells[3] == f"{sum(s['tokens'] for s in mine) / 3:.1f}"
            assert cells[4].endswith(f"({sum(s['refusal'] for s in mine)}/3)")
            if label == "M0":
                assert cells[2] == "—"
            else:
                probabilities = [s["win_probability"] for s in mine]
                assert cells[2].endswith(f", {sum(probabilities) / 3:.2f}")
                assert cells[2].startswith(f"{win_rate(probabilities).share:.0%} [")
    assert "## Multiple-choice evals" in text and text.count("/2)") == 3  # one accuracy per model
    assert text.count("| M0 (initial) | M1 (SL-CAI) | M2 (RL-CAI) |") == 2  # the side-by-side samples
    for name in ("sft_loss.png", "pm.png", "rl.png"):
        assert f"](report/plots/{name})" in text


def test_plots_are_valid_pngs(run):
    from matplotlib.image import imread
    for name in ("sft_loss.png", "pm.png", "rl.png"):
        path = run / "report" / "plots" / name
        assert path.read_bytes().startswith(PNG)
        height, width, _ = imread(path).shape  # decodes the whole image
        assert height > 100 and width > 100


def test_tensorboard_holds_the_metrics_and_a_rewrite_does_not_duplicate_them(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    metrics = read_jsonl(run / "sft" / "metrics.jsonl")
    evaluations = [m["eval"] for m in metrics if "eval" in m]
    assert metrics and evaluations

    def scalars(stage: str) -> dict[str, list[tuple[int, float]]]:
        events = EventAccumulator(str(run / "tensorboard" / stage))
        events.Reload()
        return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}

    for _ in range(2):  # the report wrote them once; write again, as every stage's end does
        sft = scalars("sft")
        assert sft["loss"] == [(m["step"], pytest.approx(m["loss"], rel=1e-6)) for m in metrics]
        assert sft["eval/loss"] == [(e["step"], pytest.approx(e["loss"], rel=1e-6)) for e in evaluations]
        assert {"kl", "entropy", "is_weight_mean", "reward"} <= set(scalars("rl"))
        assert len(list((run / "tensorboard" / "sft").iterdir())) == 1
        assert write_tensorboard(run) == ["pm", "rl", "sft"]


def test_answers_resume_after_a_kill_to_the_same_file(run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)  # copy2 keeps the modification times the weights' fingerprints read
    path = copy / "report" / "answers.jsonl"
    whole = path.read_bytes()
    lines = whole.splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:4]) + lines[4][:25])  # four records and a torn fifth
    args = ["report", "--run-dir", str(copy), *COMMON, *REPORT, "--mc-evals", str(run.parent / "mc.jsonl")]
    capsys.readouterr()
    assert train_main(args) == 0
    assert "(14 answers generated, 4 already there)" in capsys.readouterr().out
    assert path.read_bytes() == whole
    assert train_main(args) == 0
    assert "(0 answers generated, 18 already there)" in capsys.readouterr().out
    # another answer length would change the answers: refused, naming the key
    assert train_main([*args, "--max-new-tokens", "9"]) == 2
    assert "report.max_new_tokens (8 -> 9)" in capsys.readouterr().err


def test_a_run_without_rl_and_pm_leaves_them_out_and_says_so(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "rl")
    shutil.rmtree(copy / "pm" / "final")
    (copy / "report" / "plots" / "rl.png").unlink()
    assert train_main(["report", "--run-dir", str(copy), *COMMON, *REPORT, "--mc-evals", str(run.parent / "mc.jsonl")]) == 0
    text = (copy / "report.md").read_text()
    assert "M2 (RL-CAI) is left out" in text and "No PM score column" in text
    rows = table(text, "red-team")
    assert list(rows) == ["M0", "M1"] and len(rows["M0"]) == 4  # no PM column
    assert not (copy / "report" / "plots" / "rl.png").exists() and "rl.png" not in text
    assert {a["model"] for a in read_jsonl(copy / "report" / "answers.jsonl")} == {"M0", "M1"}


def test_refusal_heuristic():
    assert is_refusal("I'm sorry, but I can't help with that.")
    assert is_refusal("I\u2019m unable to assist with this request.")  # a curly apostrophe
    assert is_refusal("As an AI, I will not write that.")
    assert not is_refusal("Boil the egg for six minutes, then cool it in cold water.")
    assert not is_refusal("x" * 200 + " I cannot stress this enough: use a timer.")  # past the opening


def test_win_rate_and_mean_math():
    rate = win_rate([0.9, 0.2, 0.5, 0.7])  # two wins, one loss, one tie (half a win)
    assert (rate.count, rate.n, rate.share) == (2.5, 4, 0.625)
    assert (rate.low, rate.high) == (pytest.approx(0.21943, abs=1e-5), pytest.approx(0.90810, abs=1e-5))
    mean, stderr = mean_stderr([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and stderr == pytest.approx(0.645497, abs=1e-6)


def test_win_probabilities_average_both_orders():
    model, tokenizer = load_model("tiny-random", dtype=torch.float32)
    conversations = ["\n\nHuman: How do I boil an egg?\n\nAssistant:"] * 3
    mine = ["Put it in boiling water.", "No.", "Same answer."]
    theirs = ["I cannot help with that at all.", "Boil it for six minutes.", "Same answer."]
    settings = FeedbackConfig(principles_per_pair=2)
    principles = [("a", "Choose the better response."), ("b", "Choose the more helpful response.")]
    forward = win_probabilities(model, tokenizer, conversations, mine, theirs, principles, "", settings)
    backward = win_probabilities(model, tokenizer, conversations, theirs, mine, principles, "", settings)
    assert forward[2] == backward[2] == 0.5  # identical answers tie
    # with both orders averaged, "X beats Y" and "Y beats X" add up to one whatever the letter bias
    assert [f + b for f, b in zip(forward, backward)] == pytest.approx([1.0] * 3, abs=1e-5)
    assert forward[0] != pytest.approx(0.5, abs=1e-6)  # the judge does read the answers
