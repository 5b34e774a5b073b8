"""Registry of detectors and interventions.

A detector is a :class:`Detector` subclass decorated with :func:`register`. Packages of
detectors (``circuits`` in this one) are found through the ``interp.plugins`` entry-point group,
so the core never names them; the CLI, ``interp scan``, the store and the dashboard discover
every registered detector here.
A detector's work is split into *units* (batches, facts, samples: :class:`~interp.runs.units.Unit`)
that are committed to the store one by one, so an interrupted run resumes without redoing
finished units.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, TypeVar

import pandas as pd

from interp.errors import UserError
from interp.runs.config import SEED_MAX, DetectorConfig, NoParams, Param
from interp.runs.units import Part, Unit
from interp.stats.interval import Interval

if TYPE_CHECKING:
    import torch

    from interp.model.loaded import LoadedModel

__all__ = ["SEED_MAX", "Detector", "DetectorConfig", "Param", "Part", "Summary", "Unit", "UnitResult", "register"]
# The entry-point group through which packages add detectors and commands: each entry names a
# module whose import registers them (``circuits = "circuits"`` in this package's pyproject).
PLUGIN_GROUP = "interp.plugins"
OWN_DISTRIBUTION = "interp-workbench"

OutputKind = Literal["head_scores", "token_layer", "curves", "metrics", "intervention", "edges"]
C = TypeVar("C", bound=DetectorConfig)
T = TypeVar("T")


@dataclass
class UnitResult:
    """What one unit produces: long tables keyed by the store's table names.

    Tables (columns beyond run_id/unit, which the store adds):
      head_scores: metric, layer, head, value
      token_layer: kind, item, token_index, token, layer, value
      curves:      curve, layer, head, x, y, ci_low, ci_high, n, ci_method
      metrics:     name, value, ci_low, ci_high, n, ci_method
      artifacts:   name, json   (a JSON document, for anything that is not a long table)
    The interval columns (ci_low .. ci_method) may be left out; ``tables.interval_curves`` and
    ``tables.with_intervals`` fill them for a mean over items.
    """

    tables: dict[str, pd.DataFrame] = field(default_factory=dict)


@dataclass
class Summary:
    """The final, aggregated result of a run, printed by the CLI and returned by the API.

    ``heads`` (for head detectors) is sorted by score descending, each with at least
    layer, head and score. ``tables`` are the aggregated long tables written under unit "final".
    """

    heads: list[dict[str, Any]] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    # A metric that is an estimate over items, by its name in ``metrics``: its confidence
    # interval, n and method (:mod:`interp.stats`); the runner writes the bounds and n into the
    # final ``metrics`` table.
    intervals: dict[str, Interval] = field(default_factory=dict)
    # (for edge detectors) the graph's edges, each {sender, receiver, score, attribution,
    # in_circuit}: what the ``edges`` artifact holds (docs/path_patching.md, "Stored shape").
    edges: list[dict[str, Any]] | None = None
    warnings: list[str] = field(default_factory=list)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    # The detector's name and the run's variant: set by the runner, not by the detector.
    detector: str = ""
    variant: str = ""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"detector": self.detector, "variant": self.variant}
        if self.heads is not None:
            out["heads"] = self.heads
        out["metrics"] = self.metrics
        if self.intervals:
            out["intervals"] = {name: iv.to_dict() for name, iv in self.intervals.items()}
        if self.edges is not None:
            out["edges"] = self.edges
        out["warnings"] = self.warnings
        return out


class Detector(Generic[C]):
    """Base class. A subclass sets the class attributes, declares its parameters as a frozen
    :class:`~interp.runs.config.DetectorConfig` (``Config``), and implements ``units``, ``run_unit``
    and ``finalize``; each receives the parsed config."""

    name: ClassVar[str]
    description: ClassVar[str]
    # What the detector writes: the dashboard picks its page by this.
    output: ClassVar[OutputKind]
    # Whether it studies knowledge conflicts (the model's memory against a context that
    # contradicts it): the dashboard's Conflicts page lists its runs, whatever its output.
    knowledge_conflict: ClassVar[bool] = False
    Config: ClassVar[type[DetectorConfig]] = NoParams
    # Derived from Config when the subclass is created: the CLI and the dashboard's form read it.
    params: ClassVar[tuple[Param, ...]] = ()
    # Whether ``interp scan`` runs it by default (cheap enough for a first look).
    in_default_scan: ClassVar[bool] = False
    # The parameters ``interp scan`` (and the dashboard's scan form) runs it with, raw as on the
    # command line; {} = the defaults. They keep the default scan short (a few facts, a small
    # split) while ``interp run`` keeps the full defaults; runs are keyed by their parameters, so
    # the two are separate runs. Checked by parse_params before any model is loaded.
    scan_params: ClassVar[dict[str, Any]] = {}
    # (x axis, y axis) titles, with units, of each curve it writes to the ``curves`` table,
    # keyed by curve name or by an fnmatch pattern ("*: accuracy vs depth"); the first match
    # wins. The dashboard and interp.figures.curve_axes look them up by the run's detector.
    curve_axes: ClassVar[dict[str, tuple[str, str]]] = {}
    # The fields of Summary.heads worth a column in the CLI's head table (field -> short title),
    # most important first: the table keeps those that fit 80 columns.
    head_columns: ClassVar[dict[str, str]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.params = cls.Config.specs()

    def variant(self, cfg: C) -> str:
        """The method variant as a short, stable slug (``faithful``, ``zero-ablation``...): it
        is part of the run key, so rewording it would stop old runs from resuming. The prose
        goes in :meth:`method_text`."""
        return "default"

    def method_text(self, cfg: C) -> str:
        """One or two sentences on what exactly this run computes (stored as the run's
        ``settings`` artifact, not in the key)."""
        return self.description

    def dataset_hash(self, model: LoadedModel, cfg: C) -> str | None:
        """A hash of the input data when it comes from a file; None for generated inputs."""
        return None

    def units(self, model: LoadedModel, cfg: C) -> list[Unit]:
        """The units of work, in order. Each is committed to the store when done.
        Checks that need the model (a layer index, a prompt against the context) go here."""
        raise NotImplementedError

    def run_unit(self, model: LoadedModel, cfg: C, unit: Unit) -> UnitResult:
        """Compute one unit. Must be deterministic given the config (seed included) and unit.
        By default the unit is its one part (:meth:`run_part`, :meth:`join_parts`)."""
        return self.join_parts(model, cfg, unit, [self.run_part(model, cfg, Part(unit, 0, 1))])

    def max_parts(self, model: LoadedModel, cfg: C, unit: Unit) -> int:
        """Into how many parts ``unit`` can be split, to be computed apart (on several workers)
        by :meth:`run_part` and joined by :meth:`join_parts`; 1 (the default): not split. The
        framework chooses how many it uses (:func:`interp.runs.executors.plan_tasks`)."""
        return 1

    def run_part(self, model: LoadedModel, cfg: C, part: Part) -> Any:
        """Compute one part of a unit (a picklable value, sent back to the driver)."""
        raise NotImplementedError

    def join_parts(self, model: LoadedModel, cfg: C, unit: Unit, parts: Sequence[Any]) -> UnitResult:
        """The unit's result from its parts' values, in part order: equal to what one part
        covering the whole unit gives, up to float rounding."""
        raise NotImplementedError

    def finalize(self, model: LoadedModel, cfg: C, results: Mapping[str, pd.DataFrame]) -> Summary:
        """Aggregate all units' tables (concatenated, with a ``unit`` column) into a Summary."""
        raise NotImplementedError

    def memo(self, what: str, model: LoadedModel, cfg: C, compute: Callable[[], T]) -> T:
        """The one cache of a detector: ``compute()`` once per (what, model, config), shared by
        the units of a run. The runner makes a detector per run, so nothing cached outlives
        it (no module globals, no keys on object ids); configs are frozen, hence hashable."""
        cache: dict[tuple[str, str, DetectorConfig], Any] = self.__dict__.setdefault("_memo", {})
        key = (what, model.name, cfg)
        if key not in cache:
            cache[key] = compute()
        return cache[key]

    def example_tokens(self, model: LoadedModel, cfg: C) -> torch.Tensor | None:
        """A typical input (token ids, batch first) for the dashboard's attention view; None
        when the detector has no single representative input."""
        return None

    @classmethod
    def parse_params(cls, raw: Mapping[str, Any] | DetectorConfig) -> Any:
        """The config from raw values (CLI strings, JSON): types, ranges, then relations."""
        if isinstance(raw, cls.Config):
            return raw
        if isinstance(raw, DetectorConfig):
            raw = raw.to_dict()
        return cls.Config.parse(raw, cls.name)


