"""PH3's random-head control: all head sets as rows of shared batches against one set per pass.

``circuits.detectors.ph3_draws.score_head_sets`` scores every head set (unpruned, the pruned
set, ``--draws`` random draws of as many heads) on the same conflict prompts as rows of shared
batches, each set's zero ablation restricted to its rows; the plain way is
``circuits.data.conflicts.score_items`` once per set. The script first checks that both give the
same top-1 tokens and logits (within float rounding), then times them in alternating rounds and
prints one JSON object: seconds per way (median over rounds) and their ratio.

Time it alone on the machine (other load makes the ratio meaningless):

    .venv/bin/python benchmarks/ph3_draws.py [--model smollm2-135m] [--items 40] [--draws 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

import interp
from circuits.data.conflicts import build_dataset, score_items
from circuits.data.facts import load_facts
from circuits.detectors.ph3_draws import control_draws, score_head_sets
from circuits.methods.heads import parse_heads
from interp.model.interventions import ablate_heads

# The memory heads PH3 prunes on smollm2-135m (README); any heads of the model do for timing.
HEADS = "29.0,24.4,23.3,29.6,19.8"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="PH3 control draws: batched rows vs one head set per pass")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--heads", default=HEADS, help="the pruned set, L.H,...")
    ap.add_argument("--items", type=int, default=40, help="conflict items scored")
    ap.add_argument("--draws", type=int, default=20)
    ap.add_argument("--format", default="restated")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = interp.load_model(args.model)
    pruned = parse_heads(args.heads, model)
    ds = build_dataset(model, load_facts("auto"), seed=0, max_items=args.items, batch_size=args.batch_size)
    items = ds.validation + ds.test
    sets = [[], pruned, *control_draws(model, pruned, args.draws, seed=0)]

    def batched() -> list:
        return score_head_sets(model, items, args.format, sets, batch_size=args.batch_size)

    def one_by_one() -> list:
        return [score_items(model, items, args.format, ablate_heads(hs, "zero") if hs else [],
                            batch_size=args.batch_size) for hs in sets]

    a, b = batched(), one_by_one()  # also the warm-up
    same_top1 = sum(int((x["top1"] == y["top1"]).sum()) for x, y in zip(a, b, strict=True))
    max_diff = max(float((x[c] - y[c]).abs().max()) for x, y in zip(a, b, strict=True)
                   for c in ("logit_memory", "logit_context"))
    rows = len(sets) * len(items)
    if same_top1 != rows or max_diff > 1e-3:
        print(json.dumps({"error": "the two ways differ", "same_top1": same_top1, "rows": rows,
                          "max_logit_diff": max_diff}))
        return 1
    secs: dict[str, list[float]] = {"batched": [], "one_by_one": []}
    for _ in range(args.rounds):
        for name, fn in (("batched", batched), ("one_by_one", one_by_one)):
            t = time.perf_counter()
            fn()
            secs[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in secs.items()}
    out = {
        "model": model.name, "device": str(model.device), "items": len(items), "head_sets": len(sets),
        "rows": rows, "batch_size": args.batch_size, "format": args.format, "threads": torch.get_num_threads(),
        "same_top1": same_top1, "max_logit_diff": max_diff,
        "batched_s": round(med["batched"], 3), "one_by_one_s": round(med["one_by_one"], 3),
        "ratio_one_by_one_over_batched": round(med["one_by_one"] / med["batched"], 3),
        "seconds_per_round": {k: [round(x, 3) for x in v] for k, v in secs.items()},
    }
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
