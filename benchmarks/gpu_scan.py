"""Benchmark: the default scan (``interp scan``'s detectors with their scan parameters) on the GPU
against the CPU, on the same model, in one process.

Each device loads the model from the same folder and runs every detector of the default scan
into a fresh store; per detector, the stored head scores of the two devices are compared (max
absolute difference, and whether the top-10 heads agree) before the times are reported.
Detectors the model cannot run (random weights know no facts: causal tracing and the conflict
detectors find no items) are reported as skipped, with their one-line reason.

    python -m benchmarks.gpu_scan --model smollm2-135m --random-init

``--random-init`` builds random weights from ``.gpu/<model>/config.json`` (for the GPU machine,
where real weights cannot travel). Prints a JSON line per detector as it ends, then the whole report.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks._common import emit, random_init_folder


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--devices", default="cuda,cpu", help="devices to time, the first is the reference")
    p.add_argument("--detectors", default="", help="comma-separated (default: the default scan)")
    p.add_argument("--random-init", action="store_true")
    return p.parse_args()


def _run(model: Any, name: str, store: Any) -> dict[str, Any]:
    """One detector's scan run on ``model``: its time and stored numbers, or why it was skipped."""
    from interp.errors import UserError
    from interp.runs.registry import get_detector
    from interp.runs.runner import run_detector

    params = type(get_detector(name)).scan_params
    t0 = time.perf_counter()
    try:
        result = run_detector(model, name, params, store, progress=False)
    except UserError as exc:
        return {"skipped": str(exc)}
    seconds = time.perf_counter() - t0
    return {"seconds": round(seconds, 2), "units": result.computed_units, "tables": _values(store, result.run_id),
            "heads": {(int(h["layer"]), int(h["head"])): float(h["score"]) for h in result.summary.heads or []}}


def _values(store: Any, run_id: int) -> dict[str, Any]:
    """Each stored table's numbers (``value``, or ``y`` of curves), rows sorted by the others."""
    from interp.runs.schema import TABLES

    out = {}
    for table in TABLES:
        frame = store.to_frame(run_id, table)
        col = "y" if table == "curves" else "value"
        if frame.empty or col not in frame:
            continue
        keys = [c for c in frame.columns if c != col]
        frame = frame.sort_values(keys, kind="stable", key=lambda c: c.astype(str) if c.dtype == object else c)
        out[table] = frame[col].to_numpy(dtype=float)
    return out


def _max_diff(a: dict[str, Any], b: dict[str, Any]) -> float | None:
    """Largest absolute difference over all tables (None when their shapes differ); NaNs equal."""
    import numpy as np

    if a.keys() != b.keys() or any(a[t].shape != b[t].shape for t in a):
        return None
    diffs = [np.nanmax(np.abs(a[t] - b[t]), initial=0.0) for t in a]
    return float(max(diffs, default=0.0))


def _top(scores: dict[tuple[int, int], float], k: int = 10) -> list[tuple[int, int]]:
    return sorted(scores, key=lambda h: -scores[h])[:k]


def main() -> None:
    args = _args()
    from interp.runs.registry import default_scan

    devices = [d for d in args.devices.split(",") if d]
    if any(d.startswith("cuda") for d in devices) and not torch.cuda.is_available():
        devices = [d for d in devices if not d.startswith("cuda")]  # a CPU smoke test of this script
    detectors = [d for d in args.detectors.split(",") if d] or default_scan()
    folder = random_init_folder(args.model) if args.random_init else None
    name = str(folder or args.model)
    import interp
    from interp.runs.store import Store

    report: dict[str, Any] = {"benchmark": "gpu_scan", "model": args.model, "random_init": args.random_init,
                              "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                              "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                              "load_s": {}, "detectors": {}}
    models = {}
    for dev in devices:
        t0 = time.perf_counter()
        models[dev] = interp.load_model(name, device=dev)
        _ = models[dev].backend
        report["load_s"][dev] = round(time.perf_counter() - t0, 2)
    ref = devices[0]
    totals = dict.fromkeys(devices, 0.0)
    with tempfile.TemporaryDirectory() as ws, Store(Path(ws)) as store:
        for det in detectors:  # detector by detector, a line each: a time limit still leaves the first
            runs = {}
            for dev in devices:
                # A cache per device: each computes its own CMR grid (CPU work), neither reads the other's.
                os.environ["INTERP_CACHE_DIR"] = str(Path(ws) / f"cache-{dev}")
                runs[dev] = _run(models[dev], det, store)
            entry: dict[str, Any] = {}
            for dev, r in runs.items():
                if "skipped" in r:
                    entry[dev] = {"skipped": r["skipped"]}
                    continue
                entry[dev] = {"seconds": r["seconds"], "units": r["units"]}
                totals[dev] += r["seconds"]
                a = runs[ref]
                if dev != ref and "tables" in a:
                    entry[dev]["max_abs_diff_to_" + ref] = _max_diff(a["tables"], r["tables"])
                    if a["heads"]:
                        entry[dev]["same_top10_heads"] = _top(a["heads"]) == _top(r["heads"])
            report["detectors"][det] = entry
            emit({"detector": det, **entry})
    report["total_s"] = {d: round(t, 2) for d, t in totals.items()}
    if len(devices) == 2 and totals[devices[0]] > 0:
        report[f"speedup_{devices[0]}_over_{devices[1]}"] = round(totals[devices[1]] / totals[devices[0]], 2)
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
    emit(report)


if __name__ == "__main__":
    main()
