"""What an atlas claim's sample can decide (circuits.atlas.budget) and the overlap claim's exact
chance comparison, checked against hand-worked numbers and a full enumeration of random sets."""

from __future__ import annotations

import itertools
import math

import pytest

from circuits.atlas.budget import AT_BUDGET, MIN_DRAWS, assess
from circuits.atlas.claims import FAILS, HOLDS, INCONCLUSIVE, overlap_against_chance


def _claim(verdict: str, value: float, lo: float | None, hi: float | None, n: int, **extra: object) -> dict:
    return {"verdict": verdict, "value": value, "lo": lo, "hi": hi, "n": n, "method": "t", **extra}


def test_a_wide_inconclusive_interval_says_what_n_it_needs() -> None:
    # Half-width 0.2 at n = 20: 0.1 needs 4x the items (1/sqrt(n)); the value 0.55 sits 0.05 from
    # the threshold 0.5, which needs the half-width / 4, so 16x the items.
    r = assess(_claim(INCONCLUSIVE, 0.55, 0.35, 0.75, 20, threshold=0.5))
    assert r["half_width"] == pytest.approx(0.2)
    assert r["n_for_target"] == 80
    assert r["n_to_decide"] == 320
    assert r["n_needed"] == 320
    assert r["need"].startswith(AT_BUDGET)


def test_a_decided_or_narrow_claim_needs_nothing_more() -> None:
    held = assess(_claim(HOLDS, 0.8, 0.7, 0.9, 30, threshold=0.5))
    assert held["half_width"] == pytest.approx(0.1)
    assert held["n_for_target"] == 30
    assert "need" not in held
    # Decided but wide: the half-width target says what n it would take, no "need" sentence.
    wide = assess(_claim(HOLDS, 0.8, 0.55, 1.0, 10, threshold=0.5))
    assert wide["n_for_target"] == math.ceil(10 * (0.225 / 0.1) ** 2)
    assert "need" not in wide
    point = assess({"verdict": HOLDS, "value": 1.0, "lo": None, "hi": None, "n": 3, "method": "point"})
    assert "need" not in point
    assert "half_width" not in point


def test_too_few_draws_can_never_decide() -> None:
    few = assess({"verdict": INCONCLUSIVE, "value": 0.3, "lo": 0.1, "hi": 0.4, "n": 2, "method": "random draws"})
    assert few["n_needed"] == MIN_DRAWS == 19
    # 1 / (1 + 19) = 0.05: the smallest p that 19 draws allow reaches the level; 18 do not.
    assert 1 / (1 + MIN_DRAWS) <= 0.05 < 1 / MIN_DRAWS
    enough = assess({"verdict": INCONCLUSIVE, "value": 0.3, "lo": 0.1, "hi": 0.4, "n": 20, "method": "random draws"})
    assert "need" not in enough


def test_an_interval_below_its_methods_least_n_needs_that_n() -> None:
    r = assess(_claim(INCONCLUSIVE, 0.13, None, None, 2, threshold=0.5, n_min=10))
    assert r["n_needed"] == 10
    assert AT_BUDGET in r["need"]


def _enumerated(n_heads: int, a: int, b: int, shared: int) -> tuple[float, float, float]:
    """P(share >= shared), P(share <= shared) and the mean Jaccard over every pair of sets of
    sizes a and b (the first fixed: by symmetry the second's draw is all that matters)."""
    first = set(range(a))
    counts = [len(first & set(c)) for c in itertools.combinations(range(n_heads), b)]
    jacc = [s / (a + b - s) for s in counts]
    return (sum(s >= shared for s in counts) / len(counts), sum(s <= shared for s in counts) / len(counts),
            sum(jacc) / len(jacc))


@pytest.mark.parametrize(("n_heads", "a", "b", "shared"), [(12, 4, 4, 3), (12, 4, 5, 0), (10, 3, 3, 1), (16, 5, 5, 5)])
def test_overlap_against_chance_equals_the_enumeration(n_heads: int, a: int, b: int, shared: int) -> None:
    more, fewer, mean = _enumerated(n_heads, a, b, shared)
    r = overlap_against_chance(a, b, shared, n_heads)
    assert r["p"] == pytest.approx(more, abs=1e-12)
    assert r["chance_jaccard"] == pytest.approx(mean, abs=1e-12)
    assert r["jaccard"] == pytest.approx(shared / (a + b - shared))
    assert r["value"] == pytest.approx(r["jaccard"] - mean, abs=1e-9)
    expected = HOLDS if more <= 0.05 else FAILS if fewer <= 0.05 else INCONCLUSIVE
    assert r["verdict"] == expected
    assert r["lo"] <= r["value"] <= r["hi"] or r["verdict"] != INCONCLUSIVE


def test_overlap_verdicts_on_both_sides() -> None:
    # Ten of 270 heads shared in full: far beyond chance (expected 0.37 shared).
    assert overlap_against_chance(10, 10, 10, 270)["verdict"] == HOLDS
    # One shared head of 270 is what chance gives about a third of the time.
    one = overlap_against_chance(10, 10, 1, 270)
    assert one["verdict"] == INCONCLUSIVE
    assert 0.25 < one["p"] < 0.4
    # Two halves of 20 heads sharing none: chance shares 5 on average, 0 with p = 1 / C(20, 10).
    assert overlap_against_chance(10, 10, 0, 20)["verdict"] == FAILS


def test_an_asymmetric_interval_is_judged_on_the_thresholds_side() -> None:
    # 0.0417 [0.0417, 0.0556] against 5 %: the upper side (0.0139) must shrink to 0.0083.
    r = assess(_claim(INCONCLUSIVE, 0.5 / 12, 0.5 / 12, 0.0556, 12, threshold=0.05))
    assert r["n_to_decide"] == math.ceil(12 * ((0.0556 - 0.5 / 12) / (0.05 - 0.5 / 12)) ** 2)


def test_a_claim_over_a_models_heads_has_no_sample_to_enlarge() -> None:
    r = assess(_claim(INCONCLUSIVE, 0.48, 0.39, 0.58, 40, threshold=0.5, n_of="heads"))
    assert "need" not in r
    assert r["half_width"] == pytest.approx(0.095)
