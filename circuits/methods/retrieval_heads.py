"""The retrieval detector's per-head summary (Wu et al. 2024): each head's mean retrieval score
and null over the samples that count, whether it is above its null, and the share of heads above
the fixed threshold with its bootstrap interval over those samples.

The share is a statistic of the whole head table, so its interval resamples whole samples (each
sample's scores of every head together) and recomputes the heads' means and the share; how much
the share moves with the haystacks is what "retrieval heads are sparse" needs to know.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from circuits.methods.nulls import NullTest, above_null
from interp.runs import tables
from interp.stats import Interval, bootstrap_interval

SCORE, NULL = "retrieval_sample", "retrieval_null_sample"
# Each resample recomputes every head's mean over the resampled samples; 1,999 keep that fast for
# hundreds of heads and tens of samples, with a Monte Carlo error well below the spread.
SHARE_RESAMPLES = 1_999


@dataclass
class ScoredHeads:
    """The heads best first (score, null, above_null), the run's metrics on them, the summary's
    ``head_scores`` table, the intervals and the warnings."""

    heads: list[dict[str, Any]]
    metrics: dict[str, Any]
    table: pd.DataFrame
    intervals: dict[str, Interval] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def sample_grids(results: Mapping[str, pd.DataFrame], units: Sequence[Any], metric: str,
                 n_heads: int) -> dict[str, np.ndarray]:
    """Each unit's [layer, head] grid of ``metric``, for the units that stored it."""
    hs = results["head_scores"]
    hs = pd.DataFrame(hs[hs["metric"] == metric])
    out: dict[str, np.ndarray] = {}
    for unit in units:
        rows = pd.DataFrame(hs[hs["unit"].astype(str) == str(unit)])
        if not len(rows):
            continue
        grid = np.zeros((int(rows["layer"].to_numpy(int).max()) + 1, n_heads))
        grid[rows["layer"].to_numpy(int), rows["head"].to_numpy(int)] = rows["value"].to_numpy(float)
        out[str(unit)] = grid
    return out


def share_above_interval(grids: np.ndarray, threshold: float) -> Interval:
    """The share of heads whose mean over the samples (``grids``: [samples, layers, heads]) is
    above ``threshold``, with its bootstrap interval over the samples."""
    flat = grids.reshape(len(grids), -1)

    def share(index: np.ndarray) -> float:
        return float((flat[index.astype(int)].mean(axis=0) > threshold).mean())

    return bootstrap_interval(np.arange(len(flat)), share, n_resamples=SHARE_RESAMPLES)


def scored_heads(results: Mapping[str, pd.DataFrame], units: Sequence[Any], counted: set[Any], n_heads: int,
                 level: float, threshold: float) -> ScoredHeads:
    """Each head's mean score and null over the ``counted`` units (each counted sample weighs 1),
    whether it is above its null, best first. Units stored before the null have no null rows: the
    null and its test then rest on the counted units that have them (none: no null fields)."""
    keys = sorted(str(u) for u in units if u in counted)
    scores = sample_grids(results, keys, SCORE, n_heads)
    nulls = sample_grids(results, keys, NULL, n_heads)
    grid = np.stack([scores[k] for k in keys])
    mean = grid.mean(axis=0)
    n_layers = mean.shape[0]
    order = sorted(((la, h) for la in range(n_layers) for h in range(n_heads)), key=lambda k: (-mean[k], k))
    heads = [{"layer": la, "head": h, "score": float(mean[la, h])} for la, h in order]
    above = int((mean > threshold).sum())
    metrics: dict[str, Any] = {"n_heads_above_threshold": above, "share_heads_above_threshold": above / mean.size,
                               "max_score": float(mean.max()), "level": level}
    rows = [("retrieval", h["layer"], h["head"], h["score"]) for h in heads]
    out = ScoredHeads(heads, metrics, pd.DataFrame(),
                      intervals={"share_heads_above_threshold": share_above_interval(grid, threshold)})
    with_null = [k for k in keys if k in nulls]
    if with_null:
        test: NullTest = above_null(np.stack([scores[k] for k in with_null]), np.stack([nulls[k] for k in with_null]),
                                    level)
        null_mean = np.stack([nulls[k] for k in with_null]).mean(axis=0)
        for h in heads:
            h["retrieval_null"] = float(null_mean[h["layer"], h["head"]])
            h["above_null"] = bool(test.above[h["layer"] * n_heads + h["head"]])
        rows += [(m, h["layer"], h["head"], float(h[k])) for h in heads
                 for m, k in (("retrieval_null", "retrieval_null"), ("retrieval_above_null", "above_null"))]
        metrics.update({"level_per_head": test.level, "n_heads_above_null": test.n_above,
                        "share_heads_above_null": test.share_above})
    if len(with_null) < len(keys):
        out.warnings.append(f"null from {len(with_null)} of {len(keys)} counted samples: the others were stored "
                            "before the null" if with_null else "no null: every sample was stored before the null")
    out.table = tables.head_scores(rows)
    return out
