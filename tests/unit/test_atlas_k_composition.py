"""The atlas claim "induction heads' keys are written by previous-token heads" (Olsson et al. 2022)
on both verdict sides and at its edge, from hand-made summaries of a 4-layer model with 2 heads
per layer (one query head per kv head), each value worked out in the comment beside it.

Top-2 induction heads: L3H0 (0.9) and L2H1 (0.5); top-2 previous-token heads: 1.0 (0.9) and
0.1 (0.8). Each key has the same 4 head senders (every head below layer 2), 2 of them top
previous-token heads: random senders hit with probability 2 / 4 = 0.5.
"""

from __future__ import annotations

from typing import Any

import pytest

from circuits.atlas.claims import FAILS, HOLDS, INCONCLUSIVE, NM, ModelResults, summarize
from circuits.methods.edge_records import edge_record
from interp.runs.registry import Summary

CLAIM = "induction-keys-previous-token"
SENDERS = ("0.0", "0.1", "1.0", "1.1")


def _induction() -> Summary:
    heads = [{"layer": 3, "head": 0, "score": 0.9, "previous_token": 0.0},
             {"layer": 2, "head": 1, "score": 0.5, "previous_token": 0.1},
             {"layer": 1, "head": 0, "score": 0.0, "previous_token": 0.9},
             {"layer": 0, "head": 1, "score": 0.1, "previous_token": 0.8},
             {"layer": 1, "head": 1, "score": 0.0, "previous_token": 0.2}]
    return Summary(heads=heads, metrics={"threshold": 0.4}, detector="induction", variant="v")


def _path_patching(strongest: dict[str, str], task: str = "induction") -> Summary:
    """Edges into k:3.0 and k:2.1: the named sender at 1.0, the others at 0.1 (and -0.5 for one,
    so that |score|, not the signed score, must pick the strongest), embed at 5 (not a head)."""
    edges = []
    for receiver, best in strongest.items():
        edges.append(edge_record("embed", receiver, 5.0, None, False))
        for s in SENDERS:
            score = 1.0 if s == best else (-0.5 if s == "1.1" else 0.1)
            edges.append(edge_record(s, receiver, score if s != best else -1.0, None, False))
    return Summary(metrics={"task": task, "group_size": 1}, edges=edges, detector="path-patching", variant="direct")


def _verdict(*summaries: Summary) -> tuple[str, Any, Any]:
    res = ModelResults(n_layers=4, n_heads=8, summaries={s.detector: s for s in summaries})
    claims = {c["id"]: c["models"]["m"] for c in summarize({"m": res}, list(res.summaries), 2)["claims"]}
    got = claims[CLAIM]
    return got["verdict"], got["value"], got.get("random")


# The share of hits is read from its Wilson interval against the random senders' 0.5: with two
# heads no share can decide (2 of 2: [0.34, 1]; 1 of 2: [0.09, 0.91]; 0 of 2: [0, 0.66]).
@pytest.mark.parametrize(
    ("strongest", "verdict", "share"),
    [({"k:3.0": "1.0", "k:2.1": "0.1"}, INCONCLUSIVE, 1.0),  # both from a top previous-token head
     ({"k:3.0": "1.0", "k:2.1": "0.0"}, INCONCLUSIVE, 0.5),  # one of two: as often as random
     ({"k:3.0": "0.0", "k:2.1": "1.1"}, INCONCLUSIVE, 0.0)],
)
def test_induction_keys_from_previous_token_heads(strongest: dict[str, str], verdict: str, share: float) -> None:
    assert _verdict(_induction(), _path_patching(strongest)) == (verdict, share, 0.5)


def test_only_measured_keys_count() -> None:
    # Only L3H0's key was patched: 1 hit of 1 measured head (Wilson [0.21, 1]).
    assert _verdict(_induction(), _path_patching({"k:3.0": "0.1"})) == (INCONCLUSIVE, 1.0, 0.5)


@pytest.mark.parametrize(("hit", "verdict"), [(True, HOLDS), (False, FAILS)])
def test_eight_keys_decide_both_ways(hit: bool, verdict: str) -> None:
    """8 layers of 4 heads: induction heads L4H0..L7H1 (8), previous-token heads L0H0..L1H3 (8).
    Each key's senders are the 16 heads of layers 0-3, 8 of them top previous-token heads: random
    senders hit with probability 0.5. 8 of 8 hits: Wilson [0.68, 1] above 0.5; 0 of 8: [0, 0.32]
    below it."""
    ind = [{"layer": la, "head": h, "score": 0.9 - 0.01 * (2 * la + h), "previous_token": 0.0}
           for la in range(4, 8) for h in range(2)]
    prev = [{"layer": la, "head": h, "score": 0.0, "previous_token": 0.9 - 0.01 * (4 * la + h)}
            for la in range(2) for h in range(4)]
    edges = []
    for r in ind:
        receiver = f"k:{r['layer']}.{r['head']}"
        best = "0.0" if hit else "2.0"
        for sender in (f"{la}.{h}" for la in range(4) for h in range(4)):
            edges.append(edge_record(sender, receiver, 1.0 if sender == best else 0.1, None, False))
    res = ModelResults(n_layers=8, n_heads=32, summaries={
        "induction": Summary(heads=ind + prev, metrics={"threshold": 0.4}, detector="induction", variant="v"),
        "path-patching": Summary(metrics={"task": "induction", "group_size": 1}, edges=edges,
                                 detector="path-patching", variant="direct")})
    (got,) = [c["models"]["m"] for c in summarize({"m": res}, list(res.summaries), 8)["claims"] if c["id"] == CLAIM]
    assert (got["verdict"], got["value"], got["random"], got["n"]) == (verdict, 1.0 if hit else 0.0, 0.5, 8)
    assert (got["lo"], got["hi"]) == pytest.approx((0.6756, 1.0) if hit else (0.0, 0.3244), abs=1e-4)


@pytest.mark.parametrize("summaries", ["no-path-patching", "other-task", "no-induction"])
def test_not_measurable_without_the_runs(summaries: str) -> None:
    runs = {"no-path-patching": [_induction()],
            "other-task": [_induction(), _path_patching({"k:3.0": "1.0"}, task="prompts")],
            "no-induction": [_path_patching({"k:3.0": "1.0"})]}[summaries]
    assert _verdict(*runs)[0] == NM


def test_the_atlas_patches_into_the_keys_of_the_top_induction_heads() -> None:
    from circuits.atlas.workflow import atlas_params

    # The top 3 by induction score above layer 0 (no head writes a layer-0 key): L3H0, L2H1 and
    # L1H0 (0.0, listed before L1H1); kv heads of 2 query heads: 0, 0, 0.
    params = atlas_params("path-patching", {"induction": _induction()}, group_size=2)
    assert params["receivers"] == "k:3.0,k:2.0,k:1.0"
    assert params["task"] == "induction"
