"""The CMR fit against its nulls (the lag-CRP around random stand-ins for the matches; the lag-CRP
shuffled over lags), on hand-built attention patterns and lag-CRPs and end to end on a tiny model.

The references are independent of the code under test: the null lag-CRP and the CMR distance
computed by loops, heads built by hand from the CMR model's own CRP at parameters off the fitting
grid (the mechanism) or from token content alone (no order), the binomial law of the passes of
order-free heads, and p-values and shares recounted from the stored rows by plain loops.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from circuits.detectors import cmr
from circuits.detectors import lag_crp as episodic
from circuits.methods import cmr_model, cmr_null
from circuits.methods.lists import ListPrompts
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


@functools.cache
def _cmr_crp() -> np.ndarray:
    """The CRP the CMR model itself produces at parameters off the fitting grid (beta_enc 0.43,
    beta_rec 0.67, gamma_FT 0.27)."""
    spec = cmr_model.GridSpec(beta_enc=(0.43,), beta_rec=(0.67,), gamma_ft=(0.27,), n_sims=4)
    return cmr_model.simulate_grid(spec)[0, 0, 0]


def _cmr_head(rng: np.random.Generator) -> np.ndarray:
    """A head that does CMR's mechanism: the CMR model's own CRP, scaled, shifted, with noise."""
    crp = _cmr_crp()
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


def test_match_null_is_the_loop_over_stand_in_matches() -> None:
    gen = torch.Generator().manual_seed(0)
    b, r, off, n_h, max_lag = 2, 9, 1, 3, 3
    pattern = torch.rand(b, n_h, off + 2 * r, off + 2 * r, generator=gen)
    prompts = ListPrompts(torch.zeros(b, off + 2 * r, dtype=torch.long), off, r, torch.arange(r).expand(b, r))
    perms = torch.stack([torch.randperm(r, generator=gen) for _ in range(4)])
    got = episodic.match_null_from_pattern(pattern, prompts, perms, max_lag).numpy()
    _, counts = episodic.lag_crp_from_pattern(pattern, prompts, max_lag)
    for h in range(n_h):
        for d in range(4):
            for li, lag in enumerate(range(-max_lag, max_lag + 1)):
                total, n = 0.0, 0
                for bi in range(b):
                    for i in range(r):
                        k = int(perms[d, i]) + lag
                        if 0 <= k < r:
                            total += float(pattern[bi, h, off + r + i, off + k])
                            n += 1
                assert got[h, d, li] == pytest.approx(total, rel=1e-6)
                assert counts[li] == n  # a bijection keeps the real lag-CRP's counts


def _hand_built(kind: str, r: int, n_prompts: int, rng: np.random.Generator) -> tuple[torch.Tensor, ListPrompts]:
    """Attention patterns of one head on ``n_prompts`` repeated lists of R tokens (no prefix).

    ``cmr``: each second-list query attends to the first-list positions around its match with
    the weights of a CRP simulated by the CMR model (lag +1 strongest). ``content``: each query
    attends by the pair of tokens alone (a random affinity per query token and key token, the
    same whatever their positions), a head that ignores order. ``keys``: attention set by each
    key's token alone, the same from every query."""
    tokens = np.stack([rng.permutation(100)[:r] for _ in range(n_prompts)])
    pattern = np.full((n_prompts, 1, 2 * r, 2 * r), 1e-4)
    block = pattern[:, 0, r:, :r]  # second-list queries x first-list keys (a view)
    if kind == "cmr":
        crp = _cmr_head(rng)
        for i in range(r):
            for li, lag in enumerate(LAGS):
                if 0 <= i + lag < r:
                    block[:, i, i + lag] += crp[li]
    elif kind == "content":
        affinity = np.exp(rng.normal(0.0, 1.0, (100, 100)))
        block += affinity[tokens[:, :, None], tokens[:, None, :]]
    else:
        block += rng.gamma(0.5, size=100)[tokens][:, None, :]
    pattern /= pattern.sum(-1, keepdims=True)
    prompts = ListPrompts(torch.as_tensor(np.concatenate([tokens, tokens], 1)), 0, r, torch.arange(r).expand(n_prompts, r))
    return torch.as_tensor(pattern), prompts


