"""The nulls on real heads (issue 26's acceptance): on the 2-layer model trained to do induction
(``tests/trained_induction.py``), a head that does the mechanism is above its null and one that
does not is not, for the induction-family scores and the retrieval score.

The heads are found from the plain model's attention (:func:`find_heads`), independently of the
detectors: its best induction head (layer 1) and its best previous-token head (layer 0, which
cannot do induction: nothing before it has mixed the tokens).
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import torch
from transformers import LlamaForCausalLM

from circuits.data.needles import Needle, NeedleSample
from circuits.detectors import retrieval as rt
from circuits.detectors.induction import InductionDetector
from interp.model.loaded import LoadedModel
from interp.runs.runner import run_in_memory
from tests.tiny import VOCAB, loaded
from tests.trained_induction import find_heads, train_induction_model

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]  # trains a model (seconds); the full suite runs it


@pytest.fixture(scope="module")
def trained() -> tuple[LlamaForCausalLM, int, int]:
    """The trained model, its best previous-token head (layer 0) and best induction head (layer 1)."""
    hf, loss = train_induction_model()
    assert loss < 0.5, f"training did not reach induction (loss {loss:.3f})"
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(4, VOCAB, (8, 9), generator=gen)
    clean = torch.cat([torch.zeros(8, 1, dtype=torch.long), x, x[:, :-1]], 1)
    prev, ind, prev_scores, ind_scores = find_heads(hf, clean, 9)
    assert float(prev_scores[prev]) > 0.5
    assert float(ind_scores[ind]) > 0.5
    return hf, prev, ind


def _by_head(heads: list[dict[str, Any]]) -> dict[tuple[int, int], dict[str, Any]]:
    return {(h["layer"], h["head"]): h for h in heads}


def test_the_induction_head_is_above_its_null_and_a_layer0_head_is_not(
    trained: tuple[LlamaForCausalLM, int, int],
) -> None:
    hf, prev, ind = trained
    det = InductionDetector()
    cfg = det.parse_params({"seq_len": 10, "n_prompts": 20, "batch_size": 10})
    summary, _ = run_in_memory(loaded(copy.deepcopy(hf)), det, cfg)
    heads = _by_head(summary.heads or [])
    induction, previous = heads[(1, ind)], heads[(0, prev)]
    print(induction, previous, sep="\n")
    assert induction["induction_above_null"]
    assert induction["score"] > induction["induction_null"]
    assert not previous["induction_above_null"]
    # The previous-token head attends to t - 1 by position: above uniform causal attention, but
    # not above its twins without repeats (where it does the same); the induction head, looking
    # back a whole copy, is above neither.
    assert previous["previous_token_above_uniform"]
    assert not induction["previous_token_above_uniform"]
    assert not previous["previous_token_above_null"]
    assert summary.metrics["n_induction_above_null"] == sum(h["induction_above_null"] for h in heads.values())


def _span_samples(n: int, seed: int) -> dict[str, NeedleSample]:
    """Needle-like prompts on random tokens: BOS, 5 random tokens, a span of 6 (the needle), 5
    more, then the span's first 2 tokens; the answer is the span's other 4, which a model that
    copies by induction continues with."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(n):
        t = torch.randint(4, VOCAB, (16,), generator=gen).tolist()
        span = t[5:11]
        ids = (0, *t[:5], *span, *t[11:], *span[:2])
        needle = Needle(" ".join(f"w{x}" for x in span), "w4", " ".join(f"w{x}" for x in span[2:]))
        out[f"span{i}"] = NeedleSample(i, needle, 16, 0.5, ids, (6, 12), (8, 12), 16, 0.5, "plain")
    return out


class _SpanRetrieval(rt.RetrievalDetector):
    """The retrieval detector on :func:`_span_samples` instead of the needle grid."""

    def samples(self, model: LoadedModel, cfg: Any) -> dict[str, NeedleSample]:
        return _span_samples(12, seed=5)


def test_a_head_that_copies_the_needle_is_above_the_retrieval_null_and_a_layer0_head_is_not(
    trained: tuple[LlamaForCausalLM, int, int],
) -> None:
    hf, prev, ind = trained
    model = loaded(copy.deepcopy(hf))  # the workbench wraps the model it is given
    det = _SpanRetrieval()
    cfg = det.parse_params({"max_new_tokens": 4, "min_counted": 5})
    summary, results = run_in_memory(model, det, cfg)
    # The model continues most spans (11 of 12 here): enough counted samples for a verdict.
    assert summary.metrics["n_counted"] >= cfg.min_counted
    assert not summary.warnings
    assert summary.heads is not None
    heads = _by_head(summary.heads)
    copier, other = heads[(1, ind)], heads[(0, prev)]
    assert copier["above_null"]
    assert copier["score"] > copier["retrieval_null"]
    assert not other["above_null"]
    # The stored null is the mean of the per-sample nulls over the samples answered correctly.
    art = results["artifacts"]
    correct = {u for u, j in zip(art["unit"], art["json"], strict=True) if json.loads(j)["correct"]}
    hs = results["head_scores"]
    per = [float(v) for m, la, h, u, v in zip(hs["metric"], hs["layer"], hs["head"], hs["unit"], hs["value"],
                                               strict=True)
           if m == "retrieval_null_sample" and (la, h) == (1, ind) and u in correct]
    assert len(per) == summary.metrics["n_counted"]
    assert copier["retrieval_null"] == pytest.approx(sum(per) / len(per))
    assert summary.metrics["n_heads_above_null"] == sum(h["above_null"] for h in heads.values())
