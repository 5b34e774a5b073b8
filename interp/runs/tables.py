"""Constructors of the result tables a detector returns, columns taken from the store's schema.

A unit or a summary returns long tables (``UnitResult.tables``, ``Summary.tables``); building
them here keeps every detector on the same columns and the same rules (which values count as
metrics, how an artifact is serialised) instead of one inline column list per call site.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd

from interp.runs.schema import REQUIRED_COLUMNS, TABLES
from interp.stats.binary import wilson_counts
from interp.stats.interval import Interval


def columns(table: str) -> list[str]:
    """The columns of a store table (beyond run_id and unit, which the store adds)."""
    return [name for name, _ in TABLES[table]]


def frame(table: str, rows: Iterable[tuple[Any, ...]]) -> pd.DataFrame:
    """A table from rows in the schema's column order; the columns after a row's last value are
    empty (None) in that row, so a row without an interval ends at its value. A row must reach
    the table's last required column (a ValueError otherwise)."""
    names = columns(table)
    least = 1 + max(names.index(c) for c in REQUIRED_COLUMNS[table])
    padded = []
    for row in rows:
        if not least <= len(row) <= len(names):
            raise ValueError(f"table {table!r}: a row of {len(row)} values, expected {least} to {len(names)}: {row!r}")
        padded.append((*row, *(None,) * (len(names) - len(row))))
    return pd.DataFrame(padded, columns=names)


def _bound(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def interval_cells(iv: Interval) -> tuple[float, float | None, float | None, int, str]:
    """(value, ci_low, ci_high, n, ci_method) of an interval, a bound the method has none for as
    None: the cells of a ``metrics`` or ``curves`` row from its value on."""
    return iv.value, _bound(iv.lo), _bound(iv.hi), int(iv.n), iv.method


def metric_value(value: Any) -> float | None:
    """A value as a stored metric: numbers and booleans (as 0/1) count; NaN is kept (a
    measured 'undefined'); strings, lists and None are not metrics (None is returned)."""
    if isinstance(value, bool | np.bool_):
        return float(value)
    if isinstance(value, int | float | np.integer | np.floating):
        return float(value)
    return None


def metrics(
    values: Mapping[str, Any],
    n: int | None = None,
    ci: Mapping[str, tuple[float, float]] | None = None,
) -> pd.DataFrame:
    """The ``metrics`` table of named values (see :func:`metric_value` for what counts), each
    with the sample size ``n`` and, where ``ci`` has it, its confidence interval."""
    ci = ci or {}
    rows = []
    for name, raw in values.items():
        value = metric_value(raw)
        if value is None:
            continue
        low, high = ci.get(name, (None, None))
        rows.append((name, value, low, high, n))
    return frame("metrics", rows)


# (name, value, ci_low, ci_high, n), and where the row has an interval, the interval's method.
MetricRow = (tuple[str, float, float | None, float | None, int | None]
             | tuple[str, float, float | None, float | None, int | None, str | None])


def metric_rows(rows: Iterable[MetricRow]) -> pd.DataFrame:
    """The ``metrics`` table from (name, value, ci_low, ci_high, n[, ci_method]) rows."""
    return frame("metrics", rows)


def with_intervals(result: Mapping[str, pd.DataFrame], intervals: Mapping[str, Interval]) -> dict[str, pd.DataFrame]:
    """A summary's tables with each interval in the ``metrics`` table: the metric's row (value,
    bounds, None where the method has none, and n) in place of a row of that name, appended
    where there is none."""
    out = dict(result)
    if not intervals:
        return out
    rows = frame("metrics", ((name, *interval_cells(iv)) for name, iv in intervals.items()))
    kept = out.get("metrics")
    if kept is not None and len(kept):
        kept = pd.DataFrame(kept[~kept["name"].isin(list(intervals))])
        rows = pd.concat([kept, rows], ignore_index=True)
    out["metrics"] = rows
    return out


def head_scores(rows: Iterable[tuple[str, int, int, float]]) -> pd.DataFrame:
    """The ``head_scores`` table from (metric, layer, head, value) rows."""
    return frame("head_scores", rows)


def head_grid(metric: str, scores: Any) -> pd.DataFrame:
    """The ``head_scores`` rows of one metric from a [layer, head] array or tensor."""
    # .double(): numpy has no bfloat16, and float64 scores (counts over a span) keep every digit.
    grid = np.asarray(scores.detach().double().cpu() if hasattr(scores, "detach") else scores, dtype=float)
    return head_scores(
        (metric, layer, head, float(grid[layer, head]))
        for layer in range(grid.shape[0])
        for head in range(grid.shape[1])
    )


def curves(rows: Iterable[tuple[str, int | None, int | None, float, float]]) -> pd.DataFrame:
    """The ``curves`` table from (curve, layer, head, x, y) rows; layer/head None for a curve
    that belongs to no head. The points have no interval: see :func:`interval_curves`."""
    return frame("curves", rows)


def interval_curves(rows: Iterable[tuple[str, int | None, int | None, float, Interval]]) -> pd.DataFrame:
    """The ``curves`` table from (curve, layer, head, x, interval) rows: each point a mean over
    items, y its value with its bounds, n and method (:func:`interval_cells`)."""
    return frame("curves", ((curve, layer, head, x, *interval_cells(iv)) for curve, layer, head, x, iv in rows))


def rate_curves(rows: Iterable[tuple[str, int | None, int | None, float, float, int]]) -> pd.DataFrame:
    """The ``curves`` table from (curve, layer, head, x, rate, n) rows, each rate the share of n
    items with some 0/1 outcome (an accuracy, a memory rate), with its Wilson interval."""
    return interval_curves((c, la, h, x, wilson_counts(round(rate * n), int(n))) for c, la, h, x, rate, n in rows)


def token_layer(rows: Iterable[tuple[str, Any, int, str, int, float]]) -> pd.DataFrame:
    """The ``token_layer`` table from (kind, item, token_index, token, layer, value) rows."""
    return frame("token_layer", rows)


def artifact(name: str, document: Any) -> pd.DataFrame:
    """The ``artifacts`` table with one JSON document (numpy scalars and arrays as numbers and
    lists; anything else not JSON-serialisable as its string)."""
    return frame("artifacts", [(name, json.dumps(document, default=_json_default))])


def read_artifacts(table: pd.DataFrame | None, name: str) -> list[Any]:
    """The documents of every artifact called ``name`` in an ``artifacts`` table (one per unit
    that wrote one), in row order; none for a missing or empty table."""
    if table is None or not len(table):
        return []
    return [json.loads(doc) for n, doc in zip(table["name"], table["json"], strict=True) if n == name]


def read_artifact(table: pd.DataFrame, name: str) -> Any:
    """The document of the last artifact called ``name`` in an ``artifacts`` table, or None."""
    docs = read_artifacts(table, name)
    return docs[-1] if docs else None


def _json_default(value: Any) -> Any:
    # numpy scalars and arrays, torch tensors: tolist() gives plain numbers and lists.
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
