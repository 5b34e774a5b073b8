"""Typed, frozen parameters of a detector.

Each detector declares its parameters once, as a frozen dataclass derived from
:class:`DetectorConfig` whose fields are made with :func:`param`::

    @dataclass(frozen=True)
    class InductionConfig(DetectorConfig):
        seq_len: int = param(50, "length R of the random block (repeated twice)", low=2)
        mode: Literal["fast", "faithful"] = param("fast", "...")
        ks: tuple[int, ...] = param((1, 3), "k values to sweep", low=1)

The field's annotation is its type: ``int``, ``float``, ``bool``, ``str``, a ``Literal`` of
choices, or a ``tuple[X, ...]`` of one of these (written ``1,3,5`` on the command line). The
CLI options, the dashboard's run form, the store's parameter record and the run key are all
derived from the fields; ``__post_init__`` converts raw values (command-line strings, JSON) and
checks each field's type and range, then :meth:`DetectorConfig.check` checks relations between
fields, so a config that exists is a valid one and bad input fails before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Self, get_args, get_origin

from interp.errors import UserError

# The largest seed a parameter takes (numpy and torch generators accept it on every platform).
SEED_MAX = 2**32 - 1
# The most random draws (head sets, circuits) a control takes: a thousand put the empirical
# p-value's floor at 1/1001, far below any level a verdict uses; each draw costs passes over
# every item, so more is a typo, not a plan.
MAX_DRAWS = 1000
_SCALARS = (int, float, bool, str)


@dataclass(frozen=True)
class Param:
    """One parameter as the CLI, the dashboard and the errors see it.

    Attributes:
      name: the field name (``--seq-len`` on the command line for ``seq_len``).
      type: int, float, bool, str, or tuple for a list parameter.
      default: the value when none is given.
      help: one line for ``--help`` and the dashboard.
      choices: the allowed values (of each item, for a list parameter), or None.
      low, high: the inclusive bounds of a number (of each item of a list of numbers); None
        where unbounded on that side. ``low_open``/``high_open`` make a bound exclusive.
      unbounded: a number with no bounds says so explicitly (a test checks that every number
        is either bounded or unbounded=True).
      item: the type of each item of a list parameter (``type is tuple``), else None.
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
    item: type | None = None

    @property
    def bounded(self) -> bool:
        return self.low is not None or self.high is not None

    @property
    def type_name(self) -> str:
        return f"list of {self.item.__name__}" if self.item is not None else self.type.__name__

    @property
    def numeric(self) -> bool:
        return (self.item or self.type) in (int, float)

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
        """Convert a raw value (CLI string, JSON value or typed value), with a clear error on
        bad input. A list parameter takes a comma-separated string or a sequence."""
        if raw is None:
            return self.default
        if self.item is None:
            return self._scalar(raw, self.type, self.name)
        items = [s.strip() for s in raw.split(",") if s.strip()] if isinstance(raw, str) else raw
        if not isinstance(items, list | tuple):
            raise UserError(f"parameter {self.name!r} expects a comma-separated list, got {raw!r}")
        return tuple(self._scalar(x, self.item, f"{self.name}[{i}]") for i, x in enumerate(items))

    def format(self, value: Any) -> str:
        """The command-line form of a value (what ``parse`` reads back)."""
        if self.item is not None:
            return ",".join(str(x) for x in value)
        return str(value)

    def _scalar(self, raw: Any, kind: type, what: str) -> Any:
        try:
            if kind is bool and isinstance(raw, str):
                low = raw.lower()
                if low not in {"1", "0", "true", "false", "yes", "no"}:
                    raise ValueError(raw)
                value: Any = low in {"1", "true", "yes"}
            elif kind is int and isinstance(raw, float):
                # A JSON number: int() would truncate 2.5 silently.
                if not raw.is_integer():
                    raise ValueError(raw)
                value = int(raw)
            elif kind is int and isinstance(raw, bool):
                raise ValueError(raw)
            else:
                value = kind(raw)
        except (TypeError, ValueError, OverflowError):
            raise UserError(f"parameter {what!r} expects {kind.__name__}, got {raw!r}") from None
        if self.choices is not None and value not in self.choices:
            raise UserError(f"parameter {what!r} must be one of {list(self.choices)}, got {value!r}")
        if kind is float and not math.isfinite(value):
            raise UserError(f"parameter {what!r} must be a finite number, got {raw!r}")
        if kind in (int, float) and not self.in_range(value):
            raise UserError(f"parameter {what!r} must be {self.range_text()}, got {value!r}")
        return value


