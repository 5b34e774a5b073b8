"""Every atlas claim on both sides of its verdict, and at its edge (issue 27): hand-made summaries
of a 4-layer model with 2 heads per layer, each value worked out in the comment beside it.

The edges follow the claims' wording: "below 5 %", "more than random", "later" (> 0.5) and
"early-to-middle" (<= 0.5), "above the threshold", "overlaps more than random sets"; a tie is not more.
"""

from __future__ import annotations

from typing import Any

import pytest

from circuits.atlas.claims import FAILS, HOLDS, INCONCLUSIVE, NM, ModelResults, summarize
from interp.runs.registry import Summary
from interp.stats import Interval


def _verdicts(**summaries: Summary) -> dict[str, tuple[str, Any]]:
    res = ModelResults(n_layers=4, n_heads=8, summaries={s.detector: s for s in summaries.values()})
    claims = summarize({"m": res}, list(res.summaries), 2)["claims"]
    return {c["id"]: (c["models"]["m"]["verdict"], c["models"]["m"]["value"]) for c in claims}


def _retrieval(share: float) -> Summary:
    return Summary(detector="retrieval", variant="v", heads=[{"layer": 0, "head": 0, "score": 0.3}],
                   metrics={"share_heads_above_threshold": share, "n_heads_above_threshold": round(share * 8),
                            "n_heads": 8, "threshold": 0.1, "too_few_counted": 0})


@pytest.mark.parametrize(("share", "verdict"), [(0.04, HOLDS), (0.05, FAILS), (0.25, FAILS)])
def test_retrieval_sparse(share: float, verdict: str) -> None:
    assert _verdicts(r=_retrieval(share))["retrieval-sparse"] == (verdict, share)


@pytest.mark.parametrize(
    ("top", "random", "verdict", "value"),
    [(0.25, 0.625, HOLDS, 0.375),  # the top heads cost 0.375 more than random ones
     (0.5, 0.5, FAILS, 0.0),  # as much as random: not more
     (0.75, 0.5, FAILS, -0.25)],
)
def test_retrieval_masking(top: float, random: float, verdict: str, value: float) -> None:
    s = Summary(detector="retrieval-masking", variant="v", metrics={"top_k": 3, "n_random": 2, "n_samples": 8, "accuracy:none": 0.75,
                                                    "accuracy:top3": top, "accuracy:random-mean": random})
    assert _verdicts(s=s)["retrieval-masking"] == (verdict, pytest.approx(value))


def _conflict(memory_layers: list[int], context_layers: list[int]) -> Summary:
    heads = [{"layer": la, "head": 0, "score": 0.5, "role": "memory"} for la in memory_layers]
    heads += [{"layer": la, "head": 1, "score": -0.5, "role": "context"} for la in context_layers]
    return Summary(detector="conflict-heads", variant="v", heads=heads)


@pytest.mark.parametrize(
    ("memory", "context", "verdict", "depth"),
    # Relative depths (layer / 4) of the top 2 memory and top 2 context heads; t interval over
    # them, t(0.975, n - 1).
    [([3, 3], [3, 3], HOLDS, 0.75),  # all at 0.75, no spread: the interval is the point 0.75
     ([3, 3], [2], INCONCLUSIVE, 8 / 12),  # 0.75, 0.75, 0.5: sd 0.144, n 3, half 4.30 x 0.083: [0.31, 1.02]
     ([2], [2], INCONCLUSIVE, 0.5),  # exactly the middle, no spread: the interval is a point on 0.5
     ([0, 1], [0, 1], FAILS, 0.125)],  # 0, 0.25, 0, 0.25: sd 0.144, half 3.18 x 0.072: [-0.10, 0.35]
)
def test_memory_context_late(memory: list[int], context: list[int], verdict: str, depth: float) -> None:
    assert _verdicts(c=_conflict(memory, context))["memory-context-late"] == (verdict, pytest.approx(depth))


