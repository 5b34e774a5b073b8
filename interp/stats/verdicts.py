"""Three verdicts from an interval: the claim holds, does not hold, or the data cannot tell.

The rule, for a claim that the true value lies on the ``direction`` side of ``threshold``
("higher": above it; "lower": below it), with the interval [lo, hi] closed:

- "holds": the whole interval lies strictly on the claimed side (lo > threshold for "higher");
- "does not hold": the whole interval lies strictly on the other side (hi < threshold);
- "inconclusive": the interval contains the threshold, or is undefined (nan bounds).

This is the confidence-interval reading of two one-sided tests at level (1 - level) / 2 each
(Schuirmann 1987, J. Pharmacokinetics and Biopharmaceutics 15; Gardner & Altman 1986, BMJ 292, on
reporting intervals rather than p alone). "Does not hold" says the effect goes the other way or
falls short of the threshold, not merely that it was not found; an interval too wide to decide is
"inconclusive", never "does not hold".
"""

from __future__ import annotations

from typing import Literal

from interp.stats.interval import Direction, Interval, check_direction

Verdict = Literal["holds", "does not hold", "inconclusive"]


def verdict(interval: Interval, threshold: float, direction: Direction) -> Verdict:
    """The verdict on "the true value is ``direction`` than ``threshold``" (rule in the module docstring)."""
    direction = check_direction(direction)
    if not interval.defined or interval.contains(threshold):
        return "inconclusive"
    above = interval.lo > threshold
    return "holds" if above == (direction == "higher") else "does not hold"


def difference_verdict(difference: Interval, direction: Direction) -> Verdict:
    """The verdict on a paired difference a - b: "higher" claims a > b, "lower" claims a < b.

    ``difference`` is an interval of the per-item difference of two conditions on the same items
    (``paired_interval``), so that the items' shared variation cancels; two separate intervals
    that overlap can still differ (Schenker & Gelman 2001, The American Statistician 55).
    """
    return verdict(difference, 0.0, direction)
