"""The Dask executor on real local clusters (no mocks): its runs store what a serial run stores,
it survives a worker killed mid-unit, an interrupted driver resumes, and bad input fails fast.

Every result is compared with an independent serial run in the test process, never with the
Dask run's own output.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import pandas as pd
import pytest
import torch
from distributed import LocalCluster

import interp
from interp.errors import UserError
from interp.model.loaded import LoadedModel
from interp.runs import dask_executor
from interp.runs.clusters import make_executor
from interp.runs.config import DetectorConfig
from interp.runs.dask_executor import DaskExecutor
from interp.runs.executors import Executor
from interp.runs.registry import Detector, get_detector
from interp.runs.runner import run_detector
from interp.runs.schema import SETTINGS_UNIT, TABLES
from interp.runs.store import Store
from interp.runs.units import Task, Unit
from tests.equality import Layout, assert_frames_equal

pytestmark = [pytest.mark.timeout(300), pytest.mark.dask]

N_WORKERS = 2
# What DaskExecutor(workers=N_WORKERS) gives each worker process (1 on this 2-core machine).
WORKER_THREADS = max(1, (os.cpu_count() or 1) // N_WORKERS)
INDUCTION = {"seq_len": 8, "n_prompts": 8, "batch_size": 2}  # 4 units
COPYING = {"seq_len": 8, "n_prompts": 4}  # 2 units
# One unit (the fact), which the causal-trace detector can split by cells.
TRACE = {"prompt": "w5 w9 w17 w23 w40 w41 w7 w8", "subject": "w17 w23 w40", "answer": "w11", "samples": 2,
         "kinds": "state,mlp", "window": 2}


@pytest.fixture(scope="module")
def model(tiny_folder: Path) -> LoadedModel:
    """The driver's model, loaded by name so that it has a spec the workers load again."""
    return interp.load_model(str(tiny_folder))


@pytest.fixture(scope="module")
def dask2(model: LoadedModel) -> Iterator[DaskExecutor]:
    """One local cluster of two worker processes for the module (it takes seconds to start)."""
    assert model.spec is not None
    with DaskExecutor(model.spec, workers=N_WORKERS) as ex:
        assert isinstance(ex, DaskExecutor)
        yield ex


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def serial_run(model: LoadedModel, name: str, params: dict[str, Any], workspace: Path) -> tuple[Store, int]:
    """The reference: the same run computed serially in this process, in its own store."""
    store = Store(workspace)
    # Float reductions can round differently with another number of torch threads; compute
    # with the workers' count so that results can be compared bit for bit.
    with torch_threads(WORKER_THREADS):
        res = run_detector(model, name, params, store, progress=False)
    return store, res.run_id


def stored_tables(store: Store, run_id: int) -> dict[str, pd.DataFrame]:
    """Every table of a run, its rows grouped by unit (a cluster commits units in the order they
    finish), each unit's rows in the order they were written. The rows the runner writes from
    finalize are compared as written: the runner hands finalize the units' rows in the order of
    detector.units(), whatever order they were committed in."""
    return {table: store.to_frame(run_id, table).sort_values("unit", kind="stable").reset_index(drop=True)
            for table in TABLES}


def assert_same_results(store: Store, run_id: int, ref: Store, ref_id: int, layout: Layout = Layout.SAME,
                        skip_units: tuple[str, ...] = ()) -> None:
    """The two runs' stored tables equal as ``layout`` allows (tests/equality.py), but for the
    rows of ``skip_units``."""
    got, want = stored_tables(store, run_id), stored_tables(ref, ref_id)
    assert sum(len(df) for df in want.values()) > 0
    for table in TABLES:
        g, w = (df[~df["unit"].isin(skip_units)].reset_index(drop=True) for df in (got[table], want[table]))
        assert_frames_equal(g, w, layout, obj=table)


def unit_rows(store: Store, run_id: int) -> dict[str, int]:
    """How many rows the units table holds for each unit of a run."""
    with sqlite3.connect(store.path) as con:
        rows = con.execute("SELECT unit, COUNT(*) FROM units WHERE run_id = ? GROUP BY unit", (run_id,)).fetchall()
    return {str(u): int(n) for u, n in rows}


