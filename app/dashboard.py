"""What the dashboard's pages share: the workspace, store reads, the runs each page lists, the
model cache, and generic rendering of a run's stored tables (any detector, known now or added
later).

Stored views never touch a model: they read the store (cached per run and last update) and
plot with :mod:`interp.figures`. The model is loaded only for on-demand computations, once per
(name, dtype, device, backend) in a bounded ``st.cache_resource``. The dashboard never creates
a store: a workspace without one shows the Home page's run form, and the first run creates it.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import pandas as pd
import streamlit as st

from app import progress
from app.routing import Page, declared_routes, route_of
from interp import figures
from interp.errors import UserError
from interp.runs.schema import FINAL_UNIT, RESERVED_UNITS, TABLES, WARNINGS_UNIT
from interp.runs.store import DB_NAME

if TYPE_CHECKING:
    import numpy as np

    from interp.model.loaded import LoadedModel
    from interp.runs.store import Store

WORKSPACE_ENV = "INTERP_WORKSPACE"
PLOTLY_CONFIG = {"displaylogo": False}


def subset(frame: pd.DataFrame, mask: Any) -> pd.DataFrame:
    """The rows of ``frame`` where ``mask`` holds (a boolean Series or list), as a DataFrame."""
    return cast(pd.DataFrame, frame.loc[list(mask) if isinstance(mask, list) else mask]).reset_index(drop=True)


def setup(title: str) -> None:
    st.set_page_config(page_title=f"interp · {title}", layout="wide")


def workspace() -> Path:
    env = os.environ.get(WORKSPACE_ENV)
    return (Path(env) if env else Path.cwd() / ".interp").expanduser().resolve()


def has_store() -> bool:
    """Whether the workspace has a results store yet (the first run creates it)."""
    return (workspace() / DB_NAME).is_file()


@st.cache_resource(max_entries=4, show_spinner=False)
def _store(path: str) -> Store:
    from interp.runs.store import Store

    # One connection per workspace and server process; the Store serialises its own use.
    # create=False: reading never creates a store (a failed open is not cached, so the store
    # opens once the first run has made it).
    return Store(path, create=False)


def store() -> Store | None:
    """The workspace's store, or None after showing why there is none: no store yet (an info:
    start a run on the Home page) or one that cannot be opened (an error)."""
    if not has_store():
        st.info(f"no runs stored yet in `{workspace()}`: start one on the Home page "
                "(or run `interp scan` with this workspace)")
        return None
    try:
        return _store(str(workspace()))
    except UserError as exc:
        st.error(str(exc))
        return None


def existing_store() -> Store | None:
    """The workspace's store, or None, silently, while there is none or it cannot be opened
    (a job's panel asks before the job's CLI has created it)."""
    try:
        return _store(str(workspace())) if has_store() else None
    except UserError:
        return None


def runs(s: Store) -> pd.DataFrame:
    """The runs table, newest first (read fresh on every render: status changes)."""
    return s.runs()


@st.cache_data(max_entries=256, show_spinner=False)
def _settings(ws: str, run_id: int, updated_at: str) -> dict[str, Any]:
    return progress.run_settings(_store(ws), run_id)


def runs_on(page: Page, s: Store, frame: pd.DataFrame) -> pd.DataFrame:
    """The runs of ``frame`` that ``page`` lists, by their detector's declared route (the
    settings' recorded output for a detector this installation does not have)."""
    routes = declared_routes()
    keep = [page.accepts(route_of(str(r["detector"]), routes, {} if r["detector"] in routes
                                  else _settings(str(s.workspace), int(r["id"]), str(r["updated_at"]))))
            for r in frame.to_dict("records")]
    return subset(frame, keep)


@st.cache_data(max_entries=64, show_spinner=False)
def _tables(ws: str, run_id: int, updated_at: str, n_units: int) -> dict[str, pd.DataFrame]:
    # updated_at and n_units are in the key so that a new commit invalidates the entry.
    s = _store(ws)
    run = s.run(run_id)
    return {t: run.results(t) for t in TABLES}


