"""The induction detector's own scoring against hand-worked positions (issue 27): which query
attends to which key for each score, and which predictions each copy loss averages.

The layout: a prefix token at 0, then R = 3 random tokens twice: first copy at 1..3, second
copy at 4..6. The second-copy queries are 4, 5, 6; for each, the induction key is the token
after the previous occurrence of the current token (q - R + 1: 2, 3, 4), the duplicate key that
previous occurrence itself (q - R: 1, 2, 3) and the previous-token key q - 1 (3, 4, 5). The
lists below are written out, not computed, so an off-by-one in the detector cannot cancel out.
"""

from __future__ import annotations

import math

import torch

from circuits.detectors.induction import copy_losses, head_scores_from_patterns

R, OFFSET = 3, 1
QUERIES = [4, 5, 6]
KEYS = {"induction": [2, 3, 4], "duplicate_token": [1, 2, 3], "previous_token": [3, 4, 5]}


def _patterns(seed: int) -> list[torch.Tensor]:
    """Two layers of random causal attention patterns: batch 2, 3 heads, 7 x 7."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(2):
        scores = torch.randn(2, 3, 7, 7, generator=g)
        scores = scores.masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), float("-inf"))
        out.append(scores.softmax(-1))
    return out


def test_head_scores_are_the_mean_attention_to_the_hand_listed_keys() -> None:
    patterns = _patterns(0)
    got = head_scores_from_patterns(patterns, R, OFFSET)
    for metric, keys in KEYS.items():
        assert got[metric].shape == (2, 3)
        for layer, p in enumerate(patterns):
            for head in range(3):
                # A naive loop over the batch and the (query, key) pairs listed above.
                values = [float(p[b, head, q, k]) for b in range(2) for q, k in zip(QUERIES, keys, strict=True)]
                expected = sum(values) / len(values)
                assert math.isclose(float(got[metric][layer, head]), expected, rel_tol=1e-6), (metric, layer, head)


def test_a_head_that_attends_to_one_key_scores_one_there_and_zero_elsewhere() -> None:
    """Hand-made patterns: head 0 attends from each second-copy query to its induction key only,
    head 1 to its previous token only, head 2 to its duplicate only."""
    p = torch.zeros(1, 3, 7, 7)
    for q, k_ind, k_prev, k_dup in zip(QUERIES, KEYS["induction"], KEYS["previous_token"], KEYS["duplicate_token"],
                                       strict=True):
        p[0, 0, q, k_ind] = 1.0
        p[0, 1, q, k_prev] = 1.0
        p[0, 2, q, k_dup] = 1.0
    got = head_scores_from_patterns([p], R, OFFSET)
    assert got["induction"][0].tolist() == [1.0, 0.0, 0.0]
    assert got["previous_token"][0].tolist() == [0.0, 1.0, 0.0]
    assert got["duplicate_token"][0].tolist() == [0.0, 0.0, 1.0]


def _nll(row: list[float], target: int) -> float:
    """-log softmax(row)[target], by hand."""
    return -(row[target] - math.log(sum(math.exp(v) for v in row)))


def test_copy_losses_average_the_hand_listed_predictions() -> None:
    """Row t of the logits predicts token t + 1. The first-copy loss averages the predictions of
    tokens 2 and 3 (from rows 1, 2: the first token of a copy cannot be predicted); the
    second-copy loss those of tokens 5 and 6 (rows 4, 5), its first token being unpredictable
    from the first copy as well."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 7, 5, generator=g)
    tokens = torch.tensor([[0, 1, 2, 3, 1, 2, 3], [0, 4, 0, 2, 4, 0, 2]])
    first, second = copy_losses(logits, tokens, R, OFFSET)
    rows = logits.tolist()
    want_first = [_nll(rows[b][t], int(tokens[b, t + 1])) for b in range(2) for t in (1, 2)]
    want_second = [_nll(rows[b][t], int(tokens[b, t + 1])) for b in range(2) for t in (4, 5)]
    assert math.isclose(first, sum(want_first) / 4, rel_tol=1e-6)
    assert math.isclose(second, sum(want_second) / 4, rel_tol=1e-6)
