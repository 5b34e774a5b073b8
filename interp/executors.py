"""Where a run's units are computed: in this process (serial) or elsewhere (a Dask cluster).

The runner stays the only writer of the results store. It hands an executor the units still
to do and commits each result as the executor yields it, so resuming, progress and the store
work the same whatever computes the units. An executor yields each unit once; the order is
the executor's (a cluster returns units as they finish).

Another engine is one more subclass of :class:`Executor`; the runner and the CLI name none of
them except through :func:`make_executor`.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from interp.errors import UserError

if TYPE_CHECKING:
    from interp.config import DetectorConfig
    from interp.model import LoadedModel
    from interp.registry import Detector, UnitResult


@dataclass(frozen=True)
class ModelSpec:
    """How to load a model again in another process: the arguments of :func:`interp.load_model`.

    Attributes:
        name: a zoo name, a local folder or a hub id (a model passed as an object has no spec).
        backend: the hook backend.
        prefix: the prompt-prefix choice (``auto``, ``none`` or a token's text).
        device: the device the model was asked for (``auto`` resolved per process).
        dtype: the dtype name.
        device_map: accelerate's placement (``auto``), or None for one device.
        max_memory: per-device memory limits for ``device_map`` ("cuda:0=10GiB,cpu=60GiB"), or None.
    """

    name: str
    backend: str = "bridge"
    prefix: str = "auto"
    device: str = "cpu"
    dtype: str = "float32"
    device_map: str | None = None
    max_memory: str | None = None

    def load(self) -> LoadedModel:
        import interp

        return interp.load_model(self.name, backend=self.backend, prefix=self.prefix, device=self.device,
                                 dtype=self.dtype, device_map=self.device_map, max_memory=self.max_memory)


class Executor(ABC):
    """Computes units of a run and yields (unit, result, seconds) as each finishes."""

    name: str

    @abstractmethod
    def run_units(
        self, model: LoadedModel, detector: Detector[Any], cfg: DetectorConfig, units: Sequence[str]
    ) -> Iterator[tuple[str, UnitResult, float]]:
        """Each of ``units`` computed once, yielded as it finishes. Stopping the iteration early
        (Ctrl-C, an error in the driver) must leave nothing running that could commit later."""

    def describe(self) -> str:
        """One line for the log: where the units run."""
        return self.name

    def close(self) -> None:  # noqa: B027 - most executors hold nothing
        """Release what the executor holds (a cluster it started)."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SerialExecutor(Executor):
    """Every unit in this process, in order, on the driver's model."""

    name = "serial"

    def run_units(
        self, model: LoadedModel, detector: Detector[Any], cfg: DetectorConfig, units: Sequence[str]
    ) -> Iterator[tuple[str, UnitResult, float]]:
        for unit in units:
            t0 = time.perf_counter()
            result = detector.run_unit(model, cfg, unit)
            yield unit, result, time.perf_counter() - t0


def check_cluster_options(workers: int | None, scheduler: str | None) -> None:
    """--workers / --scheduler checked without starting anything (a command that makes one
    executor per model checks them before its first model)."""
    if workers is not None and workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    if workers is not None and scheduler is not None:
        raise UserError("give --workers (a local cluster) or --scheduler (an existing one), not both")


def make_executor(workers: int | None = None, scheduler: str | None = None, spec: ModelSpec | None = None,
                  ) -> Executor:
    """The executor the CLI options ask for: serial without ``workers`` and ``scheduler``; else a
    Dask cluster, started here with ``workers`` local worker processes or joined at ``scheduler``.
    ``spec`` is how the workers load the model."""
    check_cluster_options(workers, scheduler)
    if workers is None and scheduler is None:
        return SerialExecutor()
    if spec is None:
        raise UserError("units on workers need a model loadable by name (a zoo name, a folder or a hub id)")
    from interp.dask_executor import DaskExecutor

    return DaskExecutor(spec, workers=workers, scheduler=scheduler)
