"""Compare: the same detector across two runs (two models, or two settings), heads placed by
normalised layer depth so that models of different depth line up, and the difference."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app import dashboard as dash
from app.routing import declared_routes
from interp import figures
from interp.errors import UserError

dash.setup("compare")
st.title("Compare")
store = dash.store()
if store is None:
    st.stop()

runs = dash.runs(store)
counts = runs["detector"].value_counts() if not runs.empty else pd.Series(dtype=int)
detectors = sorted(str(d) for d in counts.index)
if not detectors:
    st.info("no runs stored yet: start one on the Home page")
    st.stop()


# First choice: a detector with two runs to compare, else a head detector (charts, not only a
# metrics table: after a first scan each detector has one run).
routes = declared_routes()
run_detectors = [str(d) for d in runs["detector"]]
first = next((i for i, d in enumerate(detectors) if run_detectors.count(d) >= 2), None)
if first is None:
    first = next((i for i, d in enumerate(detectors) if d in routes and routes[d].output == "head_scores"), 0)
detector = st.selectbox("detector", detectors, index=first, key="cmp-detector")
mine = dash.subset(runs, runs["detector"] == detector)
if len(mine) < 2:
    st.info(f"{detector} has a single run here: start another (another model or other parameters) to compare")
c1, c2 = st.columns(2)
with c1:
    row_a = dash.select_run(mine, key="cmp-a", label="run A", query_param="a")
with c2:
    rest = mine if len(mine) < 2 else mine.iloc[[*range(1, len(mine)), 0]]
    row_b = dash.select_run(rest, key="cmp-b", label="run B", query_param="b")
if row_a is None or row_b is None:
    st.stop()

tables_a, warn_a, _ = dash.run_tables(store, row_a)
tables_b, warn_b, _ = dash.run_tables(store, row_b)
dash.show_warnings([f"A: {w}" for w in warn_a] + [f"B: {w}" for w in warn_b])
label_a, label_b = f"A #{row_a['id']}", f"B #{row_b['id']}"

ma, mb = tables_a.get("metrics"), tables_b.get("metrics")
if ma is not None or mb is not None:
    st.subheader("metrics")
    va = {} if ma is None else dict(zip(ma["name"], ma["value"], strict=True))
    vb = {} if mb is None else dict(zip(mb["name"], mb["value"], strict=True))
    names = sorted(set(va) | set(vb))
    frame = pd.DataFrame({"name": names, label_a: [va.get(n) for n in names], label_b: [vb.get(n) for n in names]})
    frame["B - A"] = [
        float(b) - float(a) if isinstance(a, int | float) and isinstance(b, int | float) else None
        for a, b in zip(frame[label_a], frame[label_b], strict=True)
    ]
    st.dataframe(frame, hide_index=True)

hs_a, hs_b = tables_a.get("head_scores"), tables_b.get("head_scores")
if hs_a is None or hs_b is None:
    st.info("head comparisons need head scores in both runs")
    st.stop()
common = [m for m in dash.head_metrics(hs_a) if m in dash.head_metrics(hs_b)]
if not common:
    st.error("the two runs share no head-score metric")
    st.stop()
metric = st.selectbox("metric", common, index=common.index(detector) if detector in common else 0,
                      key="cmp-metric")


def _rows(frame: pd.DataFrame) -> pd.DataFrame:
    return frame if metric == "score" else dash.subset(frame, frame["metric"] == metric)


def _compare(hs_a: pd.DataFrame, hs_b: pd.DataFrame) -> None:
    a, b = _rows(hs_a), _rows(hs_b)
    # The number of layers is the deepest stored layer + 1 (head detectors store every layer).
    da = figures.depth_normalised(a, max(int(v) for v in a["layer"]) + 1)
    db = figures.depth_normalised(b, max(int(v) for v in b["layer"]) + 1)
    st.subheader("heads by normalised depth")
    dash.plot(figures.compare_depth_figure(da, db, labels=(label_a, label_b), value_title=metric), key="cmp-depth")
    diff = figures.depth_difference(da, db)
    dash.plot(figures.depth_difference_figure(diff, value_title=metric), key="cmp-depth-diff")
    st.dataframe(diff, hide_index=True)
    st.subheader("head by head (B - A)")
    try:
        dash.plot(figures.difference_heatmap(a, b), key="cmp-diff")
    except UserError as exc:
        st.info(str(exc))
    c1, c2 = st.columns(2)
    with c1:
        dash.plot(figures.head_heatmap(a, title=f"{label_a}: {metric}", colorbar_title=metric), key="cmp-map-a")
    with c2:
        dash.plot(figures.head_heatmap(b, title=f"{label_b}: {metric}", colorbar_title=metric), key="cmp-map-b")


dash.guarded(lambda: _compare(hs_a, hs_b) if hs_a is not None and hs_b is not None else None)