def _ph3(after: float, random: float) -> Summary:
    return Summary(detector="ph3", variant="v", metrics={"formats": ["qa"], "prune-memory.k": 3, "test.unpruned.conflict.qa.context_rate": 0.2,
                                        "test.prune-memory.conflict.qa.context_rate": after,
                                        "test.prune-memory.random-control.conflict.qa.context_rate": random})


@pytest.mark.parametrize(("after", "random", "verdict", "gain"),
                         [(0.5, 0.3, HOLDS, 0.2), (0.4, 0.4, FAILS, 0.0), (0.3, 0.5, FAILS, -0.2)])
def test_ph3_beats_random(after: float, random: float, verdict: str, gain: float) -> None:
    assert _verdicts(p=_ph3(after, random))["ph3-beats-random"] == (verdict, pytest.approx(gain))


@pytest.mark.parametrize(("decore", "verdict", "diff"), [(0.7, HOLDS, 0.1), (0.6, FAILS, 0.0), (0.5, FAILS, -0.1)])
def test_decore_beats_greedy(decore: float, verdict: str, diff: float) -> None:
    s = Summary(detector="decore-eval", variant="v", metrics={"nqswap:greedy:test_accuracy": 0.6, "nqswap:decore-entropy:test_accuracy":
                                             decore, "nqswap:decore-entropy:k": 3, "nqswap:n_test": 10})
    assert _verdicts(d=s)["decore-beats-greedy"] == (verdict, pytest.approx(diff))


@pytest.mark.parametrize(
    ("lo", "hi", "verdict"),
    [(0.05, 0.3, HOLDS),  # the whole interval above 0
     (-0.1, 0.3, INCONCLUSIVE),  # straddles 0: the data cannot tell
     (0.0, 0.3, INCONCLUSIVE),  # touches 0: not strictly above
     (-0.4, -0.02, FAILS)],  # the whole interval below 0: greedy is better
)
def test_decore_beats_greedy_from_its_paired_interval(lo: float, hi: float, verdict: str) -> None:
    """With the paired difference's interval, the verdict is read from it, not from the means."""
    diff = Interval(0.1, lo, hi, 20, "newcombe", 0.95)
    s = Summary(detector="decore-eval", variant="v",
                metrics={"nqswap:greedy:test_accuracy": 0.6, "nqswap:decore-entropy:test_accuracy": 0.7,
                         "nqswap:decore-entropy:k": 3, "nqswap:n_test": 20, "nqswap:decore-entropy:mcnemar_p": 0.5},
                intervals={"nqswap:decore-entropy:minus_greedy": diff})
    res = ModelResults(n_layers=4, n_heads=8, summaries={"decore-eval": s})
    (claim,) = [c for c in summarize({"m": res}, ["decore-eval"], 2)["claims"] if c["id"] == "decore-beats-greedy"]
    got = claim["models"]["m"]
    assert (got["verdict"], got["value"]) == (verdict, 0.1)
    assert (got["lo"], got["hi"], got["n"], got["method"]) == (lo, hi, 20, "newcombe")


@pytest.mark.parametrize(("layer", "verdict"), [(1, HOLDS), (2, HOLDS), (3, FAILS)])
def test_mlp_peak_early(layer: int, verdict: str) -> None:
    s = Summary(detector="causal-trace", variant="v", metrics={"peak_layer_mlp_last_subject": layer, "peak_value_mlp_last_subject": 0.3,
                                              "n_facts_traced": 2})
    # Layer 2 of 4 is relative depth 0.5: "early-to-middle" includes the middle.
    assert _verdicts(t=s)["mlp-peak-early"] == (verdict, layer / 4)


