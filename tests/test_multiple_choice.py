"""Multiple-choice scoring by teacher forcing and the `python -m cai_engine.eval mc` CLI, against transformers."""
import copy
import json

import pytest
import torch

from cai_engine import save_model
from cai_engine.cai import multiple_choice
from cai_engine.cai.multiple_choice import chat_wrap, encode_question, fast_dtype, score_continuations
from cai_engine.data.comparisons import DataError
from cai_engine.eval.__main__ import main as eval_main
from cai_engine.eval.mc import read_mc_questions, wilson_interval

from conftest import hf_and_ours, tiny_tokenizer

QUESTIONS = [
    ("Human: is the sky blue?\n\nAssistant: The answer is:", [" (A)", " (B)"]),
    ("Q: 2+2?\nThe answer is:", [" four", " five", " hello there"]),
    ("hello hello hello, a longer prompt so that rows have different lengths. The answer is:", [" (A)", " (B)", " (C)"]),
    ("x", [" y"]),
    # prompts that share prefixes with each other (and one that is a prefix of another): packed together
    ("Example: the sky is blue. The answer is: (A)\n\nQ: is grass green? The answer is:", [" (A)", " (B)"]),
    ("Example: the sky is blue. The answer is: (A)\n\nQ: is snow hot? The answer is:", [" (A)", " (B)"]),
    ("Example: the sky is blue. The answer is: (A)\n\nQ: is snow hot?", [" The answer is: (B)", " no"]),
    ("Example: the sky is blue. The answer is:", [" (A)", " (B)"]),
    ("Q: 2+2?\nThe answer is:", [" five", " hello"]),  # the same prompt as another question
]


@pytest.fixture(scope="module")
def models():
    hf, ours = hf_and_ours("llama", tied=False)
    return hf, ours, tiny_tokenizer()


def oracle_scores(hf, tok, questions) -> list[list[float]]:
    """transformers' dense logits, one separately encoded prompt+continuation at a time, in float64 sums."""
    out = []
    for prompt, continuations in questions:
        prompt_ids, options = encode_question(tok, prompt, continuations)
        row = []
        for option in options:
            ids = torch.tensor([prompt_ids + option])
            with torch.no_grad():
                logp = hf(ids).logits[0].double().log_softmax(-1)
            row.append(sum(float(logp[len(prompt_ids) - 1 + j, t]) for j, t in enumerate(option)))
        out.append(row)
    return out


@pytest.mark.parametrize("max_batch_tokens, max_row_tokens", [(1, 1), (64, 64), (100000, 100000), (100000, 1)])
def test_scores_equal_transformers(models, max_batch_tokens, max_row_tokens):
    hf, ours, tok = models
    ours_scores = score_continuations(ours, tok, QUESTIONS, max_batch_tokens=max_batch_tokens,
                                      max_row_tokens=max_row_tokens, progress=False)
    expected = oracle_scores(hf, tok, QUESTIONS)
    assert [len(r) for r in ours_scores] == [len(c) for _, c in QUESTIONS]
    for got, want in zip(ours_scores, expected):
        assert got == pytest.approx(want, abs=1e-4)


def test_rows_share_common_prefixes():
    tok = tiny_tokenizer()
    encoded = [encode_question(tok, p, c) for p, c in QUESTIONS]
    prompts, sizes = [p for p, _ in encoded], [len(p) + sum(map(len, o)) for p, o in encoded]
    rows = multiple_choice._rows(prompts, sizes, 100000)
    assert sorted(q for r in rows for q in r.members) == list(range(len(QUESTIONS)))
    shared = next(r for r in rows if 4 in r.members)
    assert sorted(shared.members) == [4, 5, 6, 7] and shared.shared == len(prompts[7])
    assert shared.length == sum(sizes[q] for q in shared.members) - 3 * shared.shared
    assert sum(r.length for r in rows) < sum(sizes)
    assert all(len(r.members) == 1 for r in multiple_choice._rows(prompts, sizes, 1))
    # a question that would share only one token with a row sharing five does not join it
    rows = multiple_choice._rows([[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 7], [1, 9, 9, 9, 9, 9]], [7, 7, 7], 100)
    assert [r.members for r in rows] == [[0, 1], [2]] and rows[0].shared == 5 and rows[0].length == 9


