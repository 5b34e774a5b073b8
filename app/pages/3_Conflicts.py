"""Conflicts and interventions: memory vs context rates of stored runs, their head maps, and the
interventions (PH3 pruning, head scaling, DeCoRe) where their modules provide a live view."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

import streamlit as st

if str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dashboard as dash

dash.setup("conflicts and interventions")
st.title("Conflicts and interventions")
store = dash.store()
if store is None:
    st.stop()

KEYWORDS = ("conflict", "ph3", "prun", "decore", "memory", "context", "scal")
runs = dash.runs(store)
mine = dash.subset(runs, [any(k in str(d).lower() for k in KEYWORDS) for d in runs["detector"]])

st.subheader("stored runs")
if mine.empty:
    st.info("no conflict or intervention runs in this workspace yet")
else:
    row = dash.select_run(mine, key="cf-run")
    if row is not None:
        tables, warnings, final = dash.run_tables(store, row)
        dash.show_warnings(warnings)
        dash.show_run_header(row, final)
        metrics = tables.get("metrics")
        if metrics is not None:
            rates = dash.subset(metrics, metrics["name"].str.contains("rate", case=False, na=False))
            if len(rates):
                st.markdown("**memory / context rates**")
                dash.show_metrics(rates)
        dash.show_tables(tables, key=f"cf-{row['id']}", primary=str(row["detector"]))
        for title, fig in dash.detector_figures(str(row["detector"]), tables):
            st.markdown(f"**{title}**")
            dash.plot(fig, key=f"cf-det-{row['id']}-{title}")

st.divider()
st.subheader("interventions, live")


def _module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


found = False
for name, title in (("circuits.ph3", "PH3 pruning / head scaling"), ("circuits.decore", "DeCoRe")):
    module = _module(name)
    view = getattr(module, "dashboard_view", None) if module is not None else None
    if callable(view):
        found = True
        st.markdown(f"**{title}**")
        try:
            view(st, dash.loaded_model)
        except Exception as exc:
            st.error(f"{name}.dashboard_view failed: {type(exc).__name__}: {exc}")
if not found:
    st.info(
        "no live intervention view is installed: PH3 pruning, head scaling and DeCoRe appear here "
        "when `circuits.ph3` / `circuits.decore` provide `dashboard_view(st, load_model)`"
    )