def run_tables(s: Store, row: Mapping[str, Any]) -> tuple[dict[str, pd.DataFrame], list[str], bool]:
    """(tables, warnings, final) of a run: the final unit's tables once finalized, else every
    unit's rows so far (partial)."""
    raw = _tables(str(s.workspace), int(row["id"]), str(row["updated_at"]), int(row.get("n_units") or 0))
    warnings: list[str] = []
    arts = raw["artifacts"]
    if len(arts):
        for doc in arts.loc[(arts["unit"] == WARNINGS_UNIT) & (arts["name"] == "warnings"), "json"]:
            try:
                value = json.loads(doc)
            except (TypeError, ValueError):
                value = [str(doc)]
            warnings.extend(str(w) for w in (value if isinstance(value, list) else [value]))
    units = set().union(*(set(f["unit"]) for f in raw.values() if len(f)))
    final = FINAL_UNIT in units
    out: dict[str, pd.DataFrame] = {}
    for name, frame in raw.items():
        if frame.empty:
            continue
        frame = subset(frame, frame["unit"] == FINAL_UNIT) if final else subset(frame, ~frame["unit"].isin(RESERVED_UNITS))
        if len(frame):
            out[name] = frame.reset_index(drop=True)
    return out, warnings, final


def unit_tables(s: Store, row: Mapping[str, Any]) -> dict[str, pd.DataFrame]:
    """Every per-unit row of a run (its final summary, warnings and settings left out): per-item detail
    that a finalized run's summary aggregates away, such as one traced fact's heatmaps."""
    raw = _tables(str(s.workspace), int(row["id"]), str(row["updated_at"]), int(row.get("n_units") or 0))
    out: dict[str, pd.DataFrame] = {}
    for name, frame in raw.items():
        if len(frame):
            frame = subset(frame, ~frame["unit"].isin(RESERVED_UNITS))
            if len(frame):
                out[name] = frame.reset_index(drop=True)
    return out


def head_in_other_runs(
    s: Store, all_runs: pd.DataFrame, row: Mapping[str, Any], layer: int, head: int
) -> list[tuple[Mapping[str, Any], pd.DataFrame, pd.DataFrame]]:
    """One head's stored scores and curves in the other finished runs on the same model, so a
    head's detail gathers its lag-CRP and CMR fit, retrieval score, memory/context effects."""
    out = []
    for other in all_runs.to_dict("records"):
        if int(other["id"]) == int(row["id"]) or other["model"] != row["model"] or other["status"] != "done":
            continue
        tables, _, _ = run_tables(s, other)
        parts = []
        for name in ("head_scores", "curves"):
            frame = tables.get(name)
            if frame is not None and {"layer", "head"} <= set(frame.columns):
                frame = subset(frame, (frame["layer"] == layer) & (frame["head"] == head))
            else:
                frame = pd.DataFrame()
            parts.append(frame)
        if any(len(p) for p in parts):
            out.append((other, parts[0], parts[1]))
    return out


def retrieval_examples(s: Store, row: Mapping[str, Any], layer: int, head: int, n: int = 3) -> pd.DataFrame:
    """The needle samples of a retrieval run on which one head scored highest: its per-sample
    retrieval score next to the needle, the question, the answer and the model's response."""
    units = unit_tables(s, row)
    hs, arts = units.get("head_scores"), units.get("artifacts")
    if hs is None or arts is None or "metric" not in hs.columns:
        return pd.DataFrame()
    mine = subset(hs, (hs["metric"] == "retrieval_sample") & (hs["layer"] == layer) & (hs["head"] == head))
    docs: dict[str, dict[str, Any]] = {}
    for unit, name, doc in zip(arts["unit"], arts["name"], arts["json"], strict=True):
        if name == "sample":
            with contextlib.suppress(TypeError, ValueError):
                docs[str(unit)] = json.loads(doc)
    rows = []
    for unit, value in zip(mine["unit"], mine["value"], strict=True):
        d = docs.get(str(unit))
        if d is None:
            continue
        needle = d.get("needle") or {}
        rows.append({"score": float(value), "sample": str(unit), "question": needle.get("question"),
                     "answer": needle.get("answer"), "response": d.get("response"), "correct": d.get("correct"),
                     "context_tokens": d.get("context_tokens"), "depth": d.get("actual_depth")})
    if not rows:
        return pd.DataFrame()
    return pd.DataFrame(rows).sort_values("score", ascending=False, kind="stable").head(n).reset_index(drop=True)


