"""The report stage: the initial (M0), SL-CAI (M1) and RL-CAI (M2) models on held-out prompts -> `<run.dir>/report.md`.

Each model that exists answers every held-out prompt (red-team and helpful, reported apart); answers are
appended to `report/answers.jsonl` one record at a time, each tagged with a fingerprint of the weights that
wrote it, so a rerun skips the (model, prompt) pairs already answered by the same weights and a killed run
loses nothing. Then, recomputed on every run from those answers (teacher forcing, a fraction of the cost of
generating): the PM score of each answer (`pm/final`, read as `train/rl.py` reads it), the win rate of M1 and
M2 against M0 judged by the feedback model in both orders, answer lengths, refusal shares (a heuristic,
`cai/evaluation.py`), the configured multiple-choice evals; the training curves as PNGs
(`report/plots/`) and TensorBoard event files (`tensorboard/`). Every number in report.md is from this run.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm import tqdm

from ..cai import Constitution
from ..cai.evaluation import (Proportion, answer_prompts, is_refusal, mc_accuracy, mean_stderr, proportion,
                              win_probabilities, win_rate)
from ..cai.feedback import FeedbackConfig
from ..data.prompts import Prompt, load_prompts
from ..engine import LLM
from ..eval.mc import read_mc_questions
from ..io import append_jsonl, atomic_write_text, read_jsonl
from ..model.heads import RewardModel
from ..model.loading import load_model
from ..model.tiny import TINY_MODEL
from ..cai.critique import hh_prompt
from .config import ConfigError, RunConfig
from .precision import sampler_dtype
from .plots import write_plots
from .precision import resolve_device, resolve_precision
from .rl import reward_model_scores
from .tensorboard_events import BOARD, write_tensorboard

KINDS = ("red-team", "helpful", "user")   # the order of the tables; "user": prompts from a file
MIN_PROMPTS = 30                          # below this per kind, say that differences mean little
SAMPLE_CHARS = 600                        # a side-by-side answer is cut here in report.md


@dataclass(slots=True)
class Candidate:
    label: str          # M0, M1, M2
    role: str           # initial, SL-CAI, RL-CAI
    path: str
    fingerprint: str    # of the weights: answers made by other weights are not reused


@dataclass(slots=True)
class Row:
    """One model's numbers on one kind of prompt."""
    model: Candidate
    n: int
    pm: tuple[float, float] | None        # mean, standard error
    win: Proportion | None                # vs M0 (None for M0 itself)
    win_probability: float | None         # mean P(better than M0)
    length: float                         # mean answer tokens
    refusals: Proportion


def fingerprint(path: str) -> str:
    """Names the weights behind a model path by content, not by place or time (a copied or resumed run folder
    keeps its answers; a retrained model gets new ones): each file's name, size and a SHA-256 of its first
    and last MiB (a safetensors header lists every tensor; a retrain changes the last tensor too). For an
    embedded model, the name itself."""
    where = Path(path)
    if where.is_dir():
        files = sorted(f for f in where.rglob("*") if f.is_file())
    else:
        files = [where] if where.is_file() else []
    if not files:
        return path
    digest = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        digest.update(f"{f.relative_to(where) if where.is_dir() else f.name}:{size}\n".encode())
        with open(f, "rb") as handle:
            digest.update(handle.read(1 << 20))
            if size > 2 << 20:
                handle.seek(size - (1 << 20))
                digest.update(handle.read())
    return digest.hexdigest()[:16]


def candidates(config: RunConfig) -> tuple[list[Candidate], list[str]]:
    """The models that exist (M0 always), and one line per model left out."""
    run_dir = Path(config.run.dir)
    present = [Candidate("M0", "initial", config.model.name, fingerprint(config.model.name))]
    missing = []
    for label, role, stage in (("M1", "SL-CAI", "sft"), ("M2", "RL-CAI", "rl")):
        final = run_dir / stage / "final"
        if final.is_dir():
            present.append(Candidate(label, role, str(final), fingerprint(str(final))))
        else:
            missing.append(f"{label} ({role}) is left out: `{final}` does not exist (run the {stage} stage first).")
    return present, missing


