"""Workspace overview: models and runs in the store, background jobs, and a form to start one.

A workspace without a store yet (``interp app`` on a new one) opens on the form: the first run
started there creates the store.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import streamlit as st

from app import dashboard as dash
from app import jobs, progress, uploads
from app.routing import CIRCUITS, page_lines
from interp.errors import UserError

if TYPE_CHECKING:
    import pandas as pd

    from interp.runs.store import Store

dash.setup("overview")
st.title("interp-workbench")
ws = dash.workspace()
st.caption(f"workspace: `{ws}`")

store = None
if dash.has_store():
    store = dash.store()
    if store is None:  # a store that cannot be opened: the error is shown
        st.stop()

LOCAL = "local folder..."
FILE_PARAM = re.compile(r"file|path|dataset|facts")


# -- jobs -------------------------------------------------------------------------------------


def _job_progress(job: jobs.Job) -> None:
    """The job's runs in the store: units committed of each run's total."""
    s = dash.existing_store()  # None until the job's CLI has created the store
    runs = progress.job_progress(s, job) if s is not None else []
    if not runs:
        st.progress(0.0, text="loading the model (no run stored yet)...")
    for p in runs:
        st.progress(p.fraction, text=p.text)
    if len(job.detectors) > 1:
        finished = sum(p.status == "done" for p in runs)
        st.caption(f"{finished} of {len(job.detectors)} detectors finished")


def _job_panel() -> None:
    all_jobs = jobs.list_jobs(ws)[:6]
    active = any(j.active for j in all_jobs)
    if not all_jobs:
        return
    st.subheader("jobs")
    for job in all_jobs:
        with st.container(border=True):
            head = f"**{job.label}** · {job.status}"
            if job.finished_at:
                head += f" · {job.finished_at - job.started_at:.0f} s"
            st.markdown(head)
            if job.active:
                _job_progress(job)
                if st.button("stop", key=f"stop-{job.id}"):
                    jobs.stop(ws, job.id)
            elif job.status == "done":
                st.success("finished: the results are in the runs table below")
            elif job.error:
                st.error(job.error)
    was_active = st.session_state.get("jobs_active", False)
    st.session_state["jobs_active"] = active
    if was_active and not active:
        # A job ended: refresh the whole page so the runs table shows its run.
        st.rerun(scope="app")


any_active = any(j.active for j in jobs.list_jobs(ws))
st.session_state.setdefault("jobs_active", any_active)
st.fragment(_job_panel, run_every=2.0 if any_active else None)()


# -- models and runs --------------------------------------------------------------------------

def _runs_section(store: Store, runs: pd.DataFrame) -> None:
    provs = [json.loads(p) if p else {} for p in runs["provenance_json"]]
    runs = runs.assign(
        source=[p.get("source", "") for p in provs],
        dtype=[p.get("dtype", "") for p in provs],
        device=[p.get("device", "") for p in provs],
    )
    models = (
        runs.groupby("model", as_index=False)
        .agg(runs=("id", "count"), detectors=("detector", lambda d: ", ".join(sorted(set(d)))),
             source=("source", "first"), dtype=("dtype", "first"), device=("device", "first"),
             prefix=("prefix", "first"))
    )
    st.markdown("**models**")
    st.dataframe(models, hide_index=True)
    shown = ["id", "detector", "variant", "model", "prefix", "status", "n_units", "duration_s", "created_at", "error"]
    st.markdown("**runs** (newest first)")
    st.dataframe(runs[shown], hide_index=True, column_config={"duration_s": st.column_config.NumberColumn(format="%.1f")})
    row = dash.select_run(runs, key="home-run", label="details of run")
    if row is not None:
        with st.expander(f"run #{row['id']}: parameters and provenance", expanded=False):
            c1, c2 = st.columns(2)
            c1.markdown("parameters")
            c1.json(json.loads(row["params_json"] or "{}"))
            c2.markdown("provenance")
            c2.json(json.loads(row["provenance_json"] or "{}"))
            st.caption(f"code version {row['code_version']} · key {str(row['key'])[:16]}...")
        _tables, warnings, _final = dash.run_tables(store, row)
        dash.show_warnings(warnings)


st.subheader("runs")
if store is None:
    st.info("no runs stored yet: start one below (the first run creates this workspace's results store), "
            "or run `interp scan` with this workspace")
elif (stored := dash.runs(store)).empty:
    st.info("no runs stored yet: start one below, or run `interp scan` with this workspace")
else:
    _runs_section(store, stored)


# -- start a run ------------------------------------------------------------------------------


def _detectors() -> dict[str, Any]:
    from interp.runs.registry import all_detectors

    return all_detectors()


def _zoo_names() -> list[str]:
    from interp.model.zoo import ZOO

    return list(ZOO)


def _check_model(choice: str, folder: str) -> str:
    if choice != LOCAL:
        return choice
    path = Path(folder.strip()).expanduser()
    if not folder.strip():
        raise UserError("give the path of a local model folder")
    if not path.exists():
        raise UserError(f"no such folder: {folder.strip()!r}")
    if not path.is_dir():
        raise UserError(f"{folder.strip()!r} is a file; give a model folder with config.json")
    if not (path / "config.json").is_file():
        raise UserError(f"{folder.strip()!r} has no config.json, so it is not a Hugging Face model folder")
    return str(path.resolve())


def _param_input(det_name: str, p: Any) -> Any:
    key = f"param-{det_name}-{p.name}"
    label = p.name
    if p.item is not None and p.choices:
        return st.multiselect(label, list(p.choices), default=list(p.default), help=p.help, key=key)
    if p.item is not None:
        return st.text_input(f"{label} (comma-separated)", value=p.format(p.default), help=p.help, key=key)
    if p.choices:
        return st.selectbox(label, list(p.choices), index=list(p.choices).index(p.default)
                            if p.default in p.choices else 0, help=p.help, key=key)
    if p.type is bool:
        return st.checkbox(label, value=bool(p.default), help=p.help, key=key)
    if p.type is int:
        return st.number_input(label, value=int(p.default) if p.default is not None else 0, step=1,
                               help=p.help, key=key)
    if p.type is float:
        return st.number_input(label, value=float(p.default) if p.default is not None else 0.0,
                               help=p.help, key=key, format="%g")
    return st.text_input(label, value="" if p.default is None else str(p.default), help=p.help, key=key)


def _start(argv: list[str], label: str, detectors: list[str]) -> None:
    _job, started = jobs.launch(ws, argv, label, detectors)
    st.session_state["jobs_active"] = True
    st.session_state["start-message"] = ("started" if started else "already running") + f": {label}"
    # A full rerun, so the job panel refreshes itself while the job runs.
    time.sleep(0.3)
    st.rerun()


st.subheader("start a run")
if message := st.session_state.pop("start-message", None):
    st.success(message)
try:
    registry = _detectors()
except Exception as exc:  # a broken detector module must not take the page down
    st.error(f"the detector modules could not be loaded: {type(exc).__name__}: {exc}")
    registry = {}

mode = st.radio("what", ["single detector", "scan"], horizontal=True, key="start-mode")
c1, c2 = st.columns(2)
model_choice = c1.selectbox("model", [*_zoo_names(), LOCAL], key="start-model")
folder = c2.text_input("local model folder (with config.json)", key="start-folder",
                       disabled=model_choice != LOCAL)
prefix = st.text_input(
    "prompt prefix", value="auto", key="start-prefix",
    help="the token raw-text prompts start with: auto (the model's document separator, never a "
         "chat-turn marker), none, or a token such as <|endoftext|>",
).strip() or "auto"

c3, c4, c5 = st.columns(3)
device = c3.selectbox("device", ["auto", "cpu", "cuda", "mps"], key="start-device",
                      help="auto: CUDA when present, else the CPU")
dtype = c4.selectbox("dtype", ["float32", "bfloat16", "float16"], key="start-dtype",
                     help="stored with each run; bfloat16 and float32 results never resume into each other")
n_workers = int(c5.number_input("Dask workers (0: this process)", min_value=0, max_value=64, value=0, step=1,
                                key="start-workers", help="units computed on a local Dask cluster of N processes"))


def _placement_args() -> list[str]:
    """--device/--dtype/--workers of the job, checked here first (a device this machine lacks, a
    dtype it cannot run) so that a bad choice is an error on the page, not a failed job."""
    from interp.model.loading import Placement

    Placement.parse(device, dtype)
    return ["--device", device, "--dtype", dtype, *(["--workers", str(n_workers)] if n_workers else [])]


if mode == "single detector" and registry:
    det_name = st.selectbox("detector", list(registry), key="start-detector")
    det = registry[det_name]
    st.caption(det.description)
    with st.form("start-run"):
        values: dict[str, Any] = {}
        files: dict[str, Any] = {}
        for p in det.params:
            if p.type is str and FILE_PARAM.search(p.name):
                files[p.name] = st.file_uploader(
                    f"{p.name}: upload (.jsonl, .json or .csv, at most {uploads.MAX_BYTES // 2**20} MB)",
                    type=list(uploads.EXTENSIONS), key=f"upload-{det_name}-{p.name}", help=p.help,
                )
            values[p.name] = _param_input(det_name, p)
        fresh = st.checkbox("start fresh (do not resume an unfinished run)", key="start-fresh")
        submitted = st.form_submit_button("run")
    if submitted:
        try:
            model = _check_model(model_choice, folder)
            raw = {k: v for k, v in values.items() if not (isinstance(v, str) and v == "")}
            for name, upload in files.items():
                if upload is not None:
                    raw[name] = str(uploads.save_upload(ws, upload.name, upload.getvalue(),
                                                        uploads.required_columns(name)))
            parsed = det.parse_params(raw)
            argv = ["run", det_name, "--model", model, "--prefix", prefix, *_placement_args()]
            for p in det.params:
                if p.name in raw:
                    v = getattr(parsed, p.name)
                    argv += [f"--{p.name.replace('_', '-')}", str(v).lower() if isinstance(v, bool) else p.format(v)]
            if fresh:
                argv.append("--fresh")
            _start(argv, f"{det_name} on {Path(model).name}", [det_name])
        except UserError as exc:
            st.error(str(exc))
elif mode == "scan" and registry:
    default = [n for n, d in registry.items() if d.in_default_scan]
    with st.form("start-scan"):
        # `interp scan` runs each detector with its scan parameters, as on the command line.
        chosen = st.multiselect("detectors (scan parameters)", list(registry), default=default,
                                key="scan-detectors")
        scan_params = [f"{n}: {', '.join(f'{k} {v}' for k, v in d.scan_params.items())}"
                       for n, d in registry.items() if d.scan_params]
        if scan_params:
            st.caption("scan parameters (the rest are the defaults): " + "; ".join(scan_params))
        submitted = st.form_submit_button("scan")
    if submitted:
        try:
            model = _check_model(model_choice, folder)
            if not chosen:
                raise UserError("choose at least one detector")
            _start(["scan", "--model", model, "--prefix", prefix, "--detectors", ",".join(chosen), *_placement_args()],
                   f"scan ({', '.join(chosen)}) on {Path(model).name}", chosen)
        except UserError as exc:
            st.error(str(exc))

st.divider()
st.caption(
    "  \n".join([*page_lines(registry),
                 f"**{CIRCUITS.title}**: {CIRCUITS.shows} — {CIRCUITS.fill}",
                 "**Atlas**: the papers' claims x models and every model's top heads by relative depth "
                 "— `interp atlas`",
                 "Every view reads the store; nothing is recomputed except the live forms."])
)
