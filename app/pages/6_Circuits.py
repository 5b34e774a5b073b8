"""Circuits: a run's stored edges (path patching, edge attribution, a circuit) drawn as a graph,
x = layer and y = head, MLPs in a row, embed on the left and the logits on the right; a click on
a node or an edge opens its heads in Head maps; the graph exported as JSON. The shaping lives in
app/circuits_view.py."""

from __future__ import annotations

import json
from functools import partial
from typing import TYPE_CHECKING, Any

import streamlit as st

from app import circuits_view as cv
from app import dashboard as dash
from app import edge_runs
from app.routing import CIRCUITS, PAGES

if TYPE_CHECKING:
    import pandas as pd

    from interp.runs.store import Store

HEAD_MAPS = PAGES["Head maps"].title.replace(" ", "_")  # its URL path

dash.setup("circuits")
st.title("Circuits")


def _controls(edges: list[cv.StoredEdge], rid: int) -> tuple[bool, cv.ValueName, int]:
    c1, c2, c3 = st.columns(3)
    n_in = sum(e.in_circuit for e in edges)
    show_all = bool(c1.toggle("show every edge", value=n_in == 0, key=f"cc-all-{rid}", disabled=n_in == 0,
                              help="on: every edge, the circuit's emphasised; off: the circuit's edges only"))
    has: list[cv.ValueName] = [v for v in ("score", "attribution") if any(e.value(v) is not None for e in edges)]
    by: cv.ValueName = has[0] if has else "score"
    if len(has) > 1:
        by = "attribution" if c2.radio("width by", has, horizontal=True, key=f"cc-by-{rid}") == "attribution" else "score"
    n = max(1, len(edges))
    limit = int(c3.number_input("at most edges drawn (strongest first)", 1, n, min(300, n), key=f"cc-limit-{rid}"))
    return show_all, by, limit


def _open_links(target: int | None, heads: list[tuple[str, tuple[int, int]]]) -> None:
    if target is None:
        st.caption("no finished head-detector run on this model: run one (e.g. `interp run induction`) to open "
                   "these heads in Head maps")
        return
    # Relative links, as the Atlas's: the page's URL path with the run and the head to pick.
    st.markdown(" · ".join(f"[open {label} (L{layer}H{head}) in Head maps]"
                           f"(./{HEAD_MAPS}?run={target}&layer={layer}&head={head})"
                           for label, (layer, head) in heads))


def _graph(row: dict[str, Any], edges: list[cv.StoredEdge], shape: cv.Shape, own_shape: bool,
           target: int | None) -> list[cv.StoredEdge]:
    """The figure, its click and the head picker; returns the edges drawn."""
    rid = int(row["id"])
    show_all, by, limit = _controls(edges, rid)
    drawn = cv.drawn_edges(edges, show_all=show_all, by=by, limit=limit)
    scale = max((abs(e.value(by) or 0.0) for e in edges), default=0.0)  # one scale for every view of the run
    st.caption(f"{len(edges)} edges stored, {sum(e.in_circuit for e in edges)} in the circuit; {len(drawn)} drawn "
               f"(width ∝ |{by}|, blue > 0, red < 0; solid q, dashed k, dotted v, dash-dot MLP input). Hover an "
               "edge's middle for its numbers; click a node or an edge's middle to open its heads in Head maps."
               + ("" if own_shape else " The model's config is not readable here: kv heads are drawn at their "
                  "own index."))
    state = dash.plot(cv.graph_figure(drawn, shape, by=by, scale=scale, title=f"run #{rid}: {row['detector']}"),
                      key=f"cc-graph-{rid}", on_select="rerun", selection_mode="points")
    try:
        points = list(state["selection"]["points"])
    except (KeyError, TypeError):
        points = []
    if clicked := cv.selected_heads(points, drawn, shape):
        _open_links(target, clicked)
    if heads := cv.graph_heads(drawn, shape):
        pick = st.selectbox("open a head of the graph in Head maps", heads, format_func=lambda h: f"{h[0]}.{h[1]}",
                            key=f"cc-head-{rid}")
        if pick is not None:
            _open_links(target, [("head", (int(pick[0]), int(pick[1])))])
    return drawn


def _show(store: Store, runs: pd.DataFrame, row: dict[str, Any]) -> None:
    rid = int(row["id"])
    tables, warnings, final = dash.run_tables(store, row)
    dash.show_warnings(warnings)
    dash.show_run_header(row, final)
    edges = edge_runs.stored_edges(store, row)  # a malformed artifact: a UserError, shown by dash.guarded
    if edges is None:
        st.info("this run has stored no edges (yet)")
        dash.show_tables(tables, key=f"cc-{rid}", detector=str(row["detector"]))
        return
    shape, own_shape = edge_runs.shape(row, edges)
    drawn = _graph(row, edges, shape, own_shape, edge_runs.head_run(store, runs, str(row["model"])))
    note = ("; lo, hi: the score's 95% interval over n prompt pairs (method in the hover)"
            if any(e.interval is not None for e in drawn) else "")
    st.markdown(f"**edges drawn** (strongest first{note})")
    st.dataframe(cv.edge_table(drawn), hide_index=True, key=f"cc-table-{rid}")
    params: dict[str, Any] = json.loads(row.get("params_json") or "{}")
    export = cv.export_graph(edges, shape, run_id=rid, model=str(row["model"]), detector=str(row["detector"]),
                             variant=str(row["variant"]), mode=params.get("mode"))
    st.download_button("Download graph JSON", json.dumps(export, indent=1), file_name=f"graph-run{rid}.json",
                       mime="application/json", key=f"cc-export-{rid}")
    arts = tables.get("artifacts")
    rest = {**tables, "artifacts": dash.subset(arts, arts["name"] != "edges")} if arts is not None else dict(tables)
    dash.show_tables({k: v for k, v in rest.items() if len(v)}, key=f"cc-{rid}", detector=str(row["detector"]))


def _page(store: Store) -> None:
    runs = dash.runs(store)
    mine = edge_runs.edge_runs(store, runs)
    if mine.empty:
        st.info(f"no edge runs in this workspace yet: {CIRCUITS.fill} store the edges this page draws")
        return
    row = dash.select_run(mine, key="cc-run")
    if row is not None:
        dash.guarded(partial(_show, store, runs, row))


if (store := dash.store()) is not None:
    _page(store)