def report_prompts(config: RunConfig) -> list[Prompt]:
    """The held-out prompts (or the file's), grouped by kind, the first `report.limit` of each kind."""
    s = config.report
    prompts = load_prompts(s.prompts, split="held-out")
    out = []
    for kind in KINDS:
        of_kind = [p for p in prompts if p.kind == kind]
        out += of_kind[:s.limit] if s.limit else of_kind
    return out


def generate_answers(config: RunConfig, models: Sequence[Candidate], prompts: Sequence[Prompt], path: Path,
                     device: torch.device, log, progress: bool = False
                     ) -> tuple[dict[tuple[str, str], dict], dict[str, dict], int]:
    """Answers of every model to every prompt, appended to `path` after each batch; also each model's
    multiple-choice accuracies (while it is loaded). Returns (answers by (model, prompt id), mc, generated)."""
    s = config.report
    current = {m.label: m.fingerprint for m in models}
    # a rerun keeps the answers of the same weights and drops those of weights that have changed since
    done = read_jsonl(path, keep=lambda r: current.get(r.get("model")) == r.get("fingerprint"))
    answers = {(r["model"], r["prompt_id"]): r for r in done}
    mc, generated = {}, 0
    bar = tqdm(total=len(models) * len(prompts), initial=len(answers), desc="report answers", unit="answer",
               disable=not progress)
    for m in models:
        pending = [p for p in prompts if (m.label, p.id) not in answers]
        if not pending and not s.mc_evals:
            continue
        log(f"report: {m.label} ({m.role}, {m.path}): {len(pending)} prompts to answer ...")
        model, tokenizer = load_model(m.path, dtype=torch.float32, device=device)
        if pending:
            llm = LLM(model, tokenizer, dtype=sampler_dtype(config.precision.mode, device), kv_cache_bytes=s.kv_cache_mb << 20)
            # batches on fixed boundaries from an empty prefix cache, so a resumed run computes every answer
            # exactly as an uninterrupted one (a batch a kill cut short is answered whole, written where missing)
            for start in range(0, len(prompts), s.batch_size):
                batch = prompts[start:start + s.batch_size]
                if all((m.label, p.id) in answers for p in batch):
                    continue
                llm.reset_prefix_cache()
                replies = answer_prompts(llm, batch, max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                                         seed=config.run.seed)
                for p, reply in zip(batch, replies):
                    if (m.label, p.id) in answers:
                        continue
                    record = {"model": m.label, "fingerprint": m.fingerprint, "prompt_id": p.id, "kind": p.kind,
                              "prompt": p.text, "answer": reply.text, "tokens": reply.tokens,
                              "finish_reason": reply.finish_reason}
                    append_jsonl(path, record)
                    answers[(m.label, p.id)] = record
                    generated += 1
                    bar.update()
            del llm
        if s.mc_evals:
            model = model.to(sampler_dtype(config.precision.mode, device)).eval()
            mc[m.label] = {file: mc_accuracy(model, tokenizer, file) for file in s.mc_evals}
        del model
    bar.close()
    return answers, mc, generated


def pm_scores(config: RunConfig, models: Sequence[Candidate], prompts: Sequence[Prompt], answers: dict,
              device: torch.device, log) -> dict[tuple[str, str], float] | None:
    """PM score of [prompt + answer] for every answer, or None without `<run.dir>/pm/final`."""
    pm_dir = Path(config.run.dir) / "pm" / "final"
    if not pm_dir.is_dir():
        return None
    log(f"report: PM scores from {pm_dir} ...")
    reward_model, tokenizer = RewardModel.load(pm_dir, dtype=torch.float32, device=device)
    reward_model.requires_grad_(False).eval()
    precision = resolve_precision(config.precision.mode, device)
    score = reward_model_scores(reward_model, tokenizer, prompts, precision, device)
    out, size = {}, config.report.batch_size
    for m in models:
        for start in range(0, len(prompts), size):
            indices = list(range(start, min(start + size, len(prompts))))
            texts = [answers[(m.label, prompts[i].id)]["answer"] for i in indices]
            values = score(indices, [tokenizer.encode(t, add_special_tokens=False) for t in texts])
            out.update({(m.label, prompts[i].id): float(v) for i, v in zip(indices, values)})
    return out


