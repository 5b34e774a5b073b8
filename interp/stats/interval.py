"""The record of an estimate with its confidence interval and n, and the direction of an effect."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from interp.errors import UserError

# Which way the effect goes: "lower" where a smaller value is the effect (accuracy that falls
# when the top heads are pruned), "higher" where a larger value is (a loss that rises).
Direction = Literal["lower", "higher"]


def check_direction(direction: str) -> Direction:
    """``direction`` as a ``Direction``, or a ``UserError``."""
    if direction == "lower":
        return "lower"
    if direction == "higher":
        return "higher"
    raise UserError(f"direction must be 'lower' or 'higher' (which way the effect goes), got {direction!r}")


@dataclass(frozen=True)
class Interval:
    """An estimate ``value`` with its two-sided ``level`` confidence interval ``[lo, hi]``.

    ``n`` is the number of items it rests on (pairs, for a paired difference); ``method`` names how
    the interval was made ("wilson", "t", "paired-t", "newcombe", "bca-bootstrap",
    "percentile-bootstrap", "paired-bca-bootstrap", ...). ``lo`` and ``hi`` are nan where the
    method has no interval for this data (a t interval from one value).
    """

    value: float
    lo: float
    hi: float
    n: int
    method: str
    level: float

    @property
    def defined(self) -> bool:
        """Whether both bounds are numbers."""
        return not (math.isnan(self.lo) or math.isnan(self.hi))

    def contains(self, x: float) -> bool:
        """Whether ``x`` lies in the closed interval (False where the interval is undefined)."""
        return self.defined and self.lo <= x <= self.hi

    def to_dict(self) -> dict[str, float | int | str | None]:
        """The fields as plain values for a store or JSON; nan bounds become None."""
        def num(x: float) -> float | None:
            return None if math.isnan(x) else float(x)

        return {"value": num(self.value), "lo": num(self.lo), "hi": num(self.hi), "n": int(self.n),
                "method": self.method, "level": float(self.level)}

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> Interval:
        """The record :meth:`to_dict` wrote (None bounds back to nan)."""
        def num(x: Any) -> float:
            return math.nan if x is None else float(x)

        return cls(num(doc["value"]), num(doc["lo"]), num(doc["hi"]), int(doc["n"]), str(doc["method"]),
                   float(doc["level"]))
