"""interp.stats against independent computations: coverage on simulated data with a known answer,
hand-worked intervals and p-values, and the three verdicts on hand-built intervals.

Coverage: 1,000 seeded samples (2,000 for the bootstrap, whose coverage at n = 100 sits about
half a point under 95 %); a 95 % interval must cover the true value in 93-97 % of them (the
binomial standard error of a coverage near 95 % over 1,000 samples is 0.7 points). The measured
coverage of each is in its docstring. The same harness rejects Wald at n = 20 (tests below), and,
checked by hand: Newcombe's phi uncorrected (exact coverage 91.5 % for the paired table used here
at n = 20) or set to 0 (99.4 %), and z instead of t at n = 5 (86.6 % measured), each fail it.
"""

from __future__ import annotations

import ast
import math
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from interp.errors import UserError
from interp.stats import (
    Interval,
    against_random,
    bootstrap_interval,
    difference_verdict,
    interval,
    mcnemar_exact_p,
    newcombe_paired,
    paired_interval,
    paired_p,
    paired_t_interval,
    verdict,
    wilson,
    wilson_counts,
)

# A paired 0/1 table, as P(cell): right both with and without pruning, right only without, right
# only with, wrong both. The outcomes are correlated (phi = 0.54); the true difference is 0.15.
CELLS = (0.4, 0.2, 0.05, 0.35)
TRUE_DIFFERENCE = CELLS[1] - CELLS[2]


def coverage(intervals: list[Interval], truth: float | np.ndarray) -> float:
    """Share of intervals whose closed [lo, hi] holds the true value (one value or one per interval)."""
    truths = np.broadcast_to(np.asarray(truth, dtype=float), (len(intervals),))
    return float(np.mean([iv.lo <= t <= iv.hi for iv, t in zip(intervals, truths, strict=True)]))


def bernoulli(p: float | np.ndarray, n: int, seed: int, samples: int = 1000) -> np.ndarray:
    """``samples`` rows of n 0/1 outcomes, row i with success probability p (or p[i])."""
    rng = np.random.default_rng(seed)
    probs = np.broadcast_to(np.asarray(p, dtype=float), (samples,))[:, None]
    return (rng.random((samples, n)) < probs).astype(float)


