"""How many local worker processes (``--workers N``) this machine can hold for a model: one per
core at most, and as many copies of the model as its memory takes. Checked before any process
starts; a user who wants more workers starts them on other machines and joins their scheduler
(``--scheduler``)."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from interp.errors import UserError

if TYPE_CHECKING:
    from interp.model.spec import ModelSpec

GIB = 1 << 30
# What a worker process takes before its model: Python, torch, transformers and Dask imported,
# the hook backend set up (0.53 GiB measured on the tiny test model, whose weights are a few MB).
WORKER_OVERHEAD_BYTES = GIB // 2
_DTYPE_BYTES = {"float32": 4, "fp32": 4, "float": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2,
                "half": 2, "F32": 4, "BF16": 2, "F16": 2, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1}


@dataclass(frozen=True)
class Machine:
    """What this machine offers local workers."""

    cores: int
    memory_bytes: int

    @classmethod
    def here(cls) -> Machine:
        import psutil

        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            cores = os.cpu_count() or 1
        return cls(cores=max(1, cores), memory_bytes=int(psutil.virtual_memory().total))


def parameter_count(spec: ModelSpec) -> int | None:
    """The model's parameter count without loading it: the zoo's record, or a local folder's
    safetensors headers; None when unknown (a hub id, .bin weights)."""
    from interp.model.zoo import ZOO

    if spec.name in ZOO:
        return int(ZOO[spec.name].params_m * 1e6)
    try:
        files = sorted(Path(spec.name).expanduser().glob("*.safetensors"))
    except OSError:
        return None
    counts = [_safetensors_count(f) for f in files]
    return sum(c for c in counts if c is not None) if counts and None not in counts else None


def _safetensors_count(path: Path) -> int | None:
    """Elements in a safetensors file, from its JSON header (the first 8 bytes give its length)."""
    try:
        with open(path, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            if size > 100 << 20:
                return None
            head = json.loads(fh.read(size))
    except (OSError, ValueError, struct.error):
        return None
    total = 0
    for name, info in head.items():
        if name == "__metadata__" or not isinstance(info, dict):
            continue
        n = 1
        for d in info.get("shape", []):
            n *= int(d)
        total += n
    return total


def local_worker_limit(spec: ModelSpec, machine: Machine) -> tuple[int, str]:
    """(the most local workers for ``spec`` here, the numbers that decide it, in words)."""
    params = parameter_count(spec)
    per_worker = WORKER_OVERHEAD_BYTES
    model = f"{spec.name} (size unknown)"
    if params is not None:
        weights = params * _DTYPE_BYTES.get(spec.dtype, 4)
        per_worker += weights
        model = f"{Path(spec.name).name or spec.name} ({weights / GIB:.2f} GiB in {spec.dtype})"
    by_memory = max(1, machine.memory_bytes // per_worker)
    why = (f"{machine.cores} cores and {machine.memory_bytes / GIB:.1f} GiB of memory; each worker holds a copy "
           f"of {model} and about {WORKER_OVERHEAD_BYTES / GIB:.1f} GiB of Python and torch")
    return min(machine.cores, by_memory), why


def check_local_workers(workers: int, spec: ModelSpec, machine: Machine | None = None) -> None:
    """UserError (one line, with the numbers) when ``workers`` local processes exceed what this
    machine holds for ``spec``."""
    if workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    limit, why = local_worker_limit(spec, machine or Machine.here())
    if workers > limit:
        raise UserError(f"--workers {workers} is more than this machine can run: at most {limit} here ({why}); "
                        "for more workers, start them on other machines and join their scheduler with "
                        "--scheduler tcp://HOST:8786")
