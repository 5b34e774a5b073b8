"""Run a registered detector on a model through the results store, unit by unit.

Each finished unit is committed in its own transaction, so Ctrl-C or kill -9 loses at most
the unit in flight; rerunning the same detector with the same parameters resumes the run and
skips the committed units.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from interp.model import LoadedModel
from interp.registry import Detector, Summary, UnitResult, get_detector
from interp.store import Run, Store, code_version

FINAL_UNIT = "final"
TABLES = ("head_scores", "token_layer", "curves", "metrics", "artifacts")


@dataclass
class RunResult:
    run_id: int
    summary: Summary
    resumed_units: int
    computed_units: int
    seconds: float


def run_detector(
    model: LoadedModel,
    detector_name: str,
    raw_params: Mapping[str, Any],
    store: Store,
    *,
    resume: bool = True,
    progress: bool = True,
) -> RunResult:
    """Validate parameters, open (or resume) a run, compute missing units, finalize."""
    detector = get_detector(detector_name)
    params = detector.parse_params(raw_params)
    # Validation (units() raises UserError on bad parameters) happens before the store is
    # touched, so bad input never leaves a half-written run behind.
    units = detector.units(model, params)
    run: Run = store.start_run(
        model=model.name,
        model_hash=model.provenance.file_sha256 or "",
        detector=detector.name,
        variant=detector.variant(params),
        params=params,
        dataset_hash=detector.dataset_hash(model, params),
        seed=params.get("seed"),
        code_version=code_version(),
        provenance=model.provenance.to_dict(),
        resume=resume,
    )
    started = time.perf_counter()
    with run.guard():
        done = run.done_units() - {FINAL_UNIT}
        todo = [u for u in units if u not in done]
        bar = tqdm(
            total=len(units),
            initial=len(units) - len(todo),
            desc=f"{detector.name} on {model.name}",
            unit="unit",
            file=sys.stderr,
            disable=not progress,
        )
        with bar:
            for unit in todo:
                t0 = time.perf_counter()
                result = detector.run_unit(model, params, unit)
                run.commit_unit(unit, result, time.perf_counter() - t0)
                bar.update(1)
        results = {
            table: _without_final(run.results(table)) for table in TABLES
        }
        summary = detector.finalize(model, params, results)
        run.commit_unit(FINAL_UNIT, UnitResult(tables=summary.tables), 0.0)
        if summary.warnings:
            run.commit_unit(
                "warnings",
                UnitResult(tables={"artifacts": pd.DataFrame({"name": ["warnings"], "json": [_json(summary.warnings)]})}),
                0.0,
            )
        run.finish("done")
    return RunResult(
        run_id=run.id,
        summary=summary,
        resumed_units=len(units) - len(todo),
        computed_units=len(todo),
        seconds=time.perf_counter() - started,
    )


def run_in_memory(
    model: LoadedModel, detector: Detector, params: Mapping[str, Any]
) -> tuple[Summary, dict[str, pd.DataFrame]]:
    """Run a detector's units and finalize without a store (notebooks, tests, one detector
    feeding another). ``params`` are already parsed. Returns the summary and the units'
    concatenated tables, each row tagged with its unit."""
    parts: dict[str, list[pd.DataFrame]] = {}
    for unit in detector.units(model, params):
        for table, frame in detector.run_unit(model, params, unit).tables.items():
            parts.setdefault(table, []).append(frame.assign(unit=unit))
    results = {t: pd.concat(frames, ignore_index=True) for t, frames in parts.items()}
    return detector.finalize(model, params, results), results


def _without_final(df: pd.DataFrame) -> pd.DataFrame:
    if "unit" not in df.columns:
        return df
    keep = ~df["unit"].isin([FINAL_UNIT, "warnings"])
    return pd.DataFrame(df.loc[keep]).reset_index(drop=True)


def _json(obj: Any) -> str:
    import json

    return json.dumps(obj)
