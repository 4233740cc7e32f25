"""Chat with a model from the command line: `python -m cai_engine.generate --prompt "..."`.

A plain dense-KV-cache decoder for one prompt at a time; batched serving is the paged engine's job.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from .model.loading import DEFAULT_MODEL, load_model
from .model.decoder import KVCache, Transformer
from .model.tokenizer import Tokenizer


@torch.no_grad()
def generate_ids(model: Transformer, prompt_ids: list[int], *, max_new_tokens: int = 128, temperature: float = 0.0,
                 top_p: float = 1.0, stop_ids: set[int] | None = None, seed: int | None = None, on_token=None) -> list[int]:
    if not prompt_ids:
        raise ValueError("prompt is empty")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature must be >= 0 and top_p in (0, 1], got {temperature}, {top_p}")
    limit = model.config.max_position_embeddings
    if len(prompt_ids) >= limit:
        raise ValueError(f"prompt has {len(prompt_ids)} tokens; the model's context is {limit}")
    max_new_tokens = min(max_new_tokens, limit - len(prompt_ids))
    gen = torch.Generator(device=model.device)
    if seed is not None:
        gen.manual_seed(seed)
    cache = KVCache(model.config, 1, len(prompt_ids) + max_new_tokens, model.dtype, model.device)
    ids = torch.tensor([prompt_ids], device=model.device)
    out: list[int] = []
    for _ in range(max_new_tokens):
        hidden = model(ids, cache=cache)[0, -1]
        logits = (hidden @ model.lm_head.T).float()
        token = int(sample_token(logits, temperature, top_p, gen))
        out.append(token)
        if on_token is not None:
            on_token(token)
        if stop_ids and token in stop_ids:
            break
        ids = torch.tensor([[token]], device=model.device)
    return out


def sample_token(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> torch.Tensor:
    if temperature == 0:
        return logits.argmax()
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return torch.multinomial(probs, 1, generator=gen)[0]


def stop_token_ids(model: Transformer, tokenizer: Tokenizer) -> set[int]:
    eos = (getattr(model, "generation_config", {}) or {}).get("eos_token_id", model.config.eos_token_id)
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_id is not None:
        ids.add(tokenizer.eos_id)
    return ids


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="embedded name, HF directory or .gguf file")
    p.add_argument("--prompt", required=True)
    p.add_argument("--system", default=None, help="system message (the template's default when omitted)")
    p.add_argument("--raw", action="store_true", help="feed the prompt as plain text, without the chat template")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)

    model, tokenizer = load_model(args.model, device=args.device)
    if args.raw:
        text = args.prompt
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    prompt_ids = tokenizer.encode(text, add_special_tokens=args.raw)
    stops = stop_token_ids(model, tokenizer)
    printed = ""
    generated: list[int] = []

    def stream(token: int) -> None:
        nonlocal printed
        generated.append(token)
        text = tokenizer.decode([t for t in generated if t not in stops], skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[len(printed):])
            sys.stdout.flush()
            printed = text

    start = time.perf_counter()
    try:
        generate_ids(model, prompt_ids, max_new_tokens=args.max_tokens, temperature=args.temperature,
                     top_p=args.top_p, stop_ids=stops, seed=args.seed, on_token=stream)
    except ValueError as e:
        p.error(str(e))
    elapsed = time.perf_counter() - start
    sys.stdout.write("\n")
    print(f"[{len(generated)} tokens in {elapsed:.2f}s, {len(generated) / max(elapsed, 1e-9):.1f} tok/s]",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
