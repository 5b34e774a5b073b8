"""The base of detectors whose result is one score per head (and per metric).

A subclass declares how one unit scores every head (:meth:`HeadScoreDetector.score_unit`: a
[layers, heads] grid per metric, and how many samples the unit's values average) and the metric
that ranks heads (``score``). It inherits the unit's tables, the weighted mean over units, the
head table and the summary; hooks add per-head fields (:meth:`head_fields`) and run-level
metrics (:meth:`summary_metrics`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import pandas as pd

from interp.runs import tables
from interp.runs.config import DetectorConfig
from interp.runs.registry import Detector, OutputKind, Summary, UnitResult
from interp.runs.units import Unit
from interp.stats import Interval, mean_interval

if TYPE_CHECKING:
    from interp.model.loaded import LoadedModel

C = TypeVar("C", bound=DetectorConfig)
HeadKey = tuple[str, int, int]  # (metric, layer, head)
# The metrics row that stores a unit's weight when it has no other metric (whose ``n`` says it).
SAMPLES = "samples"


@dataclass
class UnitScores:
    """What one unit of a head-score detector measured.

    Attributes:
        grids: per metric, a [layers, heads] array or tensor of the unit's scores.
        n: how many samples the unit's values average: its weight in the mean over units (0: the
            unit does not count, e.g. a needle the model answered wrongly).
        metrics: unit-level values that are means over the same samples (losses), stored with ``n``.
        artifacts: JSON documents by name (per-sample values a summary tests), stored as the
            unit's ``artifacts`` rows.
    """

    grids: Mapping[str, Any]
    n: int = 1
    metrics: Mapping[str, float] = field(default_factory=dict)
    artifacts: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class HeadMeans:
    """The weighted means over units: per (metric, layer, head), per unit metric, and the total
    weight."""

    scores: dict[HeadKey, float]
    metrics: dict[str, float]
    n: float


def unit_weights(metrics: pd.DataFrame) -> dict[str, float]:
    """Each unit's weight: the ``n`` its metric rows carry (the same on every row of a unit)."""
    if not len(metrics) or "n" not in metrics.columns:
        return {}
    return {str(u): float(n) for u, n in zip(metrics["unit"], metrics["n"], strict=True) if n is not None}


def weighted_means(results: Mapping[str, pd.DataFrame], weights: Mapping[str, float]) -> HeadMeans:
    """Per (metric, layer, head), the mean of the units' values weighted by ``weights`` (a unit
    missing there weighs 1), each metric over the units that scored it; the same for the units'
    metrics (the ``samples`` bookkeeping row left out)."""
    sums: dict[HeadKey, float] = {}
    totals: dict[str, float] = {}
    hs = results["head_scores"]
    for unit, metric, layer, head, value in zip(hs["unit"], hs["metric"], hs["layer"], hs["head"], hs["value"],
                                                strict=True):
        w = weights.get(str(unit), 1.0)
        key = (str(metric), int(layer), int(head))
        sums[key] = sums.get(key, 0.0) + float(value) * w
    for unit, metric in {(str(u), str(m)) for u, m in zip(hs["unit"], hs["metric"], strict=True)}:
        totals[metric] = totals.get(metric, 0.0) + weights.get(unit, 1.0)
    scores = {key: total / totals[key[0]] for key, total in sums.items() if totals[key[0]] > 0}
    metric_sums: dict[str, float] = {}
    ms = results.get("metrics")
    if ms is None or not len(ms):
        ms = pd.DataFrame(columns=["unit", "name", "value", "n"])
    for unit, name, value in zip(ms["unit"], ms["name"], ms["value"], strict=True):
        if str(name) != SAMPLES:
            metric_sums[str(name)] = metric_sums.get(str(name), 0.0) + float(value) * weights.get(str(unit), 1.0)
    n_total = sum(weights.get(u, 1.0) for u in {str(u) for u in hs["unit"]})
    metrics = {name: total / n_total for name, total in metric_sums.items()} if n_total else {}
    return HeadMeans(scores, metrics, n_total)


