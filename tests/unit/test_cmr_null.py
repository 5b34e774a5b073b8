"""The CMR fit against its null (each head's lag-CRP shuffled over lags), on hand-built lag-CRPs
and end to end on a tiny model.

The references are independent of the code under test: the CMR distance computed by a loop over
grid points, a lag-CRP simulated by the CMR model itself at parameters off the fitting grid, the
binomial law of the passes of order-free heads, and p-values and shares recounted from the stored
rows by plain loops.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from circuits.detectors import cmr
from circuits.methods import cmr_model, cmr_null
from interp.errors import UserError
from interp.runs.runner import run_detector
from interp.runs.store import Store
from tests.tiny import loaded, tiny_llama

LAGS = np.arange(-8, 9)
FIT = np.abs(LAGS) <= cmr_model.FIT_LAG


def _naive_distance(attn: np.ndarray, crp: np.ndarray) -> float:
    """Ji-An et al.'s distance of one curve to one CMR CRP, written out (both over the fit lags)."""
    a = attn - attn.min()
    c = crp / crp.sum()
    c = c - c.min()
    c = c * (a.max() / c.max())
    return float(np.mean((c - a) ** 2) / np.var(a))


def _cmr_head(rng: np.random.Generator) -> np.ndarray:
    """A head that does CMR's mechanism: the CRP the CMR model itself produces at parameters off
    the fitting grid (beta_enc 0.43, beta_rec 0.67, gamma_FT 0.27), scaled, shifted, with noise."""
    spec = cmr_model.GridSpec(beta_enc=(0.43,), beta_rec=(0.67,), gamma_ft=(0.27,), n_sims=20)
    crp = cmr_model.simulate_grid(spec)[0, 0, 0]
    return 0.4 * crp + 0.02 + rng.normal(0.0, 0.002, crp.shape)


@pytest.fixture(scope="module")
def grid() -> cmr_model.CMRGrid:
    return cmr_model.cmr_grid()


def test_permutations_are_seeded_uniform_shuffles() -> None:
    perms = cmr_null.permutations(n_heads=50, n_lags=11, n_draws=40, seed=3)
    assert perms.shape == (40, 50, 11)
    assert (np.sort(perms, axis=2) == np.arange(11)).all()  # each row a permutation
    assert (perms != np.arange(11)).any(axis=2).all()  # no identity among 2000 draws (p = 2000 / 11!)
    # Every position goes everywhere about equally often: 2000 draws, 11 places, chi-square.
    counts = np.stack([np.bincount(perms[:, :, i].ravel(), minlength=11) for i in range(11)])
    assert stats.chisquare(counts.ravel()).pvalue > 1e-4
    assert np.array_equal(perms, cmr_null.permutations(50, 11, 40, seed=3))
    assert not np.array_equal(perms, cmr_null.permutations(50, 11, 40, seed=4))


def test_null_distance_is_the_fit_of_the_shuffled_curve() -> None:
    rng = np.random.default_rng(0)
    spec = cmr_model.GridSpec(beta_enc=(0.2, 0.6), beta_rec=(0.1, 0.5, 0.9), gamma_ft=(0.0, 1.0), max_lag=8)
    crp = rng.random((2, 3, 2, 17)) + 0.1
    small = cmr_model.CMRGrid(spec=spec, crp=crp / crp.sum(-1, keepdims=True), seconds=0.0)
    attn = rng.random((4, 17))
    perms = cmr_null.permutations(4, int(FIT.sum()), 6, seed=1)
    null = cmr_null.null_distances(attn, LAGS, small, cmr_model.FIT_LAG, perms)
    assert null.shape == (4, 6)
    for h in range(4):
        for d in range(6):
            shuffled = attn[h][FIT][perms[d, h]]
            naive = min(_naive_distance(shuffled, small.crp[i, j, k][FIT])
                        for i in range(2) for j in range(3) for k in range(2))
            assert null[h, d] == pytest.approx(naive, rel=1e-9)


def test_cmr_head_is_above_the_null_and_flat_head_is_not(grid: cmr_model.CMRGrid) -> None:
    rng = np.random.default_rng(5)
    head = _cmr_head(rng)
    assert LAGS[np.argmax(head)] == 1 and head[LAGS == 1] > head[LAGS == -1]  # CMR's signature
    res = cmr_null.cmr_null(np.stack([head, np.full(17, 0.05)]), LAGS, grid, cmr_model.FIT_LAG,
                            n_draws=100, seed=0, alpha=0.05)
    # The CMR head fits better than every one of its 100 shuffles: p at its floor 1/101.
    assert res.p_value[0] == pytest.approx(1 / 101)
    assert res.above[0]
    assert res.distance[0] < res.null[0].min()
    assert not res.above[1] and np.isnan(res.p_value[1]) and np.isnan(res.median[1])


