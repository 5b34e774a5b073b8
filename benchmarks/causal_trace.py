"""Batched causal-trace restorations vs one forward pass per cell, on the same inputs.

Both paths restore the same cells with the same noise; the script checks they give the same
scores and prints one JSON object with both wall times and their ratio (loop / batched).

    .venv/bin/python benchmarks/causal_trace.py [--model smollm2-135m] [--cells 60] [--samples 10]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

import interp
from circuits import causal_trace as ct


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Batched causal-trace restorations vs one pass per cell")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompt", default="The Eiffel Tower is located in the city of")
    ap.add_argument("--subject", default="The Eiffel Tower")
    ap.add_argument("--answer", default="Paris")
    ap.add_argument("--cells", type=int, default=60, help="number of (kind, token, layer) cells timed")
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--window", type=int, default=10)
    ap.add_argument("--memory-mb", type=float, default=512.0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = interp.load_model(args.model)
    inp = ct.prepare(model, args.prompt, args.subject, args.answer)
    noise = 3 * ct.subject_embedding_std(model, [f.subject for f in ct.load_facts()])
    kw = {"noise_std": noise, "samples": args.samples, "seed": 1, "window": args.window}
    _, _, clean = ct.clean_and_corrupted(model, inp, noise_std=noise, samples=args.samples, seed=1, kinds=ct.KINDS)
    # Cells spread over kinds, subject-and-after tokens and layers.
    grid = [
        ct.Cell(k, t, layer)
        for t in range(inp.subject_range[0], inp.n_tokens)
        for layer in range(model.info.n_layers)
        for k in ct.KINDS
    ]
    step = max(1, len(grid) // args.cells)
    cells = grid[::step][: args.cells]

    ct.restored_scores(model, inp, cells[:1], clean, memory_mb=args.memory_mb, **kw)  # warm-up
    t0 = time.perf_counter()
    batched = ct.restored_scores(model, inp, cells, clean, memory_mb=args.memory_mb, **kw)
    t_batched = time.perf_counter() - t0
    t0 = time.perf_counter()
    # One forward pass per cell: the same code path with room for a single cell per pass.
    loop = np.concatenate([ct.restored_scores(model, inp, [c], clean, memory_mb=0.0, **kw) for c in cells])
    t_loop = time.perf_counter() - t0
    diff = float(np.abs(batched - loop).max())
    out = {
        "model": model.name,
        "n_cells": len(cells),
        "samples": args.samples,
        "n_tokens": inp.n_tokens,
        "rows_per_pass": ct.rows_per_pass(model, inp.n_tokens, args.memory_mb),
        "threads": args.threads,
        "batched_s": round(t_batched, 3),
        "loop_s": round(t_loop, 3),
        "ratio_loop_over_batched": round(t_loop / t_batched, 2),
        "max_abs_diff": diff,
        "same_numbers": diff < 1e-5,
    }
    print(json.dumps(out))
    return 0 if out["same_numbers"] else 1


if __name__ == "__main__":
    sys.exit(main())