def live_tasks(ex: DaskExecutor) -> list[str]:
    """Keys the scheduler still computes or holds, except erred ones (an exception being
    handled keeps its future alive)."""
    assert ex.client is not None

    def keys(dask_scheduler: Any) -> list[str]:
        return sorted(str(k) for k, ts in dask_scheduler.tasks.items() if ts.state != "erred")

    return cast(list[str], ex.client.run_on_scheduler(keys))


def wait_until(what: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = what()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


class Wrapped(Executor):
    """Passes the Dask executor's units through, calling ``hook(i)`` before yielding the i-th."""

    name = "wrapped"

    def __init__(self, inner: Executor, hook: Callable[[int], None]) -> None:
        super().__init__()
        self.inner, self.hook = inner, hook

    def workers(self) -> int:
        return self.inner.workers()

    def compute(
        self, model: LoadedModel, detector: Detector[Any], cfg: DetectorConfig, tasks: Sequence[Task]
    ) -> Iterator[tuple[Task, Any, float]]:
        # A plain loop, like the runner's: stopping it must cancel the inner run's tasks.
        for i, item in enumerate(self.inner.compute(model, detector, cfg, tasks)):
            self.hook(i)
            yield item


@pytest.mark.parametrize(("name", "params"), [("induction", INDUCTION), ("copying", COPYING)])
def test_dask_run_stores_what_a_serial_run_stores(
    dask2: DaskExecutor, model: LoadedModel, tmp_path: Path, name: str, params: dict[str, Any]
) -> None:
    assert dask2.describe().startswith(f"dask: {N_WORKERS} workers, dashboard http://127.0.0.1:")
    ref, ref_id = serial_run(model, name, params, tmp_path / "serial")
    store = Store(tmp_path / "dask")
    res = run_detector(model, name, params, store, progress=False, executor=dask2)
    assert res.computed_units == len(get_detector(name).units(model, get_detector(name).parse_params(params)))
    assert store.run(res.run_id).status == "done"
    assert_same_results(store, res.run_id, ref, ref_id)
    assert wait_until(lambda: live_tasks(dask2) == [], 10)


def test_one_unit_is_split_over_the_workers(dask2: DaskExecutor, model: LoadedModel, tmp_path: Path) -> None:
    """A run of one unit on two workers: the fact's trace goes out in two parts, each restoring
    half of the cells after recomputing the base run, joined on the driver. Its stored numbers
    equal a serial run's; not bit for bit, since each part batches its cells into other
    forward passes (another batching: Layout.REORDERED)."""
    ref, ref_id = serial_run(model, "causal-trace", TRACE, tmp_path / "serial")
    store = Store(tmp_path / "dask")
    before = dask2.split_units
    res = run_detector(model, "causal-trace", TRACE, store, progress=False, executor=dask2)
    assert dask2.split_units == before + 1
    assert store.run(res.run_id).status == "done"
    assert unit_rows(store, res.run_id).keys() == unit_rows(ref, ref_id).keys()
    assert len(stored_tables(ref, ref_id)["token_layer"]) > 0
    assert_same_results(store, res.run_id, ref, ref_id, Layout.REORDERED)
    assert wait_until(lambda: live_tasks(dask2) == [], 10)


def test_the_printed_dashboard_link_serves_the_dashboard(dask2: DaskExecutor) -> None:
    """The link the CLI prints opens Dask's live dashboard (bokeh comes with the install), not
    the stub page distributed serves without it."""
    import re
    import urllib.request

    line = dask2.describe()
    assert "stub" not in line
    found = re.search(r"dashboard (http://127\.0\.0\.1:\d+/status)", line)
    assert found, line
    with urllib.request.urlopen(found.group(1), timeout=30) as page:
        assert page.status == 200
        html = page.read().decode()
    assert "Bokeh" in html
    assert "task-stream" in html.lower().replace("_", "-")


def test_error_in_a_unit_propagates_and_cancels_the_rest(dask2: DaskExecutor, model: LoadedModel) -> None:
    det = get_detector("induction")
    cfg = det.parse_params(INDUCTION)
    # Batch 999 is no unit of induction: it would hold a negative number of prompts, which
    # raises on the worker.
    units = [Unit("batch", 999), *(Unit("batch", i) for i in range(4))]
    with pytest.raises(RuntimeError, match="negative dimension") as info:
        list(dask2.run_units(model, det, cfg, units))
    assert any("batch-999" in note for note in getattr(info.value, "__notes__", []))
    assert wait_until(lambda: live_tasks(dask2) == [], 10)


def test_worker_with_other_weights_is_refused(dask2: DaskExecutor, model: LoadedModel) -> None:
    other = copy.copy(model)
    other.provenance = dataclasses.replace(model.provenance, file_sha256="0" * 64)
    det = get_detector("induction")
    cfg = det.parse_params(INDUCTION)
    with pytest.raises(UserError, match="is not the driver's"):
        list(dask2.run_units(other, det, cfg, det.units(model, cfg)))


def test_interrupted_driver_resumes(dask2: DaskExecutor, model: LoadedModel, tmp_path: Path) -> None:
    params = {"seq_len": 8, "n_prompts": 12, "batch_size": 2}  # 6 units
    ref, ref_id = serial_run(model, "induction", params, tmp_path / "serial")

    def interrupt(i: int) -> None:
        if i == 2:  # after the runner has committed two units
            raise KeyboardInterrupt

    store = Store(tmp_path / "dask")
    with pytest.raises(KeyboardInterrupt):
        run_detector(model, "induction", params, store, progress=False, executor=Wrapped(dask2, interrupt))
    runs = store.runs()
    assert len(runs) == 1
    assert runs.loc[0, "status"] == "interrupted"
    run_id = int(runs.loc[0, "id"])
    assert len(store.run(run_id).done_units() - {SETTINGS_UNIT}) == 2
    # Nothing of the stopped run goes on computing on the cluster.
    assert wait_until(lambda: live_tasks(dask2) == [], 10)

    res = run_detector(model, "induction", params, store, progress=False, executor=dask2)
    assert res.run_id == run_id
    assert (res.resumed_units, res.computed_units) == (2, 4)
    assert store.run(run_id).status == "done"
    assert_same_results(store, run_id, ref, ref_id)


@pytest.fixture
def gated_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tests/plugins/kill_gate.py installed as a plug-in (an entry point) for this process and the
    worker processes it spawns (they start with its sys.path)."""
    site = tmp_path / "site"
    dist = site / "gated_example-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: gated-example\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[interp.plugins]\nkill-gate = tests.plugins.kill_gate\n")
    monkeypatch.syspath_prepend(str(site))
    return site


def test_worker_killed_mid_unit_is_survived(model: LoadedModel, gated_site: Path, tmp_path: Path) -> None:
    """SIGKILL of the worker process computing a unit, on the event the unit signals as it
    starts (tests/plugins/kill_gate.py writes its process id, then waits): the scheduler sends that
    unit to another worker, where it is computed once, and the run stores what a serial run
    stores. A unit committed although its first worker died before computing anything must have
    been computed again elsewhere."""
    params = {"seq_len": 8, "n_prompts": 12, "batch_size": 2}  # 6 units
    gate = tmp_path / "gate"
    gate.mkdir()
    ref, ref_id = serial_run(model, "induction", params, tmp_path / "serial")
    started = gate / "batch-2.started"
    killed: list[int] = []

    def kill_on_start() -> None:
        while not started.exists() or not started.read_text():
            time.sleep(0.05)  # waiting for the event; the gated unit holds until it is killed
        killed.append(int(started.read_text()))
        os.kill(killed[0], signal.SIGKILL)

    assert model.spec is not None
    with DaskExecutor(model.spec, workers=N_WORKERS) as ex:
        assert ex.client is not None
        worker_pids = set(cast(dict[str, int], ex.client.run(os.getpid)).values())
        killer = threading.Thread(target=kill_on_start, daemon=True)
        killer.start()
        store = Store(tmp_path / "dask")
        res = run_detector(model, "gated-induction", {**params, "gate": str(gate), "gate_unit": "batch-2"}, store,
                           progress=False, executor=ex)
        killer.join()
        # The nanny restarts the killed worker process (it loads the model again).
        ex.client.wait_for_workers(N_WORKERS, timeout=60)
    assert killed[0] in worker_pids  # a worker of the cluster was computing the gated unit
    assert store.run(res.run_id).status == "done"
    assert res.computed_units == 6
    stored = unit_rows(store, res.run_id)
    assert stored == unit_rows(ref, ref_id)
    assert set(stored.values()) == {1}
    assert_same_results(store, res.run_id, ref, ref_id, skip_units=(SETTINGS_UNIT,))


def test_joining_a_running_scheduler(dask2: DaskExecutor, model: LoadedModel, tmp_path: Path) -> None:
    assert dask2.cluster is not None
    assert dask2.client is not None
    assert model.spec is not None
    ref, ref_id = serial_run(model, "induction", INDUCTION, tmp_path / "serial")

    def plugins(dask_worker: Any) -> list[str]:
        return sorted(dask_worker.plugins)

    before = dask2.client.run(plugins)
    with DaskExecutor(model.spec, scheduler=dask2.cluster.scheduler_address) as joined:
        assert joined.describe().startswith(f"dask: {N_WORKERS} workers, dashboard http://127.0.0.1:")
        store = Store(tmp_path / "dask")
        res = run_detector(model, "induction", INDUCTION, store, progress=False, executor=joined)
    assert_same_results(store, res.run_id, ref, ref_id)
    # Leaving a cluster it did not start frees the model it loaded there, and nothing else.
    client = dask2.client
    assert wait_until(lambda: client.run(plugins) == before, 10)
    assert dask2.client.submit(sum, [1, 2], pure=False).result() == 3


def test_scheduler_without_workers(model: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    assert model.spec is not None
    monkeypatch.setattr(dask_executor, "WORKERS_TIMEOUT_S", 1)
    empty = LocalCluster(n_workers=0, processes=False, protocol="tcp://", host="127.0.0.1",
                         dashboard_address="127.0.0.1:0")
    try:
        with pytest.raises(UserError, match=r"^the Dask scheduler at .* has no workers after 1 s") as info:
            DaskExecutor(model.spec, scheduler=empty.scheduler_address)
    finally:
        empty.close()
    assert "\n" not in str(info.value)


def test_bad_input_fails_fast(model: LoadedModel) -> None:
    assert model.spec is not None
    with pytest.raises(UserError, match="--workers must be >= 1"):
        make_executor(workers=0, spec=model.spec)
    with pytest.raises(UserError) as info:
        DaskExecutor(model.spec, scheduler="tcp://127.0.0.1:1")
    msg = str(info.value)
    assert msg.startswith("cannot reach the Dask scheduler at tcp://127.0.0.1:1: ")
    assert "\n" not in msg


def test_cli_scan_with_workers_stores_what_a_serial_scan_stores(
    tiny_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`interp scan --workers 2` end to end: it starts its own local cluster, prints where the
    units run, and its stored tables equal those of the same scan without --workers."""
    from tests.tiny import run_cli

    args = ["scan", "-m", str(tiny_folder), "-d", "induction,copying", "--json", "--device", "cpu"]
    with torch_threads(WORKER_THREADS):
        code, _, err = run_cli(capsys, [*args, "-w", str(tmp_path / "serial")])
    assert code == 0, err
    code, _, err = run_cli(capsys, [*args, "-w", str(tmp_path / "dask"), "--workers", "2"])
    assert code == 0, err
    assert "units computed on dask: 2 workers, dashboard http://127.0.0.1:" in err, err
    with Store(tmp_path / "serial") as a, Store(tmp_path / "dask") as b:
        ra, rb = a.runs().sort_values("id"), b.runs().sort_values("id")
        assert list(ra["detector"]) == list(rb["detector"]) == ["induction", "copying"]
        assert list(rb["status"]) == ["done", "done"]
        for ida, idb in zip(ra["id"], rb["id"], strict=True):
            assert_same_results(b, int(idb), a, int(ida))


def test_workers_do_not_rerun_a_script_installed_as_main(
    model: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Streamlit installs each page as ``__main__`` (its test harness leaves it there), and
    spawned processes re-run ``__main__``'s file: a cluster started from such a process must not
    run that script in its workers."""
    import sys
    import types

    script = tmp_path / "page.py"
    script.write_text("raise SystemExit('this page ran inside a Dask worker')\n")
    fake = types.ModuleType("__main__")
    fake.__file__ = str(script)
    monkeypatch.setitem(sys.modules, "__main__", fake)
    assert model.spec is not None
    with DaskExecutor(model.spec, workers=1) as ex, Store(tmp_path / "ws") as store:
        result = run_detector(model, "copying", COPYING, store, progress=False, executor=ex)
        assert store.run(result.run_id).status == "done"
    assert sys.modules["__main__"] is fake  # put back
