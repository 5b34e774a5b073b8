"""The nulls of the induction-family and retrieval scores, against independent computations: the
above-null rule against scipy's one-sided paired t test, the induction detector's null scores
against plain HF attention on twins built here, and the retrieval null against the count over
every order of the needle's tokens."""

from __future__ import annotations

import copy
import itertools
import math
from typing import Any

import numpy as np
import pytest
import torch
from scipy import stats

from circuits.detectors import retrieval as rt
from circuits.detectors.induction import InductionDetector, twin_tokens, uniform_previous_token_share
from circuits.methods.nulls import above_null
from interp.errors import UserError
from interp.model.tokens import ordinary_token_range, repeated_random_tokens
from interp.runs.runner import run_in_memory
from tests.tiny import loaded, tiny_gpt2, tiny_llama

# ------------------------------------------------------------------ the rule


def test_above_null_is_scipys_one_sided_paired_t_test_at_the_bonferroni_level() -> None:
    """Head j is above its null exactly when scipy's one-sided paired t test (score > null) has
    p < (1 - level) / 2 / H, for heads with no shift, small shifts and large ones."""
    rng = np.random.default_rng(0)
    n, h, level = 12, 40, 0.9
    null = rng.normal(0.3, 0.1, (n, h))
    shift = np.linspace(-0.1, 0.3, h)
    score = null + shift + rng.normal(0, 0.08, (n, h))
    test = above_null(score, null, level)
    p = stats.ttest_rel(score, null, alternative="greater").pvalue
    expected = p < (1 - level) / 2 / h
    assert 0 < expected.sum() < h  # both verdicts occur, so a constant answer fails
    assert test.above.tolist() == expected.tolist()
    assert test.n_above == int(expected.sum())
    assert math.isclose(test.level, 1 - (1 - level) / h)


def test_no_spread_one_item_and_bad_input() -> None:
    same = np.ones((5, 3))
    assert not above_null(same, same).above.any()  # a score equal to its null is never above
    assert above_null(same + 0.1, same).above.all()  # the same positive excess on every item
    assert not above_null(np.ones((1, 3)), np.zeros((1, 3))).above.any()  # one item: no interval
    with pytest.raises(UserError, match="same shape"):
        above_null(np.ones((4, 3)), np.ones((4, 2)))
    with pytest.raises(UserError, match="confidence level"):
        above_null(same, same, level=1.0)


# ------------------------------------------------------------------ induction nulls


