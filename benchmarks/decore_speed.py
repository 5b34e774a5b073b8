"""Decoding cost of DeCoRe against greedy decoding, on the same prompts, in one run.

Both go through the same batched, left-padded, KV-cached loop (``circuits/decore.py``):
greedy runs the B prompt rows, DeCoRe runs 2B rows (base and masked stacked in one batch),
so one DeCoRe step is one forward pass, not two. The rounds alternate greedy and DeCoRe; the
script prints one JSON object with tokens per second of both (median over rounds) and the
ratio of their costs per generated token (target: under 1.5).

The cost does not depend on which heads are masked, only on how many layers carry a mask:
by default the first head of each of the 10 layers from 40% depth on (k = 10), or --heads.

    .venv/bin/python benchmarks/decore_speed.py [--model smollm2-135m] [--new-tokens 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

import interp
from circuits.methods.decore import decore_generate, greedy_generate
from circuits.methods.heads import parse_heads

PROMPTS = [
    "The history of the printing press begins",
    "In the middle of the ocean there is a small island where",
    "Q: What is the capital of France? A:",
    "Once upon a time, a young fox",
    "The recipe calls for two cups of flour, one egg and",
    "Write a quote that ends in the word \"heavy\": Absence makes the heart grow",
    "The committee met on Tuesday to discuss",
    "Photosynthesis is the process by which plants",
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="DeCoRe vs greedy: tokens per second on the same prompts")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--heads", default="", help="heads to mask, L.H,... (default: see the module docstring)")
    ap.add_argument("--prompts", type=int, default=len(PROMPTS), help="how many of the built-in prompts")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = interp.load_model(args.model)
    if args.heads:
        heads = parse_heads(args.heads, model)
    else:
        start = int(0.4 * model.info.n_layers)
        heads = [(la, 0) for la in range(start, min(model.info.n_layers, start + 10))]
    prompts = (PROMPTS * (1 + args.prompts // len(PROMPTS)))[: args.prompts]
    kw = {"max_new_tokens": args.new_tokens, "batch_size": len(prompts)}

    def greedy() -> int:
        return sum(len(g.tokens) for g in greedy_generate(model, prompts, **kw))

    def decore() -> int:
        return sum(len(g.tokens) for g in decore_generate(model, model.tokenizer, prompts, heads, "entropy", **kw))

    greedy()  # warm-up (first-call allocations, the bridge's lazy set-up)
    decore()
    rates: dict[str, list[float]] = {"greedy": [], "decore": []}
    tokens: dict[str, int] = {}
    for _ in range(args.rounds):
        for name, fn in (("greedy", greedy), ("decore", decore)):
            t = time.perf_counter()
            n = fn()
            rates[name].append(n / (time.perf_counter() - t))
            tokens[name] = n
    g, d = statistics.median(rates["greedy"]), statistics.median(rates["decore"])
    out = {
        "model": model.name,
        "prompts": len(prompts),
        "max_new_tokens": args.new_tokens,
        "heads_masked": len(heads),
        "masking": "uniform",
        "rounds": args.rounds,
        "threads": args.threads,
        "device": str(model.device),
        "greedy_tokens_per_s": round(g, 3),
        "decore_tokens_per_s": round(d, 3),
        "generated_tokens": tokens,
        "cost_ratio_per_token": round(g / d, 3),
        "target_ratio": 1.5,
        "rates_per_round": {k: [round(v, 3) for v in vs] for k, vs in rates.items()},
    }
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
