"""retrieval-masking's accuracies and drops on a model whose answer masking does change (issue 27),
against a naive loop over plain Hugging Face forward passes.

The model is the tiny Llama with its unembedding leaning to two needle words: W50 and W60 get
+20, so the first generated token is one of them, and W60 gets a further shift that makes it win
exactly when its logit lead over W50 (in the unchanged model) is above a threshold: midway
between the first sample's lead unmasked and with the top-2 heads masked. So that sample
answers W60, the needle's answer, unmasked and W50 masked, and the others fall where their
leads put them: the drops are not zero by construction (the forced-output model of
test_retrieval.py always answers, so its drop is 0 whatever the code computes). The reference masks a head by zeroing its query at q_proj's output (uniform attention,
as test_retrieval.py shows the ablation equals) and decodes one token with a full forward pass.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from scipy import stats

from circuits.detectors import retrieval_masking
from tests.tiny import VOCAB, tiny_llama
from tests.unit.test_retrieval import GRID, HAYSTACK_TEXT, NEEDLE, run_units, wrap

ANSWER, OTHER = 60, 50
CFG = {**GRID, "n_depths": 3, "max_new_tokens": 1, "heads": "1.2,0.1,2.3,0.0", "top_k": 2, "n_random": 2,
       "exclude_top": 4}


def _masked_logits(hf: Any, ids: list[int], heads: list[tuple[int, int]]) -> torch.Tensor:
    """The last position's logits of a plain forward pass with ``heads``' queries zeroed."""
    d = int(hf.config.head_dim)

    def zero(cols: list[int]) -> Any:
        def hook(_m: Any, _i: Any, out: torch.Tensor) -> torch.Tensor:
            out = out.clone()
            for h in cols:
                out[..., h * d:(h + 1) * d] = 0.0
            return out

        return hook

    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)
    handles = [hf.model.layers[la].self_attn.q_proj.register_forward_hook(zero(hs)) for la, hs in by_layer.items()]
    try:
        with torch.no_grad():
            return hf(torch.tensor([ids])).logits[0, -1]
    finally:
        for h in handles:
            h.remove()


def _lean(hf: Any, shift: float) -> Any:
    lm = torch.nn.Linear(int(hf.config.hidden_size), VOCAB, bias=True)
    with torch.no_grad():
        lm.weight.copy_(hf.lm_head.weight)
        lm.bias.zero_()
        lm.bias[OTHER] = 20.0
        lm.bias[ANSWER] = 20.0 + shift
    hf.lm_head = lm
    return hf


def _wilson(k: int, n: int) -> tuple[float, float]:
    """Wilson's (1927) score interval in its textbook form: (p + z²/2n ± z sqrt(p(1-p)/n +
    z²/4n²)) / (1 + z²/n), p = k/n, z the normal's 97.5 % quantile."""
    z, p = float(stats.norm.ppf(0.975)), k / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - half) / (1 + z * z / n)), min(1.0, (centre + half) / (1 + z * z / n))


def _student(values: list[float]) -> tuple[float, float]:
    """mean ± t(0.975, n - 1) s / sqrt(n) (Student 1908); nan from one value."""
    n, m = len(values), sum(values) / len(values)
    if n < 2:
        return math.nan, math.nan
    s = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(0.975, n - 1)) * s / math.sqrt(n)
    return m - half, m + half


def _check_curves(curves: pd.DataFrame, samples: Mapping[str, Any], correct: Mapping[tuple[str, str], bool],
                  draws: list[str]) -> None:
    """Every stored accuracy point against the naive loop's outcomes of its samples (those of its
    depth, its length or both): Wilson's bounds for one head set's 0/1 outcomes, Student's t for
    each sample's accuracy over the random draws."""
    where = {u: s.describe() for u, s in samples.items()}
    assert len(curves) == 3 * (2 + 3 + 2 * 3)  # three sets; 2 lengths, 3 depths, 6 cells
    for row in curves.to_dict("records"):
        name, _, what = str(row["curve"]).partition(": accuracy vs ")
        keys = ["length" if what.startswith("length") else "depth"]
        fixed = {keys[0]: row["x"]}
        if ", depth=" in what:
            fixed["depth"] = float(what.split("=")[1])
        units = [u for u in samples if all(abs(where[u][k] - v) < 5e-3 for k, v in fixed.items())]
        if name == "random-mean":
            values = [sum(correct[(u, d)] for d in draws) / len(draws) for u in units]
            expected, method = _student(values), "t"
        else:
            values = [float(correct[(u, name)]) for u in units]
            expected, method = _wilson(int(sum(values)), len(values)), "wilson"
        assert (row["y"], row["n"], row["ci_method"]) == (pytest.approx(sum(values) / len(values)), len(units), method)
        assert [row["ci_low"], row["ci_high"]] == pytest.approx(list(expected), nan_ok=True), row


