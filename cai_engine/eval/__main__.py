"""Evaluation entry point: `python -m cai_engine.eval mc --data FILE --model NAME_OR_PATH [--limit N] [--out FILE]`.

`mc` prints, as its last line, `accuracy <a> (<right>/<n>, 95% CI <lo>-<hi>)`: the share of questions
whose correct continuations all out-score the incorrect ones, with the 95% Wilson score interval.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from ..cai.multiple_choice import fast_dtype
from ..data.comparisons import DataError
from ..errors import CheckpointError
from ..io import atomic_write_text
from ..model.loading import DEFAULT_MODEL, load_model
from .mc import evaluate_mc, read_mc_questions, summary_line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cai_engine.eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    mc = sub.add_parser("mc", help="multiple-choice accuracy by teacher forcing")
    mc.add_argument("--data", required=True, help="JSONL: prompt, corrects, incorrects per line")
    mc.add_argument("--model", default=DEFAULT_MODEL, help="embedded name, HF directory or .gguf file")
    mc.add_argument("--limit", type=int, default=None, help="score only the first N questions")
    mc.add_argument("--out", default=None, help="write per-question results (both log-probs) as JSONL")
    mc.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="auto: bfloat16 on CUDA and AVX512-BF16 CPUs, float32 elsewhere")
    mc.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    mc.add_argument("--batch-tokens", type=int, default=8192, help="packed tokens per forward pass")
    mc.add_argument("--chat-template", action="store_true", help="wrap each prompt in the model's chat template")
    mc.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        if args.limit is not None and args.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {args.limit}")
        questions = read_mc_questions(args.data, args.limit)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = fast_dtype(device) if args.dtype == "auto" else getattr(torch, args.dtype)
        model, tokenizer = load_model(args.model, dtype=dtype, device=device)
        model.eval()
        results = evaluate_mc(model, tokenizer, questions, chat_template=args.chat_template,
                              max_batch_tokens=args.batch_tokens, progress=False if args.no_progress else None)
        if args.out:
            atomic_write_text(args.out, "".join(json.dumps(r) + "\n" for r in results))
    except (DataError, CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary_line(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