def unit_score_interval(results: Mapping[str, pd.DataFrame], weights: Mapping[str, float], metric: str,
                        layer: int, head: int) -> Interval | None:
    """The t interval of one head's ``metric`` over the units that count (weight > 0), each unit's
    value one sample (units are equal batches, or single samples that count or not); None with
    fewer than two such units."""
    hs = results["head_scores"]
    rows = hs[(hs["metric"] == metric) & (hs["layer"] == layer) & (hs["head"] == head)]
    values = [float(v) for u, v in zip(rows["unit"], rows["value"], strict=True) if weights.get(str(u), 1.0) > 0]
    return mean_interval(values) if len(values) >= 2 else None


class HeadScoreDetector(Detector[C]):
    """A detector that scores every head in each unit; see the module docstring."""

    output: ClassVar[OutputKind] = "head_scores"
    # The metric whose mean ranks the heads: each head's ``score`` in the summary.
    score: ClassVar[str]
    # Metrics shown under their own names in each head's dict (besides the score).
    fields: ClassVar[tuple[str, ...]] = ()

    def score_unit(self, model: LoadedModel, cfg: C, unit: Unit) -> UnitScores:
        """Every head's scores on one unit."""
        raise NotImplementedError

    def run_unit(self, model: LoadedModel, cfg: C, unit: Unit) -> UnitResult:
        s = self.score_unit(model, cfg, unit)
        out = {"head_scores": pd.concat([tables.head_grid(m, g) for m, g in s.grids.items()], ignore_index=True)}
        if s.metrics or s.n != 1:
            out["metrics"] = tables.metrics(dict(s.metrics) or {SAMPLES: s.n}, n=s.n)
        if s.artifacts:
            out["artifacts"] = pd.concat([tables.artifact(k, doc) for k, doc in s.artifacts.items()], ignore_index=True)
        return UnitResult(tables=out)

    def weights(self, results: Mapping[str, pd.DataFrame]) -> dict[str, float]:
        """Each unit's weight in the mean over units (default: the ``n`` it stored, else 1)."""
        return unit_weights(results.get("metrics", pd.DataFrame()))

    def head_fields(self, values: Mapping[str, float]) -> dict[str, Any]:
        """Extra fields of one head's dict from its metrics' means (default: none)."""
        return {}

    def summary_metrics(self, model: LoadedModel, cfg: C, heads: list[dict[str, Any]], means: HeadMeans) -> dict[str, Any]:
        """The run's metrics from the ranked heads and the means (default: the unit metrics'
        means, the number of samples and of heads)."""
        return {**means.metrics, "n_samples": means.n, "n_heads": len(heads)}

    def ranked_heads(self, means: HeadMeans) -> list[dict[str, Any]]:
        """One dict per head (layer, head, score, the declared fields the units stored,
        :meth:`head_fields`), best first; ties in (layer, head) order."""
        per_head: dict[tuple[int, int], dict[str, float]] = {}
        for (metric, layer, head), value in sorted(means.scores.items(), key=lambda kv: (kv[0][1], kv[0][2])):
            per_head.setdefault((layer, head), {})[metric] = value
        heads = [
            {"layer": layer, "head": head, "score": v[self.score], **{f: v[f] for f in self.fields if f in v},
             **self.head_fields(v)}
            for (layer, head), v in per_head.items()
            if self.score in v
        ]
        heads.sort(key=lambda h: -h["score"])
        return heads

    def finalize(self, model: LoadedModel, cfg: C, results: Mapping[str, pd.DataFrame]) -> Summary:
        weights = self.weights(results)
        means = weighted_means(results, weights)
        heads = self.ranked_heads(means)
        metrics = self.summary_metrics(model, cfg, heads, means)
        agg = tables.head_scores((m, la, h, v) for (m, la, h), v in sorted(means.scores.items()))
        # The top head's score with its interval over the units (the atlas reads "some head
        # exceeds the threshold" from it).
        top = unit_score_interval(results, weights, self.score, heads[0]["layer"], heads[0]["head"]) if heads else None
        return Summary(heads=heads, metrics=metrics, intervals={"top_score": top} if top is not None else {},
                       tables={"head_scores": agg, "metrics": tables.metrics(metrics, n=int(means.n))})
