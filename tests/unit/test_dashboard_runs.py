"""The dashboard's runs: which page lists a run (its detector's declared output, never its name),
a job's progress read from the store (units committed of the run's total), and the very first
run started from the Home page of a workspace that has no store yet. Streamlit AppTest on real
stores, real jobs (detached CLI processes) and tiny models.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from app import jobs
from app.routing import PAGES, Route, run_url
from circuits.detectors.induction import InductionDetector
from interp.runs import registry
from interp.runs.runner import run_detector
from interp.runs.store import DB_NAME, Store
from tests.plugins import install
from tests.tiny import loaded

APP = Path(__file__).resolve().parents[2] / "app"
PARAMS = {"seq_len": 4, "n_prompts": 2, "batch_size": 1}
# Each page's file and the key of the selectbox that lists its runs.
RUN_LISTS = {
    "Head maps": ("pages/1_Head_maps.py", "hm-run"),
    "Causal tracing": ("pages/2_Causal_tracing.py", "ct-run"),
    "Conflicts": ("pages/3_Conflicts.py", "cf-run"),
}


def _app(page: str, **query: Any) -> Any:
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(APP / page), default_timeout=120)
    for k, v in query.items():
        at.query_params[k] = str(v)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _listed(at: Any, key: str) -> set[int]:
    """The run ids a page's run selectbox offers (labels "#id detector · model · status"; none
    when the page says it has no runs)."""
    boxes = [b for b in at.selectbox if b.key == key]
    return {int(str(o).split()[0].removeprefix("#")) for o in boxes[0].options} if boxes else set()


def _running(ws: Path, job_id: str) -> bool:
    job = jobs.get_job(ws, job_id)
    return job is not None and job.active


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


# -- routing by output ----------------------------------------------------------------------------


class _ConflictMemoryTracer(InductionDetector):
    """A head detector whose name holds every word the pages once routed by (conflict, memory,
    trac...): it belongs on Head maps only."""

    name = "conflict-memory-tracer"


class _Plain(InductionDetector):
    """A detector with a plain name that declares it studies knowledge conflicts."""

    name = "plain-probe"
    output = "metrics"
    knowledge_conflict = True


class _Layers(InductionDetector):
    """A detector with a plain name whose declared output is a token x layer table."""

    name = "layer-probe"
    output = "token_layer"


class _Sink(InductionDetector):
    """A plug-in's intervention with a name none of the pages knows."""

    name = "sink-ablation"
    output = "intervention"
    scan_params: ClassVar[dict[str, Any]] = {}


PROBES = (_ConflictMemoryTracer, _Plain, _Layers, _Sink)


@pytest.fixture
def probes(monkeypatch: pytest.MonkeyPatch) -> None:
    registry.all_detectors()  # discover first, so the probes join a full registry
    for cls in PROBES:
        monkeypatch.setitem(registry._REGISTRY, cls.name, cls)  # pyright: ignore[reportPrivateUsage]


def test_pages_list_runs_by_declared_output_not_by_name(
    probes: None, tiny_llama_hf: torch.nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INTERP_WORKSPACE", str(tmp_path))
    with Store(tmp_path) as s:
        ids = {cls.name: run_detector(loaded(copy.deepcopy(tiny_llama_hf)), cls.name, PARAMS, s, progress=False).run_id
               for cls in PROBES}
    want = {
        "Head maps": {ids["conflict-memory-tracer"]},
        "Causal tracing": {ids["layer-probe"]},
        "Conflicts": {ids["plain-probe"], ids["sink-ablation"]},
    }
    for page, (file, key) in RUN_LISTS.items():
        assert _listed(_app(file), key) == want[page], page
    # Compare lists every detector; the Atlas's links open the page of the run's route.
    compare = _app("pages/4_Compare.py").selectbox(key="cmp-detector")
    assert set(compare.options) == {cls.name for cls in PROBES}
    assert run_url(Route("head_scores"), 7) == "./Head_maps?run=7"
    assert run_url(Route("metrics", knowledge_conflict=True), 7) == "./Conflicts?run=7"
    assert run_url(Route("curves"), 7) == "./?run=7"
    # The declaration the pages filter with, as the Home page's caption reads it.
    routes = {cls.name: Route.of(cls) for cls in PROBES}
    assert PAGES["Head maps"].detectors(routes) == ["conflict-memory-tracer"]


# -- progress from the store ----------------------------------------------------------------------


@pytest.fixture
def gated_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """tests/plugins/gated.py installed for the jobs' processes only (an ``interp.plugins`` entry
    point in a dist-info folder on their PYTHONPATH): this process does not know the detector."""
    site = install(tmp_path / "site", "gated-plugin", "tests.plugins.gated")
    # The repository too: the entry point names tests.plugins.gated, and a job runs from its
    # workspace, where ``tests`` is not importable (a clean clone has no other path to it).
    repo = str(Path(__file__).resolve().parents[2])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), repo, os.environ.get("PYTHONPATH", "")]))
    assert "gated-memory-tracer" not in registry.all_detectors()


