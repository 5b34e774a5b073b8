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

from circuits.atlas.claims import FAILS, HOLDS, NM, ModelResults, summarize
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


@pytest.mark.parametrize(
    ("strongest", "verdict", "share"),
    [({"k:3.0": "1.0", "k:2.1": "0.1"}, HOLDS, 1.0),  # both from a top previous-token head: 1 > 0.5
     ({"k:3.0": "1.0", "k:2.1": "0.0"}, FAILS, 0.5),  # one of two: as often as random, not more
     ({"k:3.0": "0.0", "k:2.1": "1.1"}, FAILS, 0.0)],
)
def test_induction_keys_from_previous_token_heads(strongest: dict[str, str], verdict: str, share: float) -> None:
    assert _verdict(_induction(), _path_patching(strongest)) == (verdict, share, 0.5)


def test_only_measured_keys_count() -> None:
    # Only L3H0's key was patched: 1 hit of 1 measured head.
    assert _verdict(_induction(), _path_patching({"k:3.0": "0.1"})) == (HOLDS, 1.0, 0.5)


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
