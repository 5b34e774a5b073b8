"""A head-score detector's top head carries its score's interval (the atlas's "induction heads
exist" reads it): over the units for any detector on the head-score base, over the prompts for
induction. Both against scipy's t quantile on values computed here from plain HF attention."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from scipy import stats

from circuits.detectors.induction import InductionDetector
from interp.model.loaded import LoadedModel
from interp.runs.config import DetectorConfig, param
from interp.runs.head_scores import HeadScoreDetector, UnitScores
from interp.runs.runner import run_in_memory
from interp.runs.units import Unit
from tests.tiny import loaded, tiny_llama

PROMPTS = [[5, 9, 14, 3, 22, 7], [8, 2, 30, 11, 4, 19], [13, 6, 25, 17, 1, 28], [21, 10, 15, 26, 12, 5]]


@dataclass(frozen=True)
class FirstTokenConfig(DetectorConfig):
    n: int = param(4, "prompts", low=1)


class FirstTokenDetector(HeadScoreDetector[FirstTokenConfig]):
    """Each head's mean attention to position 0, one prompt per unit (not registered)."""

    name = "first-token-test"
    Config = FirstTokenConfig
    score = "first"

    def variant(self, cfg: FirstTokenConfig) -> str:
        return "test"

    def units(self, model: LoadedModel, cfg: FirstTokenConfig) -> list[Unit]:
        return [Unit("prompt", i) for i in range(cfg.n)]

    def score_unit(self, model: LoadedModel, cfg: FirstTokenConfig, unit: Unit) -> UnitScores:
        out = model.run(torch.tensor([PROMPTS[int(unit.index or 0)]]), cache=["pattern.*"])
        return UnitScores({"first": torch.stack([out.cache[f"pattern.{la}"][0, :, 1:, 0].mean(-1)
                                                 for la in range(model.info.n_layers)])})


def _t(x: np.ndarray) -> tuple[float, float]:
    half = stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x))
    return x.mean() - half, x.mean() + half


def test_the_top_heads_interval_is_the_t_interval_over_units() -> None:
    hf = tiny_llama()
    summary, _ = run_in_memory(loaded(copy.deepcopy(hf)), FirstTokenDetector(), {"n": 4})
    assert summary.heads is not None
    top = summary.heads[0]
    with torch.no_grad():
        att: Any = [hf(torch.tensor([p]), output_attentions=True).attentions[top["layer"]] for p in PROMPTS]
    x = np.array([float(a[0, top["head"], 1:, 0].mean()) for a in att])
    iv = summary.intervals["top_score"]
    assert (iv.value, iv.n, iv.method) == (pytest.approx(top["score"]), 4, "t")
    assert (iv.lo, iv.hi) == pytest.approx(_t(x), abs=1e-6)
    final = summary.tables["metrics"].set_index("name")
    assert (final.loc["top_score", "ci_low"], final.loc["top_score", "n"]) == (pytest.approx(iv.lo), 4)


def test_induction_gives_the_interval_over_its_prompts() -> None:
    hf = tiny_llama()
    model = loaded(copy.deepcopy(hf))
    summary, _ = run_in_memory(model, InductionDetector(), {"n_prompts": 8, "batch_size": 2, "seq_len": 10})
    assert summary.heads is not None
    top = summary.heads[0]
    # The prompts the units used (the unit's tokens, rebuilt the detector's way), scored here
    # from plain HF attention: mean over second-copy queries q of attention to q - R + 1.
    det = InductionDetector()
    cfg = det.parse_params({"n_prompts": 8, "batch_size": 2, "seq_len": 10})
    tokens = torch.cat([det.tokens(model, cfg, u) for u in det.units(model, cfg)])
    off, r = len(model.prefix), 10
    q = torch.arange(off + r, off + 2 * r)
    with torch.no_grad():
        pattern = hf(tokens, output_attentions=True).attentions[top["layer"]][:, top["head"]]
    x = pattern[:, q, q - r + 1].mean(-1).double().numpy()
    iv = summary.intervals["top_score"]
    assert (iv.n, iv.method) == (8, "t")
    assert iv.value == pytest.approx(x.mean(), abs=1e-6)
    assert (iv.lo, iv.hi) == pytest.approx(_t(x), abs=1e-6)
    # The copy losses over the same prompts from plain HF logits: each prompt's mean next-token
    # loss over its second copy's predictable tokens (rows off + r .. off + 2r - 2 predict them).
    with torch.no_grad():
        logp = torch.log_softmax(hf(tokens).logits.double(), -1)
    rows = torch.arange(off + r, off + 2 * r - 1)
    nll = -logp[:, rows].gather(-1, tokens[:, rows + 1, None])[..., 0]
    second = nll.mean(-1).numpy()
    iv = summary.intervals["second_copy_loss"]
    assert (iv.n, iv.method) == (8, "t")
    assert iv.value == pytest.approx(summary.metrics["second_copy_loss"], abs=1e-6)
    assert (iv.value, iv.lo, iv.hi) == pytest.approx((second.mean(), *_t(second)), abs=1e-4)
    assert "first_copy_loss" in summary.intervals
