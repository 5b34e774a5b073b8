"""The options the commands share, each declared once (its flags, help and default), and the one
check of each group before anything is created.

Every command that loads a model (scan, run, atlas, decore, prune) takes :class:`ModelOptions`,
those that compute units on a cluster (scan, run, atlas) :class:`ClusterOptions`, and they and
``interp app`` declare their flags with the ``...Opt`` aliases here; plug-in commands import
them from here, not from ``interp.cli`` (``python -m interp.cli`` would load that module twice).
The dashboard's run form reads its choices (:data:`DEVICES`, :data:`DTYPES`, :data:`BACKENDS`)
and checks its values with the same classes.

:meth:`ModelOptions.check` and :meth:`ClusterOptions.check` run before any workspace, store,
process or model exists, like the detectors' parameters: a device or a memory limit the machine
cannot honour, more local workers than it holds, a scheduler that does not answer as one, a
model path the file system refuses are each one line, and nothing is left behind.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from interp.console import err
from interp.errors import UserError

if TYPE_CHECKING:
    from interp.model.spec import ModelSpec
    from interp.runs.executors import Executor

DEFAULT_MODEL = "smollm2-135m"  # the zoo's default (interp.model.zoo.DEFAULT_MODEL)
BACKENDS = ("bridge", "nnsight")
DEVICES = ("auto", "cpu", "cuda", "mps")  # and cuda:N
DTYPES = ("float32", "bfloat16", "float16")

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="zoo name, local HF folder or hub id")]
WorkspaceOpt = Annotated[
    Path | None, typer.Option("--workspace", "-w", help="results workspace (default: ./.interp or $INTERP_WORKSPACE)")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON object on stdout")]
BackendOpt = Annotated[str, typer.Option("--backend", help="hook backend: bridge or nnsight (the KV cache needs bridge)")]
PrefixOpt = Annotated[
    str,
    typer.Option(
        "--prefix",
        help="token raw-text prompts start with: auto (the model's document separator, never a "
        "chat-turn marker), none, or a token such as '<|endoftext|>'",
    ),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N, mps, or auto (CUDA when present)")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="float32, bfloat16 or float16 (stored with each run)")]
DeviceMapOpt = Annotated[str | None, typer.Option(
    "--device-map", help="spread a model over the node's GPUs, then the CPU (accelerate): auto")]
MaxMemoryOpt = Annotated[str | None, typer.Option(
    "--max-memory", help="limits per device for --device-map, e.g. cuda:0=20GiB,cpu=60GiB")]
WorkersOpt = Annotated[int | None, typer.Option(
    "--workers", help="compute units on a local Dask cluster of N worker processes (at most one per core)")]
SchedulerOpt = Annotated[str | None, typer.Option(
    "--scheduler", help="compute units on an existing Dask cluster (its scheduler address, tcp://host:8786)")]


@dataclass(frozen=True)
class ModelOptions:
    """Which model, loaded how: the options of every command that loads one."""

    model: str = DEFAULT_MODEL
    backend: str = "bridge"
    prefix: str = "auto"
    device: str = "auto"
    dtype: str = "float32"
    device_map: str | None = None
    max_memory: str | None = None

    def check(self) -> ModelSpec:
        """The model's loading recipe, every option checked without loading it: the backend, the
        placement (a device this machine has, a dtype it runs, a device map and memory limits it
        can honour) and the model's name (a folder that exists, resolved to its one name)."""
        from interp.model.loading import Placement, resolve_model_name
        from interp.model.spec import ModelSpec

        if self.backend not in BACKENDS:
            raise UserError(f"unknown backend {self.backend!r} (known: {', '.join(BACKENDS)})")
        Placement.parse(self.device, self.dtype, self.device_map, self.max_memory)
        return ModelSpec(name=resolve_model_name(self.model), backend=self.backend, prefix=self.prefix,
                         device=self.device, dtype=self.dtype, device_map=self.device_map,
                         max_memory=self.max_memory)


@dataclass(frozen=True)
class ClusterOptions:
    """Where units are computed: here (neither), a local cluster (``workers``) or a running one
    (``scheduler``)."""

    workers: int | None = None
    scheduler: str | None = None

    def check(self, specs: Sequence[ModelSpec]) -> None:
        """Both options checked before anything starts: a worker count this machine holds for
        each of ``specs`` (cores, memory, the model's size; one GPU each on CUDA), a scheduler
        that answers as one within seconds (nothing is kept open)."""
        from interp.runs.executors import check_cluster_options

        check_cluster_options(self.workers, self.scheduler)
        if self.workers is not None:
            from interp.runs.capacity import check_local_workers
            from interp.runs.dask_executor import local_gpu_devices

            for spec in specs:
                if local_gpu_devices(spec, self.workers) is None:
                    check_local_workers(self.workers, spec)
        if self.scheduler is not None:
            from interp.runs.scheduler import probe

            probe(self.scheduler)

    def executor(self, spec: ModelSpec) -> Executor:
        """The executor of these options (serial without them), its cluster announced on stderr."""
        from interp.runs.clusters import make_executor

        executor = make_executor(self.workers, self.scheduler, spec)
        if executor.name != "serial":
            err.print(f"[dim]units computed on {executor.describe()}[/dim]", highlight=False)
        return executor


def check_prompts(prompts: Sequence[str]) -> list[str]:
    """The one rule for prompts given on the command line (``interp decore``, ``interp prune``):
    at least one, and each with a visible character. A raw-text prompt is the model's prompt
    prefix then the text; an empty text would make the command continue the prefix alone, which
    is no question of the user's."""
    if not prompts:
        raise UserError("give a prompt: --prompt TEXT")
    for i, p in enumerate(prompts):
        if not p.strip():
            which = "" if len(prompts) == 1 else f" (number {i + 1})"
            raise UserError(f"--prompt{which} is empty: give the text the model should continue")
    return list(prompts)