def judge_name(config: RunConfig) -> str:
    return config.report.judge or config.feedback.feedback_model or config.model.name


def judged_wins(config: RunConfig, models: Sequence[Candidate], prompts: Sequence[Prompt], answers: dict,
                device: torch.device, log, progress: bool) -> dict[tuple[str, str], float]:
    """P(model's answer beats M0's) per (model, prompt), for every model but M0."""
    others = [m for m in models if m.label != "M0"]
    if not others:
        return {}
    judge = judge_name(config)
    log(f"report: judging {', '.join(m.label for m in others)} against M0 with {judge} ...")
    model, tokenizer = load_model(judge, dtype=sampler_dtype(config.precision.mode, device), device=device)
    constitution = Constitution.load(config.critique.constitution)
    principles = [(p.id, p.instruction) for p in constitution.comparison_principles]
    few_shot = "".join(e.prompt + e.corrects[0] + "\n\n" for e in constitution.comparison_few_shot)
    f = config.feedback
    settings = FeedbackConfig(principles_per_pair=f.principles_per_pair, chat_template=f.chat_template,
                              seed=config.run.seed)
    conversations = [hh_prompt(p) for p in prompts]
    baseline = [answers[("M0", p.id)]["answer"] for p in prompts]
    out = {}
    for m in others:
        mine = [answers[(m.label, p.id)]["answer"] for p in prompts]
        probabilities = win_probabilities(model, tokenizer, conversations, mine, baseline, principles, few_shot,
                                          settings, progress=progress)
        out.update({(m.label, p.id): q for p, q in zip(prompts, probabilities)})
    return out


def summarise(models: Sequence[Candidate], prompts: Sequence[Prompt], answers: dict, pm: dict | None,
              wins: dict) -> dict[str, list[Row]]:
    """The table rows of each kind of prompt."""
    tables = {}
    for kind in KINDS:
        ids = [p.id for p in prompts if p.kind == kind]
        if not ids:
            continue
        rows = []
        for m in models:
            mine = [answers[(m.label, i)] for i in ids]
            probabilities = [wins[(m.label, i)] for i in ids] if m.label != "M0" and wins else None
            rows.append(Row(
                m, len(ids), mean_stderr([pm[(m.label, i)] for i in ids]) if pm is not None else None,
                win_rate(probabilities) if probabilities else None,
                sum(probabilities) / len(probabilities) if probabilities else None,
                sum(r["tokens"] for r in mine) / len(mine),
                proportion(sum(is_refusal(r["answer"]) for r in mine), len(mine))))
        tables[kind] = rows
    return tables


def caveats(config: RunConfig, tables: dict[str, list[Row]]) -> list[str]:
    """Plain reasons the differences in the tables may mean nothing."""
    out = []
    if config.model.name == TINY_MODEL:
        out.append(f"M0 is `{TINY_MODEL}`, a tiny random model that answers in random bytes: this report checks "
                   "the plumbing and says nothing about Constitutional AI.")
    for kind, rows in tables.items():
        if rows[0].n < MIN_PROMPTS:
            out.append(f"Only {rows[0].n} {kind} prompts: too few for differences between the models to mean much.")
        undecided = [r.model.label for r in rows if r.win is not None and r.win.low <= 0.5 <= r.win.high]
        if undecided:
            out.append(f"{kind}: the 95% interval of the win rate of {' and '.join(undecided)} includes 50%: the "
                       f"judge cannot tell {'it' if len(undecided) == 1 else 'them'} from M0 on these prompts.")
        spans = [(r.pm[0] - 1.96 * r.pm[1], r.pm[0] + 1.96 * r.pm[1]) for r in rows
                 if r.pm is not None and not math.isnan(r.pm[1])]
        if len(spans) > 1 and max(low for low, _ in spans) <= min(high for _, high in spans):
            out.append(f"{kind}: the PM scores' 95% intervals (mean ± 1.96 standard errors) all overlap.")
    return out


