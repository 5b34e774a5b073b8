"""The executor the command-line options ask for (:func:`make_executor`): serial, or a Dask
cluster started here or joined; the options checked before anything starts."""

from __future__ import annotations

from typing import TYPE_CHECKING

from interp.errors import UserError
from interp.runs.executors import Executor, SerialExecutor, check_cluster_options

if TYPE_CHECKING:
    from interp.model.spec import ModelSpec


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