def param(
    default: Any,
    help: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    unbounded: bool = False,
) -> Any:
    """A config field: its default, one line of help and, for numbers, its range."""
    meta = {"help": help, "low": low, "high": high, "low_open": low_open, "high_open": high_open,
            "unbounded": unbounded}
    return dataclasses.field(default=default, metadata={"param": meta})


def _param_of(f: dataclasses.Field[Any], annotation: Any) -> Param:
    meta = f.metadata.get("param")
    if meta is None:
        raise TypeError(f"config field {f.name!r} must be declared with interp.runs.config.param()")
    kind, choices, item = _kind(annotation, f.name)
    if item is not None and not isinstance(f.default, tuple):
        raise TypeError(f"config field {f.name!r}: a list parameter's default must be a tuple")
    return Param(f.name, kind, f.default, meta["help"], choices, meta["low"], meta["high"],
                 meta["low_open"], meta["high_open"], meta["unbounded"], item)


def _kind(annotation: Any, name: str) -> tuple[type, tuple[Any, ...] | None, type | None]:
    """(type, choices, item type) of a field annotation."""
    origin = get_origin(annotation)
    if origin is tuple:
        args = get_args(annotation)
        if len(args) != 2 or args[1] is not Ellipsis:
            raise TypeError(f"config field {name!r}: lists are written tuple[X, ...]")
        kind, choices, _ = _kind(args[0], name)
        return tuple, choices, kind
    if origin is Literal:
        choices = get_args(annotation)
        return type(choices[0]), tuple(choices), None
    if annotation in _SCALARS:
        return annotation, None, None
    raise TypeError(f"config field {name!r}: unsupported type {annotation!r}")


@dataclass(frozen=True)
class DetectorConfig:
    """Base of every detector's parameters (see the module docstring).

    ``renamed`` maps a parameter's former name to its current one: :meth:`parse` reads the old
    name (a stored run's parameters, an old script), so renaming a field never orphans a run.
    """

    renamed: ClassVar[dict[str, str]] = {}

    def __post_init__(self) -> None:
        for p in self.specs():
            object.__setattr__(self, p.name, p.parse(getattr(self, p.name)))
        self.check()

    def check(self) -> None:
        """Check what single ranges cannot: relations between fields (min <= max), a list's
        items, a file's existence. Raise UserError naming the fields. Checks that need the
        model (a layer index, a prompt against the context) belong in ``Detector.units``."""

    @classmethod
    def specs(cls) -> tuple[Param, ...]:
        """The fields as :class:`Param` (the CLI, the dashboard and the errors use these)."""
        hints = typing.get_type_hints(cls, include_extras=False)
        return tuple(_param_of(f, hints[f.name]) for f in dataclasses.fields(cls))

    @classmethod
    def parse(cls, raw: Mapping[str, Any], owner: str = "") -> Self:
        """A config from raw values (command-line strings, JSON), unknown names refused;
        ``owner`` (the detector's name) is named in that error."""
        names = [f.name for f in dataclasses.fields(cls)]
        clash = [old for old, new in cls.renamed.items() if old in raw and new in raw]
        if clash:
            raise UserError(f"give {cls.renamed[clash[0]]!r} only ({clash[0]!r} is its former name)")
        raw = {cls.renamed.get(k, k): v for k, v in raw.items()}
        unknown = sorted(set(raw) - set(names))
        if unknown:
            known = ", ".join(sorted(names)) or "none"
            where = f" for {owner!r}" if owner else ""
            raise UserError(f"unknown parameter {unknown[0]!r}{where} (known: {known})")
        return cls(**{k: v for k, v in raw.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        """The values as JSON types (lists for tuples): what the store records and keys on."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def get(self, name: str, default: Any = None) -> Any:
        """A field by name, ``default`` when this config has no such field (generic code such
        as the runner reading ``seed``)."""
        return getattr(self, name, default)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


@dataclass(frozen=True)
class NoParams(DetectorConfig):
    """The config of a detector without parameters."""