def cell(text: str) -> str:
    """An answer as one markdown table cell."""
    text = text if len(text) <= SAMPLE_CHARS else text[:SAMPLE_CHARS] + " [...]"
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")
    return text.replace("\r", "").replace("\n", "<br>") or "*(empty)*"


def percent(p: Proportion) -> str:
    return f"{p.share:.0%} [{p.low:.0%}, {p.high:.0%}]"


def render(config: RunConfig, models: Sequence[Candidate], missing: Sequence[str], prompts: Sequence[Prompt],
           answers: dict, tables: dict[str, list[Row]], has_pm: bool, mc: dict, plots: Sequence[tuple[str, Path]],
           boards: Sequence[str]) -> str:
    run_dir = Path(config.run.dir)
    s = config.report
    lines = ["# Constitutional AI run report", "",
             f"Run folder `{run_dir}`. Models: " + "; ".join(f"**{m.label}** ({m.role}) `{m.path}`" for m in models)
             + ". Answers: " + ("greedy" if s.temperature == 0 else f"temperature {s.temperature}")
             + f", at most {s.max_new_tokens} tokens, to the "
             + (f"prompts of `{s.prompts}`" if s.prompts else "built-in held-out prompts")
             + (f" (first {s.limit} of each kind)" if s.limit else "") + ". Every number below comes from this run.", ""]
    lines += [f"- {line}" for line in missing]
    if not has_pm:
        lines.append(f"- No PM score column: `{run_dir / 'pm' / 'final'}` does not exist (run the pm stage first).")
    if len(models) > 1:
        lines.append(f"- Win rate vs M0: `{judge_name(config)}` answers the AI-feedback question (\"(A)\"/\"(B)\", "
                     f"{config.feedback.principles_per_pair} constitution principle(s) per prompt) with each answer "
                     "first in turn; a prompt is won when the averaged P(better) is above 1/2, a tie counts half; "
                     "[95% Wilson interval]; mean P(better) after it.")
    lines += ["- Refusals are a heuristic: a refusal phrase (\"I can't\", \"I'm sorry\", \"as an AI\", ...; "
              "`REFUSAL_PHRASES` in `cai/evaluation.py`) in the first 200 characters. It misses polite deflections.",
              "- Length: generated tokens per answer (EOS excluded).", ""]
    notes = caveats(config, tables)
    if notes:
        lines += ["**Too small to tell.** " + " ".join(notes), ""]
    for kind, rows in tables.items():
        lines += [f"## {kind} prompts ({rows[0].n})", ""]
        header = ["model"] + (["PM score (mean ± s.e.)"] if has_pm else []) + \
                 (["win rate vs M0"] if len(models) > 1 else []) + ["mean answer tokens", "refusals"]
        lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        for r in rows:
            values = [f"{r.model.label} ({r.model.role})"]
            if has_pm:
                values.append(f"{r.pm[0]:.3f} ± {r.pm[1]:.3f}" if not math.isnan(r.pm[1]) else f"{r.pm[0]:.3f}")
            if len(models) > 1:
                values.append(f"{percent(r.win)}, {r.win_probability:.2f}" if r.win is not None else "—")
            values += [f"{r.length:.1f}", f"{percent(r.refusals)} ({int(r.refusals.count)}/{r.n})"]
            lines.append("| " + " | ".join(values) + " |")
        lines.append("")
    if mc:
        lines += ["## Multiple-choice evals", "", "Accuracy [95% Wilson interval] (right/total).", "",
                  "| eval | " + " | ".join(mc) + " |", "| --- |" + " --- |" * len(mc)]
        for file in config.report.mc_evals:
            lines.append(f"| `{file}` | " + " | ".join(
                f"{mc[label][file].share:.3f} [{mc[label][file].low:.3f}, {mc[label][file].high:.3f}] "
                f"({int(mc[label][file].count)}/{mc[label][file].n})" for label in mc) + " |")
        lines.append("")
    shown = interleave(prompts)[:s.samples]
    if shown:
        lines += ["## Side by side", ""]
        for p in shown:
            lines += [f"**{p.kind}** `{p.id}`: {cell(p.text)}", "",
                      "| " + " | ".join(f"{m.label} ({m.role})" for m in models) + " |",
                      "|" + " --- |" * len(models),
                      "| " + " | ".join(cell(answers[(m.label, p.id)]["answer"]) for m in models) + " |", ""]
    lines += ["## Training curves", ""]
    if plots:
        lines += [f"![{title}]({path.relative_to(run_dir).as_posix()})" for title, path in plots] + [""]
    else:
        lines += ["No stage of this run has written metrics yet: no curves.", ""]
    if boards:
        lines += [f"TensorBoard ({', '.join(boards)}): `tensorboard --logdir {run_dir / BOARD}`.", ""]
    return "\n".join(lines)