def _naive_scores(hf: torch.nn.Module, tokens: torch.Tensor, r: int, offset: int) -> dict[str, np.ndarray]:
    """[layer, head] mean attention, over rows and second-copy queries, to each score's key, by
    loops over plain HF attention."""
    with torch.no_grad():
        att = hf(tokens, output_attentions=True).attentions
    keys = {"induction": lambda q: q - r + 1, "duplicate_token": lambda q: q - r, "previous_token": lambda q: q - 1}
    out = {}
    for metric, key in keys.items():
        grid = np.zeros((len(att), att[0].shape[1]))
        for layer, a in enumerate(att):
            for head in range(a.shape[1]):
                vals = [float(a[b, head, q, key(q)]) for b in range(a.shape[0])
                        for q in range(offset + r, offset + 2 * r)]
                grid[layer, head] = sum(vals) / len(vals)
        out[metric] = grid
    return out


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_induction_nulls_are_the_scores_on_twins_without_repeats(make: Any) -> None:
    hf = make()
    ref_hf = copy.deepcopy(hf)  # plain HF: the workbench's model wraps its own copy
    model = loaded(hf)
    det = InductionDetector()
    r, n, seed = 6, 5, 3
    cfg = det.parse_params({"seq_len": r, "n_prompts": n, "batch_size": n, "seed": seed})
    summary, _ = run_in_memory(model, det, cfg)
    hs = summary.tables["head_scores"]
    got = {m: np.zeros((3, 4)) for m in hs["metric"].unique()}
    for m, la, h, v in zip(hs["metric"], hs["layer"], hs["head"], hs["value"], strict=True):
        got[m][la, h] = v
    # The twins, drawn here: the repeated batch's generator, then B from the same generator.
    repeated = repeated_random_tokens(model, n, r, seed=seed * 100_003)
    low, high = ordinary_token_range(model)
    gen = torch.Generator().manual_seed(seed * 100_003)
    first = torch.randint(low, high, (n, r), generator=gen)
    second = torch.randint(low, high, (n, r), generator=gen)
    assert torch.equal(repeated[:, 1 : 1 + r], first)
    assert not torch.equal(first, second)
    twins = torch.cat([repeated[:, : 1 + r], second], dim=1)
    assert [torch.equal(a, b) for a, b in zip(twin_tokens(model, n, r, seed * 100_003), (repeated, twins),
                                                strict=True)] == [True, True]
    real, null = _naive_scores(ref_hf, repeated, r, 1), _naive_scores(ref_hf, twins, r, 1)
    for metric in real:
        np.testing.assert_allclose(got[metric], real[metric], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(got[f"{metric}_null"], null[metric], rtol=1e-5, atol=1e-7)
        assert not np.allclose(got[f"{metric}_null"], real[metric])  # the null is not the score again
    # Uniform causal attention gives t - 1 the share 1 / (t + 1): second-copy queries 7..12.
    assert math.isclose(summary.metrics["previous_token_uniform"], sum(1 / (q + 1) for q in range(7, 13)) / 6)
    assert math.isclose(uniform_previous_token_share(r, 1), summary.metrics["previous_token_uniform"])
    for name in ("induction_above_null", "duplicate_token_above_null", "previous_token_above_null",
                 "previous_token_above_uniform"):
        assert set(np.unique(got[name])) <= {0.0, 1.0}
        assert summary.metrics[f"n_{name}"] == int(got[name].sum())
        assert summary.metrics[f"share_{name}"] == pytest.approx(got[name].mean())


# ------------------------------------------------------------------ retrieval null


def _over_every_order(argmaxes: list[torch.Tensor], seq: list[int], span: tuple[int, int],
                      targets: list[int]) -> torch.Tensor:
    """The retrieval score averaged over every order of the span's tokens, by brute force."""
    start, end = span
    total = torch.zeros(argmaxes[0].shape, dtype=torch.float64)
    orders = list(itertools.permutations(seq[start:end]))
    for order in orders:
        shuffled = [*seq[:start], *order, *seq[end:]]
        total += rt.retrieval_scores(argmaxes, shuffled, span, targets)
    return total / len(orders)


def test_retrieval_null_is_the_score_over_every_order_of_the_needle_hand_made() -> None:
    seq = [9, 9, 9, 5, 6, 7, 6, 9, 6]  # needle span [3, 7): tokens 5 6 7 6 (6 twice)
    span, targets = (3, 7), [6, 7, 6]
    argmax = [torch.tensor([[4, 4], [8, 1]]), torch.tensor([[5, 4], [8, 5]]), torch.tensor([[6, 3], [8, 7]])]
    null = rt.retrieval_null_scores(argmax, seq, span, targets)
    # L0H0 is in the span at every step: (2/4 + 1/4 + 2/4) / 4; L0H1 too; L1H0 never; L1H1 once (target 7).
    expected = torch.tensor([[5 / 16, 5 / 16], [0.0, 1 / 16]], dtype=torch.float64)
    assert torch.allclose(null, expected)
    assert torch.allclose(null, _over_every_order(argmax, seq, span, targets))


@pytest.mark.parametrize("mode", ["faithful", "fast"])
def test_retrieval_null_on_a_tiny_models_decoding_is_the_score_over_every_order(mode: str) -> None:
    """On a real decoding of a tiny model (its argmaxes as recorded), the stored null equals the
    brute-force mean over all 720 orders of the 6-token needle."""
    from tests.unit.test_retrieval import FORCED, force_output, sample_for, wrap

    hf = force_output(tiny_llama(), token=FORCED)
    ref_hf = copy.deepcopy(hf)
    model = wrap(hf)
    sample = sample_for(model)
    if mode == "faithful":
        r = rt.score_sample_faithful(model, sample, 3)
        steps, targets = r["argmax"], r["generated"]
        seq = [*sample.input_ids, *targets]
    else:
        r = rt.score_sample_fast(model, sample)
        a0, a1 = sample.answer_span
        targets = list(sample.input_ids[a0:a1])
        seq = [*sample.input_ids, *targets]
        steps = _fast_argmaxes(ref_hf, sample, targets)
    brute = _over_every_order(steps, seq, sample.needle_span, targets)
    assert torch.allclose(r["null_scores"], brute)
    assert torch.equal(r["scores"], rt.retrieval_scores(steps, seq, sample.needle_span, targets))


def _fast_argmaxes(hf: torch.nn.Module, sample: Any, answer: list[int]) -> list[torch.Tensor]:
    """Per answer token, [layer, head] argmax key positions from one plain HF pass over prompt + answer."""
    ids = torch.tensor([[*sample.input_ids, *answer[:-1]]])
    with torch.no_grad():
        att = hf(ids, output_attentions=True).attentions
    first = len(sample.input_ids) - 1
    return [torch.stack([a[0, :, first + j].argmax(-1) for a in att]) for j in range(len(answer))]
