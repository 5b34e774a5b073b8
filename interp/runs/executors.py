"""Where a run's units are computed: in this process (serial) or elsewhere (a Dask cluster).

The runner stays the only writer of the results store. It hands an executor the units still
to do and commits each result as the executor yields it, so resuming, progress and the store
work the same whatever computes the units. An executor yields each unit once; the order is
the executor's (a cluster returns units as they finish).

Another engine is one more subclass of :class:`Executor`; the runner and the CLI name none of
them except through :func:`interp.runs.clusters.make_executor`.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from interp.errors import UserError
from interp.runs.units import Part, Task, Unit

if TYPE_CHECKING:
    from interp.model.loaded import LoadedModel
    from interp.runs.config import DetectorConfig
    from interp.runs.registry import Detector, UnitResult


def plan_tasks(
    model: LoadedModel, detector: Detector[Any], cfg: DetectorConfig, units: Sequence[Unit], workers: int
) -> list[Task]:
    """The tasks of ``units`` on ``workers`` workers: with fewer units than workers, each unit
    the detector can split goes out in as many parts as leave no worker idle; else whole."""
    share = workers // len(units) if 0 < len(units) < workers else 1
    tasks: list[Task] = []
    for unit in units:
        n = min(share, detector.max_parts(model, cfg, unit)) if share > 1 else 1
        tasks.extend([Part(unit, i, n) for i in range(n)] if n > 1 else [unit])
    return tasks


class PartJoiner:
    """Collects the parts of split units as they finish and joins a unit when its last part
    arrives (``join``: the detector's join_parts, given the values in part order)."""

    def __init__(self, join: Callable[[Unit, list[Any]], UnitResult]) -> None:
        self._join = join
        self._parts: dict[Unit, dict[int, tuple[Any, float]]] = {}
        self.joined = 0  # units computed in parts and joined here

    def add(self, part: Part, value: Any, seconds: float) -> tuple[UnitResult, float] | None:
        """The unit's joined result and its summed seconds once every part is in, else None."""
        got = self._parts.setdefault(part.unit, {})
        got[part.index] = (value, seconds)
        if len(got) < part.count:
            return None
        del self._parts[part.unit]
        self.joined += 1
        return self._join(part.unit, [got[i][0] for i in range(part.count)]), sum(s for _, s in got.values())


class Executor(ABC):
    """Computes units of a run and yields (unit, result, seconds) as each finishes.

    The base class holds the policy shared by every engine: which units go out in parts
    (:func:`plan_tasks`, from :meth:`workers`) and the joining of parts (:class:`PartJoiner`). A subclass computes tasks (:meth:`compute`)."""

    name: str

    def __init__(self) -> None:
        self.split_units = 0  # units computed in parts and joined (Detector.max_parts > 1)

    def workers(self) -> int:
        """How many tasks this executor computes at once."""
        return 1

    @abstractmethod
    def compute(
        self, model: LoadedModel, detector: Detector[Any], cfg: DetectorConfig, tasks: Sequence[Task]
    ) -> Iterator[tuple[Task, Any, float]]:
        """Each task computed once (a Unit: its UnitResult; a Part: the detector's part value),
        yielded with its seconds as it finishes. Stopping the iteration early (Ctrl-C, an error
        in the driver) must leave nothing running that could commit later."""

    def run_units(
        self, model: LoadedModel, detector: Detector[Any], cfg: DetectorConfig, units: Sequence[Unit]
    ) -> Iterator[tuple[Unit, UnitResult, float]]:
        """Each of ``units`` computed once, yielded as it finishes (parts joined here)."""
        tasks = plan_tasks(model, detector, cfg, units, self.workers())
        joiner = PartJoiner(lambda unit, values: detector.join_parts(model, cfg, unit, values))
        for task, value, seconds in self.compute(model, detector, cfg, tasks):
            if isinstance(task, Unit):
                yield task, value, seconds
                continue
            joined = joiner.add(task, value, seconds)
            if joined is not None:
                self.split_units += 1
                yield task.unit, *joined

    def describe(self) -> str:
        """One line for the log: where the units run."""
        return self.name

    def close(self) -> None:  # noqa: B027 - most executors hold nothing
        """Release what the executor holds (a cluster it started)."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def compute_task(model: LoadedModel, detector: Detector[Any], cfg: DetectorConfig, task: Task) -> Any:
    """One task on the process's model: a unit's UnitResult, or a part's value."""
    if isinstance(task, Part):
        return detector.run_part(model, cfg, task)
    return detector.run_unit(model, cfg, task)


class SerialExecutor(Executor):
    """Every unit in this process, in order, on the driver's model."""

    name = "serial"

    def compute(
        self, model: LoadedModel, detector: Detector[Any], cfg: DetectorConfig, tasks: Sequence[Task]
    ) -> Iterator[tuple[Task, Any, float]]:
        for task in tasks:
            t0 = time.perf_counter()
            value = compute_task(model, detector, cfg, task)
            yield task, value, time.perf_counter() - t0


def check_cluster_options(workers: int | None, scheduler: str | None) -> None:
    """--workers / --scheduler checked without starting anything (a command that makes one
    executor per model checks them before its first model)."""
    if workers is not None and workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    if workers is not None and scheduler is not None:
        raise UserError("give --workers (a local cluster) or --scheduler (an existing one), not both")
