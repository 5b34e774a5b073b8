"""Retrieval heads on the zoo default (smollm2-135m), at small sizes."""

from __future__ import annotations

from typing import Any

import pandas as pd
import pytest
import torch

from circuits.detectors import retrieval as rt
from circuits.detectors import retrieval_masking
from interp.model.loaded import LoadedModel
from interp.runs.runner import finalized

pytestmark = pytest.mark.integration

SMALL = {"min_length": 200, "max_length": 300, "n_lengths": 2, "n_depths": 1, "n_needles": 2, "max_new_tokens": 20}


def run_units(det: Any, model: LoadedModel, params: dict[str, Any]) -> Any:
    parts: dict[str, list[pd.DataFrame]] = {}
    for u in det.units(model, params):
        for table, df in det.run_unit(model, params, u).tables.items():
            parts.setdefault(table, []).append(df.assign(unit=u.key))
    return finalized(model, det, params, {t: pd.concat(v, ignore_index=True) for t, v in parts.items()})


@pytest.fixture(scope="module")
def scans(smol: LoadedModel) -> dict[str, Any]:
    torch.manual_seed(0)
    out = {}
    for mode in ("faithful", "fast"):
        det = rt.RetrievalDetector()
        out[mode] = run_units(det, smol, det.parse_params({**SMALL, "mode": mode}))
    return out


def test_kv_decode_matches_full_forward(smol: LoadedModel) -> None:
    det = rt.RetrievalDetector()
    sample = next(iter(rt.samples_for(smol, det.parse_params(SMALL)).values()))
    ids = torch.tensor([sample.input_ids])
    gen, argmax = rt.needle_decode(smol, ids, 3, record_attention=True)
    # Reference without any KV cache: the whole sequence in one pass, attention of the rows
    # that were the decoding steps' queries.
    full = torch.tensor([[*sample.input_ids, *gen[0][:-1]]])
    with torch.no_grad():
        out = smol.run(full, cache=["pattern.*"])
    n = len(sample.input_ids)
    assert out.logits[0, n - 1 :].argmax(-1).tolist() == gen[0]
    for t, table in enumerate(argmax):
        ref = torch.stack([out.cache[f"pattern.{la}"][0, :, n - 1 + t].argmax(-1) for la in range(smol.info.n_layers)])
        assert torch.equal(table[:, 0], ref)


def test_faithful_scan_reports_counted_samples(scans: dict[str, Any], smol: LoadedModel) -> None:
    s = scans["faithful"]
    assert s.variant == "faithful"
    assert s.metrics["n_samples"] == 4
    assert s.metrics["correctness"] == rt.CORRECTNESS
    if s.metrics["n_counted"] == 0:
        assert s.heads == []
        assert s.warnings
    else:
        assert len(s.heads) == smol.info.n_total_heads
        scores = [h["score"] for h in s.heads]
        assert scores == sorted(scores, reverse=True)
        assert min(scores) >= 0.0
        assert 0 <= s.metrics["n_heads_above_threshold"] <= smol.info.n_total_heads


def test_fast_and_faithful_agreement_is_computable(scans: dict[str, Any]) -> None:
    a = {(h["layer"], h["head"]): h["score"] for h in scans["faithful"].heads}
    b = {(h["layer"], h["head"]): h["score"] for h in scans["fast"].heads}
    if not a or not b:
        pytest.skip("one of the scans counted no samples")
    agree = rt.agreement(a, b, k=10)
    assert -1.0 <= agree["spearman"] <= 1.0
    assert 0.0 <= agree["top10_overlap"] <= 1.0


def test_masking_runs_with_given_ranking(scans: dict[str, Any], smol: LoadedModel) -> None:
    heads = scans["faithful"].heads or scans["fast"].heads
    ranking = ",".join(f"{h['layer']}.{h['head']}" for h in heads[:30])
    det: Any = retrieval_masking.RetrievalMaskingDetector()
    params = det.parse_params(
        {**SMALL, "n_lengths": 1, "n_needles": 1, "heads": ranking, "top_k": 5, "n_random": 1, "seed": 1}
    )
    s = run_units(det, smol, params)
    assert s.metrics["n_samples"] == 1
    for key in ("accuracy:none", "accuracy:top5", "accuracy:random-mean"):
        assert 0.0 <= s.metrics[key] <= 1.0
    sets = det.head_sets(smol, params)
    assert sets["top5"] == [(h["layer"], h["head"]) for h in heads[:5]]