def _match_null_curves(pattern: torch.Tensor, prompts: ListPrompts, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A one-head pattern's lag-CRP [lags] and its 20 match-null lag-CRPs [20, lags]."""
    sums, counts = episodic.lag_crp_from_pattern(pattern, prompts, 8)
    perms = torch.as_tensor(np.random.default_rng(seed).permuted(np.tile(np.arange(prompts.length), (20, 1)), axis=1))
    null = episodic.match_null_from_pattern(pattern, prompts, perms, 8) / counts
    return (sums / counts).numpy()[0], null.numpy()[0]


def _match_null_verdict(
    heads: list[tuple[np.ndarray, np.ndarray]], grid: cmr_model.CMRGrid
) -> cmr_null.CMRNull:
    """Heads' (lag-CRP, null lag-CRPs) against their nulls, fitted in one batch."""
    crp = np.stack([c for c, _ in heads])
    null = np.stack([n for _, n in heads])
    distance = cmr_model.fit_cmr(crp, LAGS, grid, cmr_model.FIT_LAG).distance
    return cmr_null.against_null(distance, cmr_null.fit_null_curves(null, LAGS, grid, cmr_model.FIT_LAG), 0.05)


def test_hand_built_cmr_head_is_above_the_match_null(grid: cmr_model.CMRGrid) -> None:
    pattern, prompts = _hand_built("cmr", 30, 4, np.random.default_rng(1))
    res = _match_null_verdict([_match_null_curves(pattern, prompts, seed=0)], grid)
    assert res.p_value[0] == pytest.approx(1 / 21)  # better than all 20 null draws
    assert res.above[0]


def test_hand_built_content_heads_pass_the_match_null_at_the_level(grid: cmr_model.CMRGrid) -> None:
    """Order-free heads: the true pairing of queries and matches is one more random pairing for
    them, so each passes with probability 1/21 (it must beat all 20 draws): Binomial(n, 1/21)."""
    rng = np.random.default_rng(2)
    n = 300
    heads = [_match_null_curves(*_hand_built("content", 30, 2, rng), seed=i) for i in range(n)]
    above = _match_null_verdict(heads, grid).above
    law = stats.binom(n, 1 / 21)
    assert law.ppf(0.0005) <= int(above.sum()) <= law.ppf(0.9995)


def test_head_deaf_to_the_query_equals_its_match_null(grid: cmr_model.CMRGrid) -> None:
    """Attention set by the keys alone: any stand-in matches give the same lag-CRP (p = 1)."""
    pattern, prompts = _hand_built("keys", 30, 3, np.random.default_rng(4))
    res = _match_null_verdict([_match_null_curves(pattern, prompts, seed=0)], grid)
    assert np.allclose(res.null[0], res.distance[0], rtol=1e-9)
    assert res.p_value[0] == pytest.approx(1.0)
    assert not res.above[0]


def test_cmr_head_is_above_the_null_and_flat_head_is_not(grid: cmr_model.CMRGrid) -> None:
    rng = np.random.default_rng(5)
    head = _cmr_head(rng)
    assert LAGS[np.argmax(head)] == 1
    assert head[LAGS == 1] > head[LAGS == -1]
    res = cmr_null.cmr_null(np.stack([head, np.full(17, 0.05)]), LAGS, grid, cmr_model.FIT_LAG,
                            n_draws=100, seed=0, alpha=0.05)
    # The CMR head fits better than every one of its 100 shuffles: p at its floor 1/101.
    assert res.p_value[0] == pytest.approx(1 / 101)
    assert res.above[0]
    assert res.distance[0] < res.null[0].min()
    assert not res.above[1]
    assert np.isnan(res.p_value[1])
    assert np.isnan(res.median[1])


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
    assert np.isnan(res.p_value[2])
    assert not res.above[2]
    with pytest.raises(UserError, match="level"):
        cmr_null.against_null(distance, null, alpha=1.0)


def test_too_few_draws_for_the_level_is_an_error() -> None:
    with pytest.raises(UserError, match="null_draws must be >= 19"):
        cmr.CMRConfig(null_draws=18)
    cmr.CMRConfig(null_draws=19)
    with pytest.raises(UserError, match="null_draws must be >= 99"):
        cmr.CMRConfig(null_draws=98, null_alpha=0.01)


def _rows(store: Store, run_id: int, table: str, cols: tuple[str, ...]) -> list[tuple]:
    """The run's final rows of one table as plain tuples of ``cols``."""
    df = store.run(run_id).to_frame(table, unit="final")
    return list(zip(*(df[c].tolist() for c in cols), strict=True))


@pytest.mark.parametrize("kind", ["match", "lags"])
def test_cmr_run_stores_the_null_and_both_shares(tmp_path: Path, kind: str) -> None:
    model = loaded(copy.deepcopy(tiny_llama()), "bridge")
    raw = {"seq_len": 12, "n_prompts": 4, "batch_size": 2, "null_draws": 20, "null_kind": kind}
    with Store(tmp_path / "ws") as store:
        result = run_detector(model, "cmr", raw, store, progress=False)
        scores = _rows(store, result.run_id, "head_scores", ("metric", "layer", "head", "value"))
        curves = _rows(store, result.run_id, "curves", ("curve", "layer", "head", "x", "y"))
        value = dict(_rows(store, result.run_id, "metrics", ("name", "value")))
    n_heads = model.info.n_layers * model.info.n_heads
    by: dict[str, dict[tuple[int, int], float]] = {}
    for metric, layer, head, v in scores:
        by.setdefault(metric, {})[(int(layer), int(head))] = float(v) if v is not None else float("nan")
    for m in ("cmr_distance", "cmr_null_p", "cmr_above_null", "cmr_null_distance"):
        assert len(by[m]) == n_heads
    draws: dict[tuple[int, int], list[tuple[float, float]]] = {}
    for curve, layer, head, x, y in curves:
        if curve == "cmr_null_distance":
            draws.setdefault((int(layer), int(head)), []).append((float(x), float(y) if y is not None else float("nan")))
    n_above = n_like = n_both = 0
    for key, d in by["cmr_distance"].items():
        null = [y for _, y in sorted(draws[key])]
        assert len(null) == 20
        if np.isnan(d):
            assert np.isnan(by["cmr_null_p"][key])
            assert by["cmr_above_null"][key] == 0
            continue
        p = (1 + sum(x <= d for x in null)) / 21
        assert by["cmr_null_p"][key] == pytest.approx(p)
        assert by["cmr_null_distance"][key] == pytest.approx(float(np.median(null)))
        above = p <= 0.05
        assert by["cmr_above_null"][key] == float(above)
        n_above += above
        n_like += d < cmr_model.CMR_LIKE
        n_both += above and d < cmr_model.CMR_LIKE
    assert value["n_above_null"] == n_above
    assert value["share_above_null"] == pytest.approx(n_above / n_heads)
    assert value["n_cmr_like"] == n_like
    assert value["share_cmr_like"] == pytest.approx(n_like / n_heads)
    assert value["n_cmr_like_above_null"] == n_both
    assert value["null_draws"] == 20
    heads = {(h["layer"], h["head"]): h for h in result.summary.heads or []}
    assert sum(bool(h["cmr_above_null"]) for h in heads.values()) == n_above


def test_detector_draws_distinct_stand_in_matches_per_unit() -> None:
    from interp.runs.registry import get_detector
    from interp.runs.units import Unit

    det = get_detector("cmr")
    cfg = det.parse_params({"null_draws": 30})
    a = det.null_perms(cfg, Unit("batch", 0), 50)  # type: ignore[attr-defined]
    b = det.null_perms(cfg, Unit("batch", 1), 50)  # type: ignore[attr-defined]
    assert a.shape == (30, 50)
    assert (np.sort(a, axis=1) == np.arange(50)).all()
    assert len({tuple(row) for row in a}) == 30  # every draw its own bijection
    assert not np.array_equal(a, b)  # every unit its own draws
    assert det.null_perms(det.parse_params({"null_kind": "lags"}), Unit("batch", 0), 50) is None  # type: ignore[attr-defined]


def test_units_stored_before_the_null_finalize_without_it() -> None:
    """A run stored by an older version (no null in its units) is still read, with a warning."""
    from interp.runs.registry import get_detector
    from interp.runs.runner import finalized, run_in_memory

    model = loaded(copy.deepcopy(tiny_llama()), "bridge")
    det = get_detector("cmr")
    cfg = det.parse_params({"seq_len": 12, "n_prompts": 2, "batch_size": 1})
    summary, results = run_in_memory(model, det, cfg)
    assert summary.metrics["null_kind"] == "match"
    old = dict(results)
    old["artifacts"] = results["artifacts"].iloc[0:0]
    again = finalized(model, det, cfg, old)
    assert "n_above_null" not in again.metrics
    assert any("before the null" in w for w in again.warnings)
    assert all("cmr_above_null" not in h for h in again.heads or [])
    assert again.metrics["n_cmr_like"] == summary.metrics["n_cmr_like"]
