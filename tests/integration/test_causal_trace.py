"""Causal tracing on the zoo default (smollm2-135m): the batched restoration against a plain
one-cell-at-a-time ROME-style trace with raw hooks on a separately loaded HF copy, the known
filter against a plain forward, and bad input."""

from __future__ import annotations

import pytest
import torch

from circuits.data.facts import Fact, known_facts, load_facts
from circuits.detectors import causal_trace as ct
from circuits.detectors import knockout
from circuits.methods import tracing
from interp.errors import UserError
from interp.model.loaded import LoadedModel
from interp.model.loading import load_hf

pytestmark = pytest.mark.integration

PROMPT, SUBJECT, ANSWER = "The Eiffel Tower is located in the city of", "The Eiffel Tower", "Paris"


@pytest.fixture(scope="module")
def plain_smol() -> torch.nn.Module:
    hf, _, _ = load_hf("smollm2-135m")
    return hf.eval()


def _reference(plain, inp, noise_std, samples, seed, cell, window):
    from tests.unit.test_causal_trace import reference_cell

    return reference_cell(
        plain, inp.tokens, inp.subject_range, inp.target,
        noise_std=noise_std, samples=samples, seed=seed, cell=cell, window=window,
    )


def test_batched_restoration_equals_hooked_loop_on_smol(smol: LoadedModel, plain_smol) -> None:
    inp = tracing.prepare(smol, PROMPT, SUBJECT, ANSWER)
    s, e = inp.subject_range
    noise = 3 * tracing.subject_embedding_std(smol, [f.subject for f in load_facts()])
    samples, seed, window = 10, 1, 10
    p_clean, p_corr, clean = tracing.clean_and_corrupted(
        smol, inp, noise_std=noise, samples=samples, seed=seed, kinds=tracing.RESTORABLE
    )
    ref_clean, ref_corr = _reference(plain_smol, inp, noise, samples, seed, None, window)
    assert p_clean == pytest.approx(ref_clean, abs=1e-5)
    assert p_corr == pytest.approx(ref_corr, abs=1e-5)
    last = inp.n_tokens - 1
    cells = [
        tracing.Cell("state", e - 1, 8),
        tracing.Cell("state", s, 2),
        tracing.Cell("mlp", e - 1, 10),
        tracing.Cell("mlp", last, 25),
        tracing.Cell("attn", last, 20),
    ]
    got = tracing.restored_scores(
        smol, inp, cells, clean, noise_std=noise, samples=samples, seed=seed, window=window, memory_mb=64
    )
    moved = 0.0
    for cell, value in zip(cells, got, strict=True):
        _, ref = _reference(plain_smol, inp, noise, samples, seed, cell, window)
        assert abs(value - ref) < 1e-5, (cell, value, ref)
        moved = max(moved, abs(ref - ref_corr))
    assert moved > 1e-3


def test_known_filter_matches_plain_forward_on_smol(smol: LoadedModel, plain_smol) -> None:
    facts = load_facts()[:12]
    df = known_facts(smol, facts)
    for fact, known in zip(facts, df["known"], strict=True):
        ids = torch.tensor([smol.encode(fact.prompt)])
        first = smol.tokenizer(" " + fact.answer, add_special_tokens=False)["input_ids"][0]
        with torch.no_grad():
            top = int(plain_smol(ids).logits[0, -1].argmax())
        assert known == (top == first), fact


def test_knockout_runs_on_smol(smol: LoadedModel) -> None:
    inp = tracing.prepare(smol, PROMPT, SUBJECT, ANSWER)
    p_clean, curves = knockout.knockout_effects(smol, inp, window=9)
    assert 0 < p_clean <= 1
    for which in knockout.KNOCKOUT_SETS:
        assert curves[which].shape == (smol.info.n_layers,)
        assert (curves[which] >= -1).all()


def test_bad_input_on_smol(smol: LoadedModel) -> None:
    with pytest.raises(UserError, match="not found in prompt"):
        tracing.prepare(smol, PROMPT, "Big Ben", ANSWER)
    with pytest.raises(UserError, match="longer than"):
        tracing.prepare(smol, "word " * (smol.info.max_positions + 10) + "Paris", "Paris", "France")
    with pytest.raises(UserError, match="needs all of"):
        ct.run_inline(smol, "causal-trace", prompt=PROMPT, subject=SUBJECT)
    # A split answer is traced on its first token, and the summary says so.
    inp = tracing.prepare(smol, PROMPT, SUBJECT, "Parisian Gardens")
    assert inp.n_answer_tokens > 1
    assert known_facts(smol, [Fact(SUBJECT, PROMPT, "Parisian Gardens")])["n_answer_tokens"].iloc[0] > 1
