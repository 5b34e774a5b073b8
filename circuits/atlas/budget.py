"""What an atlas claim's sample can and cannot decide: the half-width of its interval against
the target of 0.1, and for an inconclusive claim the sample it would need.

The needs are projections, not promises: an interval's half-width shrinks as 1/sqrt(n) for the
t, Wilson, Newcombe and bootstrap intervals the claims use, so at n' = n (h / h')^2 the half-width
h would become h' if the spread of the items stayed what it is. A claim read from random draws
needs enough draws for its empirical p to reach the level at all: with d draws the smallest p
is 1 / (1 + d) (Phipson & Smyth 2010), so 0.05 needs 19. A claim whose interval is undefined
because its n is below the least its method accepts needs that least n (``n_min``). A claim
whose n counts heads (``n_of`` "heads": the depths of a model's top heads) has no sample to
enlarge: its interval is what the model's heads give, whatever the budget.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

# The half-width every claim's interval should reach (the atlas's design target), on the scale of
# its value: shares, rates, relative depths and scores all lie in [0, 1].
TARGET_HALF_WIDTH = 0.1
ALPHA = 0.05
# The fewest draws whose smallest empirical p, 1 / (1 + draws), is at most ALPHA.
MIN_DRAWS = math.ceil(1 / ALPHA) - 1
AT_BUDGET = "inconclusive at this budget"
CHANCE_METHOD = "hypergeometric"


def _n_for(n: int, half_width: float, target: float) -> int:
    # The tolerance keeps a half-width on the target (0.1 up to rounding) from asking for one more.
    return max(n, math.ceil(n * (half_width / target) ** 2 - 1e-9))


def _interval_needs(result: Mapping[str, Any]) -> dict[str, Any]:
    n, lo, hi, value = result.get("n"), result.get("lo"), result.get("hi"), result.get("value")
    if not isinstance(n, int) or n < 1:
        return {}
    if not isinstance(lo, int | float) or not isinstance(hi, int | float):
        n_min = result.get("n_min")
        if isinstance(n_min, int) and n < n_min:
            return {"n_needed": n_min, "need": f"{AT_BUDGET}: n = {n}, the interval needs n >= {n_min}"}
        return {}
    half = (float(hi) - float(lo)) / 2
    out: dict[str, Any] = {"half_width": half, "n_for_target": _n_for(n, half, TARGET_HALF_WIDTH)}
    if result["verdict"] != "inconclusive" or result.get("n_of") == "heads":
        return out
    threshold = result.get("threshold")
    needs = []
    if half > TARGET_HALF_WIDTH:
        needs.append(f"half-width {half:.2g} at n = {n}; n ~ {out['n_for_target']} for {TARGET_HALF_WIDTH}")
    if isinstance(threshold, int | float) and isinstance(value, int | float) and value != threshold:
        # The bound on the threshold's side (a bootstrap interval need not be symmetric) must
        # shrink to the distance between the value and the threshold.
        side = float(hi) - float(value) if threshold > value else float(value) - float(lo)
        out["n_to_decide"] = _n_for(n, side, abs(float(value) - float(threshold)))
        needs.append(f"n ~ {out['n_to_decide']} to decide if the value stays at {value:.3g}")
    if needs:
        out["n_needed"] = out.get("n_to_decide", out["n_for_target"])
        out["need"] = f"{AT_BUDGET}: " + "; ".join(needs)
    return out


def _draws_needs(result: Mapping[str, Any]) -> dict[str, Any]:
    n = result.get("n")
    if result["verdict"] != "inconclusive" or not isinstance(n, int) or n >= MIN_DRAWS:
        return {}
    return {"n_needed": MIN_DRAWS,
            "need": f"{AT_BUDGET}: {n} draws cannot give p <= {ALPHA} (at least {MIN_DRAWS} can)"}


def assess(result: Mapping[str, Any]) -> dict[str, Any]:
    """``result`` (one claim on one model) with what its sample can decide: ``half_width`` and
    ``n_for_target`` for an interval; for an inconclusive claim that more items or draws could
    decide, ``n_needed`` (``n_to_decide`` when the value would stay where it is) and ``need``,
    the sentence saying it is inconclusive at this budget."""
    method = result.get("method")
    # A point or an exact chance comparison (the overlap claim) has no sample to enlarge.
    if result.get("verdict") in (None, "not measurable") or method in ("point", CHANCE_METHOD):
        return dict(result)
    extra = _draws_needs(result) if method == "random draws" else _interval_needs(result)
    return {**result, **extra}
