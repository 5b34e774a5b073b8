"""The atlas as a run of the workspace's results store, and reading it back.

One ``interp atlas`` call is one run of the pseudo-detector ``atlas`` (no registered detector has
that name): its model is the ``--models`` list as the command takes it, its parameters the models,
detectors, k of the top-k sets and prompt-prefix choice, its dtype in the provenance (both enter
the run's key). The run is started before the first model loads, so ``interp runs`` shows it
running and a Ctrl-C or a crash marks it interrupted or failed (the store's run guard); it is
finished only after its result is committed, in one unit (the runner's ``final`` unit):

- one ``artifacts`` row named :data:`CLAIM` per claim, its JSON document the claim as ``--json``
  prints it (id, short title, text, detectors, and per model the verdict, value and detail);
- one ``artifacts`` row named :data:`DOCUMENT`: the whole document ``--json`` prints.

Its ``settings`` artifact declares the output ``atlas``, which no page of the dashboard but the
Atlas page takes, so the run never shows among the head detectors' runs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from interp.errors import UserError
from interp.runs import tables
from interp.runs.registry import UnitResult
from interp.runs.run_keys import code_version
from interp.runs.schema import FINAL_UNIT, SETTINGS_UNIT
from interp.runs.store import Run, Store

DETECTOR = "atlas"
OUTPUT = "atlas"
DOCUMENT = "atlas"
CLAIM = "claim"


def plain(o: Any) -> Any:
    """numpy scalars (metrics) as plain numbers, as the other commands' --json writes them."""
    return o.item() if hasattr(o, "item") else str(o)


def to_json(value: Any) -> str:
    """A document as ``interp atlas --json`` writes it."""
    return json.dumps(value, default=plain)


def variant(detectors: Sequence[str], default: Sequence[str]) -> str:
    """The run's variant: ``default`` for the default detector set, else the detectors."""
    return "default" if list(detectors) == list(default) else ",".join(detectors)


def start_atlas(
    store: Store, models: Sequence[str], detectors: Sequence[str], default: Sequence[str], *,
    top: int, prefix: str, dtype: str, resume: bool,
) -> Run:
    """Open the atlas run (an interrupted one of the same key is resumed unless ``resume`` is
    False; a finished one never is: each call writes its own atlas) with its settings."""
    params = {"models": list(models), "detectors": list(detectors), "top": top, "prefix": prefix}
    run = store.start_run(
        model=",".join(models), model_hash=None, detector=DETECTOR, variant=variant(detectors, default),
        params=params, dataset_hash=None, seed=None, code_version=code_version(),
        provenance={"dtype": dtype}, resume=resume,
    )
    doc = {"variant": variant(detectors, default), "params": params, "output": OUTPUT, "n_units": 0,
           "method": "the detectors' runs on every model, their top heads, overlaps and the papers' claims"}
    with run.guard():
        run.commit_unit(SETTINGS_UNIT, UnitResult(tables={"artifacts": tables.artifact("settings", doc)}), 0.0)
    return run


def finish_atlas(run: Run, doc: Mapping[str, Any]) -> None:
    """Commit the atlas's claims and document in one unit, then mark the run done."""
    rows = [(CLAIM, to_json(claim)) for claim in doc["claims"]] + [(DOCUMENT, to_json(doc))]
    run.commit_unit(FINAL_UNIT, UnitResult(tables={"artifacts": tables.frame("artifacts", rows)}), 0.0)
    run.finish("done")


@dataclass(frozen=True)
class StoredAtlas:
    """A finished atlas run: its id and time, the document ``--json`` printed, and its claims as
    the store's claim rows hold them."""

    run_id: int
    created_at: str
    document: dict[str, Any]
    claims: list[dict[str, Any]]


def read_atlas(store: Store, run_id: int) -> StoredAtlas:
    """The atlas of a finished atlas run; UserError for any other run."""
    info = store.run(run_id).info()
    if info["detector"] != DETECTOR or info["status"] != "done":
        raise UserError(f"run {run_id} is not a finished atlas run ({info['detector']}, {info['status']})")
    frame = store.run(run_id).to_frame("artifacts", unit=FINAL_UNIT)
    doc = tables.read_artifact(frame, DOCUMENT)
    if not isinstance(doc, dict):
        raise UserError(f"atlas run {run_id} has no document")
    claims = [json.loads(text) for name, text in zip(frame["name"], frame["json"], strict=True) if name == CLAIM]
    return StoredAtlas(run_id, str(info["created_at"]), doc, claims)


def latest_atlas(store: Store) -> StoredAtlas | None:
    """The newest finished atlas run of the store, or None."""
    runs = store.runs()
    ids = [int(i) for i, det, status in zip(runs["id"], runs["detector"], runs["status"], strict=True)
           if det == DETECTOR and status == "done"]
    return read_atlas(store, max(ids)) if ids else None
