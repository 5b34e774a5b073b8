"""PH3's random-head control as a distribution: many seeded draws of as many random heads as
pruned, all head sets scored as rows of shared batches, and where the pruned set falls among them.

PH3 (Jin et al. 2024) compares pruning the top-k heads with pruning k random heads. One random
draw says little; here every direction gets ``n_random`` draws (the first equals the single
draw PH3 used to make), each draw's test rates are kept, and the pruned set's target rate is
placed among the draws' rates: its percentile and the empirical p-value of Phipson & Smyth
(2010) that random pruning raises the target rate as much (``interp.stats.against_random``).

Cost: a draw adds rows, not passes of its own. All head sets (unpruned, the pruned sets, every
draw) of prompts of equal length share forward passes of ``batch_size`` rows, each set's zero
ablation restricted to its rows (``AblateHeads(batch=...)``), so the model's forward passes
are filled whatever the split's size.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
import torch

from circuits.data.conflicts import ConflictItem, check_format, rate_intervals, rate_outcomes, scored_frame
from circuits.methods.heads import Head, all_heads, random_heads
from interp.errors import UserError
from interp.model.interventions import Intervention, ablate_heads
from interp.model.loaded import LoadedModel
from interp.stats import Interval, against_random, newcombe_paired

RATES = ("memory_rate", "context_rate", "other_rate", "memory_preferred_rate", "mean_logit_diff")


def control_draws(model: LoadedModel, pruned: Sequence[Head], n_draws: int, seed: int) -> list[list[Head]]:
    """``n_draws`` random head sets, each of as many heads as ``pruned`` (all that are left on a
    model that small) drawn outside ``pruned``. The draws follow each other from one generator
    seeded with ``seed``, so draw 0 is the single control PH3 drew before there were several."""
    if n_draws < 1:
        raise UserError(f"need at least one random draw, got {n_draws}")
    n = min(len(pruned), model.info.n_total_heads - len(pruned))
    rng = random.Random(seed)
    return [random_heads(all_heads(model), pruned, n, rng) for _ in range(n_draws)]


def _chunks(model: LoadedModel, prompts: Sequence[str], n_sets: int,
            batch_size: int) -> list[tuple[list[tuple[int, int]], list[list[int]]]]:
    """Rows (head set, prompt) grouped by prompt length (no padding) and cut into chunks of at
    most ``batch_size`` rows: (the chunk's (set, prompt) pairs, their token ids)."""
    by_len: dict[int, list[tuple[int, list[int]]]] = {}
    for i, p in enumerate(prompts):
        ids = model.to_tokens(p)[0].tolist()
        by_len.setdefault(len(ids), []).append((i, ids))
    out = []
    for length in sorted(by_len):
        rows = [(s, i, ids) for s in range(n_sets) for i, ids in by_len[length]]
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            out.append(([(s, i) for s, i, _ in chunk], [ids for _, _, ids in chunk]))
    return out


def score_head_sets(
    model: LoadedModel,
    items: Sequence[ConflictItem],
    fmt: str,
    head_sets: Sequence[Sequence[Head]],
    *,
    conflict: bool = True,
    batch_size: int = 32,
) -> list[pd.DataFrame]:
    """``circuits.data.conflicts.score_items`` with each head set zero-ablated in turn (an empty
    set: the unpruned model), one frame per set, the sets run as rows of shared batches."""
    check_format(fmt)
    if not items:
        raise UserError("no conflict items to score")
    if batch_size < 1:
        raise UserError("batch_size must be >= 1")
    prompts = [i.conflict_prompt(fmt) if conflict else i.plain_prompt(fmt) for i in items]
    n = len(items)
    top1 = torch.empty(len(head_sets), n, dtype=torch.long)
    picked = torch.empty(len(head_sets), n, 2)
    for pairs, ids in _chunks(model, prompts, len(head_sets), batch_size):
        rows_of: dict[int, list[int]] = {}
        for row, (s, _) in enumerate(pairs):
            rows_of.setdefault(s, []).append(row)
        ivs: list[Intervention] = []
        for s, rows in rows_of.items():
            if head_sets[s]:
                ivs.extend(ablate_heads(list(head_sets[s]), "zero", batch=tuple(rows)))
        with torch.no_grad():
            logits = model.run(torch.tensor(ids, device=model.device), interventions=ivs).logits[:, -1].float().cpu()
        for row, (s, i) in enumerate(pairs):
            top1[s, i] = logits[row].argmax()
            picked[s, i] = logits[row, [items[i].memory_token, items[i].context_token]]
    return [scored_frame(items, fmt, top1[s], picked[s]) for s in range(len(head_sets))]


def evaluate_scored(
    model: LoadedModel,
    items: Sequence[ConflictItem],
    formats: Sequence[str],
    head_sets: Mapping[str, Sequence[Head]],
    *,
    conflict: bool = True,
    batch_size: int = 32,
) -> dict[str, dict[str, pd.DataFrame]]:
    """The scored items (``scored_frame``, in ``items``' order) per head set (by name) and
    format, every set batched."""
    names = list(head_sets)
    out: dict[str, dict[str, pd.DataFrame]] = {name: {} for name in names}
    for f in formats:
        scored = score_head_sets(model, items, f, [head_sets[n] for n in names], conflict=conflict,
                                 batch_size=batch_size)
        for name, frame in zip(names, scored, strict=True):
            out[name][f] = frame
    return out


def condition_intervals(scored: Mapping[str, Mapping[str, Mapping[str, pd.DataFrame]]], conditions: Sequence[str],
                        targets: Mapping[str, str]) -> dict[str, Interval]:
    """The intervals of the test metrics of the unpruned and pruned conditions
    (``scored[setting][condition][format]``): each rate's Wilson interval and the mean logit
    difference's t interval over the items, and each pruned direction's change of its target
    rate on the conflict prompts (``targets``: direction -> rate) as the paired difference from
    unpruned on the same items (Newcombe 1998, method 10): pruning changes answers item by item."""
    out: dict[str, Interval] = {}
    for setting, by_cond in scored.items():
        for cond in conditions:
            for f, frame in by_cond[cond].items():
                out.update({f"test.{cond}.{setting}.{f}.{name}": iv for name, iv in rate_intervals(frame).items()})
    for d, target in targets.items():
        for f, frame in scored["conflict"][d].items():
            before, after = (rate_outcomes(x)[target] for x in (scored["conflict"]["unpruned"][f], frame))
            out[f"test.{d}.{f}.{target}_change"] = newcombe_paired(after, before)
    return out


def draw_records(direction: str, draws: Sequence[Sequence[Head]],
                 res: Mapping[str, Mapping[str, Mapping[str, Mapping[str, float]]]]) -> list[dict[str, Any]]:
    """One record per draw, setting and format: the draw's heads and its test rates.
    ``res[setting][condition][format]`` are rates; draw i's condition is ``<direction>.draw<i>``."""
    recs = []
    for i, heads in enumerate(draws):
        for setting, by_cond in res.items():
            for f, r in by_cond[f"{direction}.draw{i}"].items():
                recs.append({"direction": direction, "draw": i, "heads": [list(h) for h in heads],
                             "setting": setting, "format": f, "n": int(r["n"]), **{k: float(r[k]) for k in RATES}})
    return recs


def versus_random(records: Sequence[Mapping[str, Any]], pruned: Mapping[str, float], direction: str, target: str,
                  formats: Sequence[str]) -> dict[str, Any]:
    """Where the pruned set's target rate on the conflict prompts (``pruned``: by format) falls
    among the draws' rates (``records``: ``draw_records``), averaged over formats (PH3's selection
    criterion) and per format: its percentile (ties half) and the empirical p that a random draw
    raises it as much (direction "higher").

    Metric names are plain snake_case: ``prune_memory_vs_random_percentile``,
    ``prune_memory_qa_vs_random_p``, ...; ``prune_memory_random_context_rates`` lists the draws'
    format-averaged rates in draw order.
    """
    stem = direction.replace("-", "_")
    conflict = [r for r in records if r["direction"] == direction and r["setting"] == "conflict"]
    by_draw: dict[int, dict[str, float]] = {}
    for r in conflict:
        by_draw.setdefault(int(r["draw"]), {})[str(r["format"])] = float(r[target])
    rows = [by_draw[i] for i in sorted(by_draw)]
    if not rows:
        raise UserError(f"{direction}: no random draws stored to compare with")
    scopes: dict[str, tuple[float, list[float]]] = {
        "": (sum(pruned[f] for f in formats) / len(formats), [sum(d[f] for f in formats) / len(formats) for d in rows]),
    }
    for f in formats:
        scopes[f"_{f}"] = (pruned[f], [d[f] for d in rows])
    out: dict[str, Any] = {}
    for scope, (value, draws) in scopes.items():
        control = against_random(value, draws, "higher")
        out[f"{stem}{scope}_vs_random_percentile"] = control.percentile
        out[f"{stem}{scope}_vs_random_p"] = control.p_value
    out[f"{stem}_random_{target}s"] = scopes[""][1]
    return out