def _own_units(ws: Path) -> list[int]:
    """The gated run's committed units named unit-i (the runner's own units aside), by name."""
    if not (ws / DB_NAME).is_file():
        return []
    with Store(ws, create=False) as s:
        runs = s.runs()
        if runs.empty:
            return []
        return sorted(int(u.removeprefix("unit-")) for u in s.run(int(runs["id"].iloc[0])).done_units()
                      if u.startswith("unit-"))


@pytest.mark.subprocess
def test_a_jobs_progress_is_its_units_committed_of_the_total(
    gated_plugin: None, tiny_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ws, gate = tmp_path / "ws", tmp_path / "gate"
    monkeypatch.setenv("INTERP_WORKSPACE", str(ws))
    argv = ["run", "gated-memory-tracer", "--model", str(tiny_folder), "--n-units", "5", "--open-units", "2",
            "--gate", str(gate)]
    job, started = jobs.launch(ws, argv, "gated", ["gated-memory-tracer"])
    assert started
    try:
        # The job stops after committing units 0 and 1 until the gate opens.
        _wait_for(lambda: _own_units(ws) == [0, 1] or not _running(ws, job.id), "two committed units")
        assert _own_units(ws) == [0, 1], jobs.get_job(ws, job.id)
        home = _app("Home.py")
        bars = [(e.proto.value, e.proto.text) for e in home.get("progress")]
        assert bars == [(40, "gated-memory-tracer (run #1): 2/5 units")]
        # This process does not know the detector: the run's settings route it to Head maps,
        # whose header shows the same count.
        heads = _app("pages/1_Head_maps.py", run=1)
        assert [m.value for m in heads.metric if m.label == "units"] == ["2/5"]
    finally:
        gate.touch()
    _wait_for(lambda: not _running(ws, job.id), "the job's end")
    done = jobs.get_job(ws, job.id)
    assert done is not None
    assert done.status == "done", done.error
    assert _own_units(ws) == [0, 1, 2, 3, 4]
    heads = _app("pages/1_Head_maps.py", run=1)
    assert [m.value for m in heads.metric if m.label == "units"] == ["5/5"]


# -- the first run, from a workspace without a store ----------------------------------------------


@pytest.mark.subprocess
def test_the_first_scan_starts_from_the_home_page_of_a_new_workspace(
    tiny_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ws = tmp_path / "new"
    monkeypatch.setenv("INTERP_WORKSPACE", str(ws))
    at = _app("Home.py")
    assert any("first run creates" in i.value for i in at.info), [i.value for i in at.info]
    assert not ws.exists(), "rendering the page created the workspace"
    # Every other page says where to start, and creates nothing either.
    for file, _key in RUN_LISTS.values():
        page = _app(file)
        assert any("start one on the Home page" in i.value for i in page.info), file
    assert not ws.exists()

    at.radio(key="start-mode").set_value("scan").run()
    at.selectbox(key="start-model").set_value("local folder...").run()
    at.text_input(key="start-folder").input(str(tiny_folder)).run()
    at.multiselect(key="scan-detectors").set_value(["induction"])  # a form's widget: sent with the submit
    next(b for b in at.button if b.label == "scan").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    assert any("started: scan (induction)" in s.value for s in at.success)
    [job] = jobs.list_jobs(ws)
    assert job.detectors == ("induction",)
    _wait_for(lambda: not _running(ws, job.id), "the scan's end")
    done = jobs.get_job(ws, job.id)
    assert done is not None
    assert done.status == "done", done.error
    with Store(ws, create=False) as s:
        runs = s.runs()
    assert list(runs["detector"]) == ["induction"]
    assert list(runs["status"]) == ["done"]
    home = _app("Home.py")
    assert not any("no runs stored yet" in i.value for i in home.info)
    assert any("finished" in s.value for s in home.success)
