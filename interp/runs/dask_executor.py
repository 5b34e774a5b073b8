"""Units on a Dask cluster: a local one started here (``--workers N``) or one already running
(``--scheduler ADDR``).

Each worker process loads the model once, from the driver's :class:`~interp.runs.executors.ModelSpec`,
in a worker plugin, and computes the units sent to it on that copy; the driver only submits one
task per unit and yields the results as they finish, for the runner to commit. A worker that
dies mid-unit is survived: the scheduler sends its units to another worker (up to
``distributed.scheduler.allowed-failures`` deaths per unit), and each unit's future completes,
hence is yielded, once.

Results equal a serial run's exactly when the workers compute like the driver: same weights
(checked, by their hash), dtype, prompt prefix and backend (checked), device and torch thread
count (not checked: float reductions may round differently on another device or thread count).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import sys
import threading
import time
import types
import uuid
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

from distributed import Client, Future, LocalCluster, WorkerPlugin, as_completed, get_worker

from interp.errors import UserError
from interp.model.load import load_spec
from interp.model.spec import ModelSpec
from interp.runs.executors import Executor, check_cluster_options, compute_task
from interp.runs.units import Part, Task, Unit

if TYPE_CHECKING:
    from distributed import Worker

    from interp.model.loaded import LoadedModel
    from interp.runs.config import DetectorConfig
    from interp.runs.registry import Detector

# How long to wait for an existing scheduler to answer, then for it to have a worker.
CONNECT_TIMEOUT_S = 5
WORKERS_TIMEOUT_S = 10
# Detector instances (with their memos) a worker keeps: the current run's, and the previous
# one's in case its last units are still arriving. A driver runs one run at a time.
_DETECTORS_KEPT = 2


def model_identity(model: LoadedModel) -> dict[str, Any]:
    """What must match between the driver's model and a worker's for the worker's results to
    be the driver's: the weights' hash, the dtype, the prompt prefix and the hook backend."""
    return {
        "file_sha256": model.provenance.file_sha256,
        "dtype": str(model.dtype).removeprefix("torch."),
        "prefix": model.provenance.prefix,
        "backend": model.backend_name,
    }


class ModelPlugin(WorkerPlugin):
    """Holds one worker's copy of the model and the detector instances of the runs it serves.

    The model is loaded in :meth:`setup` (so registering the plugin fails early, in the driver,
    when a worker cannot load it), or on the first unit where setup failed on a worker that
    joined later. Units run one at a time per worker, even on a worker with several threads:
    the hook backends and the detectors' memos are not thread-safe.
    """

    def __init__(self, spec: ModelSpec, torch_threads: int | None = None,
                 devices: Mapping[str, str] | None = None) -> None:
        self.spec = spec
        self.torch_threads = torch_threads
        # Worker name -> the device its copy goes on (a local cluster's GPU workers, one GPU
        # each); a worker not named here loads on spec.device.
        self.devices = dict(devices or {})
        self._model: LoadedModel | None = None
        self._detectors: OrderedDict[tuple[str, DetectorConfig], Detector[Any]] = OrderedDict()
        self._load_lock = threading.Lock()
        self.run_lock = threading.Lock()

    # Locks do not pickle: the plugin travels as its spec, thread count and devices.
    def __getstate__(self) -> dict[str, Any]:
        return {"spec": self.spec, "torch_threads": self.torch_threads, "devices": self.devices}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["spec"], state["torch_threads"], state["devices"])

    async def setup(self, worker: Worker) -> None:
        self.apply_threads()
        # Off the worker's event loop: loading a large model must not stall its heartbeats.
        await asyncio.get_running_loop().run_in_executor(None, self.model, str(worker.name))

    def teardown(self, worker: Worker) -> None:
        with self._load_lock:
            self._model = None
            self._detectors.clear()

    def apply_threads(self) -> None:
        if self.torch_threads is not None:
            import torch

            if torch.get_num_threads() != self.torch_threads:
                torch.set_num_threads(self.torch_threads)

    def model(self, worker_name: str) -> LoadedModel:
        with self._load_lock:
            if self._model is None:
                spec = self.spec
                if worker_name in self.devices:
                    spec = dataclasses.replace(spec, device=self.devices[worker_name])
                model = load_spec(spec)
                _ = model.backend  # its hooks are set up once here (seconds), not in the first unit
                self._model = model
            return self._model

    def detector(self, name: str, params: Mapping[str, Any]) -> tuple[Detector[Any], DetectorConfig]:
        """The worker's one instance of detector ``name`` for this config (its memo is shared
        by the units of the run), and the parsed config."""
        from interp.runs.registry import get_detector

        fresh = get_detector(name)
        cfg = fresh.parse_params(params)
        key = (name, cfg)
        with self._load_lock:
            detector = self._detectors.get(key)
            if detector is None:
                detector = self._detectors[key] = fresh
                while len(self._detectors) > _DETECTORS_KEPT:
                    self._detectors.popitem(last=False)
            else:
                self._detectors.move_to_end(key)
        return detector, cfg


def _compute_task(
    plugin_name: str, detector_name: str, params: Mapping[str, Any], task: Task, expected: Mapping[str, Any],
) -> tuple[Task, Any, float]:
    """One task on a worker (a Dask task): (the task, a unit's UnitResult or a part's value,
    seconds of compute)."""
    worker = get_worker()
    plugin = worker.plugins.get(plugin_name)
    if not isinstance(plugin, ModelPlugin):
        raise RuntimeError(f"Dask worker {worker.address} has no interp model plugin {plugin_name!r}")
    model = plugin.model(str(worker.name))
    mine = model_identity(model)
    differ = [k for k, v in expected.items() if mine.get(k) != v]
    if differ:
        detail = ", ".join(f"{k} {mine.get(k)!r} here, {expected[k]!r} on the driver" for k in differ)
        raise UserError(f"the model on Dask worker {worker.address} is not the driver's ({detail})")
    detector, cfg = plugin.detector(detector_name, params)
    with plugin.run_lock:
        plugin.apply_threads()
        t0 = time.perf_counter()
        result = compute_task(model, detector, cfg, task)
        seconds = time.perf_counter() - t0
    return task, result, seconds


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


class DaskExecutor(Executor):
    """Units on Dask workers, each holding its own copy of the model.

    ``workers=N`` starts a local cluster of N single-threaded worker processes (each with
    ``cpu_count // N`` torch threads; for a model on CUDA, one GPU each, as the workers' ``GPU``
    resource) and closes it in :meth:`close`; ``scheduler=ADDR`` joins a running cluster (its
    workers must be able to load ``spec``: the same folder or zoo model and the same package
    versions). ``retries`` reruns a unit whose task raised; a worker that died is covered
    without it, by the scheduler's ``allowed-failures``. Which units go out in parts, and their
    joining, is the :class:`~interp.runs.executors.Executor` base's policy.
    """

    name = "dask"

    def __init__(
        self, spec: ModelSpec, *, workers: int | None = None, scheduler: str | None = None, retries: int = 0
    ) -> None:
        if (workers is None) == (scheduler is None):
            raise UserError("give the Dask executor workers (a local cluster) or a scheduler address (an existing one)")
        check_cluster_options(workers, scheduler)
        super().__init__()
        self.spec = spec
        self.retries = retries
        self.cluster: LocalCluster | None = None
        self.client: Client | None = None
        self._closed = False
        self._plugin_name = f"interp-model-{uuid.uuid4().hex[:12]}"
        devices = local_gpu_devices(spec, workers) if workers is not None else None
        if workers is not None and devices is None:
            from interp.runs.capacity import check_local_workers

            check_local_workers(workers, spec)  # before any process starts
        # Tasks ask for a GPU only on a cluster started here, whose workers declare theirs; the
        # workers of a joined cluster need declare nothing.
        self._resources = {"GPU": 1} if devices else None
        try:
            if workers is not None:
                threads = max(1, (os.cpu_count() or 1) // workers)
                with _bare_main():
                    self.cluster = LocalCluster(
                        n_workers=workers,
                        threads_per_worker=1,
                        processes=True,
                        host="127.0.0.1",
                        dashboard_address="127.0.0.1:0",
                        silence_logs=logging.ERROR,
                        # The memory of a worker is its model, which Dask cannot spill: its
                        # pause threshold would stall the run instead of failing it.
                        memory_limit=0,
                        resources=self._resources,
                    )
                self.client = Client(self.cluster, set_as_default=False)
                names = [str(name) for name in self.cluster.workers]  # 0 .. N-1, kept by a respawn
                plugin = ModelPlugin(spec, threads, dict(zip(names, devices, strict=True)) if devices else None)
            else:
                assert scheduler is not None
                self.client = _connect(scheduler)
                plugin = ModelPlugin(spec)
            self.client.register_plugin(plugin, name=self._plugin_name)
        except BaseException:
            self.close()
            raise

    def describe(self) -> str:
        client = self._client()
        n = len(cast(dict[str, int], client.nthreads()))
        try:
            link = client.dashboard_link
        except (KeyError, AttributeError):
            link = None
        where = f"dashboard {link}" if link else "no dashboard"
        if link and self.cluster is not None and importlib.util.find_spec("bokeh") is None:
            where += " (a stub: the dashboard needs bokeh)"
        return f"dask: {n} worker{'s' if n != 1 else ''}, {where}"

    def workers(self) -> int:
        return len(cast(dict[str, int], self._client().nthreads()))

    def compute(
        self, model: LoadedModel, detector: Detector[Any], cfg: DetectorConfig, tasks: Sequence[Task]
    ) -> Iterator[tuple[Task, Any, float]]:
        client = self._client()
        params = cfg.to_dict()
        expected = model_identity(model)
        cfg_hash = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:8]
        token = uuid.uuid4().hex[:12]
        pending: dict[Future, Task] = {}
        try:
            for task in tasks:
                part = f"part{task.index}of{task.count}" if isinstance(task, Part) else "whole"
                future = client.submit(
                    _compute_task, self._plugin_name, detector.name, params, task, expected,
                    key=f"{detector.name}-{cfg_hash}-{_unit_of(task).key}-{part}-{token}", pure=False,
                    retries=self.retries, resources=self._resources,
                )
                pending[future] = task
            for future in as_completed(list(pending), loop=client.loop):
                task = pending.pop(future)
                try:
                    _, value, seconds = future.result()
                except Exception as exc:
                    exc.add_note(f"({task} of {detector.name}, on a Dask worker)")
                    raise
                future.release()
                yield task, value, seconds
        finally:
            # An error, Ctrl-C or a consumer that stopped: nothing of this run may go on.
            if pending:
                client.cancel(list(pending), force=True)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        client, cluster = self.client, self.cluster
        self.client = self.cluster = None
        if client is not None:
            if cluster is None:
                # A cluster that outlives us: free the model memory on its workers.
                with contextlib.suppress(Exception):  # best effort: the workers may be gone
                    client.unregister_worker_plugin(self._plugin_name)
            client.close()
        if cluster is not None:
            cluster.close()

    def _client(self) -> Client:
        if self.client is None:
            raise RuntimeError("the Dask executor is closed")
        return self.client


def local_gpu_devices(spec: ModelSpec, workers: int) -> list[str] | None:
    """The device of each worker of a local cluster for a model on CUDA: one GPU per worker
    (``cuda:0`` ... ``cuda:N-1``), as the workers' ``GPU`` resource; None off CUDA. UserError
    when the workers would have to share GPUs: more workers than GPUs, every worker pinned to
    one ``cuda:K``, or several workers each spreading the model over all GPUs (a device map)."""
    from interp.model.loading import parse_device

    device = parse_device(spec.device)
    if device.type != "cuda":
        return None
    import torch

    count = torch.cuda.device_count()
    if spec.device_map is not None:
        if workers > 1:
            raise UserError(f"--device-map spreads each worker's model over all {count} GPUs of this machine: "
                            "start one local worker (--workers 1), or join a cluster of one worker per node")
        return None
    if device.index is not None and workers > 1:
        raise UserError(f"--device {spec.device} puts every worker on that one GPU; use --device cuda to give "
                        f"each of the {workers} workers its own")
    if workers > count:
        raise UserError(f"--workers {workers} on CUDA needs a GPU per worker; this machine has {count}")
    if device.index is not None:
        return [str(device)]
    return [f"cuda:{i}" for i in range(workers)]


@contextlib.contextmanager
def _bare_main() -> Iterator[None]:
    """Worker processes are spawned, and spawning re-runs the parent's ``__main__`` file in each
    new process. A host that installed a script of its own as ``__main__`` (Streamlit runs every
    page as ``__main__``, and its test harness leaves it there) would have that script run in every
    worker. The tasks need only importable modules, so the workers start from a bare one. (A
    worker the nanny respawns later, after a crash, is spawned under the host's ``__main__`` of
    that moment: start clusters from a process whose ``__main__`` is importable, as the CLI is.)"""
    main = sys.modules.get("__main__")
    if main is None or getattr(main, "__spec__", None) is not None or not getattr(main, "__file__", None):
        yield  # run by module name (python -m, the interp script's entry point) or interactive
        return
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


class _Client(Client):
    """A Dask client whose failed start leaves nothing behind: Dask's own keeps a half-built
    client whose finaliser, run at some later collection, waits for its event loop and prints a
    traceback on the user's terminal seconds after the error was reported."""

    def start(self, **kwargs: Any) -> None:
        try:
            super().start(**kwargs)
        except BaseException:
            self.status = "closed"  # the finaliser's close() then has nothing to do
            self._loop_runner.stop()
            raise


def _connect(address: str) -> Client:
    """A client of the scheduler at ``address`` that has at least one worker; UserError (one
    line) within seconds otherwise, whatever answers there (:func:`interp.runs.scheduler.probe`
    first: the client is built only where a scheduler greeted us)."""
    from interp.runs.scheduler import probe

    target = probe(address)
    try:
        client = _Client(target, timeout=CONNECT_TIMEOUT_S, set_as_default=False)
    except (OSError, TimeoutError, ValueError, TypeError) as exc:
        raise UserError(f"cannot reach the Dask scheduler at {target}: {_one_line(exc)}") from None
    try:
        client.wait_for_workers(1, timeout=WORKERS_TIMEOUT_S)
    except (OSError, TimeoutError) as exc:
        client.close()
        raise UserError(
            f"the Dask scheduler at {target} has no workers after {WORKERS_TIMEOUT_S} s ({_one_line(exc)})"
        ) from None
    return client


def _unit_of(task: Task) -> Unit:
    return task.unit if isinstance(task, Part) else task