def interleave(prompts: Sequence[Prompt]) -> list[Prompt]:
    """One prompt of each kind in turn, so the side-by-side samples show every kind."""
    by_kind = [[p for p in prompts if p.kind == kind] for kind in KINDS]
    return [group[i] for i in range(max(map(len, by_kind), default=0)) for group in by_kind if i < len(group)]


def run_report_stage(config: RunConfig, *, allow_config_change: bool, progress: bool,
                     log: Callable[[str], None]) -> str:
    s = config.report
    run_dir = Path(config.run.dir)
    stage_dir = run_dir / "report"
    if s.prompts and not Path(s.prompts).is_file():
        raise ConfigError(f"report.prompts = {s.prompts!r}: file not found")
    for file in s.mc_evals:
        if not Path(file).is_file():
            raise ConfigError(f"report.mc_evals: {file!r}: file not found")
        read_mc_questions(file)  # a malformed line fails now, not after the answers are generated
    prompts = report_prompts(config)
    if not prompts:
        raise ConfigError("report: no prompts to answer (report.prompts / report.limit)")
    models, missing = candidates(config)
    for line in missing:
        log(f"report: {line}")
    device = resolve_device(config.run.device)
    answers, mc, generated = generate_answers(config, models, prompts, stage_dir / "answers.jsonl", device, log,
                                                    progress)
    pm = pm_scores(config, models, prompts, answers, device, log)
    wins = judged_wins(config, models, prompts, answers, device, log, progress)
    atomic_write_text(stage_dir / "scores.jsonl", "".join(json.dumps({
        "model": m.label, "prompt_id": p.id, "kind": p.kind, "tokens": answers[(m.label, p.id)]["tokens"],
        "refusal": is_refusal(answers[(m.label, p.id)]["answer"]),
        "pm_score": pm[(m.label, p.id)] if pm is not None else None,
        "win_probability": wins.get((m.label, p.id))}) + "\n" for m in models for p in prompts))
    tables = summarise(models, prompts, answers, pm, wins)
    plots = write_plots(run_dir, stage_dir / "plots")
    boards = write_tensorboard(run_dir)
    out = run_dir / "report.md"
    atomic_write_text(out, render(config, models, missing, prompts, answers, tables, pm is not None, mc, plots,
                                  boards))
    return (f"report: {len(models)} models x {len(prompts)} prompts ({generated} answers generated, "
            f"{len(models) * len(prompts) - generated} already there), {len(plots)} plots; report at {out}")