def run_label(row: Mapping[str, Any]) -> str:
    return f"#{int(row['id'])} {row['detector']} · {Path(str(row['model'])).name} · {row['status']}"


def select_run(
    frame: pd.DataFrame, *, key: str, label: str = "run", query_param: str | None = "run"
) -> dict[str, Any] | None:
    """A run picked in a selectbox (default: ?run=<id> in the URL, else the newest)."""
    if frame.empty:
        return None
    ids = [int(i) for i in frame["id"]]
    index = 0
    if query_param and query_param in st.query_params:
        try:
            wanted = int(st.query_params[query_param])
        except ValueError:
            wanted = -1
        if wanted in ids:
            index = ids.index(wanted)
    rows = {int(r["id"]): r for r in frame.to_dict("records")}
    chosen = st.selectbox(label, ids, index=index, format_func=lambda i: run_label(rows[i]), key=key)
    if chosen is None:
        return None
    if query_param:
        st.query_params[query_param] = str(chosen)
    return rows[int(chosen)]


def head_in_query(layers: list[int], heads: list[int]) -> tuple[int, int] | None:
    """The head that ?layer=L&head=H in the URL names, if the run has it."""
    try:
        wanted = (int(st.query_params["layer"]), int(st.query_params["head"]))
    except (KeyError, ValueError):
        return None
    return wanted if wanted[0] in layers and wanted[1] in heads else None


def show_warnings(warnings: list[str]) -> None:
    for w in warnings:
        st.warning(w, icon="⚠️")


def show_run_header(row: Mapping[str, Any], final: bool) -> None:
    cols = st.columns(5)
    cols[0].metric("detector", str(row["detector"]))
    cols[1].metric("variant", str(row["variant"]))
    cols[2].metric("status", str(row["status"]))
    s = existing_store()
    units = progress.run_progress(s, int(row["id"]), str(row["detector"]), str(row["status"])) if s else None
    # Units done of the total the run recorded (its own units: the runner's settings, final
    # and warnings aside).
    cols[3].metric("units", "—" if units is None else (f"{units.done}/{units.total}" if units.total is not None
                                                       else str(units.done)))
    dur = row.get("duration_s")
    cols[4].metric("duration", "—" if dur is None or pd.isna(dur) else f"{float(dur):.1f} s")
    if row["status"] == "failed" and row.get("error"):
        st.error(f"run failed: {row['error']}")
    if not final:
        st.info("this run is not finalized: the tables below are its committed units so far")


def metric_value(metrics: pd.DataFrame | None, *names: str) -> float | None:
    if metrics is None or metrics.empty:
        return None
    for name in names:
        hit = metrics.loc[metrics["name"] == name, "value"]
        if len(hit) and pd.notna(hit.iloc[0]):
            return float(hit.iloc[0])
    return None


def plot(fig: Any, key: str, **kwargs: Any) -> Any:
    return st.plotly_chart(fig, key=key, config=PLOTLY_CONFIG, **kwargs)


def show_metrics(frame: pd.DataFrame) -> None:
    cols = [c for c in ("name", "value", "ci_low", "ci_high", "n", "ci_method") if c in frame.columns]
    table = cast(pd.DataFrame, frame[cols]).copy()
    bounds = [c for c in ("ci_low", "ci_high", "ci_method") if c in table.columns]
    if {"ci_low", "ci_high"} <= set(bounds) and bool(table[["ci_low", "ci_high"]].isna().to_numpy().all()):
        table = table.drop(columns=bounds)
    st.dataframe(table, hide_index=True, key=None)


def head_metrics(frame: pd.DataFrame) -> list[str]:
    if "metric" not in frame.columns:
        return ["score"]
    return sorted(str(m) for m in frame["metric"].dropna().unique())


