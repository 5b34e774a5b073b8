"""Curves whose points are means over items carry their interval (issue 26): attention knockout's
mean change over the facts (Student's t), a rate's Wilson interval (``tables.rate_curves``),
and the figures that draw them as error bars. Each is checked against a computation written
here: scipy's t quantile over the per-fact values the units stored, Wilson's textbook formula.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from circuits.detectors import causal_trace as ct
from circuits.detectors import knockout
from circuits.detectors.conflict_heads import rates_figure
from interp import figures
from interp.model.loaded import LoadedModel
from interp.runs import tables
from interp.stats import Interval


def _wilson(k: int, n: int) -> tuple[float, float]:
    """Wilson's (1927) score interval in its textbook form: (p + z²/2n ± z sqrt(p(1-p)/n +
    z²/4n²)) / (1 + z²/n), p = k/n, z the normal's 97.5 % quantile."""
    z, p = float(stats.norm.ppf(0.975)), k / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - half) / (1 + z * z / n)), min(1.0, (centre + half) / (1 + z * z / n))


def _top1(model: LoadedModel, prompt: str) -> str:
    with torch.no_grad():
        top = int(model.run(model.to_tokens(prompt)).logits[0, -1].argmax())
    return str(model.tokenizer.decode([top])).strip()


def test_knockout_curves_carry_the_t_interval_over_the_facts(tiny_model: LoadedModel, tmp_path: Path) -> None:
    prompts = [("w31", "w30 w31 w32 w33"), ("w41", "w40 w41 w42 w43"), ("w51", "w50 w51 w52"), ("w21", "w20 w21")]
    lines = [{"subject": s, "prompt": p, "answer": _top1(tiny_model, p)} for s, p in prompts]
    path = tmp_path / "facts.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in lines))
    summary, units = ct.run_inline(tiny_model, "attention-knockout", facts=str(path), limit=4, window=1)
    assert summary.metrics["n_facts"] == 4
    per_fact: pd.DataFrame = units["curves"]
    final = summary.tables["curves"]
    assert len(final) == 3 * tiny_model.info.n_layers
    for row in final.to_dict("records"):
        ys = per_fact.loc[(per_fact["curve"] == row["curve"]) & (per_fact["x"] == row["x"]), "y"].to_numpy(float)
        assert len(ys) == 4
        half = stats.t.ppf(0.975, 3) * ys.std(ddof=1) / math.sqrt(4)
        assert (row["n"], row["ci_method"]) == (4, "t")
        assert [row["y"], row["ci_low"], row["ci_high"]] == pytest.approx([ys.mean(), ys.mean() - half, ys.mean() + half])
    # The facts differ: the intervals have width, so a bound that ignored the spread would show.
    assert (final["ci_high"] - final["ci_low"]).min() > 0
    # Each curve's largest drop carries the interval of its point, from the facts' own values.
    for which in knockout.KNOCKOUT_SETS:
        layer = summary.metrics[f"min_layer_{which}"]
        ys = per_fact.loc[(per_fact["curve"] == which) & (per_fact["x"] == layer), "y"].to_numpy(float)
        half = stats.t.ppf(0.975, 3) * ys.std(ddof=1) / math.sqrt(4)
        iv = summary.intervals[f"min_change_{which}"]
        assert (iv.n, iv.method) == (4, "t")
        assert [iv.value, iv.lo, iv.hi] == pytest.approx([ys.mean(), ys.mean() - half, ys.mean() + half])
        assert iv.value == pytest.approx(summary.metrics[f"min_change_{which}"])
    fig = knockout.knockout_figure(final)
    first = final[final["curve"] == knockout.KNOCKOUT_SETS[0]]
    assert list(fig.data[0].error_y.array) == pytest.approx((first["ci_high"] - first["y"]).tolist())


def test_rate_curves_are_wilson_intervals() -> None:
    cells = [(0, 5), (2, 5), (5, 5), (3, 11), (1, 1)]
    frame = tables.rate_curves(("acc", None, None, float(i), k / n, n) for i, (k, n) in enumerate(cells))
    for row, (k, n) in zip(frame.to_dict("records"), cells, strict=True):
        assert (row["y"], row["n"], row["ci_method"]) == (pytest.approx(k / n), n, "wilson")
        assert [row["ci_low"], row["ci_high"]] == pytest.approx(list(_wilson(k, n)), abs=1e-12)


