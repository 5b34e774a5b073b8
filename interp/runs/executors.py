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
from typing import TYPE_CHECKING, Any

from interp.errors import UserError

if TYPE_CHECKING:
    from interp.model.loaded import LoadedModel
    from interp.model.spec import ModelSpec
    from interp.runs.config import DetectorConfig
    from interp.runs.registry import Detector, UnitResult


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
    from interp.runs.dask_executor import DaskExecutor

    return DaskExecutor(spec, workers=workers, scheduler=scheduler)
