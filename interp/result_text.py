"""A run's result as the CLI prints it: the head table and the edge table, each fitting a
terminal, and the line of metrics (each with its interval and n where it has one)."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from interp.console import err, out
from interp.stats.interval import Interval

TERMINAL_COLUMNS = 80


def cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _column_width(column: tuple[str, list[str]]) -> int:
    """Characters a column takes: its widest cell, plus 3 of border and padding."""
    title, cells = column
    return max(len(title), *map(len, cells)) + 3 if cells else len(title) + 3


def heads_table(title: str, heads: list[dict[str, Any]], top: int, columns: dict[str, str]) -> Table:
    """The top heads with the detector's chosen columns (``Detector.head_columns``, most
    important first), as many as fit an 80-column terminal; the rest stay in --json, the
    store and the export."""
    shown = heads[:top]
    fixed = [("rank", [str(i) for i in range(1, len(shown) + 1)]),
             ("head", [f"L{h['layer']}H{h['head']}" for h in shown]),
             ("score", [cell(h["score"]) for h in shown])]
    extra = [(label, [cell(h.get(key, "")) for h in shown]) for key, label in columns.items()
             if shown and key in shown[0]]
    width = 1 + sum(_column_width(c) for c in fixed)
    chosen = list(fixed)
    for column in extra:
        if width + _column_width(column) > TERMINAL_COLUMNS:
            break
        width += _column_width(column)
        chosen.append(column)
    table = Table(title=title)
    for name, _ in chosen:
        table.add_column(name, justify="right", no_wrap=True)
    for row in zip(*(cells for _, cells in chosen), strict=True):
        table.add_row(*row)
    return table


def _bounds(e: dict[str, Any]) -> str:
    """The score's interval as ``[lo, hi]`` (3 decimals: the column stays narrow), or ``-``."""
    lo, hi = e.get("lo"), e.get("hi")
    return "-" if lo is None or hi is None else f"[{lo:+.3f}, {hi:+.3f}]"


def _interval_caption(edges: list[dict[str, Any]]) -> str | None:
    """What the interval column is: its method(s) and n over the scored edges shown."""
    kinds = sorted({(e["method"], e["n"]) for e in edges if e.get("method") is not None}, key=str)
    if not kinds:
        return None
    return "95% CI over prompt pairs: " + "; ".join(f"{m}, n={n}" for m, n in kinds)


def edges_table(title: str, edges: list[dict[str, Any]], top: int) -> Table:
    """The ``top`` edges by |exact score| (by |attribution| where none is exact) with the score's
    95 % interval, in 80 columns (the interval's method and n in the caption)."""

    def size(e: dict[str, Any]) -> tuple[bool, float]:
        exact = e.get("score")
        return (exact is not None, abs(exact if exact is not None else e.get("attribution") or 0.0))

    shown = sorted(edges, key=size, reverse=True)[:top]
    table = Table(title=title, title_justify="left", caption=_interval_caption(shown), caption_justify="left")
    for name in ("sender", "receiver", "score", "95% CI", "attribution", "circuit"):
        table.add_column(name, justify="left" if name in ("sender", "receiver") else "right", no_wrap=True)
    for e in shown:
        score, attribution = (f"{e[k]:+.4f}" if e[k] is not None else "-" for k in ("score", "attribution"))
        table.add_row(e["sender"], e["receiver"], score, _bounds(e), attribution, "yes" if e["in_circuit"] else "")
    return table


def metric_text(name: str, value: Any, iv: Interval | None) -> str:
    """``name=value``, with the interval and n where the metric has one."""
    text = f"{name}={value:.4g}" if isinstance(value, float) else f"{name}={value}"
    if iv is not None and iv.defined:
        text += f" [{iv.lo:.3g}, {iv.hi:.3g}] n={iv.n}"
    return text


def print_summary(result: Any, top: int) -> None:
    from interp.runs.registry import all_detectors

    s = result.summary
    if s.heads:
        det = all_detectors().get(s.detector)
        columns = det.head_columns if det is not None else {}
        out.print(heads_table(f"{s.detector} ({s.variant}): top heads", s.heads, top, columns))
    if s.edges:
        out.print(edges_table(f"{s.detector} ({s.variant}): strongest edges", s.edges, top))
    if s.metrics:
        scalars = {k: v for k, v in s.metrics.items() if isinstance(v, int | float | str | bool)}
        if scalars:
            out.print("  ".join(metric_text(k, v, s.intervals.get(k)) for k, v in scalars.items()))
    for w in s.warnings:
        err.print(f"[bold yellow]WARNING[/bold yellow] {w}")
    err.print(
        f"[dim]run {result.run_id}: {result.computed_units} units computed, {result.resumed_units} resumed, "
        f"{result.seconds:.1f}s[/dim]"
    )