def paired_outcomes(n: int, seed: int, samples: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """``samples`` rows of n items drawn from ``CELLS``: (outcome without pruning, with pruning)."""
    cell = np.random.default_rng(seed).choice(4, size=(samples, n), p=CELLS)
    return (cell <= 1).astype(float), ((cell == 0) | (cell == 2)).astype(float)


def wald(values: np.ndarray) -> Interval:
    """The broken variant: p ± z sqrt(p (1 - p) / n) (Brown, Cai & DasGupta 2001, §2)."""
    p, n = float(values.mean()), len(values)
    half = 1.959964 * math.sqrt(p * (1 - p) / n)
    return Interval(p, p - half, p + half, n, "wald", 0.95)


# --- coverage -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "p"), [(20, 0.2), (200, 0.3)])
def test_wilson_covers_a_proportion(n: int, p: float) -> None:
    """Measured (seed 1): n = 20, p = 0.2: 94.4 %; n = 200, p = 0.3: 94.8 %. Exact coverage by
    enumeration is 95.6 % and 94.7 %. At n = 20, p = 0.3 Wilson's exact coverage is 97.5 %, just
    above the band (96.5 % measured on seed 1): the binomial's oscillation (Brown, Cai & DasGupta
    2001, §2), hence p = 0.2 there; the test over p drawn uniformly below picks no p."""
    samples = bernoulli(p, n, seed=1)
    intervals = [interval(row) for row in samples]
    assert {iv.method for iv in intervals} == {"wilson"}
    assert 0.93 <= coverage(intervals, p) <= 0.97


def test_wilson_covers_on_average_over_p() -> None:
    """Each sample its own p ~ U(0.05, 0.95), n = 20: 94.9 % measured (seeds 2, 3); Wald 89.9 %."""
    p = np.random.default_rng(2).uniform(0.05, 0.95, 1000)
    samples = bernoulli(p, 20, seed=3)
    assert 0.93 <= coverage([interval(row) for row in samples], p) <= 0.97
    assert coverage([wald(row) for row in samples], p) < 0.93


def test_the_harness_rejects_wald_at_n_20() -> None:
    """The broken variant fails the same check: Wald at n = 20, p = 0.2 covers 92.1 % exactly
    (92.0 % measured on the samples Wilson covers 94.4 % of)."""
    samples = bernoulli(0.2, 20, seed=1)
    assert coverage([wald(row) for row in samples], 0.2) < 0.93


@pytest.mark.parametrize("n", [20, 200])
def test_newcombe_covers_a_paired_difference(n: int) -> None:
    """Measured (seed 4): n = 20: 94.8 % (exact by enumeration: 96.1 %); n = 200: 95.5 %."""
    a, b = paired_outcomes(n, seed=4)
    intervals = [paired_interval(x, y) for x, y in zip(a, b, strict=True)]
    assert {iv.method for iv in intervals} == {"newcombe"}
    assert 0.93 <= coverage(intervals, TRUE_DIFFERENCE) <= 0.97


@pytest.mark.parametrize("n", [5, 50])
def test_t_covers_a_mean(n: int) -> None:
    """Normal data, mean 1, sd 2. Measured (seed 5): n = 5: 94.7 %; n = 50: 94.7 %. With z for t
    the n = 5 interval covers 86.6 % of the same samples (checked by hand)."""
    samples = np.random.default_rng(5).normal(1.0, 2.0, (1000, n))
    intervals = [interval(row) for row in samples]
    assert {iv.method for iv in intervals} == {"t"}
    assert 0.93 <= coverage(intervals, 1.0) <= 0.97


def test_paired_t_covers_a_mean_difference() -> None:
    """Correlated pairs b = 0.8 a + N(0.3, 0.6²), n = 10: true mean(a - b) = -0.3. Measured
    (seed 6): 94.3 %."""
    rng = np.random.default_rng(6)
    a = rng.normal(0.0, 1.0, (1000, 10))
    b = 0.8 * a + rng.normal(0.3, 0.6, (1000, 10))
    intervals = [paired_interval(x, y) for x, y in zip(a, b, strict=True)]
    assert {iv.method for iv in intervals} == {"paired-t"}
    assert 0.93 <= coverage(intervals, -0.3) <= 0.97


def test_bca_covers_a_skewed_mean() -> None:
    """Exponential data (mean 1), n = 100, 999 resamples each. Measured (seed 7): 94.5 %. At
    small n both BCa and t undercover this skewed distribution (measured on 1,000 samples: n = 20,
    BCa 91.2 %, t 90.9 %; n = 50, BCa 92.6 %, t 93.0 %); the bootstrap's intervals are also too
    narrow by about sqrt((n - 1) / n), the plug-in variance's bias (Efron & Tibshirani 1993, ch. 14)."""
    samples = np.random.default_rng(7).exponential(1.0, (2000, 100))
    intervals = [bootstrap_interval(row, n_resamples=999, seed=i) for i, row in enumerate(samples)]
    assert {iv.method for iv in intervals} == {"bca-bootstrap"}
    assert 0.93 <= coverage(intervals, 1.0) <= 0.97


def test_paired_bootstrap_covers_a_mean_difference() -> None:
    """The pairs of the paired-t test, n = 100, 999 resamples each. Measured (seed 8): 94.4 %
    (94.45 % on 4,000 other samples, against 95.2 % for paired t on the same)."""
    rng = np.random.default_rng(8)
    a = rng.normal(0.0, 1.0, (2000, 100))
    b = 0.8 * a + rng.normal(0.3, 0.6, (2000, 100))
    intervals = [paired_interval(x, y, method="paired-bootstrap", n_resamples=999, seed=i)
                 for i, (x, y) in enumerate(zip(a, b, strict=True))]
    assert {iv.method for iv in intervals} == {"paired-bca-bootstrap"}
    assert 0.93 <= coverage(intervals, -0.3) <= 0.97


# --- hand-worked values -------------------------------------------------------------------------

# The level at which z = 2 exactly, P(|Z| < 2) = erf(2 / sqrt 2), so hand values need no table.
Z2_LEVEL = math.erf(2 / math.sqrt(2))


def test_wilson_by_hand() -> None:
    """x = 3 of n = 10, z = 2: centre (3 + 2) / 14, half-width (2 / 14) sqrt(3 * 7 / 10 + 1)."""
    iv = wilson([1, 1, 1, 0, 0, 0, 0, 0, 0, 0], Z2_LEVEL)
    assert iv.value == 0.3
    assert (iv.n, iv.method) == (10, "wilson")
    assert math.isclose(iv.lo, 5 / 14 - math.sqrt(3.1) / 7, rel_tol=1e-9)
    assert math.isclose(iv.hi, 5 / 14 + math.sqrt(3.1) / 7, rel_tol=1e-9)
    # No successes: the interval still has width (Wald's would be 0..0): hi = z² / (n + z²).
    zero = wilson_counts(0, 10, Z2_LEVEL)
    assert zero.lo == 0.0
    assert math.isclose(zero.hi, 4 / 14, rel_tol=1e-9)


def _pairs(n11: int, n10: int, n01: int, n00: int) -> tuple[list[int], list[int]]:
    """Items with the given 2x2 counts: (outcomes in condition a, outcomes in condition b)."""
    a = [1] * n11 + [1] * n10 + [0] * n01 + [0] * n00
    b = [1] * n11 + [0] * n10 + [1] * n01 + [0] * n00
    return a, b


def test_newcombe_by_hand() -> None:
    """Counts 6, 1, 0, 3 (n = 10), z = 2: p1 = 0.7, p2 = 0.6. Wilson 7/10: 9/14 ± sqrt(3.1)/7;
    Wilson 6/10: 8/14 ± sqrt(3.4)/7. ad - bc = 18 > n/2, so phi = (18 - 5) / sqrt(7*3*6*4)."""
    iv = newcombe_paired(*_pairs(6, 1, 0, 3), level=Z2_LEVEL)
    l1, u1 = 9 / 14 - math.sqrt(3.1) / 7, 9 / 14 + math.sqrt(3.1) / 7
    l2, u2 = 8 / 14 - math.sqrt(3.4) / 7, 8 / 14 + math.sqrt(3.4) / 7
    phi = 13 / math.sqrt(504)
    lo = 0.1 - math.sqrt((0.7 - l1) ** 2 - 2 * phi * (0.7 - l1) * (u2 - 0.6) + (u2 - 0.6) ** 2)
    hi = 0.1 + math.sqrt((u1 - 0.7) ** 2 - 2 * phi * (u1 - 0.7) * (0.6 - l2) + (0.6 - l2) ** 2)
    assert (iv.method, iv.n) == ("newcombe", 10)
    assert math.isclose(iv.value, 0.1, rel_tol=1e-12)
    assert math.isclose(iv.lo, lo, rel_tol=1e-9)
    assert math.isclose(iv.hi, hi, rel_tol=1e-9)
    # Counts 1, 4, 4, 1: ad - bc = -15 < 0, phi = -15 / sqrt(5^4) = -0.6 (uncorrected); both
    # arms are w = sqrt(3.5)/7 (Wilson 5/10), so the bounds are ± w sqrt(1 + 1.2 + 1).
    neg = newcombe_paired(*_pairs(1, 4, 4, 1), level=Z2_LEVEL)
    w = math.sqrt(3.5) / 7
    assert math.isclose(neg.hi, w * math.sqrt(3.2), rel_tol=1e-9)
    assert math.isclose(neg.lo, -w * math.sqrt(3.2), rel_tol=1e-9)


def test_mcnemar_exact_by_hand() -> None:
    """Discordant 1 and 6: 2 P(X <= 1), X ~ Bin(7, 1/2) = 2 (1 + 7) / 128; 2 and 8: 2 (1 + 10 + 45) / 1024."""
    assert math.isclose(mcnemar_exact_p(*_pairs(5, 1, 6, 2)), 16 / 128, rel_tol=1e-12)
    assert math.isclose(mcnemar_exact_p(*_pairs(0, 8, 2, 0)), 112 / 1024, rel_tol=1e-12)
    assert math.isclose(mcnemar_exact_p(*_pairs(3, 0, 5, 3)), 2 / 32, rel_tol=1e-12)
    assert mcnemar_exact_p(*_pairs(4, 3, 3, 1)) == 1.0  # as many each way: no evidence, capped at 1
    assert mcnemar_exact_p(*_pairs(4, 0, 0, 1)) == 1.0  # no discordant pair


def test_paired_t_by_hand() -> None:
    """d = 1, 2, 3, 3 (the pair of test_episodic_statistics): mean 2.25, s = sqrt(2.75 / 3); with
    3 degrees of freedom the tabulated t(0.975) = 3.182446."""
    a, b = [2.0, 4.0, 6.0, 8.0], [1.0, 2.0, 3.0, 5.0]
    iv = paired_t_interval(a, b)
    half = 3.182446 * math.sqrt(2.75 / 3) / 2
    assert (iv.value, iv.n, iv.method) == (2.25, 4, "paired-t")
    assert math.isclose(iv.hi - 2.25, half, rel_tol=1e-6)
    assert math.isclose(2.25 - iv.lo, half, rel_tol=1e-6)
    single = interval([3.0])
    assert single.value == 3.0
    assert math.isnan(single.lo)
    assert math.isnan(single.hi)


def test_random_control_by_hand() -> None:
    """Draws 1..10. Value 3: two draws below, one tie, so the percentile is (2 + 1/2) / 10 = 25 %;
    "lower": 3 draws <= 3, p = (1 + 3) / 11; "higher": 8 draws >= 3, p = 9 / 11."""
    draws = list(range(1, 11))
    low = against_random(3.0, draws, "lower")
    assert (low.percentile, low.n_as_extreme, low.n_draws) == (25.0, 3, 10)
    assert math.isclose(low.p_value, 4 / 11, rel_tol=1e-12)
    high = against_random(3.0, draws, "higher")
    assert (high.percentile, high.n_as_extreme) == (25.0, 8)
    assert math.isclose(high.p_value, 9 / 11, rel_tol=1e-12)
    # Beyond every draw: the p-value's floor 1 / (N + 1), never 0 (Phipson & Smyth 2010).
    assert against_random(0.5, draws, "lower").p_value == 1 / 11
    assert against_random(0.5, draws, "lower").percentile == 0.0
    assert against_random(11.0, draws, "higher").p_value == 1 / 11
    assert against_random(11.0, draws, "higher").percentile == 100.0
    # Ties count as at least as extreme either way: draws 1, 1, 1, 2 and value 1.
    tied = [1.0, 1.0, 1.0, 2.0]
    assert against_random(1.0, tied, "lower").p_value == 4 / 5
    assert against_random(1.0, tied, "higher").p_value == 1.0
    assert against_random(1.0, tied, "lower").percentile == 37.5
    assert low.to_dict() == {"value": 3.0, "percentile": 25.0, "p_value": 4 / 11, "n_as_extreme": 3,
                             "n_draws": 10, "direction": "lower"}


def test_verdicts_by_hand() -> None:
    iv = Interval(0.5, 0.2, 0.8, 30, "wilson", 0.95)
    assert verdict(iv, 0.1, "higher") == "holds"
    assert verdict(iv, 0.1, "lower") == "does not hold"
    assert verdict(iv, 0.9, "higher") == "does not hold"
    assert verdict(iv, 0.9, "lower") == "holds"
    assert verdict(iv, 0.5, "higher") == "inconclusive"
    assert verdict(iv, 0.5, "lower") == "inconclusive"
    assert verdict(iv, 0.2, "higher") == "inconclusive"  # the bounds belong to the interval
    assert verdict(iv, 0.8, "lower") == "inconclusive"
    undefined = Interval(0.5, math.nan, math.nan, 1, "t", 0.95)
    assert verdict(undefined, 0.1, "higher") == "inconclusive"
    # Paired differences a - b against 0.
    assert difference_verdict(Interval(-0.1, -0.3, -0.05, 40, "newcombe", 0.95), "lower") == "holds"
    assert difference_verdict(Interval(-0.1, -0.3, -0.05, 40, "newcombe", 0.95), "higher") == "does not hold"
    assert difference_verdict(Interval(-0.1, -0.3, 0.1, 40, "newcombe", 0.95), "lower") == "inconclusive"
    assert difference_verdict(Interval(0.2, 0.05, 0.3, 40, "paired-t", 0.95), "higher") == "holds"


# --- the bootstrap and the entry points ---------------------------------------------------------


def test_bootstrap_agrees_with_t_on_a_large_normal_sample() -> None:
    """n = 400 normal values: BCa and t estimate the same interval (within 5 % of its width), one
    seed gives one interval, another seed another."""
    x = np.random.default_rng(9).normal(3.0, 1.0, 400)
    t, boot = interval(x), interval(x, method="bootstrap", n_resamples=4999, seed=1)
    assert boot.method == "bca-bootstrap"
    assert boot.value == t.value
    width = t.hi - t.lo
    assert abs(boot.lo - t.lo) < 0.05 * width
    assert abs(boot.hi - t.hi) < 0.05 * width
    assert interval(x, method="bootstrap", n_resamples=999, seed=1) == \
        interval(x, method="bootstrap", n_resamples=999, seed=1)
    assert interval(x, method="bootstrap", n_resamples=999, seed=2) != \
        interval(x, method="bootstrap", n_resamples=999, seed=1)


def test_bootstrap_falls_back_without_warnings() -> None:
    """All values equal: value..value. A median whose jackknife has no spread (BCa's acceleration
    is 0 / 0): the percentile interval. Neither spills a warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flat = bootstrap_interval([2.0] * 5)
        ties = bootstrap_interval([0.0] * 15 + [1.0] * 3, np.median, n_resamples=999)
        same_shift = paired_interval([1.0, 2.0, 3.0], [0.0, 1.0, 2.0], method="paired-bootstrap")
    assert (flat.value, flat.lo, flat.hi, flat.method) == (2.0, 2.0, 2.0, "percentile-bootstrap")
    assert ties.method == "percentile-bootstrap"
    assert ties.lo <= ties.value <= ties.hi
    assert (same_shift.lo, same_shift.hi, same_shift.method) == (1.0, 1.0, "paired-percentile-bootstrap")


def test_the_entry_points_pick_the_method_from_the_data() -> None:
    assert interval([0, 1, 1, 0, True]).method == "wilson"
    assert interval([0.5, 1.0, 0.0]).method == "t"
    assert interval([0.0, 1.0, 1.0], method="t").method == "t"
    assert interval([0.3, 1.0, 2.0], statistic=np.median, n_resamples=99).method == "bca-bootstrap"
    assert paired_interval([1, 0, 1, 1], [0, 0, 1, 0]).method == "newcombe"
    assert paired_interval([1, 0, 1, 1], [0.5, 0, 1, 0]).method == "paired-t"
    median_shift = paired_interval([1.0, 2.0, 4.0, 3.0], [0.0, 1.5, 2.0, 2.5], n_resamples=99,
                                   statistic=lambda x, y, axis=-1: np.median(x - y, axis=axis))
    assert median_shift.method == "paired-bca-bootstrap"
    assert median_shift.value == 0.75


def test_interval_to_dict() -> None:
    iv = Interval(0.5, 0.25, 0.75, 12, "wilson", 0.95)
    assert iv.to_dict() == {"value": 0.5, "lo": 0.25, "hi": 0.75, "n": 12, "method": "wilson", "level": 0.95}
    undefined = interval([4.0]).to_dict()
    assert (undefined["value"], undefined["lo"], undefined["hi"], undefined["n"]) == (4.0, None, None, 1)


# --- bad input ----------------------------------------------------------------------------------

BAD_INPUT: list[tuple[str, Callable[[], object]]] = [
    ("confidence level", lambda: interval([0.1, 0.2], level=0.0)),
    ("confidence level", lambda: interval([0.1, 0.2], level=1.0)),
    ("confidence level", lambda: interval([0.1, 0.2], level=95)),
    ("confidence level", lambda: wilson([0, 1], level=float("nan"))),
    ("confidence level", lambda: paired_interval([0, 1], [1, 1], level=-0.5)),
    ("n_resamples", lambda: bootstrap_interval([0.1, 0.2], n_resamples=0)),
    ("n_resamples", lambda: bootstrap_interval([0.1, 0.2], n_resamples=1_000_001)),
    ("n_resamples", lambda: interval([0.1, 0.2], method="bootstrap", n_resamples=2.5)),  # type: ignore[arg-type]
    ("empty", lambda: interval([])),
    ("empty", lambda: wilson([])),
    ("empty", lambda: paired_interval([], [])),
    ("empty", lambda: against_random(1.0, [], "lower")),
    ("one value per item", lambda: paired_interval([1.0, 2.0], [1.0])),
    ("one value per item", lambda: mcnemar_exact_p([1, 0, 1], [1, 0])),
    ("one value per item", lambda: paired_p(np.array([1.0, 2.0]), np.array([1.0]))),
    ("0/1 outcomes", lambda: wilson([0, 0.5, 1])),
    ("0/1 outcomes", lambda: newcombe_paired([0, 2], [1, 0])),
    ("0/1 outcomes", lambda: mcnemar_exact_p([0, 1], [1, -1])),
    ("0/1 outcomes", lambda: interval([0.0, 2.0], method="wilson")),
    ("non-finite", lambda: interval([0.1, float("nan")])),
    ("unknown interval method", lambda: interval([0.1], method="wald")),  # type: ignore[arg-type]
    ("needs the bootstrap", lambda: interval([0.1, 0.2], method="t", statistic=np.median)),
    ("direction", lambda: against_random(1.0, [1.0, 2.0], "up")),  # type: ignore[arg-type]
    ("direction", lambda: verdict(Interval(0.5, 0.2, 0.8, 3, "t", 0.95), 0.1, "above")),  # type: ignore[arg-type]
    ("finite number", lambda: against_random(float("nan"), [1.0], "higher")),
]


@pytest.mark.parametrize(("words", "call"), BAD_INPUT, ids=[f"{i}-{w}" for i, (w, _) in enumerate(BAD_INPUT)])
def test_bad_input_is_a_one_line_user_error(words: str, call: Callable[[], object]) -> None:
    with pytest.raises(UserError, match=words) as info:
        call()
    assert "\n" not in str(info.value)


def test_stats_imports_only_numpy_scipy_and_errors() -> None:
    """The room's rule (its docstring): pure numpy/scipy, ``interp.errors`` and itself."""
    root = Path(__file__).resolve().parents[2] / "interp" / "stats"
    bad = []
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                top = name.split(".")[0]
                ok = (top in ("numpy", "scipy", "__future__") or top in sys.stdlib_module_names
                      or name == "interp.errors" or name.startswith("interp.stats"))
                if not ok:
                    bad.append(f"{path.name}: {name}")
    assert bad == []