def show_head_scores(
    frame: pd.DataFrame,
    metrics: pd.DataFrame | None,
    *,
    key: str,
    primary: str | None = None,
    select: bool = False,
) -> tuple[int, int] | None:
    """A heatmap of one metric, picked in a radio (the primary metric first); returns a clicked
    head, if any.

    A stored metric ``<metric>_threshold`` outlines the heads above it; a plain ``threshold``
    applies to the primary metric (the one named like the detector, or the only one).
    """
    names = head_metrics(frame)
    if primary in names:
        names = [primary, *(n for n in names if n != primary)]
    lead = primary if primary in names else (names[0] if len(names) == 1 else None)
    # One map at a time (a radio, not tabs): every plotly chart costs the browser paint time.
    name = st.radio("metric", names, horizontal=True, key=f"{key}-metric") if len(names) > 1 else names[0]
    name = str(name)
    rows = frame if name == "score" else subset(frame, frame["metric"] == name)
    threshold = metric_value(metrics, f"{name}_threshold")
    if threshold is None and name == lead:
        threshold = metric_value(metrics, "threshold")
    fig = figures.head_heatmap(rows, None, threshold=threshold, title=name)
    if not select:
        plot(fig, key=f"{key}-{name}")
        return None
    state = plot(fig, key=f"{key}-{name}", on_select="rerun", selection_mode="points")
    points = _selected_points(state)
    return points[0] if points else None


def _selected_points(state: Any) -> list[tuple[int, int]]:
    try:
        points = state["selection"]["points"]
    except (KeyError, TypeError):
        return []
    out = []
    for p in points:
        try:
            out.append((int(p["y"]), int(p["x"])))
        except (KeyError, TypeError, ValueError):
            continue
    return out


def show_token_layer(
    frame: pd.DataFrame,
    *,
    key: str,
    marked: Callable[[Any], list[int]] | None = None,
    mean: bool = True,
    value_title: str | None = None,
) -> None:
    """Heatmaps per kind; with several items, a picker (``mean`` adds the mean over items).
    ``value_title`` (what the values are, with units) titles the colour bars after the kind."""
    kinds = sorted(str(k) for k in frame["kind"].dropna().unique()) if "kind" in frame.columns else [""]
    items = sorted({str(i) for i in frame["item"].dropna()}) if "item" in frame.columns else []
    item: str | None = None
    if len(items) > 1:
        options = ["(mean over items)", *items] if mean else items
        choice = st.selectbox("item", options, key=f"{key}-item")
        item = None if choice == "(mean over items)" else choice
    elif items:
        item = items[0]
    cols = st.columns(min(3, len(kinds)))
    for i, kind in enumerate(kinds):
        rows = frame if not kind else subset(frame, frame["kind"] == kind)
        with cols[i % len(cols)]:
            try:
                fig = figures.token_layer_heatmap(
                    rows, None, item, marked_tokens=marked(item) if marked else (), title=kind or None,
                    value_title=f"{kind}: {value_title}" if kind and value_title else (value_title or kind or None),
                )
            except UserError as exc:
                st.info(f"{kind}: {exc}")
                continue
            plot(fig, key=f"{key}-{kind}")


def curve_axes_of(detector: str | None) -> dict[str, tuple[str, str]]:
    """The axis titles a detector declares for its curves (``Detector.curve_axes``); empty for
    a detector that is not registered (any more) or whose module does not load."""
    if not detector:
        return {}
    try:
        from interp.runs.registry import all_detectors

        cls = all_detectors().get(str(detector))
    except Exception:  # a broken plugin module must not take the page down
        return {}
    return dict(cls.curve_axes) if cls is not None else {}


def show_curves(frame: pd.DataFrame, *, key: str, detector: str | None = None) -> None:
    """One line plot per curve, its axes titled as ``detector`` (the run's) declares them."""
    axes = curve_axes_of(detector)
    names = sorted(str(c) for c in frame["curve"].dropna().unique()) if "curve" in frame.columns else [""]
    for name in names:
        rows = frame if not name else subset(frame, frame["curve"] == name)
        plot(figures.curves_figure(rows, None, title=name or None, axes=axes), key=f"{key}-{name}")


def show_artifacts(frame: pd.DataFrame) -> None:
    for name, doc in zip(frame["name"], frame["json"], strict=True):
        with st.expander(f"artifact: {name}"):
            try:
                st.json(json.loads(doc))
            except (TypeError, ValueError):
                st.code(str(doc))


