"""Plotly figure builders over the store's long tables, shared by the dashboard and notebooks.

Every builder takes a frame as :meth:`interp.runs.store.Run.results` returns it (extra columns such
as ``unit`` are ignored) and returns a ``plotly.graph_objects.Figure``; none of them computes
anything beyond reshaping, so a stored run plots without touching a model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase
from typing import Any, cast

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from interp.errors import UserError

HEAT_SCALE = "Viridis"
DIVERGING_SCALE = "RdBu_r"
# Axis titles of a curve whose detector declares none (a plugin, or a curve it does not list).
UNDECLARED_AXES = ("x (axis not declared by the detector)", "y (axis not declared by the detector)")


def _df(value: Any) -> pd.DataFrame:
    """pandas' stubs widen many DataFrame operations to DataFrame | Series; these are frames."""
    return cast(pd.DataFrame, value)


def _long(mat: pd.DataFrame) -> pd.DataFrame:
    """A layer x head matrix back to a long (layer, head, value) table, NaN cells dropped."""
    layers, heads = np.meshgrid(mat.index.to_numpy(), mat.columns.to_numpy(), indexing="ij")
    out = pd.DataFrame(
        {"layer": layers.ravel().astype(int), "head": heads.ravel().astype(int), "value": mat.to_numpy(float).ravel()}
    )
    return _df(out[out["value"].notna()]).reset_index(drop=True)


