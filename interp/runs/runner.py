"""Run a registered detector on a model through the results store, unit by unit.

Each finished unit is committed in its own transaction, so Ctrl-C or kill -9 loses at most
the unit in flight; rerunning the same detector with the same parameters resumes the run and
skips the committed units.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from interp.errors import UserError
from interp.model.loaded import LoadedModel
from interp.runs import tables
from interp.runs.config import DetectorConfig
from interp.runs.executors import Executor, SerialExecutor
from interp.runs.registry import Detector, Summary, UnitResult, get_detector
from interp.runs.run_keys import code_version, key_context, run_key
from interp.runs.schema import FINAL_UNIT, SETTINGS_UNIT, TABLES, WARNINGS_UNIT
from interp.runs.store import Run, Store
from interp.runs.units import Unit


@dataclass
class RunResult:
    run_id: int
    summary: Summary
    resumed_units: int
    computed_units: int
    seconds: float
    # A finished run found in the store (find_or_run): its summary re-made from the stored units.
    reused: bool = False


def run_detector(
    model: LoadedModel,
    detector_name: str,
    raw_params: Mapping[str, Any],
    store: Store,
    *,
    resume: bool = True,
    progress: bool = True,
    executor: Executor | None = None,
) -> RunResult:
    """Validate parameters, open (or resume) a run, compute missing units, finalize.

    ``executor`` computes the units (default: serially in this process); whatever computes
    them, this process alone commits each result to the store as it arrives."""
    detector = get_detector(detector_name)
    cfg = detector.parse_params(raw_params)
    # Validation (units() raises UserError on bad parameters) happens before the store is
    # touched, so bad input never leaves a half-written run behind.
    units = detector.units(model, cfg)
    run = _open_run(model, detector, cfg, store, resume)
    started = time.perf_counter()
    with run.guard():
        done = run.done_units() - {FINAL_UNIT, SETTINGS_UNIT}
        todo = [u for u in units if u.key not in done]
        if SETTINGS_UNIT not in run.done_units():
            run.commit_unit(SETTINGS_UNIT, settings(detector, cfg, len(units)), 0.0)
        desc = f"{detector.name} on {model.name}"
        with tqdm(total=len(units), initial=len(units) - len(todo), desc=desc, unit="unit", file=sys.stderr,
                  disable=not progress) as bar:
            _commit_units(run, (executor or SerialExecutor()).run_units(model, detector, cfg, todo), todo, bar)
        summary = finalized(model, detector, cfg, {table: unit_rows(run.results(table), units) for table in TABLES})
        run.commit_unit(FINAL_UNIT, UnitResult(tables=summary.tables), 0.0)
        if summary.warnings:
            run.commit_unit(
                WARNINGS_UNIT, UnitResult(tables={"artifacts": tables.artifact("warnings", summary.warnings)}), 0.0
            )
        run.finish("done")
    return RunResult(run_id=run.id, summary=summary, resumed_units=len(units) - len(todo),
                     computed_units=len(todo), seconds=time.perf_counter() - started)


def _open_run(model: LoadedModel, detector: Detector[Any], cfg: DetectorConfig, store: Store, resume: bool) -> Run:
    """A new run of the store, or the interrupted one with the same key (``resume``)."""
    return store.start_run(
        model=model.name,
        model_hash=model.provenance.file_sha256 or "",
        detector=detector.name,
        variant=detector.variant(cfg),
        params=cfg.to_dict(),
        dataset_hash=detector.dataset_hash(model, cfg),
        seed=cfg.get("seed"),
        code_version=code_version(),
        provenance=model.provenance.to_dict(),
        resume=resume,
        identity=lambda stored: _identity(detector, stored),
    )


def _commit_units(run: Run, computed: Iterable[tuple[Unit, UnitResult, float]], todo: Sequence[Unit], bar: Any) -> None:
    """Commit each unit as the executor yields it, once; every unit of ``todo`` must come."""
    committed: set[Unit] = set()
    for unit, result, seconds in computed:
        if unit in committed:  # an executor must not yield a unit twice; never store it twice
            continue
        run.commit_unit(unit.key, result, seconds)
        committed.add(unit)
        bar.update(1)
    missing = [u for u in todo if u not in committed]
    if missing:
        raise RuntimeError(f"the executor returned without units {missing[:5]}")


def run_key_of(model: LoadedModel, detector: Detector[Any], cfg: DetectorConfig) -> str:
    """The store key of a run of ``detector`` with ``cfg`` on ``model``: what a run is (the
    model's weights, prompt prefix and dtype, the detector, variant, parameters, data, seed)."""
    return run_key(model=model.name, model_hash=model.provenance.file_sha256 or "", detector=detector.name,
                   variant=detector.variant(cfg), params=cfg.to_dict(), dataset_hash=detector.dataset_hash(model, cfg),
                   seed=cfg.get("seed"), **key_context(model.provenance.to_dict()))


def find_run(model: LoadedModel, detector_name: str, raw_params: Mapping[str, Any], store: Store) -> RunResult | None:
    """The finished run of this detector with these parameters on this model in ``store`` (same
    key: weights, prompt prefix, dtype, variant, parameters, data, seed), its summary re-made
    from the stored units without recomputing any; None when there is none."""
    detector = get_detector(detector_name)
    cfg = detector.parse_params(raw_params)
    run = store.find_run(run_key_of(model, detector, cfg), "done")
    if run is None:
        return None
    t0 = time.perf_counter()
    units = detector.units(model, cfg)
    summary = finalized(model, detector, cfg, {t: unit_rows(run.results(t), units) for t in TABLES})
    return RunResult(run_id=run.id, summary=summary, resumed_units=len(units), computed_units=0,
                     seconds=time.perf_counter() - t0, reused=True)


def find_latest(
    model: LoadedModel,
    detector_name: str,
    store: Store,
    where: Mapping[str, Any] | None = None,
    prefer: Mapping[str, Any] | None = None,
) -> RunResult | None:
    """The newest finished run of this detector on ``model`` in ``store`` whose parameters agree
    with ``where`` (the others free), preferring one that also agrees with ``prefer``; its summary
    re-made from the stored units (:func:`find_run`); None when there is none.

    A stored run is this model's when its key is the key this model (weights, prompt prefix,
    dtype) gives the run's own parameters today, so a run of other weights or another prefix
    never counts, and neither does one whose parameters no longer parse."""
    detector = get_detector(detector_name)

    def given(values: Mapping[str, Any] | None) -> dict[str, Any]:
        return {k: v for k, v in detector.parse_params(values or {}).to_dict().items() if k in (values or {})}

    want, better = given(where), given(prefer)
    runs = store.runs()
    fallback: dict[str, Any] | None = None
    for row in pd.DataFrame(runs[(runs["detector"] == detector_name) & (runs["status"] == "done")]).to_dict("records"):
        params = json.loads(str(row["params_json"])) if row["params_json"] else {}
        if any(params.get(k) != v for k, v in want.items()):
            continue
        try:
            cfg = detector.parse_params(params)
        except UserError:
            continue
        if run_key_of(model, detector, cfg) != row["key"]:
            continue
        if all(params.get(k) == v for k, v in better.items()):
            return find_run(model, detector_name, params, store)
        fallback = fallback or params
    return None if fallback is None else find_run(model, detector_name, fallback, store)


def find_or_run(
    model: LoadedModel,
    detector_name: str,
    raw_params: Mapping[str, Any],
    store: Store,
    *,
    accept: Sequence[Mapping[str, Any]] = (),
    progress: bool = True,
    executor: Executor | None = None,
) -> RunResult:
    """The finished run of this detector with ``raw_params`` on ``model`` (:func:`find_run`),
    else the first finished run with one of the parameter sets in ``accept`` (alternatives the
    caller takes as well, in order of preference), else a run now (resumed where one was
    interrupted), stored. The result says which (``reused``, ``run_id``)."""
    for params in (raw_params, *accept):
        found = find_run(model, detector_name, params, store)
        if found is not None:
            return found
    return run_detector(model, detector_name, raw_params, store, progress=progress, executor=executor)


def run_in_memory(
    model: LoadedModel, detector: Detector[Any], params: Mapping[str, Any] | DetectorConfig
) -> tuple[Summary, dict[str, pd.DataFrame]]:
    """Run a detector's units and finalize without a store (notebooks, tests, one detector
    feeding another). ``params`` is its config, or raw values to parse. Returns the summary and
    the units' concatenated tables, each row tagged with its unit."""
    cfg = detector.parse_params(params)
    parts: dict[str, list[pd.DataFrame]] = {}
    for unit in detector.units(model, cfg):
        for table, frame in detector.run_unit(model, cfg, unit).tables.items():
            parts.setdefault(table, []).append(frame.assign(unit=unit.key))
    results = {t: pd.concat(frames, ignore_index=True) for t, frames in parts.items()}
    return finalized(model, detector, cfg, results), results


def finalized(
    model: LoadedModel, detector: Detector[Any], cfg: DetectorConfig, results: Mapping[str, pd.DataFrame]
) -> Summary:
    """The detector's summary of its units' tables, with its name and the run's variant, and its
    intervals in its final ``metrics`` table (:func:`interp.runs.tables.with_intervals`)."""
    summary = detector.finalize(model, cfg, results)
    return dataclasses.replace(summary, detector=detector.name, variant=detector.variant(cfg),
                               tables=tables.with_intervals(summary.tables, summary.intervals))


def settings(detector: Detector[Any], cfg: DetectorConfig, n_units: int) -> UnitResult:
    """The ``settings`` artifact of a run: its variant slug, what that means in words, the
    parameters as typed values, its declared output and its number of units (the dashboard's
    progress: committed units of that total)."""
    doc = {"variant": detector.variant(cfg), "method": detector.method_text(cfg), "params": cfg.to_dict(),
           "output": detector.output, "n_units": n_units}
    return UnitResult(tables={"artifacts": tables.artifact("settings", doc)})


def _identity(detector: Detector[Any], stored_params: Mapping[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """(variant, params) of a run stored by an older version, as this version writes them; None
    when today's config no longer accepts its parameters (it cannot be resumed then)."""
    try:
        cfg = detector.parse_params(stored_params)
    except UserError:
        return None
    return detector.variant(cfg), cfg.to_dict()


def unit_rows(df: pd.DataFrame, units: Sequence[Unit]) -> pd.DataFrame:
    """A table's rows written by the detector's units (not the final, warnings and settings rows
    the runner adds), in the order of ``units``: a cluster commits units as they finish, and a
    finalize that sums in row order must see the same order as after a serial run."""
    if "unit" not in df.columns:
        return df
    keep = pd.DataFrame(df.loc[~df["unit"].isin([FINAL_UNIT, WARNINGS_UNIT, SETTINGS_UNIT])])
    position = {u.key: i for i, u in enumerate(units)}
    order = keep["unit"].map(lambda u: position.get(u, len(position)))
    return pd.DataFrame(keep.iloc[order.argsort(kind="stable")]).reset_index(drop=True)
