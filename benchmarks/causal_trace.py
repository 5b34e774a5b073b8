"""Causal-trace restorations through the engine vs one forward pass per cell, same inputs.

Three paths restore the same cells with the same noise:
- ``loop``: one full forward pass of the N corrupted rows per cell (the baseline);
- ``stacked``: cells stacked in the batch dimension, every pass a full forward;
- ``engine``: stacked, and each cell starts at its lowest restored layer and its token, on the
  corrupted run's residual and KV cache (the default path of ``trace_fact``).
The script checks all three give the same scores and prints one JSON object with the wall
times and the ratios to the loop. ``--cells 0`` (default) restores every cell of the fact.

    .venv/bin/python benchmarks/causal_trace.py [--model smollm2-135m] [--cells 0] [--samples 10]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np
import torch

import interp
from circuits.data.facts import load_facts
from circuits.methods import tracing


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Batched causal-trace restorations vs one pass per cell")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompt", default="The Eiffel Tower is located in the city of")
    ap.add_argument("--subject", default="The Eiffel Tower")
    ap.add_argument("--answer", default="Paris")
    ap.add_argument("--cells", type=int, default=0, help="number of (kind, token, layer) cells timed (0: all)")
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--window", type=int, default=10)
    ap.add_argument("--memory-mb", type=float, default=512.0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = interp.load_model(args.model)
    inp = tracing.prepare(model, args.prompt, args.subject, args.answer)
    noise = 3 * tracing.subject_embedding_std(model, [f.subject for f in load_facts()])
    kw = {"noise_std": noise, "samples": args.samples, "seed": 1, "window": args.window}
    _, _, clean = tracing.clean_and_corrupted(model, inp, noise_std=noise, samples=args.samples, seed=1, kinds=tracing.RESTORABLE)
    # Cells spread over kinds, subject-and-after tokens and layers.
    grid = [
        tracing.Cell(k, t, layer)
        for t in range(inp.subject_range[0], inp.n_tokens)
        for layer in range(model.info.n_layers)
        for k in tracing.RESTORABLE
    ]
    step = max(1, len(grid) // args.cells) if args.cells else 1
    cells = grid[::step][: args.cells or None]

    def timed(fn: Any) -> tuple[float, np.ndarray]:
        t0 = time.perf_counter()
        values = fn()
        return time.perf_counter() - t0, values

    tracing.restored_scores(model, inp, cells[:3], clean, memory_mb=args.memory_mb, **kw)  # warm-up
    t_engine, engine = timed(lambda: tracing.restored_scores(model, inp, cells, clean, memory_mb=args.memory_mb, **kw))
    t_stacked, stacked = timed(
        lambda: tracing.restored_scores(model, inp, cells, clean, memory_mb=args.memory_mb, reuse=False, **kw)
    )
    # One full forward pass per cell: room for a single cell per pass, nothing reused.
    t_loop, loop = timed(lambda: np.concatenate(
        [tracing.restored_scores(model, inp, [c], clean, memory_mb=0.0, reuse=False, **kw) for c in cells]
    ))
    diff = float(max(np.abs(engine - loop).max(), np.abs(stacked - loop).max()))
    out = {
        "model": model.name,
        "n_cells": len(cells),
        "samples": args.samples,
        "n_tokens": inp.n_tokens,
        "subject_range": list(inp.subject_range),
        "threads": args.threads,
        "engine_s": round(t_engine, 3),
        "stacked_s": round(t_stacked, 3),
        "loop_s": round(t_loop, 3),
        "ratio_loop_over_engine": round(t_loop / t_engine, 2),
        "ratio_loop_over_stacked": round(t_loop / t_stacked, 2),
        "max_abs_diff": diff,
        "same_numbers": diff < 1e-5,
    }
    print(json.dumps(out))
    return 0 if out["same_numbers"] else 1


if __name__ == "__main__":
    sys.exit(main())
