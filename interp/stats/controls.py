"""A top head set against random controls taken as a distribution: where its value falls among
the values of N random draws (random head sets of the same size), and the empirical p-value.

Phipson & Smyth (2010), "Permutation p-values should never be zero: calculating exact p-values
when permutations are randomly drawn", Statistical Applications in Genetics and Molecular Biology
9(1): with N random draws the exact p-value of the observed value, counting it among the draws, is
(1 + #draws at least as extreme) / (1 + N); it is never 0 and its floor 1 / (1 + N) says how many
draws a small p needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from interp.errors import UserError
from interp.stats.checks import ArrayLike, as_values
from interp.stats.interval import Direction, check_direction


@dataclass(frozen=True)
class RandomControl:
    """The top set's ``value`` among ``n_draws`` random draws' values.

    ``percentile``: percent of draws below the value, ties counted half (0 to 100, whatever the
    direction); ``n_as_extreme``: draws at least as far in the effect's ``direction`` (<= the
    value for "lower", >= for "higher"); ``p_value`` = (1 + n_as_extreme) / (1 + n_draws).
    """

    value: float
    percentile: float
    p_value: float
    n_as_extreme: int
    n_draws: int
    direction: Direction

    def to_dict(self) -> dict[str, float | int | str]:
        """The fields as plain values for a store or JSON."""
        return {"value": float(self.value), "percentile": float(self.percentile),
                "p_value": float(self.p_value), "n_as_extreme": int(self.n_as_extreme),
                "n_draws": int(self.n_draws), "direction": self.direction}


def against_random(value: float, draws: ArrayLike, direction: Direction) -> RandomControl:
    """Where ``value`` falls among the random ``draws``, and its empirical p-value in ``direction``."""
    direction = check_direction(direction)
    if not math.isfinite(value):
        raise UserError(f"the top set's value must be a finite number, got {value}")
    d = as_values(draws, "random draws")
    below, ties = int((d < value).sum()), int((d == value).sum())
    extreme = below + ties if direction == "lower" else len(d) - below
    return RandomControl(float(value), 100.0 * (below + ties / 2) / len(d), (1 + extreme) / (1 + len(d)),
                         extreme, len(d), direction)