def show_tables(
    tables: Mapping[str, pd.DataFrame],
    *,
    key: str,
    skip: tuple[str, ...] = (),
    primary: str | None = None,
    detector: str | None = None,
) -> None:
    """Every stored table of a run, generically: whatever the detector (``detector``, the run's,
    names the curves' axes)."""
    metrics = tables.get("metrics")
    if "metrics" in tables and "metrics" not in skip:
        st.subheader("metrics")
        show_metrics(tables["metrics"])
    if "head_scores" in tables and "head_scores" not in skip:
        st.subheader("head scores (layer x head)")
        show_head_scores(tables["head_scores"], metrics, key=f"{key}-hs", primary=primary)
    if "token_layer" in tables and "token_layer" not in skip:
        st.subheader("token x layer")
        show_token_layer(tables["token_layer"], key=f"{key}-tl")
    if "curves" in tables and "curves" not in skip:
        st.subheader("curves")
        show_curves(tables["curves"], key=f"{key}-cv", detector=detector)
    if "artifacts" in tables and "artifacts" not in skip:
        show_artifacts(tables["artifacts"])


def model_spec(row: Mapping[str, Any]) -> tuple[str | None, str, str]:
    """(loadable name or None, dtype, device) of the model a run used."""
    try:
        prov = json.loads(row.get("provenance_json") or "{}")
    except (TypeError, ValueError):
        prov = {}
    dtype = str(prov.get("dtype", "float32")).removeprefix("torch.")
    device = str(prov.get("device", "cpu"))
    try:
        from interp.model.loading import parse_device

        parse_device(device)
    except UserError:
        # A device map ("map(cuda:0 x12, cpu x12)") or a device this machine lacks (a run made on
        # a GPU machine, viewed on a laptop): the views load the model where it fits here.
        device = "auto"
    name = None if prov.get("source") == "object" else str(prov.get("model_id") or row["model"])
    return name, dtype, device


@st.cache_resource(max_entries=1, show_spinner="loading the model (once per process)...")
def _loaded_model(name: str, dtype: str, device: str, backend: str) -> LoadedModel:
    import interp

    return interp.load_model(name, backend=backend, dtype=dtype, device=device)


def loaded_model(name: str, dtype: str = "float32", device: str = "cpu", backend: str = "bridge") -> LoadedModel | None:
    """The model, loaded once per process; None after showing the error for bad input."""
    try:
        return _loaded_model(name, dtype, device, backend)
    except UserError as exc:
        st.error(str(exc))
    except (OSError, ValueError, RuntimeError) as exc:
        st.error(f"cannot load model {name!r}: {type(exc).__name__}: {exc}")
    return None


def token_labels(model: LoadedModel, ids: list[int]) -> list[str]:
    return [str(t).replace("Ġ", "␣").replace("▁", "␣") for t in model.tokenizer.convert_ids_to_tokens(ids)]


@st.cache_data(max_entries=16, show_spinner="computing the attention pattern...")
def attention_pattern(
    name: str, dtype: str, device: str, layer: int, head: int, ids: tuple[int, ...]
) -> tuple[np.ndarray, list[str]]:
    """One head's attention pattern on a token sequence (small: q x k for one head)."""
    import torch

    model = _loaded_model(name, dtype, device, "bridge")
    model.check_head(layer, head)
    tokens = torch.tensor([list(ids)], dtype=torch.long)
    with torch.no_grad():
        out = model.run(tokens, cache=[f"pattern.{layer}"])
    pattern = out.cache[f"pattern.{layer}"][0, head].float().cpu().numpy()
    return pattern, token_labels(model, list(ids))


def example_ids(model: LoadedModel, detector: str, params: Mapping[str, Any], max_tokens: int) -> list[int] | None:
    """The detector's typical input (:meth:`Detector.example_tokens`), truncated to
    ``max_tokens``; None where it has none."""
    from interp.runs.registry import get_detector

    try:
        det = get_detector(detector)
        full = det.parse_params({k: v for k, v in params.items() if k in {p.name for p in det.params}})
        ids = det.example_tokens(model, full)
        if ids is None:
            return None
    except Exception:
        return None
    try:
        row = ids[0] if getattr(ids, "ndim", 1) == 2 else ids
        return [int(t) for t in list(row)[:max_tokens]]
    except (TypeError, ValueError, IndexError):
        return None


def guarded(fn: Callable[[], Any]) -> Any:
    """Run a page section; a UserError becomes a message in the page, never a traceback."""
    try:
        return fn()
    except UserError as exc:
        st.error(str(exc))
    return None
