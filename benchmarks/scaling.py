"""Benchmark: units per second of one run computed by 1 and by N Dask workers (and serially in
this process), the ratio and the parallel efficiency (ratio / N).

The same run (a detector, its parameters, the model) is computed into a fresh store by each
executor in this process; the stored tables of every executor are checked equal to the serial
run's (rows grouped by unit) before any time is reported. Cluster start-up and model loading on
the workers are timed apart from the units: the units-per-second numbers are the runs alone.

    python -m benchmarks.scaling --model smollm2-135m --workers 1,2 --detector induction \\
        --params n_prompts=80,batch_size=5

Expect little gain on a 2-core machine: one torch process already uses both cores for one unit,
so N workers split the same cores (each gets cores // N torch threads); what they gain is only
what one unit leaves idle. Real gains need more cores (or GPUs) than one process can use.
Prints a JSON line per executor as it ends, then the whole report.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from benchmarks._common import emit, random_init_folder


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--detector", default="induction")
    p.add_argument("--params", default="n_prompts=80,batch_size=5", help="NAME=VALUE,... for the detector")
    p.add_argument("--workers", default="1,2", help="worker counts to time, comma-separated")
    p.add_argument("--device", default="cpu", help="device of the driver and the workers (cpu, cuda, auto)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--random-init", action="store_true",
                   help="random weights from .gpu/<model>/config.json, saved to a temporary folder the workers "
                   "load (for machines without the weights)")
    return p.parse_args()


def _tables(store: Any, run_id: int) -> dict[str, pd.DataFrame]:
    from interp.runs.schema import TABLES

    return {t: store.to_frame(run_id, t).sort_values("unit", kind="stable").reset_index(drop=True) for t in TABLES}


def _timed_run(model: Any, detector: str, params: dict[str, Any], executor: Any) -> tuple[float, int, dict]:
    from interp.runs.runner import run_detector
    from interp.runs.store import Store

    with tempfile.TemporaryDirectory() as ws, Store(Path(ws)) as store:
        t0 = time.perf_counter()
        result = run_detector(model, detector, params, store, progress=False, executor=executor)
        seconds = time.perf_counter() - t0
        return seconds, result.computed_units, _tables(store, result.run_id)


def main() -> None:
    args = _args()
    import interp
    from interp.runs.dask_executor import DaskExecutor
    from interp.runs.executors import SerialExecutor

    params = dict(kv.split("=", 1) for kv in args.params.split(",") if kv)
    counts = [int(n) for n in args.workers.split(",")]
    folder = random_init_folder(args.model) if args.random_init else None
    model = interp.load_model(str(folder or args.model), device=args.device, dtype=args.dtype)
    assert model.spec is not None
    serial_s, n_units, reference = _timed_run(model, args.detector, params, SerialExecutor())
    rows: dict[str, Any] = {"serial": {"seconds": round(serial_s, 2), "units_per_s": round(n_units / serial_s, 3),
                                       "torch_threads": torch.get_num_threads()}}
    emit({"serial": rows["serial"]})  # a line per executor as it ends: a time limit leaves the first
    for n in counts:
        t0 = time.perf_counter()
        with DaskExecutor(model.spec, workers=n) as ex:
            startup = time.perf_counter() - t0
            seconds, units, tables = _timed_run(model, args.detector, params, ex)
        for name, frame in reference.items():
            pd.testing.assert_frame_equal(tables[name], frame, check_exact=False, rtol=1e-5, atol=1e-6, obj=name)
        rows[f"dask-{n}"] = {"workers": n, "torch_threads_per_worker": max(1, (os.cpu_count() or 1) // n),
                             "startup_s": round(startup, 2), "seconds": round(seconds, 2),
                             "units_per_s": round(units / seconds, 3)}
        emit({f"dask-{n}": rows[f"dask-{n}"]})
    one = rows.get("dask-1", {}).get("units_per_s")
    for n in counts:
        r = rows[f"dask-{n}"]
        if one:
            r["ratio_to_1_worker"] = round(r["units_per_s"] / one, 3)
            r["parallel_efficiency"] = round(r["units_per_s"] / one / n, 3)
        r["ratio_to_serial"] = round(r["units_per_s"] / rows["serial"]["units_per_s"], 3)
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
    emit({"benchmark": "scaling", "model": args.model, "random_init": args.random_init, "detector": args.detector, "params": params,
          "units": n_units, "device": args.device, "dtype": args.dtype, "cpu_count": os.cpu_count(),
          "machine": platform.machine(), "results_equal": True, "runs": rows})


if __name__ == "__main__":
    main()