def _stored(frame: pd.DataFrame) -> pd.DataFrame:
    """A curves table as a finished run's final unit reads it back (with its unit column)."""
    return frame.assign(unit="final")


def test_curves_figure_draws_the_stored_bounds_as_error_bars() -> None:
    ivs = {0.0: (0.5, 0.25, 0.75, 4), 1.0: (0.2, 0.05, 0.5, 4), 2.0: (0.4, math.nan, math.nan, 1)}
    # Rows out of x order: the bars must follow their points.
    frame = _stored(tables.frame("curves", [("acc", None, None, x, *ivs[x], "t") for x in (2.0, 0.0, 1.0)]))
    fig = figures.curves_figure(frame, "acc")
    [trace] = fig.data
    assert list(trace.x) == [0.0, 1.0, 2.0]
    assert list(trace.error_y.array) == pytest.approx([0.25, 0.3, math.nan], nan_ok=True)
    assert list(trace.error_y.arrayminus) == pytest.approx([0.25, 0.15, math.nan], nan_ok=True)
    assert trace.hovertext[0] == "CI [0.25, 0.75], n=4 (t)"
    assert trace.hovertext[2] == ""
    # One line per head, each with its own bars; the head-map page's figures too.
    heads = _stored(tables.frame("curves", [("crp", la, 0, x, 0.1 * la + x, 0.1 * la + x - 0.1, 0.1 * la + x + 0.2, 3)
                                            for la in (0, 1) for x in (-1.0, 1.0)]))
    fig = figures.curves_figure(heads, "crp")
    assert [b for t in fig.data for b in t.error_y.array] == pytest.approx([0.2] * 4)
    [fig] = figures.head_curves_figures(heads, 1, 0)
    assert list(fig.data[0].error_y.arrayminus) == pytest.approx([0.1, 0.1])


def test_curves_without_bounds_or_with_repeated_points_get_no_error_bars() -> None:
    plain = _stored(tables.curves([("acc", None, None, 0.0, 0.5), ("acc", None, None, 1.0, 0.7)]))
    assert figures.curves_figure(plain, "acc").data[0].error_y.array is None
    old = plain[["unit", "curve", "layer", "head", "x", "y"]]  # a frame without the columns
    assert figures.curves_figure(pd.DataFrame(old), "acc").data[0].error_y.array is None
    # Several units' points on one x (a partial run) are averaged, and their bounds are not the mean's.
    units = tables.interval_curves(("acc", None, None, 0.0, Interval(y, y - 0.1, y + 0.1, 5, "t", 0.95))
                                   for y in (0.2, 0.4))
    [trace] = figures.curves_figure(_stored(units), "acc").data
    assert (list(trace.y), trace.error_y.array) == ([pytest.approx(0.3)], None)


def test_rates_figure_bars_are_the_wilson_intervals_of_the_items() -> None:
    table = pd.DataFrame({"label": ["qa / unmodified", "qa / modified"], "n_items": [8, 8],
                          "memory_rate": [0.75, 0.125], "context_rate": [0.25, 0.5], "other_rate": [0.0, 0.375]})
    fig = rates_figure(table)
    for trace, col in zip(fig.data, ("memory_rate", "context_rate", "other_rate"), strict=True):
        bounds = [_wilson(round(r * 8), 8) for r in table[col]]
        assert list(trace.error_y.array) == pytest.approx([hi - r for r, (_, hi) in zip(table[col], bounds, strict=True)])
        assert list(trace.error_y.arrayminus) == pytest.approx([r - lo for r, (lo, _) in zip(table[col], bounds, strict=True)])
    assert rates_figure(table.drop(columns=["n_items"])).data[0].error_y.array is None
    assert np.isfinite(list(fig.data[0].error_y.array)).all()


def test_a_row_without_an_interval_ends_at_its_value_and_a_short_row_is_refused() -> None:
    frame = tables.curves([("acc", None, None, 0.0, 0.5)])
    assert list(frame.columns) == tables.columns("curves")
    assert frame[["ci_low", "ci_high", "n", "ci_method"]].isna().to_numpy().all()
    assert tables.metric_rows([("acc", 0.5, 0.2, 0.8, 8)])["ci_method"].isna().all()
    with pytest.raises(ValueError, match="a row of 4 values, expected 5 to 9"):
        tables.frame("curves", [("acc", None, None, 0.0)])
