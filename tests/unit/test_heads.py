"""circuits/heads.py: the head-list grammar, labels, rankings and the random control draw."""

from __future__ import annotations

import copy
import random
from typing import Any

import numpy as np
import pytest

from circuits.detectors import decore_eval
from circuits.methods.heads import (
    all_heads,
    check_heads,
    head_label,
    parse_heads,
    random_heads,
    ranking_from_summary,
)
from interp.errors import UserError
from interp.runs.registry import Summary
from tests.tiny import loaded


@pytest.fixture
def model(tiny_llama_hf: Any) -> Any:
    return loaded(copy.deepcopy(tiny_llama_hf), "bridge")  # 3 layers x 4 heads


def test_grammar_both_forms_in_order() -> None:
    assert parse_heads("12.3, L4H1,l0h2 ,7.0") == [(12, 3), (4, 1), (0, 2), (7, 0)]
    assert parse_heads("1.2,,3.4,") == [(1, 2), (3, 4)]
    # head_label writes what parse_heads reads.
    assert parse_heads(",".join(head_label(*h) for h in [(3, 5), (10, 0)])) == [(3, 5), (10, 0)]


@pytest.mark.parametrize("bad", ["12", "a.b", "1.2.3", "1-2", "L3", "H5", "L3H", "-1.2", "LL3H5", "3H5", "L3.5", "1. 2"])
def test_grammar_rejects(bad: str) -> None:
    with pytest.raises(UserError, match=r"LAYER\.HEAD or LxHy"):
        parse_heads(bad)


@pytest.mark.parametrize("empty", ["", " ", ",", " , "])
def test_no_heads_is_an_error(empty: str) -> None:
    with pytest.raises(UserError, match="no heads given"):
        parse_heads(empty)


def test_duplicates_rejected_in_either_form() -> None:
    for text in ("12.3,12.3", "12.3,L12H3", "l1h1, 1.1"):
        with pytest.raises(UserError, match="listed twice"):
            parse_heads(text)
    with pytest.raises(UserError, match="head L0H1 listed twice"):
        check_heads([(0, 1), [0, 1]])


def test_range_checked_against_the_model_only_when_given(model: Any) -> None:
    assert parse_heads("9.0") == [(9, 0)]
    assert parse_heads("2.3", model) == [(2, 3)]
    for bad in ("3.0", "0.4", "L9H0"):
        with pytest.raises(UserError, match="out of range"):
            parse_heads(bad, model)
    assert check_heads([[1, 2], (0, 3)], model) == [(1, 2), (0, 3)]
    numpy_pairs = [(np.int64(1), np.int64(2))]
    assert all(type(x) is int for h in check_heads(numpy_pairs) for x in h)  # type: ignore[arg-type]


def test_all_heads_and_ranking_from_summary(model: Any) -> None:
    assert all_heads(model) == [(la, h) for la in range(3) for h in range(4)]
    s = Summary(detector="d", variant="v", heads=[{"layer": np.int64(2), "head": 1, "score": 0.9}, {"layer": 0, "head": 3, "score": 0.1}])
    assert ranking_from_summary(s) == [(2, 1), (0, 3)]
    assert ranking_from_summary(Summary(detector="d", variant="v")) == []


CANDIDATES = [(la, h) for la in range(5) for h in range(4)]
TOP = [(2, 1), (0, 3), (1, 2), (0, 0), (4, 2), (1, 1)]


@pytest.mark.parametrize("make_rng", [random.Random, np.random.default_rng])
def test_control_never_draws_an_excluded_head(make_rng: Any) -> None:
    for k in (0, 1, 3, 7):
        for seed in range(40):
            drawn = random_heads(CANDIDATES, TOP, k, make_rng(seed))
            assert len(drawn) == k == len(set(drawn))
            assert drawn == sorted(drawn)
            assert set(drawn) <= set(CANDIDATES) - set(TOP)
    # Heads given as lists (as JSON gives them) are excluded too: the DeCoRe reference's defect.
    as_lists = [list(h) for h in TOP]
    for seed in range(40):
        assert not set(random_heads(CANDIDATES, as_lists, 5, make_rng(seed))) & set(TOP)


@pytest.mark.parametrize("make_rng", [random.Random, np.random.default_rng])
def test_control_too_few_left_and_negative_k(make_rng: Any) -> None:
    with pytest.raises(UserError, match="only 14 heads lie outside the 6 excluded ones; cannot draw 15"):
        random_heads(CANDIDATES, TOP, 15, make_rng(0))
    assert len(random_heads(CANDIDATES, TOP, 14, make_rng(0))) == 14
    with pytest.raises(UserError, match="k must be >= 0"):
        random_heads(CANDIDATES, TOP, -1, make_rng(0))


def test_control_is_deterministic_per_seed_and_generator() -> None:
    assert random_heads(CANDIDATES, TOP, 4, random.Random(5)) == random_heads(CANDIDATES, TOP, 4, random.Random(5))
    draws = {tuple(random_heads(CANDIDATES, TOP, 4, random.Random(s))) for s in range(20)}
    assert len(draws) > 10
    np_draw = random_heads(CANDIDATES, TOP, 4, np.random.default_rng([3, 1]))
    assert np_draw == random_heads(CANDIDATES, TOP, 4, np.random.default_rng([3, 1]))
    # Successive draws from one generator differ (the retrieval-masking draws).
    rng = random.Random(5)
    assert random_heads(CANDIDATES, TOP, 4, rng) != random_heads(CANDIDATES, TOP, 4, rng)


def test_control_draws_are_the_stored_ones() -> None:
    """Each detector's draw is pinned: the stored control heads of its results depend on it."""
    pool = [hd for hd in CANDIDATES if hd not in set(TOP)]
    # random.Random: sample over the pool in candidate order (retrieval-masking, ph3, decore-eval).
    assert random_heads(CANDIDATES, TOP, 4, random.Random(7)) == sorted(random.Random(7).sample(pool, 4))
    # numpy: choice of indices into the pool (episodic-ablation, its ranking as the candidates).
    ranked = list(reversed(CANDIDATES))
    pick = np.random.default_rng([0, 2]).choice(len(ranked) - 3, size=3, replace=False)
    assert random_heads(ranked, ranked[:3], 3, np.random.default_rng([0, 2])) == sorted(ranked[3:][j] for j in pick)


def test_decore_control_avoids_the_masked_sets(model: Any) -> None:
    ranking = [(2, 1), (0, 3), (1, 2), (0, 0), (2, 2), (1, 1)]
    for k in (1, 2, 3):
        for seed in range(30):
            drawn = decore_eval.method_heads("control-entropy", k, ranking, 4, model, seed)
            assert len(drawn) == k == len(set(drawn))
            assert not set(drawn) & set(ranking[:4])
    with pytest.raises(UserError, match="cannot draw"):
        decore_eval.method_heads("control-entropy", 9, ranking, 4, model, 0)
