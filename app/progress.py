"""How far a run is, read from the store: its committed units against the number of units the
runner recorded in the run's ``settings`` artifact when it started the run; and the runs a
background job of the dashboard is writing.

The store is the one record of progress (the CLI's progress bar is for a terminal): a unit is
done once committed, whichever process or Dask worker computed it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import pandas as pd

from interp.runs import tables
from interp.runs.schema import RESERVED_UNITS, SETTINGS_UNIT

if TYPE_CHECKING:
    from app.jobs import Job
    from interp.runs.store import Store


def run_settings(store: Store, run_id: int) -> dict[str, Any]:
    """The run's settings artifact (variant, method, params, output, n_units), {} when it has none
    (a run stored by hand, or before the runner wrote one)."""
    frame = store.run(run_id).to_frame("artifacts", unit=SETTINGS_UNIT)
    doc = None
    with contextlib.suppress(TypeError, ValueError):
        doc = tables.read_artifact(frame, "settings")
    return dict(doc) if isinstance(doc, Mapping) else {}


@dataclass(frozen=True)
class RunProgress:
    """One run's units: ``done`` committed of ``total`` (None when the run did not record its
    total: stored before the runner wrote it)."""

    run_id: int
    detector: str
    status: str
    done: int
    total: int | None

    @property
    def fraction(self) -> float:
        if self.status == "done":
            return 1.0
        return min(1.0, self.done / self.total) if self.total else 0.0

    @property
    def text(self) -> str:
        units = f"{self.done}/{self.total} units" if self.total is not None else f"{self.done} units"
        return f"{self.detector} (run #{self.run_id}): {units}" + ("" if self.status == "running" else f", {self.status}")


def run_progress(store: Store, run_id: int, detector: str, status: str) -> RunProgress:
    """The progress of one stored run: its committed units (the runner's reserved units aside)
    of the total its settings recorded."""
    done = len(store.run(run_id).done_units() - set(RESERVED_UNITS))
    total = run_settings(store, run_id).get("n_units")
    return RunProgress(run_id, detector, status, done, int(total) if isinstance(total, int) else None)


def _timestamp(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def job_progress(store: Store, job: Job) -> list[RunProgress]:
    """The progress of each run the job has written, in the order of the job's detectors: the
    runs of those detectors started, resumed or committed to since the job started.

    The job and its runs are linked by detector and time (the CLI does not know about jobs):
    another process writing a run of the same detector at the same time would show here too."""
    runs = store.runs()
    if runs.empty or not job.detectors:
        return []
    mine = runs[runs["detector"].isin(list(job.detectors))
                & (runs["updated_at"].map(_timestamp) >= job.started_at)]
    order = {name: i for i, name in enumerate(job.detectors)}
    rows = sorted(pd.DataFrame(mine).to_dict("records"), key=lambda r: (order[str(r["detector"])], int(r["id"])))
    return [run_progress(store, int(r["id"]), str(r["detector"]), str(r["status"])) for r in rows]
