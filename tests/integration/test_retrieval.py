"""Retrieval heads on the zoo default (smollm2-135m), at small sizes."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from circuits.detectors import retrieval as rt
from circuits.detectors import retrieval_masking
from interp.errors import UserError
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


def hf_needle_decode(hf: Any, tokenizer: Any, prompt: list[int], steps: int,
                     zero: Sequence[tuple[int, int]] = ()) -> tuple[list[int], list[torch.Tensor]]:
    """The reference decoding, naively: plain HF, a full forward pass per step (no KV cache),
    stopping at EOS or a token holding a newline (kept); each step's [layer, head] argmax key of
    the last query's attention (output_attentions). ``zero``: heads whose query is zeroed at
    q_proj's output (uniform attention, the masking the detector applies)."""
    d = int(hf.config.head_dim)
    by_layer: dict[int, list[int]] = {}
    for layer, head in zero:
        by_layer.setdefault(layer, []).append(head)

    def hook(cols: list[int]) -> Any:
        def zero_q(_m: Any, _i: Any, out: torch.Tensor) -> torch.Tensor:
            out = out.clone()
            for h in cols:
                out[..., h * d:(h + 1) * d] = 0.0
            return out

        return zero_q

    handles = [hf.model.layers[la].self_attn.q_proj.register_forward_hook(hook(hs)) for la, hs in by_layer.items()]
    gen: list[int] = []
    tables: list[torch.Tensor] = []
    try:
        for _ in range(steps):
            with torch.no_grad():
                out = hf(torch.tensor([prompt + gen]), output_attentions=True)
            tok = int(out.logits[0, -1].argmax())
            tables.append(torch.stack([a[0, :, -1].argmax(-1) for a in out.attentions]))
            gen.append(tok)
            if tok == tokenizer.eos_token_id or "\n" in tokenizer.decode([tok]):
                break
    finally:
        for h in handles:
            h.remove()
    return gen, tables


def _reference(smol: LoadedModel) -> Any:
    """A fresh plain HF copy of the zoo default (the bridge rewires the module it wraps)."""
    from interp.model.loading import load_hf

    return load_hf("smollm2-135m")[0]


def test_faithful_scan_equals_a_naive_loop(scans: dict[str, Any], smol: LoadedModel) -> None:
    """Which samples count and every head's score, recomputed with plain HF: a head hits at a
    step when its attention's argmax key lies in the needle and holds the token generated then;
    its score on a sample is its hits over the needle's length, averaged over the samples the
    model answered (ROUGE-1 recall of the answer > 0.5)."""
    s = scans["faithful"]
    det = rt.RetrievalDetector()
    cfg = det.parse_params({**SMALL, "mode": "faithful"})
    hf = _reference(smol)
    counted: list[dict[tuple[int, int], float]] = []
    for sample in rt.samples_for(smol, cfg).values():
        gen, tables = hf_needle_decode(hf, smol.tokenizer, list(sample.input_ids), cfg.max_new_tokens)
        if not rt.is_correct(sample.needle.answer, rt.response_text(smol, gen)):
            continue
        seq, (start, end) = [*sample.input_ids, *gen], sample.needle_span
        hits: dict[tuple[int, int], int] = {}
        for table, tok in zip(tables, gen, strict=True):
            for (layer, head), key in np.ndenumerate(table.numpy()):
                hits[(layer, head)] = hits.get((layer, head), 0) + int(start <= key < end and seq[key] == tok)
        counted.append({h: n / (end - start) for h, n in hits.items()})
    assert s.metrics["n_samples"] == 4
    assert s.metrics["n_counted"] == len(counted)
    if not counted:
        assert s.heads == []
        assert any("NO RETRIEVAL SCORES" in w for w in s.warnings)
        return
    expected = {h: sum(c[h] for c in counted) / len(counted) for h in counted[0]}
    got = {(h["layer"], h["head"]): h["score"] for h in s.heads}
    assert got.keys() == expected.keys()
    for head, value in expected.items():
        assert got[head] == pytest.approx(value, rel=1e-12, abs=1e-12), head


def _spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Pearson correlation of the ranks (ties take their mean rank), by hand."""

    def ranks(x: Sequence[float]) -> list[float]:
        order = sorted(range(len(x)), key=lambda i: x[i])
        r = [0.0] * len(x)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
                j += 1
            for t in range(i, j + 1):
                r[order[t]] = (i + j) / 2
            i = j + 1
        return r

    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    return cov / math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))


def test_fast_and_faithful_agreement_by_hand(scans: dict[str, Any]) -> None:
    a = {(h["layer"], h["head"]): h["score"] for h in scans["faithful"].heads}
    b = {(h["layer"], h["head"]): h["score"] for h in scans["fast"].heads}
    common = sorted(set(a) & set(b))
    if len(common) < 2:
        with pytest.raises(UserError, match="at least two heads"):
            rt.agreement(a, b, k=10)
        return
    agree = rt.agreement(a, b, k=10)
    assert agree["spearman"] == pytest.approx(_spearman([a[h] for h in common], [b[h] for h in common]), abs=1e-12)
    top_a = set(sorted(common, key=lambda h: -a[h])[:10])
    top_b = set(sorted(common, key=lambda h: -b[h])[:10])
    assert agree["top10_overlap"] == len(top_a & top_b) / 10


def test_masking_with_a_given_ranking_equals_a_naive_loop(scans: dict[str, Any], smol: LoadedModel) -> None:
    """Each head set's needle accuracy, recomputed with plain HF and the heads' queries zeroed."""
    heads = scans["faithful"].heads or scans["fast"].heads
    ranking = ",".join(f"{h['layer']}.{h['head']}" for h in heads[:30])
    det: Any = retrieval_masking.RetrievalMaskingDetector()
    params = det.parse_params(
        {**SMALL, "n_lengths": 1, "n_needles": 1, "heads": ranking, "top_k": 5, "n_random": 1, "seed": 1}
    )
    s = run_units(det, smol, params)
    assert s.metrics["n_samples"] == 1
    sets = det.head_sets(smol, params)
    assert sets["top5"] == [(h["layer"], h["head"]) for h in heads[:5]]
    [sample] = det.samples(smol, params).values()
    hf = _reference(smol)
    correct = {}
    for name, hs in sets.items():
        gen, _ = hf_needle_decode(hf, smol.tokenizer, list(sample.input_ids), params.max_new_tokens, zero=hs)
        correct[name] = float(rt.is_correct(sample.needle.answer, rt.response_text(smol, gen)))
    assert s.metrics["accuracy:none"] == correct["none"]
    assert s.metrics["accuracy:top5"] == correct["top5"]
    assert s.metrics["accuracy:random-mean"] == correct["random5-draw0"]
    assert s.metrics["drop:top"] == correct["none"] - correct["top5"]
