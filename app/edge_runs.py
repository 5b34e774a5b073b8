"""The workspace's edge runs as the pages read them: which runs store edges (the Circuits page's
route), a run's stored edges, the shape of its model (read from the model's config, never its
weights), and the run a head opens in on the Head maps page."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import streamlit as st

from app import circuits_view as cv
from app import dashboard as dash
from app.routing import CIRCUITS, PAGES
from interp.errors import UserError
from interp.runs import tables as run_tables

if TYPE_CHECKING:
    from interp.model.layout import ModelInfo
    from interp.runs.store import Store


def edge_runs(s: Store, all_runs: pd.DataFrame, model: str | None = None) -> pd.DataFrame:
    """The runs the Circuits page lists (their detector declares ``edges``), of ``model`` if given."""
    mine = dash.runs_on(CIRCUITS, s, all_runs)
    return mine if model is None else dash.subset(mine, mine["model"] == model)


def stored_edges(s: Store, row: Mapping[str, Any]) -> list[cv.StoredEdge] | None:
    """The run's ``edges`` artifact as typed edges; None where it stored none (yet). A
    malformed artifact is a UserError."""
    tables, _, _ = dash.run_tables(s, row)
    arts = tables.get("artifacts")
    doc = run_tables.read_artifact(arts, "edges") if arts is not None else None
    return None if doc is None else cv.parse_edges(doc)


@st.cache_data(max_entries=32, show_spinner=False)
def _config_info(folder: str) -> ModelInfo | None:
    from transformers import AutoConfig

    from interp.model.layout import ModelInfo

    try:
        return ModelInfo.from_config(AutoConfig.from_pretrained(folder, local_files_only=True))
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def model_info(row: Mapping[str, Any]) -> ModelInfo | None:
    """The shape of the run's model from its config.json (a local folder or a converted zoo
    model); None where there is none here (an in-memory model, a hub model not cached)."""
    from interp.model import zoo

    name, _, _ = dash.model_spec(row)
    if name is None:
        return None
    if name in zoo.ZOO:
        if not zoo.is_cached(name):
            return None
        folder = zoo.model_dir(name)
    else:
        folder = Path(name).expanduser()
    return _config_info(str(folder)) if (folder / "config.json").is_file() else None


def shape(row: Mapping[str, Any], edges: list[cv.StoredEdge]) -> tuple[cv.Shape, bool]:
    """(the layout's shape, whether it is the model's own): from the model's config, else
    inferred from the edges (kv heads then drawn at their own index)."""
    info = model_info(row)
    return cv.shape_of(edges, info), info is not None


def head_run(s: Store, all_runs: pd.DataFrame, model: str) -> int | None:
    """The newest finished run on ``model`` that the Head maps page lists (a head opens there)."""
    heads = dash.runs_on(PAGES["Head maps"], s, all_runs)
    done = [int(r["id"]) for r in heads.to_dict("records") if r["model"] == model and r["status"] == "done"]
    return done[0] if done else None  # runs come newest first


def show_head_edges(s: Store, all_runs: pd.DataFrame, row: Mapping[str, Any], layer: int, head: int) -> None:
    """A head's strongest incoming and outgoing edges in each edge run on the model of
    ``row`` (the Head maps page's head detail)."""
    found = []
    for other in edge_runs(s, all_runs, str(row["model"])).to_dict("records"):
        try:
            edges = stored_edges(s, other)
        except UserError:
            continue  # the Circuits page names what is wrong with it
        if not edges:
            continue
        incoming, outgoing = cv.head_edges(edges, layer, head, shape(other, edges)[0])
        if len(incoming) or len(outgoing):
            found.append((other, incoming, outgoing))
    if not found:
        return
    with st.expander(f"L{layer}H{head}'s strongest edges in {len(found)} edge runs on this model", expanded=True):
        for other, incoming, outgoing in found:
            st.markdown(f"**{dash.run_label(other)}** ([graph](./Circuits?run={int(other['id'])}))")
            left, right = st.columns(2)
            left.caption(f"into L{layer}H{head} (its q, and its kv group's k and v)")
            left.dataframe(incoming, hide_index=True)
            right.caption(f"out of L{layer}H{head}")
            right.dataframe(outgoing, hide_index=True)