def test_bf16_scores_are_close_to_fp32(models):
    _, ours, tok = models
    exact = score_continuations(ours, tok, QUESTIONS, progress=False)
    half = score_continuations(copy.deepcopy(ours).to(torch.bfloat16), tok, QUESTIONS, progress=False)
    for a, b in zip(exact, half):
        assert b == pytest.approx(a, abs=0.15)


def test_bad_questions_are_named(models):
    _, ours, tok = models
    with pytest.raises(ValueError, match="question 1: continuations"):
        score_continuations(ours, tok, [("a", [" b"]), ("a", [])])
    with pytest.raises(ValueError, match="question 0: the prompt"):
        score_continuations(ours, tok, [("", [" b"])])
    with pytest.raises(ValueError, match="question 0: .*context is 128"):
        score_continuations(ours, tok, [("word " * 100, [" b"])])


def test_fast_dtype(monkeypatch):
    monkeypatch.setattr(multiple_choice, "cpu_has_fast_bf16", lambda: (True, "AMX"))
    assert fast_dtype("cpu") == torch.bfloat16
    monkeypatch.setattr(multiple_choice, "cpu_has_fast_bf16", lambda: (False, "none"))
    assert fast_dtype("cpu") == torch.float32


def test_chat_wrap_moves_the_answer_lead_into_the_reply():
    tok = tiny_tokenizer()
    text = chat_wrap(tok, "Which is better?\n(A) x\n(B) y\nThe answer is:")
    assert text == "<|im_start|>user\nWhich is better?\n(A) x\n(B) y<|im_end|>\n<|im_start|>assistant\nThe answer is:"


def test_wilson_interval_solves_the_score_equation():
    z = 1.959963984540054
    for right, n in [(8, 10), (0, 7), (7, 7), (123, 200), (1, 1)]:
        lo, hi = wilson_interval(right, n)
        p = right / n
        # the bounds are the roots of (p - q)^2 = z^2 q (1 - q) / n
        for q in (lo, hi):
            assert (p - q) ** 2 == pytest.approx(z * z * q * (1 - q) / n, abs=1e-12)
        assert 0 <= lo <= p <= hi <= 1
    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    with pytest.raises(ValueError):
        wilson_interval(0, 0)


def write_mc_file(path, questions, extra=True):
    with open(path, "w") as f:
        for prompt, corrects, incorrects in questions:
            obj = {"prompt": prompt, "corrects": corrects, "incorrects": incorrects}
            if extra:
                obj["source"] = "test"  # other keys are ignored
            f.write(json.dumps(obj) + "\n")