_REGISTRY: dict[str, type[Detector]] = {}


def register(cls: type[Detector]) -> type[Detector]:
    """Class decorator: make a detector discoverable by name."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        first = _REGISTRY[cls.name]
        raise RuntimeError(f"detector {cls.name!r} registered twice ({first.__module__}.{first.__qualname__}, then "
                           f"{cls.__module__}.{cls.__qualname__})")
    _REGISTRY[cls.name] = cls
    return cls


_COMMANDS: dict[str, Callable[..., Any]] = {}


def command(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator for an extra CLI command (a typer-style function) defined in ``circuits/``:
    ``interp <name> ...`` then calls it. Raise UserError for bad input."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        first = _COMMANDS.get(name)
        if first is not None and (first.__module__, first.__qualname__) != (fn.__module__, fn.__qualname__):
            raise RuntimeError(f"command {name!r} registered twice ({first.__module__}, then {fn.__module__})")
        _COMMANDS[name] = fn
        return fn

    return deco


def all_commands() -> dict[str, Callable[..., Any]]:
    _discover()
    return dict(sorted(_COMMANDS.items()))


# Why each plug-in that failed to load was refused, by its entry point ("name = value"). It is
# not imported again in this process: its modules that did import stay imported, and would not
# register again.
_FAILED: dict[str, str] = {}


def _discover() -> None:
    """Import every installed plug-in module (entry-point group ``interp.plugins``); each
    registers its detectors and commands when imported. A plug-in that fails (raises at import,
    registers a detector name that exists) is skipped whole, whatever it had registered, and
    recorded in :func:`plugin_failures`: the other plug-ins, and the commands that need none of
    them, keep working. The workbench's own plug-ins load first, so a name that another plug-in
    registers again is refused in that plug-in, whatever the order of the installed packages."""
    for ep in sorted(metadata.entry_points(group=PLUGIN_GROUP), key=_own_first):
        label = f"{ep.name} = {ep.value}"
        if label in _FAILED:
            continue
        detectors, commands = dict(_REGISTRY), dict(_COMMANDS)
        try:
            ep.load()
        except Exception as exc:  # a plug-in's bug of any kind must not break the others
            _REGISTRY.clear()
            _REGISTRY.update(detectors)
            _COMMANDS.clear()
            _COMMANDS.update(commands)
            dist = f" (from {ep.dist.name} {ep.dist.version})" if ep.dist is not None else ""
            reason = " ".join(str(exc).split()) or type(exc).__name__
            _FAILED[label] = f"plug-in {label!r}{dist} was not loaded: {type(exc).__name__}: {reason}"


def _own_first(ep: metadata.EntryPoint) -> tuple[bool, str]:
    return (ep.dist is None or ep.dist.name != OWN_DISTRIBUTION, ep.name)


def plugin_failures() -> list[str]:
    """One line per plug-in that could not be loaded (its entry point, its distribution, why)."""
    _discover()
    present = {f"{ep.name} = {ep.value}" for ep in metadata.entry_points(group=PLUGIN_GROUP)}
    return [why for label, why in _FAILED.items() if label in present]


def all_detectors() -> dict[str, type[Detector]]:
    _discover()
    return dict(sorted(_REGISTRY.items()))


def default_scan() -> list[str]:
    """The detectors ``interp scan`` runs when none are named, in name order."""
    return [name for name, d in all_detectors().items() if d.in_default_scan]


def get_detector(name: str) -> Detector:
    detectors = all_detectors()
    if name not in detectors:
        failed = "".join(f"; {why}" for why in plugin_failures())
        raise UserError(f"unknown detector {name!r} (available: {', '.join(detectors)}){failed}")
    return detectors[name]()

