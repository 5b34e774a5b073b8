"""Registry of detectors and interventions.

Each module of ``circuits/`` defines a :class:`Detector` subclass and decorates it with
:func:`register`; the CLI, ``interp scan``, the store and the dashboard discover it here.
A detector's work is split into named *units* (batches, facts, samples) that are committed to
the store one by one, so an interrupted run resumes without redoing finished units.
"""

from __future__ import annotations

import importlib
import math
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import pandas as pd

from interp.errors import UserError

if TYPE_CHECKING:
    from interp.model import LoadedModel

OutputKind = Literal["head_scores", "token_layer", "curves", "metrics", "intervention"]
# The largest seed a parameter takes (numpy and torch generators accept it on every platform).
SEED_MAX = 2**32 - 1


@dataclass(frozen=True)
class Param:
    """One parameter of a detector: name, type, default and help text.

    An int or float parameter declares its range: ``low``/``high`` bound it (inclusive unless
    ``low_open``/``high_open``), or ``unbounded=True`` says that any value is meaningful (a
    test checks that every numeric parameter does one or the other). :meth:`parse` enforces
    the range, so a bad value fails before any model is loaded.
    """

    name: str
    type: type
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    unbounded: bool = False

    @property
    def bounded(self) -> bool:
        return self.low is not None or self.high is not None

    def range_text(self) -> str:
        """The allowed range as written in errors: 'in (0, 1)', 'in [0, 10]', '>= 1', '> 0'."""

        def num(x: float) -> str:
            return str(int(x)) if float(x).is_integer() else str(x)

        if self.low is not None and self.high is not None:
            return (f"in {'(' if self.low_open else '['}{num(self.low)}, "
                    f"{num(self.high)}{')' if self.high_open else ']'}")
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {num(self.low)}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {num(self.high)}"
        return "any value"

    def in_range(self, value: float) -> bool:
        # Written so that NaN is out of every declared range.
        if self.low is not None and not (value > self.low if self.low_open else value >= self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def parse(self, raw: Any) -> Any:
        """Convert a raw (CLI string or JSON) value, with a clear error on bad input."""
        if raw is None:
            return self.default
        try:
            if self.type is bool and isinstance(raw, str):
                low = raw.lower()
                if low not in {"1", "0", "true", "false", "yes", "no"}:
                    raise ValueError(raw)
                value: Any = low in {"1", "true", "yes"}
            elif self.type is int and isinstance(raw, float):
                # A JSON number: int() would truncate 2.5 silently.
                if not raw.is_integer():
                    raise ValueError(raw)
                value = int(raw)
            else:
                value = self.type(raw)
        except (TypeError, ValueError, OverflowError):
            raise UserError(
                f"parameter {self.name!r} expects {self.type.__name__}, got {raw!r}"
            ) from None
        if self.choices is not None and value not in self.choices:
            raise UserError(f"parameter {self.name!r} must be one of {list(self.choices)}, got {value!r}")
        if self.type is float and not math.isfinite(value):
            raise UserError(f"parameter {self.name!r} must be a finite number, got {raw!r}")
        if self.type in (int, float) and not self.in_range(value):
            raise UserError(f"parameter {self.name!r} must be {self.range_text()}, got {value!r}")
        return value


@dataclass
class UnitResult:
    """What one unit produces: long tables keyed by the store's table names.

    Tables (columns beyond run_id/unit, which the store adds):
      head_scores: metric, layer, head, value
      token_layer: kind, item, token_index, token, layer, value
      curves:      curve, layer, head, x, y
      metrics:     name, value, ci_low, ci_high, n
      artifacts:   name, json   (a JSON document, for anything that is not a long table)
    """

    tables: dict[str, pd.DataFrame] = field(default_factory=dict)


@dataclass
class Summary:
    """The final, aggregated result of a run, printed by the CLI and returned by the API.

    ``heads`` (for head detectors) is sorted by score descending, each with at least
    layer, head and score. ``tables`` are the aggregated long tables written under unit "final".
    """

    detector: str
    variant: str
    heads: list[dict[str, Any]] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"detector": self.detector, "variant": self.variant}
        if self.heads is not None:
            out["heads"] = self.heads
        out["metrics"] = self.metrics
        out["warnings"] = self.warnings
        return out


class Detector:
    """Base class. Subclasses set the class attributes and implement the three methods."""

    name: ClassVar[str]
    description: ClassVar[str]
    kind: ClassVar[OutputKind]
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

    def variant(self, params: Mapping[str, Any]) -> str:
        """The name of the method variant (faithful/fast, zero/mean/uniform ablation...)."""
        return "default"

    def dataset_hash(self, model: LoadedModel, params: Mapping[str, Any]) -> str | None:
        """A hash of the input data when it comes from a file; None for generated inputs."""
        return None

    def units(self, model: LoadedModel, params: Mapping[str, Any]) -> list[str]:
        """Names of the units of work, in order. Each is committed to the store when done."""
        raise NotImplementedError

    def run_unit(self, model: LoadedModel, params: Mapping[str, Any], unit: str) -> UnitResult:
        """Compute one unit. Must be deterministic given params (seed included) and unit."""
        raise NotImplementedError

    def finalize(
        self, model: LoadedModel, params: Mapping[str, Any], results: Mapping[str, pd.DataFrame]
    ) -> Summary:
        """Aggregate all units' tables (concatenated, with a ``unit`` column) into a Summary."""
        raise NotImplementedError

    @classmethod
    def check_params(cls, params: Mapping[str, Any]) -> None:
        """Check what single ranges cannot: relations between parameters (min <= max, a list
        parameter's items, a file parameter's file). Runs in :meth:`parse_params`, before any
        model is loaded; raise UserError naming the parameters. Checks that need the model
        (a layer index, a prompt against the context) stay in :meth:`units`."""

    @classmethod
    def parse_params(cls, raw: Mapping[str, Any]) -> dict[str, Any]:
        """Convert and validate raw parameters: types, ranges, then :meth:`check_params`."""
        known = {p.name: p for p in cls.params}
        unknown = sorted(set(raw) - set(known))
        if unknown:
            names = ", ".join(sorted(known)) or "none"
            raise UserError(f"unknown parameter {unknown[0]!r} for {cls.name!r} (known: {names})")
        params = {name: p.parse(raw.get(name)) for name, p in known.items()}
        cls.check_params(params)
        return params


_REGISTRY: dict[str, type[Detector]] = {}


def register(cls: type[Detector]) -> type[Detector]:
    """Class decorator: make a detector discoverable by name."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise RuntimeError(f"detector {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


_COMMANDS: dict[str, Callable[..., Any]] = {}


def command(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator for an extra CLI command (a typer-style function) defined in ``circuits/``:
    ``interp <name> ...`` then calls it. Raise UserError for bad input."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        _COMMANDS[name] = fn
        return fn

    return deco


def all_commands() -> dict[str, Callable[..., Any]]:
    _discover()
    return dict(sorted(_COMMANDS.items()))


def _discover() -> None:
    import circuits

    for info in pkgutil.iter_modules(circuits.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"circuits.{info.name}")


def all_detectors() -> dict[str, type[Detector]]:
    _discover()
    return dict(sorted(_REGISTRY.items()))


def default_scan() -> list[str]:
    """The detectors ``interp scan`` runs when none are named, in name order."""
    return [name for name, d in all_detectors().items() if d.in_default_scan]


def get_detector(name: str) -> Detector:
    detectors = all_detectors()
    if name not in detectors:
        raise UserError(f"unknown detector {name!r} (available: {', '.join(detectors)})")
    return detectors[name]()


DetectorFactory = Callable[[], Detector]
