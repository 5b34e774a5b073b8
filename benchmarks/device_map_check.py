"""GPU check: a model split by a device map (half its layers on cuda:0, the rest on the CPU)
gives the same head scores as the whole model on one device, to 1e-4 in float32.

For the GPU machine, where real weights cannot travel: random weights (seed 0) from the zoo
model's config in .gpu/<model>/ (see benchmarks/_common.py), saved to a temporary folder and
loaded twice by name, (a) on cuda, (b) with ``device_map="auto"`` and a cuda:0 limit of about
half the weights, CPU for the rest. Each runs induction and copying (their scan parameters) on
both backends; the bridge backend is expected to refuse the mixed map (TransformerLens 4.3), and
that refusal is reported, not hidden. Prints one JSON object; exit 1 when scores differ.

    python -m benchmarks.device_map_check --model smollm2-135m
"""

from __future__ import annotations

import argparse
import shutil
import sys
from typing import Any

import torch

from benchmarks._common import emit, random_init_folder


def _scores(model: Any, detector: str) -> dict[tuple[int, int], float]:
    from interp.runs.registry import get_detector
    from interp.runs.runner import run_in_memory

    det = get_detector(detector)
    summary, _ = run_in_memory(model, det, type(det).scan_params)
    return {(int(h["layer"]), int(h["head"])): float(h["score"]) for h in summary.heads or []}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="smollm2-135m")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("device_map_check needs a CUDA device")
    import interp
    from interp.errors import UserError

    folder = random_init_folder(args.model)
    weights_mib = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20
    limit = f"0={max(1, int(weights_mib / 2))}MiB,cpu=64GiB"
    report: dict[str, Any] = {"model": args.model, "weights_mib": round(weights_mib), "max_memory": limit}
    ok = True
    for backend in ("nnsight", "bridge"):
        whole = interp.load_model(str(folder), backend=backend, device="cuda")
        try:
            split = interp.load_model(str(folder), backend=backend, device="cuda", device_map="auto",
                                      max_memory=limit)
        except UserError as exc:
            report[backend] = {"refused": str(exc)}
            continue
        devices = sorted({str(d) for d in getattr(split.hf, "hf_device_map", {}).values()})
        mixed = any(d not in ("cpu", "disk") for d in devices) and "cpu" in devices
        entry: dict[str, Any] = {"placement": split.provenance.device, "devices": devices, "mixed": mixed}
        ok &= mixed
        for detector in ("induction", "copying"):
            a, b = _scores(whole, detector), _scores(split, detector)
            diff = max(abs(a[k] - b[k]) for k in a) if a.keys() == b.keys() else float("inf")
            entry[detector] = {"heads": len(a), "max_abs_diff": diff, "within_1e-4": diff <= 1e-4}
            ok &= diff <= 1e-4
        report[backend] = entry
    report["ok"] = ok
    shutil.rmtree(folder, ignore_errors=True)
    emit(report)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
