"""DeCoRe on the zoo default (smollm2-135m), at small sizes."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from circuits.detectors import decore_eval as ev
from circuits.methods.decore import decore_generate, default_k, greedy_generate
from circuits.methods.decore_scoring import decore_score
from interp.cli import main as cli_main
from interp.model.loaded import LoadedModel
from interp.runs.runner import finalized
from interp.runs.schema import FINAL_UNIT
from interp.runs.store import Store

pytestmark = pytest.mark.integration

HEADS = [(18, 6), (17, 4), (17, 3), (23, 2)]
PROMPTS = [
    "The capital of France is the city of Rome. Q: What is the capital of France? A:",
    "Q: What is the largest planet? A:",
]


def test_batch_equals_single_and_hand_step(smol: LoadedModel) -> None:
    batch = decore_generate(smol, smol.tokenizer, PROMPTS, HEADS, max_new_tokens=3)
    for p, b in zip(PROMPTS, batch, strict=True):
        alone = decore_generate(smol, smol.tokenizer, [p], HEADS, max_new_tokens=3)[0]
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
    dec = decore_generate(smol, smol.tokenizer, PROMPTS, [], max_new_tokens=4)
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
            parts.setdefault(table, []).append(df.assign(unit=u.key))
    return finalized(model, det, params, {t: pd.concat(v, ignore_index=True) for t, v in parts.items()})


def test_eval_detector_memotrap_small(smol: LoadedModel) -> None:
    det = ev.DecoreEvalDetector()
    heads = ",".join(f"{la}.{h}" for la, h in HEADS)
    params = det.parse_params({"heads": heads, "ks": "2", "tasks": "memotrap", "max_items": 3, "exclude_top": 4})
    s = run_units(det, smol, params)
    table = pd.DataFrame(json.loads(s.tables["artifacts"]["json"].iloc[0]))
    assert set(table["method"]) == set(ev.METHODS)
    assert bool((table["n_test"] == 3).all())
    assert bool((table["n_validation"] == 3).all())
    # Each of the control's draws (20 by default) lies outside the top 4 of the given ranking.
    [case] = [u for u in det.units(smol, params) if u.key == "memotrap/control-entropy/k2"]
    ctrl = det.run_unit(smol, params, case).tables["artifacts"]
    draws = json.loads(ctrl["json"].iloc[0])["draw_heads"]
    assert len(draws) == params.n_random == 20
    for drawn in draws:
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


# One needle at one depth and length: a retrieval run of one unit (seconds, not minutes).
SMALL_RETRIEVAL = {"n_lengths": "1", "n_depths": "1", "n_needles": "1", "max_length": "300"}


def _decore(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[dict[str, Any], str]:
    """`interp decore ... --json` in process: its JSON object and its stderr. Returning (no
    SystemExit) is exit status 0."""
    cli_main(["decore", "--prompt", PROMPTS[1], "--max-new-tokens", "3", *args, "--json"])
    cap = capsys.readouterr()
    return json.loads(cap.out.strip().splitlines()[-1]), cap.err


def _stored(ws: Path) -> list[tuple[int, list[tuple[int, int]]]]:
    """(run id, final ranking) of every retrieval run in the workspace, oldest first."""
    with Store(ws, create=False) as store:
        runs = store.runs()
        out = []
        for run_id in sorted(int(i) for i in runs.loc[runs["detector"] == "retrieval", "id"]):
            final = store.run(run_id).to_frame("head_scores", FINAL_UNIT)
            rows = zip(final["metric"], final["value"], final["layer"], final["head"], strict=True)
            best_first = sorted((-float(v), int(la), int(h)) for m, v, la, h in rows if m == "retrieval")
            out.append((run_id, [(la, h) for _, la, h in best_first]))
        return out


def test_cli_default_k_reuses_the_workspaces_retrieval_run(
    smol: LoadedModel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ws = tmp_path / "ws"
    cli_main(["run", "retrieval", "--mode", "fast", "-w", str(ws), "--json",
              *(a for name, v in SMALL_RETRIEVAL.items() for a in (f"--{name.replace('_', '-')}", v))])
    capsys.readouterr()
    [(run_id, ranking)] = _stored(ws)
    k = default_k(smol.info.n_total_heads)
    assert k == 13
    out, err = _decore(capsys, "-w", str(ws))  # no --heads, no --k
    assert out["heads"] == [list(h) for h in ranking[:k]]
    assert out["ranking"]["source"] == "stored run"
    assert out["ranking"]["run_id"] == run_id
    assert out["ranking"]["k"] == k
    assert out["ranking"]["k_rule"] == "default"
    assert f"masking the top {k} retrieval heads" in err
    assert f"using retrieval run {run_id} (fast-teacher-forced) from {ws.resolve()}" in err
    assert len(_stored(ws)) == 1  # nothing computed


def test_cli_computes_and_stores_the_ranking_then_reuses_it(
    smol: LoadedModel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ws = tmp_path / "empty"
    small = [a for name, v in SMALL_RETRIEVAL.items() for a in ("--ranking-param", f"{name}={v}")]
    out, err = _decore(capsys, "-w", str(ws), "--k", "4", *small)
    assert "no finished retrieval run of smollm2-135m" in err
    [(run_id, ranking)] = _stored(ws)
    assert f"stored as retrieval run {run_id} in {ws.resolve()}" in err
    assert out["ranking"]["source"] == "computed now"
    assert out["ranking"]["run_id"] == run_id
    assert out["ranking"]["params"]["n_needles"] == 1
    assert out["heads"] == [list(h) for h in ranking[:4]]
    # The next call takes it from the store.
    out, err = _decore(capsys, "-w", str(ws), "--k", "2", *small)
    assert f"using retrieval run {run_id} (fast-teacher-forced)" in err
    assert out["ranking"]["source"] == "stored run"
    assert out["heads"] == [list(h) for h in ranking[:2]]
    assert len(_stored(ws)) == 1
