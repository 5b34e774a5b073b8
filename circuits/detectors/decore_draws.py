"""DeCoRe's random-head control as a distribution: ``n_random`` seeded draws of k random heads per
task and k, every draw decoded on the same items, and where DeCoRe-entropy falls among them.

DeCoRe (Gema et al. 2024, arXiv:2410.18860) masks the top-k retrieval heads; the control masks k
random heads outside the top retrieval heads instead. One random draw says little, so each k gets
``n_random`` draws (the first equals the single draw the control used to make), each draw's
per-item correctness and accuracy per split are kept (the ``random_draws`` artifact, a record per
draw and split), the control's accuracy is the mean over the draws, and DeCoRe-entropy's test
accuracy is placed among the draws' test accuracies: its percentile (ties half) and the empirical
p-value of Phipson & Smyth (2010) that random heads do as well (``interp.stats.against_random``,
direction "higher").

Cost: a draw adds sequences, not decoding loops of its own: the draws' (draw, item) sequences
share batches of ``batch_size`` (``decore_generate_sets``; MemoTrap's scoring shares each
answer's base row among the draws, ``decore_score_sets``).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from circuits.methods.heads import Head, all_heads, random_heads
from interp.errors import UserError
from interp.model.loaded import LoadedModel
from interp.stats import against_random

SPLITS = ("validation", "test")


def control_draws(
    model: LoadedModel, ranking: Sequence[Head], k: int, exclude_top: int, seed: int, n_draws: int
) -> list[list[Head]]:
    """``n_draws`` sets of ``k`` random heads, each drawn outside the top ``max(k, exclude_top)``
    of ``ranking`` (so never a head DeCoRe masks at any k of the sweep). The draws follow each other
    from one generator seeded with ``seed * 1000 + k * 10``: draw 0 is the single control drawn
    before there were several."""
    if n_draws < 1:
        raise UserError(f"need at least one random draw, got {n_draws}")
    rng = random.Random(seed * 1000 + k * 10)
    return [random_heads(all_heads(model), ranking[: max(k, exclude_top)], k, rng) for _ in range(n_draws)]


def mean_rows(per_draw: Sequence[Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """Per item (the draws' rows are in the same item order): its split, the fraction of draws
    that got it right (``correct``) and, on nqswap, that gave the memory answer (``memory``)."""
    out = []
    for rows in zip(*per_draw, strict=True):
        first = rows[0]
        if any(r["item"] != first["item"] or r["split"] != first["split"] for r in rows):
            raise ValueError("the draws' rows are not in the same item order")
        row: dict[str, Any] = {"item": first["item"], "split": first["split"],
                               "correct": float(np.mean([bool(r["correct"]) for r in rows]))}
        if "memory" in first:
            row["memory"] = float(np.mean([bool(r["memory"]) for r in rows]))
        out.append(row)
    return out


def draw_records(task: str, k: int, draws: Sequence[Sequence[Head]],
                 per_draw: Sequence[Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """One record per draw and split: the draw's heads, its accuracy (and memory-answer rate on
    nqswap) over the split's n items, and each item's row (item, correct, output[, memory])."""
    recs = []
    for i, (heads, rows) in enumerate(zip(draws, per_draw, strict=True)):
        for split in SPLITS:
            items = [{k2: v for k2, v in r.items() if k2 != "split"} for r in rows if r["split"] == split]
            if not items:
                continue
            rec: dict[str, Any] = {"task": task, "k": k, "draw": i, "heads": [list(h) for h in heads],
                                   "split": split, "n": len(items),
                                   "accuracy": float(np.mean([bool(r["correct"]) for r in items]))}
            if all("memory" in r for r in items):
                rec["memory_rate"] = float(np.mean([bool(r["memory"]) for r in items]))
            recs.append({**rec, "items": items})
    return recs


def versus_random(records: Sequence[Mapping[str, Any]], decore: Mapping[tuple[str, int], float],
                  chosen: Mapping[str, int]) -> dict[str, Any]:
    """Where DeCoRe-entropy's test accuracy (``decore``: by task and k) falls among the draws'
    test accuracies (``records``: ``draw_records``) of the same task and k: its percentile and the
    empirical p that k random heads do as well (direction "higher").

    Metrics: ``<task>:decore-entropy:k<k>:vs_random_percentile`` and ``..._p`` per k; at the k
    chosen on validation (``chosen``: by task) also ``<task>:decore-entropy:vs_random_percentile``,
    ``...:vs_random_p`` and ``<task>:control-entropy:random_test_accuracies`` (the draws'
    accuracies in draw order).
    """
    by: dict[tuple[str, int], dict[int, float]] = {}
    for r in records:
        if r["split"] == "test":
            by.setdefault((str(r["task"]), int(r["k"])), {})[int(r["draw"])] = float(r["accuracy"])
    out: dict[str, Any] = {}
    for (task, k), draws in sorted(by.items()):
        value = decore.get((task, k))
        if value is None or not np.isfinite(value):
            continue
        accs = [draws[i] for i in sorted(draws)]
        control = against_random(value, accs, "higher")
        names = [f"{task}:decore-entropy:k{k}"] + ([f"{task}:decore-entropy"] if chosen.get(task) == k else [])
        for name in names:
            out[f"{name}:vs_random_percentile"] = control.percentile
            out[f"{name}:vs_random_p"] = control.p_value
        if chosen.get(task) == k:
            out[f"{task}:control-entropy:random_test_accuracies"] = accs
    return out