def _require(frame: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise UserError(f"{what}: the table has no column {missing[0]!r}")


def _single(frame: pd.DataFrame, column: str) -> str | None:
    """The one value of ``column`` in the frame (a metric, kind or curve name), else None."""
    if column not in frame.columns:
        return None
    values = frame[column].dropna().unique().tolist()
    return str(values[0]) if len(values) == 1 else None


def curve_axes(axes: Mapping[str, tuple[str, str]] | None, curve: str | None) -> tuple[str, str]:
    """(x, y) axis titles of one curve from a detector's ``curve_axes``: its exact name first,
    then the first matching fnmatch pattern; :data:`UNDECLARED_AXES` when none matches."""
    if axes and curve is not None:
        if curve in axes:
            return axes[curve]
        for pattern, titles in axes.items():
            if fnmatchcase(curve, pattern):
                return titles
    return UNDECLARED_AXES


def _joined(titles: Sequence[str]) -> str:
    return " / ".join(dict.fromkeys(titles))


def _one(frame: pd.DataFrame, column: str, value: str | None, what: str) -> pd.DataFrame:
    """Rows of one metric/kind/curve; with ``value`` None the table must hold a single one."""
    if column not in frame.columns:
        return frame
    values = list(frame[column].dropna().unique().tolist())
    if value is None:
        if len(values) > 1:
            raise UserError(f"{what}: choose one {column} of {sorted(map(str, values))}")
        return frame
    if value not in values:
        raise UserError(f"{what}: no {column} {value!r} (available: {', '.join(sorted(map(str, values)))})")
    return _df(frame[frame[column] == value])


def head_matrix(frame: pd.DataFrame, metric: str | None = None) -> pd.DataFrame:
    """A head_scores table as a layer x head matrix (mean over duplicate rows, e.g. units)."""
    _require(frame, ("layer", "head", "value"), "head scores")
    rows = _one(frame, "metric", metric, "head scores")
    if rows.empty:
        raise UserError("head scores: the table is empty")
    return rows.pivot_table(index="layer", columns="head", values="value", aggfunc="mean").sort_index()


def top_heads(frame: pd.DataFrame, metric: str | None = None, n: int | None = None) -> pd.DataFrame:
    """(layer, head, value) of a head_scores table, highest value first."""
    out = _long(head_matrix(frame, metric)).sort_values("value", ascending=False, kind="stable")
    return _df(out.head(n) if n is not None else out).reset_index(drop=True)


def head_heatmap(
    frame: pd.DataFrame,
    metric: str | None = None,
    *,
    threshold: float | None = None,
    title: str | None = None,
    zmid: float | None = None,
    colorbar_title: str | None = None,
) -> go.Figure:
    """Layer x head heatmap of one metric; heads at or above ``threshold`` are outlined. The
    colour bar is titled ``colorbar_title``, else the metric (given, or the frame's only one)."""
    mat = head_matrix(frame, metric)
    label = colorbar_title or metric or _single(frame, "metric") or title or "head score"
    z = mat.to_numpy(dtype=float)
    layers = [int(v) for v in mat.index]
    heads = [int(v) for v in mat.columns]
    diverging = zmid is not None
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=heads,
            y=layers,
            colorscale=DIVERGING_SCALE if diverging else HEAT_SCALE,
            zmid=zmid,
            colorbar={"title": label},
            hovertemplate="layer %{y}, head %{x}<br>" + label + " = %{z:.4f}<extra></extra>",
        )
    )
    if threshold is not None:
        ys, xs = np.nonzero(np.nan_to_num(z, nan=-np.inf) >= threshold)
        if len(ys):
            fig.add_trace(
                go.Scatter(
                    x=[heads[i] for i in xs],
                    y=[layers[i] for i in ys],
                    mode="markers",
                    marker={"symbol": "square-open", "size": 14, "color": "red", "line": {"width": 2}},
                    name=f">= {threshold:g}",
                    hovertemplate="layer %{y}, head %{x}: above threshold<extra></extra>",
                )
            )
    fig.update_layout(
        title=title or (f"{label}" + (f" (threshold {threshold:g})" if threshold is not None else "")),
        xaxis={"title": "head", "dtick": 1},
        yaxis={"title": "layer", "autorange": "reversed", "dtick": max(1, len(layers) // 15)},
        height=max(320, 18 * len(layers) + 140),
        margin={"l": 50, "r": 20, "t": 50, "b": 40},
        legend={"orientation": "h", "y": -0.12},
    )
    return fig


def token_layer_heatmap(
    frame: pd.DataFrame,
    kind: str | None = None,
    item: object | None = None,
    *,
    marked_tokens: Sequence[int] = (),
    title: str | None = None,
    value_title: str | None = None,
) -> go.Figure:
    """Token x layer heatmap of one kind (and one item; all items are averaged when None).

    ``marked_tokens`` (token indices, e.g. the subject) get a '*' on the axis. The colour bar
    is titled ``value_title`` (what the values are, with units), else the kind.
    """
    _require(frame, ("layer", "value"), "token x layer table")
    rows = _one(frame, "kind", kind, "token x layer table")
    if item is not None and "item" in rows.columns:
        rows = _df(rows[rows["item"].astype(str) == str(item)])
    if rows.empty:
        raise UserError("token x layer table: no rows for this selection")
    index = "token_index" if "token_index" in rows.columns else "token"
    mat = rows.pivot_table(index=index, columns="layer", values="value", aggfunc="mean").sort_index()
    label = value_title or kind or _single(rows, "kind") or title or "token x layer value"
    labels: list[str] = []
    if "token" in rows.columns and index == "token_index":
        names = {int(i): str(t) for i, t in zip(rows["token_index"], rows["token"], strict=True)}
        for t in mat.index:
            name = names.get(int(t), str(t))
            labels.append(f"{'*' if int(t) in set(marked_tokens) else ''}{name} [{int(t)}]")
    else:
        labels = [str(t) for t in mat.index]
    fig = go.Figure(
        go.Heatmap(
            z=mat.to_numpy(dtype=float),
            x=[int(v) for v in mat.columns],
            y=labels,
            colorscale=HEAT_SCALE,
            colorbar={"title": label},
            hovertemplate="token %{y}<br>layer %{x}<br>" + label + " = %{z:.4f}<extra></extra>",
        )
    )
    fig.update_layout(
        title=title or (kind or "token x layer"),
        xaxis={"title": "layer"},
        yaxis={"title": "token [position]", "autorange": "reversed", "type": "category"},
        height=max(300, 22 * len(labels) + 140),
        margin={"l": 120, "r": 20, "t": 50, "b": 40},
    )
    return fig


def error_bars(frame: pd.DataFrame, value: str = "y") -> dict[str, Any] | None:
    """Plotly's ``error_y`` of points that carry a stored interval (``ci_low``, ``ci_high``
    around ``value``): the distances up and down to the bounds, none (NaN) at a point without
    one; None where no point has one."""
    if not {"ci_low", "ci_high"} <= set(frame.columns):
        return None
    # astype: a column of a run stored without bounds holds None, which becomes NaN.
    lo, hi = (np.asarray(frame[c].astype(float), dtype=float) for c in ("ci_low", "ci_high"))
    if np.isnan(lo).all() and np.isnan(hi).all():
        return None
    y = frame[value].to_numpy(float)
    return {"type": "data", "symmetric": False, "array": hi - y, "arrayminus": y - lo}


def _interval_text(frame: pd.DataFrame) -> list[str] | None:
    """Each point's interval, n and method for its hover label; None where no point has one."""
    if error_bars(frame) is None:
        return None
    missing = pd.Series([None] * len(frame), index=frame.index)
    n = frame["n"] if "n" in frame.columns else missing
    method = frame["ci_method"] if "ci_method" in frame.columns else missing
    return [
        "" if pd.isna(lo) or pd.isna(hi) else f"CI [{lo:.4g}, {hi:.4g}], n={'?' if pd.isna(k) else int(k)} ({m})"
        for lo, hi, k, m in zip(frame["ci_low"], frame["ci_high"], n, method, strict=True)
    ]


def _line(rows: pd.DataFrame, name: str) -> go.Scatter:
    """One line through a curve's points, with error bars where they carry a stored interval.
    Several rows on one x (the units of a partial run) are averaged and drawn without bars: their
    mean has no interval stored."""
    if rows["x"].is_unique:
        g = _df(rows.sort_values("x"))
        return go.Scatter(x=g["x"], y=g["y"], mode="lines+markers", name=name, error_y=error_bars(g),
                          hovertext=_interval_text(g))
    g = _df(rows.groupby("x", as_index=False)["y"].mean())
    return go.Scatter(x=g["x"], y=g["y"], mode="lines+markers", name=name)


def head_curves_figures(
    frame: pd.DataFrame,
    layer: int,
    head: int,
    *,
    title: str | None = None,
    axes: Mapping[str, tuple[str, str]] | None = None,
) -> list[go.Figure]:
    """Every curve stored for one head, one line each; curves on the same x values share a
    figure (a head's lag-CRP next to its CMR fit; its serial-position curve apart). ``axes``
    is the detector's ``curve_axes`` (see :func:`curve_axes`)."""
    _require(frame, ("curve", "layer", "head", "x", "y"), "curves")
    rows = _df(frame[(frame["layer"] == layer) & (frame["head"] == head)])
    if rows.empty:
        raise UserError(f"curves: nothing stored for L{layer}H{head}")
    groups: dict[tuple[float, ...], list[str]] = {}
    for name in sorted(str(c) for c in rows["curve"].dropna().unique()):
        xs = tuple(sorted({float(x) for x in rows.loc[rows["curve"] == name, "x"]}))
        groups.setdefault(xs, []).append(name)
    figs = []
    for names in groups.values():
        fig = go.Figure()
        for name in names:
            fig.add_trace(_line(_df(rows[rows["curve"] == name]), name))
        titles = [curve_axes(axes, name) for name in names]
        fig.update_layout(
            title=f"{title or f'L{layer}H{head}'}: {', '.join(names)}",
            xaxis={"title": _joined([t[0] for t in titles])},
            yaxis={"title": _joined([t[1] for t in titles])},
            height=320,
        )
        figs.append(fig)
    return figs


def curves_figure(
    frame: pd.DataFrame,
    curve: str | None = None,
    *,
    heads: Sequence[tuple[int, int]] | None = None,
    title: str | None = None,
    axes: Mapping[str, tuple[str, str]] | None = None,
    x_title: str | None = None,
    y_title: str | None = None,
) -> go.Figure:
    """Line plot of one curve: one line per (layer, head) present, or one line overall; a point
    that is a mean over items with its stored interval gets an error bar (``ci_low``..``ci_high``).

    The axis titles come from ``axes``, the ``curve_axes`` of the detector that wrote the curve
    (see :func:`curve_axes`); ``x_title``/``y_title`` override them.
    """
    _require(frame, ("x", "y"), "curves")
    rows = _one(frame, "curve", curve, "curves")
    if rows.empty:
        raise UserError("curves: no rows for this selection")
    declared = curve_axes(axes, curve or _single(rows, "curve"))
    fig = go.Figure()
    # Curves of no single head (layer/head -1 or missing, e.g. accuracy vs depth, or a knockout
    # curve whose layer is its x) are one line, not one line per row.
    has_heads = (
        {"layer", "head"} <= set(rows.columns)
        and bool(rows[["layer", "head"]].notna().to_numpy().all())
        and bool((rows["head"].to_numpy(dtype=float) >= 0).all())
    )
    if has_heads:
        pairs = sorted({(int(a), int(b)) for a, b in zip(rows["layer"], rows["head"], strict=True)})
        for layer, head in pairs:
            if heads is not None and (layer, head) not in set(heads):
                continue
            g = _df(rows[(rows["layer"] == layer) & (rows["head"] == head)])
            fig.add_trace(_line(g, f"L{layer}H{head}"))
    else:
        fig.add_trace(_line(rows, curve or _single(rows, "curve") or "curve"))
    fig.update_layout(
        title=title or (curve or "curve"),
        xaxis={"title": x_title or declared[0]},
        yaxis={"title": y_title or declared[1]},
        height=380,
        margin={"l": 50, "r": 20, "t": 50, "b": 40},
    )
    return fig


def attention_pattern_figure(
    pattern: np.ndarray, tokens: Sequence[str], *, title: str | None = None
) -> go.Figure:
    """One head's attention pattern [query, key] with the tokens on both axes."""
    pattern = np.asarray(pattern, dtype=float)
    if pattern.ndim != 2 or pattern.shape[0] != pattern.shape[1] or pattern.shape[0] != len(tokens):
        raise UserError(f"attention pattern of shape {pattern.shape} does not match {len(tokens)} tokens")
    labels = [f"{t} [{i}]" for i, t in enumerate(tokens)]
    fig = go.Figure(
        go.Heatmap(
            z=pattern,
            x=labels,
            y=labels,
            colorscale=HEAT_SCALE,
            zmin=0.0,
            zmax=1.0,
            colorbar={"title": "attention weight"},
            hovertemplate="query %{y}<br>key %{x}<br>attention = %{z:.3f}<extra></extra>",
        )
    )
    fig.update_layout(
        title=title or "attention pattern",
        xaxis={"title": "key token [position]", "type": "category", "tickangle": -60},
        yaxis={"title": "query token [position]", "type": "category", "autorange": "reversed"},
        height=max(420, 14 * len(labels) + 200),
        margin={"l": 120, "r": 20, "t": 50, "b": 120},
    )
    return fig


def depth_normalised(frame: pd.DataFrame, n_layers: int, metric: str | None = None) -> pd.DataFrame:
    """Head scores with ``depth`` = layer / (n_layers - 1), so models of different depth line up."""
    mat = head_matrix(frame, metric)
    long = _long(mat)
    long["depth"] = long["layer"] / max(1, n_layers - 1)
    return _df(long[["layer", "head", "depth", "value"]])


def compare_depth_figure(
    a: pd.DataFrame,
    b: pd.DataFrame,
    *,
    labels: tuple[str, str] = ("A", "B"),
    title: str | None = None,
    value_title: str = "head score",
) -> go.Figure:
    """Two :func:`depth_normalised` frames: every head as a point, and each model's max per depth.
    ``value_title`` names the score (the metric compared)."""
    fig = go.Figure()
    for frame, label, color in ((a, labels[0], "#1f77b4"), (b, labels[1], "#d62728")):
        fig.add_trace(
            go.Scatter(
                x=frame["depth"],
                y=frame["value"],
                mode="markers",
                name=f"{label}: heads",
                marker={"color": color, "opacity": 0.45, "size": 7},
                customdata=frame[["layer", "head"]].to_numpy(),
                hovertemplate="L%{customdata[0]}H%{customdata[1]}<br>depth %{x:.2f}<br>%{y:.4f}<extra>"
                + label
                + "</extra>",
            )
        )
        top = _df(frame.groupby("depth", as_index=False)["value"].max())
        fig.add_trace(go.Scatter(x=top["depth"], y=top["value"], mode="lines", name=f"{label}: max per layer",
                                 line={"color": color}))
    fig.update_layout(
        title=title or "heads by normalised depth",
        xaxis={"title": "relative depth: layer / (n_layers - 1)", "range": [-0.02, 1.02]},
        yaxis={"title": value_title},
        height=420,
        margin={"l": 50, "r": 20, "t": 50, "b": 40},
    )
    return fig


def depth_difference(a: pd.DataFrame, b: pd.DataFrame, bins: int = 10) -> pd.DataFrame:
    """B minus A of the per-bin max and mean head score, in ``bins`` equal bins of normalised depth."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    out = []
    for frame in (a, b):
        idx = np.clip(np.digitize(frame["depth"], edges[1:-1]), 0, bins - 1)
        g = _df(frame.assign(bin=idx).groupby("bin")["value"].agg(["max", "mean"]))
        out.append(g.reindex(range(bins)))
    diff = pd.DataFrame(
        {
            "depth_from": edges[:-1],
            "depth_to": edges[1:],
            "max_a": out[0]["max"].to_numpy(),
            "max_b": out[1]["max"].to_numpy(),
            "mean_a": out[0]["mean"].to_numpy(),
            "mean_b": out[1]["mean"].to_numpy(),
        }
    )
    diff["max_diff"] = diff["max_b"] - diff["max_a"]
    diff["mean_diff"] = diff["mean_b"] - diff["mean_a"]
    return diff


def difference_heatmap(
    a: pd.DataFrame, b: pd.DataFrame, metric: str | None = None, *, title: str | None = None
) -> go.Figure:
    """B minus A head by head; both runs must have the same layers x heads."""
    ma, mb = head_matrix(a, metric), head_matrix(b, metric)
    if ma.shape != mb.shape or not (ma.index.equals(mb.index) and ma.columns.equals(mb.columns)):
        raise UserError(
            f"head-by-head difference needs the same layers x heads ({ma.shape[0]}x{ma.shape[1]} vs "
            f"{mb.shape[0]}x{mb.shape[1]}); compare by normalised depth instead"
        )
    diff = _long(mb - ma)
    name = metric or _single(a, "metric") or "head score"
    return head_heatmap(diff, None, title=title or "difference (B - A)", zmid=0.0,
                        colorbar_title=f"{name} difference (B - A)")


def depth_difference_figure(
    diff: pd.DataFrame, *, title: str | None = None, value_title: str = "head score"
) -> go.Figure:
    """Bar chart of :func:`depth_difference`: B - A of the max head score per depth bin.
    ``value_title`` names the score (the metric compared)."""
    centers = (diff["depth_from"] + diff["depth_to"]) / 2
    fig = go.Figure(
        [
            go.Bar(x=centers, y=diff["max_diff"], name="max B - max A"),
            go.Bar(x=centers, y=diff["mean_diff"], name="mean B - mean A"),
        ]
    )
    fig.update_layout(
        title=title or "difference by normalised depth (B - A)",
        xaxis={"title": "relative depth, bin centre: layer / (n_layers - 1)"},
        yaxis={"title": f"{value_title} difference (B - A)"},
        barmode="group",
        height=360,
        margin={"l": 50, "r": 20, "t": 50, "b": 40},
    )
    return fig


def depth_strip_figure(frame: pd.DataFrame, *, title: str, value_title: str = "score") -> go.Figure:
    """Heads of several models on one relative-depth axis (layer / n_layers): a row per model,
    a point per head, its size and colour the score. ``frame``: model, label, relative_depth, score."""
    _require(frame, ["model", "label", "relative_depth", "score"], "depth strip")
    models = list(dict.fromkeys(frame["model"]))
    scores = frame["score"].astype(float).abs()
    top = float(np.max(scores.to_numpy())) if len(frame) else 1.0
    fig = go.Figure(
        go.Scatter(
            x=frame["relative_depth"],
            y=frame["model"],
            mode="markers",
            marker={"size": 8 + 22 * scores / (top or 1.0), "color": frame["score"],
                    "colorscale": "Viridis", "showscale": True, "colorbar": {"title": value_title},
                    "line": {"width": 0.5, "color": "#333"}},
            text=frame["label"],
            hovertemplate="%{text} · %{y}<br>relative depth %{x:.2f}<br>" + value_title + " %{marker.color:.3f}<extra></extra>",
        )
    )
    fig.update_layout(
        title=title,
        xaxis={"title": "relative depth: layer / n_layers", "range": [-0.03, 1.0]},
        yaxis={"title": "model", "categoryorder": "array", "categoryarray": models[::-1]},
        height=120 + 45 * len(models),
        margin={"l": 110, "r": 20, "t": 50, "b": 40},
    )
    return fig