@pytest.mark.parametrize(
    ("like_layers", "verdict", "depth"),
    # t interval over the CMR-like heads' relative depths (layer / 4).
    [([3, 3, 3], HOLDS, 0.75),  # no spread: the point 0.75
     ([3, 2], INCONCLUSIVE, 5 / 8),  # 0.75, 0.5: sd 0.18, half 12.7 x 0.125: far wider than the layers
     ([2], FAILS, 0.5),  # one head (no interval): the middle is not middle-to-late's later half
     ([0, 0, 1, 1], FAILS, 1 / 8),  # 0, 0, 0.25, 0.25: sd 0.144, half 3.18 x 0.072: [-0.10, 0.35]
     ([], FAILS, None)],  # no CMR-like head: the claim does not show
)
def test_cmr_mid_late(like_layers: list[int], verdict: str, depth: float | None) -> None:
    heads = [{"layer": la, "head": 0, "score": -0.1, "cmr_like": True} for la in like_layers]
    heads.append({"layer": 0, "head": 1, "score": -0.9, "cmr_like": False})
    got = _verdicts(c=Summary(detector="cmr", variant="v", heads=heads))["cmr-mid-late"]
    assert got[0] == verdict
    assert got[1] == (None if depth is None else pytest.approx(depth))


@pytest.mark.parametrize(("best", "verdict"), [(0.41, HOLDS), (0.4, FAILS), (0.1, FAILS)])
def test_induction_exists(best: float, verdict: str) -> None:
    s = Summary(detector="induction", variant="v", heads=[{"layer": 3, "head": 0, "score": best}, {"layer": 1, "head": 1, "score": 0.05}],
                metrics={"threshold": 0.4})
    assert _verdicts(i=s)["induction-exists"] == (verdict, best)


# Two random top-2 sets of the 8 heads share 0 heads with p 15/28 (C(6,2)/C(8,2)), 1 with 12/28
# and 2 with 1/28; their Jaccard (0, 1/3, 1) has mean 12/28 / 3 + 1/28 = 5/28 under chance.
@pytest.mark.parametrize(
    ("retrieval_heads", "verdict", "lead"),
    [([(3, 0), (2, 1)], HOLDS, 1 - 5 / 28),  # the same set: p = 1/28
     ([(3, 0), (0, 1)], INCONCLUSIVE, 1 / 3 - 5 / 28),  # {L3H0, L2H1} and {L3H0, L0H1}: p = 13/28
     ([(0, 0), (0, 1)], INCONCLUSIVE, -5 / 28)],  # disjoint, as chance is with p = 15/28: not fewer
)
def test_induction_retrieval_overlap(retrieval_heads: list[tuple[int, int]], verdict: str, lead: float) -> None:
    ind = Summary(detector="induction", variant="v", heads=[{"layer": 3, "head": 0, "score": 0.9}, {"layer": 2, "head": 1, "score": 0.5}],
                  metrics={"threshold": 0.4})
    ret = Summary(detector="retrieval", variant="v", heads=[{"layer": la, "head": h, "score": 0.3 - 0.1 * i}
                                           for i, (la, h) in enumerate(retrieval_heads)],
                  metrics={"share_heads_above_threshold": 0.25})
    assert _verdicts(i=ind, r=ret)["induction-retrieval-overlap"] == (verdict, pytest.approx(lead))


def _induction(lo: float, hi: float) -> Summary:
    return Summary(detector="induction", variant="v", heads=[{"layer": 2, "head": 0, "score": 0.5}],
                   metrics={"threshold": 0.4}, intervals={"top_score": Interval(0.5, lo, hi, 4, "t", 0.95)})


@pytest.mark.parametrize(("lo", "hi", "verdict"), [(0.45, 0.55, HOLDS), (0.3, 0.7, INCONCLUSIVE),
                                                   (0.4, 0.6, INCONCLUSIVE)])
def test_induction_exists_from_the_top_heads_interval(lo: float, hi: float, verdict: str) -> None:
    """Above the threshold 0.4 only when the top head's whole interval is; touching it is not."""
    assert _verdicts(i=_induction(lo, hi))["induction-exists"] == (verdict, 0.5)


def test_every_claim_carries_value_interval_n_and_one_of_the_verdicts() -> None:
    res = ModelResults(n_layers=4, n_heads=8, summaries={
        "induction": _induction(0.45, 0.55), "retrieval": _retrieval(0.25), "conflict-heads": _conflict([3], [2])})
    for claim in summarize({"m": res, "none": ModelResults(4, 8)}, list(res.summaries), 2)["claims"]:
        for got in claim["models"].values():
            assert {"verdict", "value", "lo", "hi", "n", "method"} <= got.keys(), claim["id"]
            assert got["verdict"] in (HOLDS, FAILS, INCONCLUSIVE, NM)


