"""The CLI's head tables fit an 80-column terminal, with each detector's chosen columns."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from interp.result_text import TERMINAL_COLUMNS, heads_table
from interp.runs.registry import all_detectors

DETECTORS = all_detectors()


def _render(table: object) -> list[str]:
    # A console far wider than the table: rich would squeeze an over-wide table into 80
    # columns by truncating cells ("L…"), which is what the table must never need.
    buf = io.StringIO()
    Console(file=buf, width=300, color_system=None).print(table)
    return [line.rstrip() for line in buf.getvalue().splitlines()]


def _heads(columns: dict[str, str], n: int) -> list[dict[str, object]]:
    # Wide values: a 3-digit layer and head, negative two-digit floats.
    return [{"layer": 100 + i, "head": 100 + i, "score": -10.5 - i, **dict.fromkeys(columns, -12.345)} for i in range(n)]


@pytest.mark.parametrize("name", [n for n, d in DETECTORS.items() if d.head_columns])
def test_every_head_table_fits_80_columns_and_keeps_its_first_columns(name: str) -> None:
    columns = DETECTORS[name].head_columns
    lines = _render(heads_table(f"{name} (some-variant-slug): top heads", _heads(columns, 15), 15, columns))
    widths = [len(line) for line in lines]
    assert max(widths) <= TERMINAL_COLUMNS, "\n".join(lines)
    header = next(line for line in lines if "rank" in line)
    assert "…" not in "".join(lines)
    assert next(iter(columns.values())) in header  # the most important column always fits


def test_columns_that_do_not_fit_are_dropped_from_the_end() -> None:
    columns = {f"metric_{i}": f"metric number {i}" for i in range(8)}
    lines = _render(heads_table("t", _heads(columns, 3), 3, columns))
    header = next(line for line in lines if "rank" in line)
    kept = [i for i in range(8) if f"metric number {i}" in header]
    assert kept == list(range(len(kept)))
    assert 0 < len(kept) < 8
    assert max(map(len, lines)) <= TERMINAL_COLUMNS


def test_a_metric_prints_with_its_interval_and_n() -> None:
    from interp.result_text import metric_text
    from interp.stats import Interval

    assert metric_text("acc", 0.6, Interval(0.6, 0.3866, 0.7812, 20, "wilson", 0.95)) == "acc=0.6 [0.387, 0.781] n=20"
    assert metric_text("acc", 0.6, None) == "acc=0.6"
    nan = float("nan")
    assert metric_text("mean", 2.0, Interval(2.0, nan, nan, 1, "t", 0.95)) == "mean=2"  # no interval from one value
    assert metric_text("k", 3, None) == "k=3"


def _edge(sender: str, receiver: str, score: float | None, lo: float | None, hi: float | None,
          n: int | None = 8) -> dict[str, object]:
    return {"sender": sender, "receiver": receiver, "score": score, "lo": lo, "hi": hi, "n": n,
            "method": None if n is None else "paired-t", "attribution": -12.3456, "in_circuit": True}


def test_the_edge_table_shows_each_scores_interval_in_80_columns() -> None:
    from interp.result_text import edges_table

    # Wide names and two-digit negative numbers everywhere.
    edges = [_edge("mlp:29", "kq:29.14", -10.5 - i, -99.123 + i, -10.001, n=8) for i in range(5)]
    edges += [_edge("29.14", "logits", 0.5, None, None, n=1),  # one pair: no interval
              _edge("embed", "v:28.2", None, None, None, n=None),  # not confirmed
              {k: v for k, v in _edge("0.1", "q:3.0", 0.25, 0.1, 0.4).items() if k not in ("lo", "hi", "n", "method")}]
    lines = _render(edges_table("circuit (eap-ig.steps-5.direct): strongest edges", edges, 20))
    assert max(map(len, lines)) <= TERMINAL_COLUMNS, "\n".join(lines)
    assert "…" not in "".join(lines)
    assert "95% CI" in next(line for line in lines if "sender" in line)
    row = next(line for line in lines if "-10.5000" in line)
    assert "[-99.123, -10.001]" in row
    assert "-" in next(line for line in lines if "29.14" in line and "logits" in line).split("+0.5000")[1]
    # The caption names the interval's method and each n among the edges shown.
    assert any("95% CI over prompt pairs: paired-t, n=1; paired-t, n=8" in line for line in lines), "\n".join(lines)
