"""Command-line options that several commands share, the plug-in commands included (a plug-in
imports them from here, not from interp.cli: ``python -m interp.cli`` would load that module twice)."""

from __future__ import annotations

from typing import Annotated

import typer

DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N, mps, or auto (CUDA when present)")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="float32, bfloat16 or float16 (stored with each run)")]
DeviceMapOpt = Annotated[str | None, typer.Option(
    "--device-map", help="spread a model over the node's GPUs, then the CPU (accelerate): auto")]
MaxMemoryOpt = Annotated[str | None, typer.Option(
    "--max-memory", help="limits per device for --device-map, e.g. cuda:0=20GiB,cpu=60GiB")]
WorkersOpt = Annotated[int | None, typer.Option(
    "--workers", help="compute units on a local Dask cluster of N worker processes")]
SchedulerOpt = Annotated[str | None, typer.Option(
    "--scheduler", help="compute units on an existing Dask cluster (its scheduler address, tcp://host:8786)")]