def test_accuracies_and_drops_equal_a_naive_loop(tmp_path: Path) -> None:
    (tmp_path / "hay.txt").write_text(HAYSTACK_TEXT)
    (tmp_path / "needles.jsonl").write_text(json.dumps({**NEEDLE, "answer": f"W{ANSWER}"}) + "\n")
    files = {"haystack_file": str(tmp_path / "hay.txt"), "needles_file": str(tmp_path / "needles.jsonl")}
    plain = tiny_llama()
    det = retrieval_masking.RetrievalMaskingDetector()
    cfg = det.parse_params({**files, **CFG})
    probe = wrap(copy.deepcopy(plain))
    samples, sets = det.samples(probe, cfg), det.head_sets(probe, cfg)
    leads = {(u, name): float(lg[ANSWER] - lg[OTHER]) for u, s in samples.items() for name, heads in sets.items()
             for lg in [_masked_logits(plain, list(s.input_ids), heads)]}
    first = next(iter(samples))
    threshold = (leads[(first, "none")] + leads[(first, "top2")]) / 2
    # No lead within float rounding of the threshold (ten float32 steps at the biased logits'
    # size, 20: 1.9e-5), so the detector's batched, cached decoding and the single forward pass
    # here cannot fall on different sides of it.
    assert min(abs(v - threshold) for v in leads.values()) > 2e-5

    leaning = _lean(copy.deepcopy(plain), -threshold)
    summary, results = run_units(det, wrap(_lean(copy.deepcopy(plain), -threshold)), cfg)

    # The naive loop: one greedy token per (sample, head set), correct when it is the answer.
    correct = {(u, name): int(_masked_logits(leaning, list(s.input_ids), heads).argmax()) == ANSWER
               for u, s in samples.items() for name, heads in sets.items()}
    assert correct == {key: lead > threshold for key, lead in leads.items()}  # the construction holds
    stored = [json.loads(j) for n, j in zip(results["artifacts"]["name"], results["artifacts"]["json"], strict=True)
              if n == "masked_sample"]
    assert len(stored) == len(samples)
    for row in stored:
        unit = next(u for u, s in samples.items() if s.describe()["length"] == row["length"]
                    and s.describe()["depth"] == row["depth"])
        for name in sets:
            assert row[f"correct:{name}"] == correct[(unit, name)], (unit, name)

    n = len(samples)

    def acc(name: str) -> float:
        return sum(correct[(u, name)] for u in samples) / n

    draws = [name for name in sets if name.startswith("random")]
    random_mean = sum(sum(correct[(u, d)] for d in draws) / len(draws) for u in samples) / n
    m = summary.metrics
    assert m["accuracy:none"] == acc("none")
    assert m["accuracy:top2"] == acc("top2")
    assert m["accuracy:random-mean"] == random_mean
    assert m["accuracy:random-min"] == min(acc(d) for d in draws)
    assert m["accuracy:random-max"] == max(acc(d) for d in draws)
    assert m["drop:top"] == acc("none") - acc("top2")
    assert m["drop:random-mean"] == acc("none") - random_mean
    # Masking changed answers here: the numbers above are not zero by construction.
    assert len({acc(name) for name in sets}) > 1
    # The top set among the random draws: percent of draws below it (ties half), and the share of
    # draws (counting the top set itself) that hurt at least as much (Phipson & Smyth 2010).
    top, rand = acc("top2"), [acc(d) for d in draws]
    below, ties = sum(r < top for r in rand), sum(r == top for r in rand)
    assert m["top_vs_random:percentile"] == pytest.approx(100 * (below + ties / 2) / len(rand))
    assert m["top_vs_random:p"] == pytest.approx((1 + below + ties) / (1 + len(rand)))
    # The accuracies and the drop carry their intervals over the n samples.
    for name, value, method in (("accuracy:none", acc("none"), "wilson"), ("accuracy:top2", top, "wilson"),
                                ("drop:top", acc("none") - top, "newcombe")):
        iv = summary.intervals[name]
        assert (iv.value, iv.n, iv.method) == (pytest.approx(value), n, method)
        assert iv.lo <= iv.value <= iv.hi
    _check_curves(summary.tables["curves"], samples, correct, draws)
