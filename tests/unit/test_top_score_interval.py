"""A head-score detector's top head carries its score's interval over the units (the atlas's
"induction heads exist" reads it), checked against scipy's t quantile on the units' own values."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from circuits.detectors.induction import InductionDetector
from interp.runs.runner import run_in_memory
from tests.tiny import loaded, tiny_llama


def test_the_top_heads_interval_is_the_t_interval_of_its_unit_scores() -> None:
    model = loaded(tiny_llama())
    summary, results = run_in_memory(model, InductionDetector(), {"n_prompts": 8, "batch_size": 2, "seq_len": 10})
    assert summary.heads is not None
    top = summary.heads[0]
    hs = results["head_scores"]
    values = hs[(hs["metric"] == "induction") & (hs["layer"] == top["layer"]) & (hs["head"] == top["head"])]["value"]
    x = values.to_numpy(float)
    assert len(x) == 4  # one value per unit of 2 prompts
    half = stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x))
    iv = summary.intervals["top_score"]
    assert (iv.value, iv.n, iv.method) == (pytest.approx(top["score"]), 4, "t")
    assert (iv.lo, iv.hi) == pytest.approx((x.mean() - half, x.mean() + half))
    final = summary.tables["metrics"].set_index("name")
    assert (final.loc["top_score", "ci_low"], final.loc["top_score", "n"]) == (pytest.approx(iv.lo), 4)