@pytest.mark.parametrize(("lo", "hi", "verdict"), [(0.1, 0.5, HOLDS), (0.3, 0.7, INCONCLUSIVE), (0.55, 0.8, FAILS)])
def test_mlp_peak_early_from_its_interval_over_facts(lo: float, hi: float, verdict: str) -> None:
    """"Early-to-middle" includes the middle: holds when the whole interval is at or below 0.5,
    does not hold when it lies above."""
    s = Summary(detector="causal-trace", variant="v", metrics={"peak_layer_mlp_last_subject": 1,
                "peak_value_mlp_last_subject": 0.3, "n_facts_traced": 10},
                intervals={"peak_depth_mlp_last_subject": Interval(0.25, lo, hi, 10, "bca-bootstrap", 0.95)})
    assert _verdicts(t=s)["mlp-peak-early"] == (verdict, 0.25)


def test_cmr_like_heads_must_also_beat_their_null() -> None:
    """Heads under the distance threshold but not above their null are not CMR-like; the share
    is reported both ways."""
    heads = [{"layer": 3, "head": h, "score": -0.1, "cmr_like": True, "cmr_above_null": True} for h in range(3)]
    heads += [{"layer": 0, "head": h, "score": -0.2, "cmr_like": True, "cmr_above_null": False} for h in range(3)]
    res = ModelResults(n_layers=4, n_heads=8, summaries={"cmr": Summary(detector="cmr", variant="v", heads=heads)})
    (got,) = [c["models"]["m"] for c in summarize({"m": res}, ["cmr"], 2)["claims"] if c["id"] == "cmr-mid-late"]
    # Only the three layer-3 heads count: depth 0.75 (by the threshold alone the layer-0 heads
    # would pull it to 0.375).
    assert (got["verdict"], got["value"], got["share"], got["share_by_threshold"]) == (HOLDS, 0.75, 0.5, 1.0)


def _masking(top: float, draws: list[float]) -> Summary:
    return Summary(detector="retrieval-masking", variant="v", metrics={
        "top_k": 3, "n_random": len(draws), "n_samples": 8, "accuracy:none": 0.75, "accuracy:top3": top,
        "accuracy:random-mean": sum(draws) / len(draws), "random_accuracies": draws})


@pytest.mark.parametrize(
    ("top", "draws", "verdict"),
    [(0.25, [0.5 + 0.025 * i for i in range(20)], HOLDS),  # below all 20: p = 1/21 <= 0.05
     (0.25, [0.5, 0.75], INCONCLUSIVE),  # below both, but two draws allow p >= 1/3
     (0.25, [0.125] + [0.5] * 19, INCONCLUSIVE),  # one draw lower: p = 2/21 = 0.095
     (0.9, [0.5] * 20, FAILS)],  # above all 20: masking the top set hurts less than random
)
def test_retrieval_masking_against_its_random_draws(top: float, draws: list[float], verdict: str) -> None:
    res = ModelResults(n_layers=4, n_heads=8, summaries={"retrieval-masking": _masking(top, draws)})
    (got,) = [c["models"]["m"] for c in summarize({"m": res}, ["retrieval-masking"], 2)["claims"]
              if c["id"] == "retrieval-masking"]
    assert got["verdict"] == verdict
    assert got["value"] == pytest.approx(sum(draws) / len(draws) - top)  # how much lower than random
    assert (got["n"], got["method"]) == (len(draws), "random draws")
    assert got["lo"] <= got["value"] <= got["hi"] or len(set(draws)) == 1


def test_ph3_against_its_random_draws() -> None:
    s = _ph3(0.5, 0.3)
    draws = [0.25 + 0.01 * i for i in range(20)]  # 0.25 .. 0.44, all below 0.5
    s = Summary(detector="ph3", variant="v", metrics={**s.metrics, "prune_memory_random_context_rates": draws})
    got = _verdicts(p=s)["ph3-beats-random"]
    assert got == (HOLDS, pytest.approx(0.5 - sum(draws) / 20))
