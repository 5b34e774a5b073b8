"""The retrieval detector's per-head summary on hand-made unit tables: means, nulls, the share
above the threshold with its interval over samples, and units stored before the null."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from circuits.methods.retrieval_heads import scored_heads, share_above_interval

# Three counted samples of a 1-layer, 2-head model, and one sample that does not count.
SCORES = {"s0": [0.3, 0.0], "s1": [0.2, 0.09], "s2": [0.1, 0.0], "s3": [0.9, 0.9]}
NULLS = {"s0": [0.05, 0.0], "s1": [0.05, 0.05], "s2": [0.0, 0.0], "s3": [0.5, 0.5]}


def _results(with_null: set[str]) -> dict[str, pd.DataFrame]:
    rows = [(u, "retrieval_sample", 0, h, v) for u, vs in SCORES.items() for h, v in enumerate(vs)]
    rows += [(u, "retrieval_null_sample", 0, h, v) for u, vs in NULLS.items() if u in with_null for h, v in enumerate(vs)]
    return {"head_scores": pd.DataFrame(rows, columns=["unit", "metric", "layer", "head", "value"])}


def test_means_over_the_counted_samples_and_the_share_by_hand() -> None:
    got = scored_heads(_results(set(SCORES)), list(SCORES), {"s0", "s1", "s2"}, 2, 0.95, 0.1)
    # Head 0: (0.3 + 0.2 + 0.1) / 3 = 0.2 > 0.1; head 1: 0.09 / 3 < 0.1. s3 does not count.
    assert [(h["head"], pytest.approx(h["score"])) for h in got.heads] == [(0, 0.2), (1, 0.03)]
    assert [pytest.approx(h["retrieval_null"]) for h in got.heads] == [0.1 / 3, 0.05 / 3]
    assert (got.metrics["n_heads_above_threshold"], got.metrics["share_heads_above_threshold"]) == (1, 0.5)
    iv = got.intervals["share_heads_above_threshold"]
    assert (iv.value, iv.n) == (0.5, 3)
    # A resample's share is 0 or 0.5 (head 1 never passes 0.1: its largest mean is 0.09); head 0
    # falls to 0.1, not above, only on the resample s2 x3.
    assert iv.lo in (0.0, 0.5)
    assert iv.hi == 0.5
    assert not got.warnings


def test_samples_stored_before_the_null_leave_it_to_the_others() -> None:
    got = scored_heads(_results({"s0", "s1"}), list(SCORES), {"s0", "s1", "s2"}, 2, 0.95, 0.1)
    assert [pytest.approx(h["retrieval_null"]) for h in got.heads] == [0.05, 0.025]
    assert got.warnings == ["null from 2 of 3 counted samples: the others were stored before the null"]
    none = scored_heads(_results(set()), list(SCORES), {"s0", "s1", "s2"}, 2, 0.95, 0.1)
    assert all("retrieval_null" not in h for h in none.heads)
    assert none.warnings == ["no null: every sample was stored before the null"]
    assert set(none.table["metric"]) == {"retrieval"}


def test_the_share_interval_is_a_point_when_every_sample_agrees() -> None:
    grids = np.tile(np.array([[[0.3, 0.05, 0.2]]]), (6, 1, 1))
    iv = share_above_interval(grids, 0.1)
    assert (iv.value, iv.lo, iv.hi) == (pytest.approx(2 / 3), pytest.approx(2 / 3), pytest.approx(2 / 3))
