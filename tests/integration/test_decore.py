"""DeCoRe on the zoo default (smollm2-135m), at small sizes."""

from __future__ import annotations

import copy
import json
from typing import Any

import pandas as pd
import pytest
import torch

from circuits import decore_eval as ev
from circuits.decore import decore_generate, decore_score, greedy_generate
from interp.cli import main as cli_main
from interp.model import LoadedModel

pytestmark = pytest.mark.integration

HEADS = [(18, 6), (17, 4), (17, 3), (23, 2)]
PROMPTS = [
    "The capital of France is the city of Rome. Q: What is the capital of France? A:",
    "Q: What is the largest planet? A:",
]


def test_batch_equals_single_and_hand_step(smol: LoadedModel) -> None:
    batch = decore_generate(smol, PROMPTS, HEADS, max_new_tokens=3)
    for p, b in zip(PROMPTS, batch, strict=True):
        alone = decore_generate(smol, [p], HEADS, max_new_tokens=3)[0]
        assert b.tokens == alone.tokens
        assert b.scores == pytest.approx(alone.scores, abs=1e-3)
    # First step by hand on an independent HF copy, the heads' query slices zeroed by raw hooks.
    plain = copy.deepcopy(smol.hf)
    ids = smol.to_tokens(PROMPTS[1])
    d = smol.info.d_head
    with torch.no_grad():
        base = plain(ids).logits[0, -1].double()
        hooks = []
        for layer, head in HEADS:
            def fwd(_m, _i, out, head=head):
                out = out.clone()
                out[..., head * d:(head + 1) * d] = 0.0
                return out
            hooks.append(plain.model.layers[layer].self_attn.q_proj.register_forward_hook(fwd))
        masked = plain(ids).logits[0, -1].double()
        for h in hooks:
            h.remove()
    p = torch.softmax(base, -1)
    a = float(-(p[p > 0] * p[p > 0].log()).sum())
    s = (1 + a) * torch.log_softmax(base, -1) - a * torch.log_softmax(masked, -1)
    assert batch[1].tokens[0] == int(s.argmax())
    assert batch[1].alphas[0] == pytest.approx(a, rel=1e-3)


def test_no_heads_is_greedy_and_scores(smol: LoadedModel) -> None:
    dec = decore_generate(smol, PROMPTS, [], max_new_tokens=4)
    gre = greedy_generate(smol, PROMPTS, max_new_tokens=4)
    assert [g.tokens for g in dec] == [g.tokens for g in gre]
    sc = decore_score(smol, PROMPTS[:1], [[" Rome", " Paris"]], HEADS)
    assert list(sc["answer"]) == [" Rome", " Paris"]
    assert bool(sc["decore"].notna().all())
    assert bool((sc["n_tokens"] >= 1).all())


def run_units(det: Any, model: LoadedModel, params: dict[str, Any]) -> Any:
    parts: dict[str, list[pd.DataFrame]] = {}
    for u in det.units(model, params):
        for table, df in det.run_unit(model, params, u).tables.items():
            parts.setdefault(table, []).append(df.assign(unit=u))
    return det.finalize(model, params, {t: pd.concat(v, ignore_index=True) for t, v in parts.items()})


def test_eval_detector_memotrap_small(smol: LoadedModel) -> None:
    det = ev.DecoreEvalDetector()
    heads = ",".join(f"{la}.{h}" for la, h in HEADS)
    params = det.parse_params({"heads": heads, "ks": "2", "tasks": "memotrap", "max_items": 3, "exclude_top": 4})
    s = run_units(det, smol, params)
    table = pd.DataFrame(json.loads(s.tables["artifacts"]["json"].iloc[0]))
    assert set(table["method"]) == set(ev.METHODS)
    assert bool((table["n_test"] == 3).all())
    assert bool((table["n_validation"] == 3).all())
    # The control's heads lie outside the top 4 of the given ranking.
    ctrl = det.run_unit(smol, params, "memotrap/control-entropy/k2").tables["artifacts"]
    drawn = json.loads(ctrl["json"].iloc[0])["heads"]
    assert len(drawn) == 2
    assert not {tuple(h) for h in drawn} & set(HEADS)


def test_cli_json(smol: LoadedModel, capsys: pytest.CaptureFixture[str]) -> None:
    cli_main(["decore", "--heads", "18.6,17.4", "--prompt", PROMPTS[1], "--max-new-tokens", "3", "--json"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["heads"] == [[18, 6], [17, 4]]
    assert len(out["results"]) == 1
    assert len(out["results"][0]["decore_tokens"]) <= 3
    with pytest.raises(SystemExit):
        cli_main(["decore", "--prompt", "x", "--heads", "18.6", "--k", "3"])