def test_eval_cli_accuracy_and_logprobs_equal_transformers(tmp_path, models, capsys):
    hf, ours, tok = models
    save_model(ours, tok, tmp_path / "model")
    mc = [(p, c[:1], c[1:]) for p, c in QUESTIONS[:3]]
    # two corrects on either side of an incorrect: wrong (every correct must beat every incorrect),
    # and two corrects above an incorrect: right
    prompt, options = QUESTIONS[1]
    best, middle, worst = (o for _, o in sorted(zip(oracle_scores(hf, tok, [QUESTIONS[1]])[0], options), reverse=True))
    mc += [(prompt, [best, worst], [middle]), (prompt, [middle, best], [worst])]
    write_mc_file(tmp_path / "mc.jsonl", mc)
    expected = oracle_scores(hf, tok, [(p, c + i) for p, c, i in mc])
    right = [min(s[: len(c)]) > max(s[len(c):]) for s, (_, c, _) in zip(expected, mc)]
    assert 0 < sum(right) < len(mc), "the test file should hold right and wrong questions"

    rc = eval_main(["mc", "--data", str(tmp_path / "mc.jsonl"), "--model", str(tmp_path / "model"),
                    "--out", str(tmp_path / "out.jsonl"), "--dtype", "float32", "--no-progress"])
    assert rc == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    lo, hi = wilson_interval(sum(right), len(mc))
    assert last == f"accuracy {sum(right) / len(mc):.4f} ({sum(right)}/{len(mc)}, 95% CI {lo:.4f}-{hi:.4f})"
    results = [json.loads(line) for line in open(tmp_path / "out.jsonl")]
    assert [r["line"] for r in results] == [1, 2, 3, 4, 5]
    assert [r["right"] for r in results] == right and right[3:] == [False, True]
    for r, want, (_, c, _) in zip(results, expected, mc):
        assert r["corrects_logprobs"] + r["incorrects_logprobs"] == pytest.approx(want, abs=1e-4)

    rc = eval_main(["mc", "--data", str(tmp_path / "mc.jsonl"), "--model", str(tmp_path / "model"),
                    "--limit", "2", "--dtype", "float32", "--no-progress"])
    assert rc == 0 and f"({sum(right[:2])}/2," in capsys.readouterr().out.strip().splitlines()[-1]

    # the default dtype (bf16 on this kind of CPU, else fp32) gives nearly the same log-probs
    rc = eval_main(["mc", "--data", str(tmp_path / "mc.jsonl"), "--model", str(tmp_path / "model"),
                    "--out", str(tmp_path / "auto.jsonl"), "--no-progress"])
    assert rc == 0 and capsys.readouterr().out.strip().splitlines()[-1].startswith("accuracy ")
    for r, want in zip(map(json.loads, open(tmp_path / "auto.jsonl")), expected):
        assert r["corrects_logprobs"] + r["incorrects_logprobs"] == pytest.approx(want, abs=0.3)


@pytest.mark.parametrize("line, message", [
    ("{not json", "invalid JSON"),
    ('["a"]', "expected a JSON object"),
    ('{"corrects": [" a"], "incorrects": [" b"]}', "'prompt' must be a non-empty string (missing)"),
    ('{"prompt": "p", "incorrects": [" b"]}', "'corrects' must be a non-empty list of non-empty strings (missing)"),
    ('{"prompt": "p", "corrects": [" a"], "incorrects": []}', "'incorrects' must be a non-empty list"),
    ('{"prompt": "p", "corrects": [" a"], "incorrects": [3]}', "'incorrects' must be a non-empty list"),
])
def test_malformed_lines_name_file_and_line(tmp_path, capsys, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "p", "corrects": [" a"], "incorrects": [" b"]}\n\n' + line + "\n")
    with pytest.raises(DataError, match=f"bad.jsonl:3: {message}".replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[")):
        read_mc_questions(path)
    assert eval_main(["mc", "--data", str(path), "--model", "nonexistent-model"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "bad.jsonl:3:" in err and len(err.splitlines()) == 1


def test_cli_bad_arguments(tmp_path, capsys):
    write_mc_file(tmp_path / "mc.jsonl", [("p", [" a"], [" b"])])
    assert eval_main(["mc", "--data", str(tmp_path / "mc.jsonl"), "--limit", "0"]) == 2
    assert "--limit must be >= 1" in capsys.readouterr().err
    assert eval_main(["mc", "--data", str(tmp_path / "mc.jsonl"), "--model", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
    assert eval_main(["mc", "--data", str(tmp_path / "none.jsonl")]) == 2
    assert "none.jsonl" in capsys.readouterr().err
    (tmp_path / "empty.jsonl").write_text("\n")
    assert eval_main(["mc", "--data", str(tmp_path / "empty.jsonl")]) == 2
    assert "no questions" in capsys.readouterr().err


def test_cli_help_has_one_line_per_option(capsys):
    with pytest.raises(SystemExit):
        eval_main(["mc", "--help"])
    out = capsys.readouterr().out
    for flag in ["--data", "--model", "--limit", "--out", "--dtype", "--device", "--batch-tokens", "--chat-template"]:
        assert flag in out