@pytest.mark.parametrize("kind", ["noise", "scrambled-cmr"])
def test_order_free_heads_pass_at_the_level(grid: cmr_model.CMRGrid, kind: str) -> None:
    """Heads whose values carry no order pass about as often as the level says, no more.

    With 20 draws a head passes only when it beats all 20 (p = 1/21 <= 0.05), which an
    exchangeable head does with probability 1/21: the pass count is Binomial(n, 1/21)."""
    rng = np.random.default_rng(11)
    n = 300
    if kind == "noise":
        heads = rng.random((n, 17))
    else:  # the CMR head's own values put in a random order: same values, no lag structure
        cmr_values = _cmr_head(rng)
        heads = np.stack([rng.permutation(cmr_values) for _ in range(n)])
    res = cmr_null.cmr_null(heads, LAGS, grid, cmr_model.FIT_LAG, n_draws=20, seed=2, alpha=0.05)
    law = stats.binom(n, 1 / 21)
    assert law.ppf(0.0005) <= int(res.above.sum()) <= law.ppf(0.9995)


def test_against_null_counts_as_a_loop() -> None:
    rng = np.random.default_rng(3)
    distance = np.array([0.1, 0.9, np.nan, 0.5])
    null = rng.random((4, 30))
    null[3, :5] = 0.5  # ties count against the head
    res = cmr_null.against_null(distance, null, alpha=0.1)
    for h in (0, 1, 3):
        p = (1 + sum(x <= distance[h] for x in null[h])) / 31
        assert res.p_value[h] == pytest.approx(p)
        assert res.above[h] == (p <= 0.1)
    assert np.isnan(res.p_value[2]) and not res.above[2]
    with pytest.raises(UserError, match="level"):
        cmr_null.against_null(distance, null, alpha=1.0)


def test_too_few_draws_for_the_level_is_an_error() -> None:
    with pytest.raises(UserError, match="null_draws must be >= 19"):
        cmr.CMRConfig(null_draws=18)
    cmr.CMRConfig(null_draws=19)
    with pytest.raises(UserError, match="null_draws must be >= 99"):
        cmr.CMRConfig(null_draws=98, null_alpha=0.01)


def _final(store: Store, run_id: int, table: str) -> pd.DataFrame:
    df = store.run(run_id).to_frame(table, unit="final")
    return df


def test_cmr_run_stores_the_null_and_both_shares(tmp_path: Path) -> None:
    model = loaded(copy.deepcopy(tiny_llama()), "bridge")
    raw = {"seq_len": 12, "n_prompts": 4, "batch_size": 2, "null_draws": 20}
    with Store(tmp_path / "ws") as store:
        result = run_detector(model, "cmr", raw, store, progress=False)
        scores = _final(store, result.run_id, "head_scores")
        curves = _final(store, result.run_id, "curves")
        metrics = _final(store, result.run_id, "metrics")
    n_heads = model.info.n_layers * model.info.n_heads
    by = {m: scores[scores["metric"] == m].set_index(["layer", "head"])["value"]
          for m in ("cmr_distance", "cmr_null_p", "cmr_above_null", "cmr_null_distance")}
    assert all(len(s) == n_heads for s in by.values())
    draws = curves[curves["curve"] == "cmr_null_distance"]
    n_above = n_like = n_both = 0
    for (layer, head), d in by["cmr_distance"].items():
        null = draws[(draws["layer"] == layer) & (draws["head"] == head)].sort_values("x")["y"].to_numpy()
        assert len(null) == 20
        if np.isnan(d):
            assert np.isnan(by["cmr_null_p"][layer, head]) and by["cmr_above_null"][layer, head] == 0
            continue
        p = (1 + sum(x <= d for x in null)) / 21
        assert by["cmr_null_p"][layer, head] == pytest.approx(p)
        assert by["cmr_null_distance"][layer, head] == pytest.approx(float(np.median(null)))
        above = p <= 0.05
        assert by["cmr_above_null"][layer, head] == float(above)
        n_above += above
        n_like += d < cmr_model.CMR_LIKE
        n_both += above and d < cmr_model.CMR_LIKE
    value = metrics.set_index("name")["value"]
    assert value["n_above_null"] == n_above
    assert value["share_above_null"] == pytest.approx(n_above / n_heads)
    assert value["n_cmr_like"] == n_like
    assert value["share_cmr_like"] == pytest.approx(n_like / n_heads)
    assert value["n_cmr_like_above_null"] == n_both
    assert value["null_draws"] == 20
    heads = {(h["layer"], h["head"]): h for h in result.summary.heads or []}
    assert sum(bool(h["cmr_above_null"]) for h in heads.values()) == n_above
