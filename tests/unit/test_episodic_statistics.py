"""episodic-ablation's interval and p-value against hand-worked numbers (issue 27).

With four paired samples the t distribution has 3 degrees of freedom, whose CDF has a closed
form (Student's t, nu = 3): F(t) = 1/2 + [t / (sqrt(3) (1 + t^2/3)) + atan(t / sqrt(3))] / pi.
The interval's half-width must put the mean at F = 0.975 of its standard error, and the two-sided
p-value is 2 (1 - F(|t|)); both are computed here from that formula, not with scipy.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from circuits.detectors.episodic_ablation import ablation_effects
from interp.runs.units import Unit
from interp.stats.means import paired_p, t_interval


def t3_cdf(t: float) -> float:
    return 0.5 + (t / (math.sqrt(3) * (1 + t * t / 3)) + math.atan(t / math.sqrt(3))) / math.pi


def test_t_interval_by_hand() -> None:
    x = np.array([1.0, 2.0, 4.0, 7.0])
    # mean 3.5; deviations -2.5, -1.5, 0.5, 3.5; sum of squares 21; s = sqrt(21 / 3) = sqrt(7)
    m, lo, hi = t_interval(x)
    assert m == 3.5
    se = math.sqrt(7) / 2
    assert math.isclose(hi - m, m - lo, rel_tol=1e-12)
    assert math.isclose(t3_cdf((hi - m) / se), 0.975, abs_tol=1e-9)
    # The tabulated t(0.975, 3) = 3.182446: half-width 3.182446 * sqrt(7) / 2 = 4.2099.
    assert math.isclose(hi - m, 3.182446 * se, rel_tol=1e-6)
    single = t_interval(np.array([2.0]))
    assert single[0] == 2.0
    assert math.isnan(single[1])
    assert math.isnan(single[2])


def test_paired_p_by_hand() -> None:
    a, b = np.array([2.0, 4.0, 6.0, 8.0]), np.array([1.0, 2.0, 3.0, 5.0])
    # d = 1, 2, 3, 3: mean 2.25, s = sqrt(2.75 / 3), t = 2.25 / (s / 2) = 4.70009
    t = 2.25 / (math.sqrt(2.75 / 3) / 2)
    assert math.isclose(t, 4.700096, rel_tol=1e-6)
    assert math.isclose(paired_p(a, b), 2 * (1 - t3_cdf(t)), rel_tol=1e-9)
    assert math.isclose(paired_p(b, a), paired_p(a, b), rel_tol=1e-12)  # two-sided
    assert math.isnan(paired_p(a, a + 1.0))  # differences without spread: no t statistic


def test_ablation_effects_by_hand() -> None:
    """A hand-made curves table: four positions, clean and top-k, two random draws."""
    values = {"clean": [1.0, 2.0, 3.0, 4.0], "top": [2.0, 4.0, 6.0, 8.0], "random-0": [1.0, 2.0, 3.0, 5.0],
              "random-1": [1.0, 2.0, 3.0, 5.0]}
    rows = [{"unit": u, "curve": metric, "layer": None, "head": None, "x": float(x), "y": y}
            for u, ys in values.items() for metric in ("icl", "icl_window", "second_copy_loss")
            for x, y in zip([3, 0, 2, 1], [ys[3], ys[0], ys[2], ys[1]], strict=True)]  # x order is restored
    units = [Unit("clean"), Unit("top"), Unit("random", 0), Unit("random", 1)]
    metrics, _ = ablation_effects(pd.DataFrame(rows), units)
    # top - clean = 1, 2, 3, 4: mean 2.5; random - clean = 0, 0, 0, 1: mean 0.25
    assert metrics["icl_clean"] == 2.5
    assert metrics["icl_delta_top"] == 2.5
    assert metrics["icl_delta_random"] == 0.25
    assert metrics["icl_top_minus_random"] == 2.25
    # top - random = 1, 2, 3, 3: the pair worked out above.
    t = 2.25 / (math.sqrt(2.75 / 3) / 2)
    assert math.isclose(metrics["icl_paired_p"], 2 * (1 - t3_cdf(t)), rel_tol=1e-9)
    lo, hi = metrics["icl_delta_top_ci"]  # 1, 2, 3, 4: s = sqrt(5 / 3)
    assert math.isclose(t3_cdf((hi - 2.5) / (math.sqrt(5 / 3) / 2)), 0.975, abs_tol=1e-9)
    assert math.isclose(lo, 5.0 - hi, rel_tol=1e-12)
    assert metrics["icl_delta_random_per_draw"] == [0.25, 0.25]


def test_top_set_among_random_draws_by_hand() -> None:
    """Four random draws whose mean changes are 0.25, 3.0, 2.5 and 1.0 against a top-k change of
    2.5: two below, one tie, one above, so percentile (2 + 1/2) / 4 = 62.5 and the empirical p that
    a draw raises the measure as much is (1 + 2) / (1 + 4) (Phipson & Smyth 2010)."""
    clean = [1.0, 2.0, 3.0, 4.0]
    values = {"clean": clean, "top": [2.0, 4.0, 6.0, 8.0]}
    for i, shift in enumerate([[0, 0, 0, 1], [3, 3, 3, 3], [1, 2, 3, 4], [1, 1, 1, 1]]):
        values[f"random-{i}"] = [c + s for c, s in zip(clean, shift, strict=True)]
    rows = [{"unit": u, "curve": metric, "layer": None, "head": None, "x": float(x), "y": y}
            for u, ys in values.items() for metric in ("icl", "icl_window", "second_copy_loss")
            for x, y in enumerate(ys)]
    units = [Unit("clean"), Unit("top"), *(Unit("random", i) for i in range(4))]
    metrics, rows_out = ablation_effects(pd.DataFrame(rows), units)
    stored = {name: (value, n) for name, value, _lo, _hi, n, *_ in rows_out}
    # The changes against clean are differences on the same texts: named as paired t intervals.
    methods = {row[0]: row[5] if len(row) > 5 else None for row in rows_out}
    assert methods["icl_delta_top"] == methods["icl_top_minus_random"] == "paired-t"
    assert methods["icl_top_vs_random_p"] is None
    for metric in ("icl", "icl_window", "second_copy_loss"):
        assert metrics[f"{metric}_delta_random_per_draw"] == [0.25, 3.0, 2.5, 1.0]
        assert metrics[f"{metric}_top_vs_random_percentile"] == 62.5
        assert math.isclose(metrics[f"{metric}_top_vs_random_p"], 3 / 5)
        assert stored[f"{metric}_top_vs_random_percentile"] == (62.5, 4)
        assert stored[f"{metric}_top_vs_random_p"][1] == 4

