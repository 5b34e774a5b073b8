"""DeCoRe decoding on tiny models, checked against plain HF copies with raw torch hooks.

The masked model of the reference is computed independently (tests/decore_reference.py): a
separate copy of the HF model whose head is masked by a raw hook on the query projection's
output (uniform attention: the head's query slice is zeroed) or on the output projection's
input (zero ablation), and every decoding step recomputes the whole sequence without a KV cache.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
import torch

from circuits.commands.decore import parse_ranking_params, workspace_ranking
from circuits.detectors import decore_eval as ev
from circuits.methods.decore import (
    DecoreSettings,
    base_entropy,
    combine,
    decore_generate,
    default_k,
    greedy_generate,
    parse_alpha,
    retrieval_ranking,
)
from circuits.methods.decore_scoring import decore_score
from interp.errors import UserError
from interp.model.loaded import LoadedModel
from interp.model.prefix import choose_prefix
from interp.runs import tables
from interp.runs.runner import run_in_memory
from interp.runs.store import Store
from tests.decore_reference import hand_decode, hand_entropy, raw_mask
from tests.tiny import loaded

HEADS = [(1, 0), (2, 3)]
PROMPTS = [[0, 5, 9, 17, 33, 40, 41], [0, 77, 12], [0, 64, 65, 66, 70]]


@pytest.fixture
def pair(tiny_hf: torch.nn.Module) -> tuple[LoadedModel, torch.nn.Module]:
    """A bridge model and an independent plain HF copy of the same weights."""
    return loaded(copy.deepcopy(tiny_hf), "bridge"), copy.deepcopy(tiny_hf)


@pytest.mark.parametrize("method", ["uniform", "zero"])
@pytest.mark.parametrize("alpha", ["entropy", 0.5])
def test_one_step_equals_formula(pair, method, alpha) -> None:
    model, plain = pair
    prompt = PROMPTS[0]
    ids = torch.tensor([prompt])
    with torch.no_grad():
        base = plain(ids).logits[0, -1].double()
        with raw_mask(plain, HEADS, method):
            masked = plain(ids).logits[0, -1].double()
    # The mask must change the distribution, or the test could not fail.
    assert float((torch.log_softmax(base, -1) - torch.log_softmax(masked, -1)).abs().max()) > 1e-3
    a = hand_entropy(base) if alpha == "entropy" else 0.5
    expect = (1 + a) * torch.log_softmax(base, -1) - a * torch.log_softmax(masked, -1)
    tok = int(expect.argmax())
    g = decore_generate(model, model.tokenizer, [prompt], HEADS, alpha, max_new_tokens=1, method=method)[0]
    assert g.tokens == [tok]
    assert g.alphas[0] == pytest.approx(a, abs=1e-4)
    assert g.scores[0] == pytest.approx(float(expect[tok]), abs=1e-4)
    assert g.base_logprobs[0] == pytest.approx(float(torch.log_softmax(base, -1)[tok]), abs=1e-4)


@pytest.mark.parametrize("prefill", ["masked", "shared"])
def test_several_steps_with_cache_equal_hand_decoding(pair, prefill) -> None:
    model, plain = pair
    for prompt in PROMPTS[:2]:
        toks, scores, alphas = hand_decode(plain, prompt, HEADS, "uniform", "entropy", 5,
                                           shared_prefill=prefill == "shared")
        g = decore_generate(model, model.tokenizer, [prompt], HEADS, max_new_tokens=5, prefill=prefill)[0]
        n = len(g.tokens)  # may stop early at EOS
        assert g.tokens == toks[:n]
        assert g.scores == pytest.approx(scores[:n], abs=1e-4)
        assert g.alphas == pytest.approx(alphas[:n], abs=1e-4)


def test_no_heads_makes_decore_greedy(pair) -> None:
    model, plain = pair
    dec = decore_generate(model, model.tokenizer, PROMPTS, [], max_new_tokens=6)
    gre = greedy_generate(model, PROMPTS, max_new_tokens=6)
    for prompt, d, g in zip(PROMPTS, dec, gre, strict=True):
        seq = list(prompt)
        hand = []
        for _ in range(len(g.tokens)):
            with torch.no_grad():
                t = int(plain(torch.tensor([seq])).logits[0, -1].argmax())
            hand.append(t)
            seq.append(t)
        assert g.tokens == hand
        assert d.tokens == g.tokens
        # With nothing masked the combination is (1 + a) lp - a lp = lp.
        assert d.scores == pytest.approx(d.base_logprobs, abs=1e-4)
        assert d.scores == pytest.approx(g.scores, abs=1e-4)


@pytest.mark.parametrize("method", ["uniform", "zero"])
def test_left_padding_changes_nothing(pair, method) -> None:
    model, _ = pair
    batch = decore_generate(model, model.tokenizer, PROMPTS, HEADS, max_new_tokens=6, method=method)
    for prompt, b in zip(PROMPTS, batch, strict=True):
        alone = decore_generate(model, model.tokenizer, [prompt], HEADS, max_new_tokens=6, method=method)[0]
        assert b.tokens == alone.tokens
        assert b.scores == pytest.approx(alone.scores, abs=1e-4)
        assert b.alphas == pytest.approx(alone.alphas, abs=1e-4)
    gb = greedy_generate(model, PROMPTS, max_new_tokens=6)
    for prompt, b in zip(PROMPTS, gb, strict=True):
        assert b.tokens == greedy_generate(model, [prompt], max_new_tokens=6)[0].tokens


def test_score_equals_hand_sum(pair) -> None:
    model, plain = pair
    prompts = ["w5 w9 w17 w33", "w70 w71"]
    answers = [["w40 w41 w42", "w50"], ["w90 w91", "w100 w101 w102 w103"]]
    got = decore_score(model, prompts, answers, HEADS)
    for pi, (p, cands) in enumerate(zip(prompts, answers, strict=True)):
        pids = [0] + [int(w[1:]) for w in p.split()]
        for ai, a in enumerate(cands):
            aids = [int(w[1:]) for w in a.split()]
            ids = torch.tensor([pids + aids])
            with torch.no_grad():
                base = plain(ids).logits[0].double()
                with raw_mask(plain, HEADS, "uniform"):
                    masked = plain(ids).logits[0].double()
            total, base_total = 0.0, 0.0
            for j, t in enumerate(aids):
                pos = len(pids) - 1 + j
                alpha = hand_entropy(base[pos])
                s = (1 + alpha) * torch.log_softmax(base[pos], -1) - alpha * torch.log_softmax(masked[pos], -1)
                total += float(s[t])
                base_total += float(torch.log_softmax(base[pos], -1)[t])
            row = got[(got.prompt_index == pi) & (got.answer_index == ai)].iloc[0]
            assert row["decore"] == pytest.approx(total, abs=1e-3)
            assert row["base"] == pytest.approx(base_total, abs=1e-3)
    # Left padding in a batch of one vs several: the same scores.
    alone = decore_score(model, prompts[1:], answers[1:], HEADS)
    both = got[got.prompt_index == 1].reset_index(drop=True)
    assert alone["decore"].tolist() == pytest.approx(both["decore"].tolist(), abs=1e-4)


def test_entropy_and_combination_by_hand() -> None:
    two = torch.tensor([[0.0, 0.0]])
    assert float(base_entropy(two)[0]) == pytest.approx(math.log(2))
    assert float(base_entropy(torch.tensor([[0.0, -float("inf")]]))[0]) == pytest.approx(0.0)
    base = torch.tensor([[math.log(0.5), math.log(0.25), math.log(0.25)]])
    masked = torch.tensor([[math.log(0.25), math.log(0.5), math.log(0.25)]])
    out = combine(base, masked, torch.tensor([1.0]))[0]
    # 2 * log(0.5) - log(0.25) = 0; 2 * log(0.25) - log(0.5) = log(1/8); 2 log .25 - log .25 = log .25
    assert out.tolist() == pytest.approx([0.0, math.log(1 / 8), math.log(0.25)], abs=1e-6)


def test_settings_and_bad_input(tiny_llama_hf) -> None:
    model = loaded(copy.deepcopy(tiny_llama_hf), "bridge")
    assert parse_alpha("entropy") == "entropy"
    assert parse_alpha("0.5") == 0.5
    for bad in ("x", "-1", "nan"):
        with pytest.raises(UserError):
            parse_alpha(bad)
    with pytest.raises(UserError):
        DecoreSettings(method="mean")  # type: ignore[arg-type]
    with pytest.raises(UserError):
        decore_generate(model, model.tokenizer, [PROMPTS[0]], [(7, 0)], max_new_tokens=1)
    with pytest.raises(UserError):
        decore_generate(model, model.tokenizer, [PROMPTS[0]], [(0, 0), (0, 0)], max_new_tokens=1)
    with pytest.raises(UserError):
        decore_generate(model, model.tokenizer, [], HEADS)
    assert DecoreSettings(alpha=0.5).variant.startswith("vanilla")


# ---------------------------------------------------------------- the default k and the stored ranking


def test_default_k_is_the_decore_papers_share_of_heads() -> None:
    assert default_k(1024) == 50  # Llama-3-8B, the paper's own setting
    assert default_k(270) == 13  # smollm2-135m: 13.18
    assert default_k(336) == 16  # qwen2.5-0.5b and -1.5b
    assert default_k(72) == 4  # gemma3-270m: 3.52
    assert default_k(2048) == 100
    for small in (1, 4, 12, 30):  # a share below one head is still one head
        assert default_k(small) == 1
    with pytest.raises(UserError):
        default_k(0)


def test_workspace_ranking_finds_or_runs_the_retrieval_run(tiny_llama_hf, tmp_path: Path) -> None:
    """The ranking is a real retrieval run of the workspace: computed and stored on the first
    call, reused (no new run) on the next, the other mode's run taken with a note when none of the
    asked mode exists, and never a run of other parameters, another model or another prefix."""
    from tests.unit.test_retrieval import GRID, force_output, wrap
    from tests.unit.test_retrieval import files as files_fixture

    files = files_fixture.__wrapped__(tmp_path)  # type: ignore[attr-defined]
    model = wrap(force_output(copy.deepcopy(tiny_llama_hf)))
    params = {**files, **GRID}
    ws = tmp_path / "ws"
    lines: list[str] = []
    ranking, record = workspace_ranking(model, "fast", ws, params, log=lines.append)
    assert record["source"] == "computed now"
    assert lines[-1] == f"stored as retrieval run {record['run_id']} in {ws.resolve()}"
    # The ranking is the stored run's heads best first (ties by layer, head), as an in-memory run gives.
    want, _ = retrieval_ranking(model, "fast", params)
    assert ranking == want
    with Store(ws) as store:
        fast_id = record["run_id"]
        assert store.run(fast_id).info()["variant"] == "fast-teacher-forced"
        n_runs = len(store.runs())
    lines.clear()
    again, rec2 = workspace_ranking(model, "fast", ws, params, log=lines.append)
    assert (again, rec2["run_id"], rec2["source"]) == (ranking, fast_id, "stored run")
    assert lines == [f"using retrieval run {fast_id} (fast-teacher-forced) from {ws.resolve()}"]
    # The faithful mode takes the fast run when no faithful run exists, and says so.
    lines.clear()
    _, rec3 = workspace_ranking(model, "faithful", ws, params, log=lines.append)
    assert rec3["run_id"] == fast_id
    assert "none is faithful" in lines[0]
    with Store(ws) as store:
        assert len(store.runs()) == n_runs  # nothing was computed
    # Other parameters, another model (other weights) or another prompt prefix: a new run.
    _, rec4 = workspace_ranking(model, "fast", ws, {**params, "n_depths": 1}, log=lines.append)
    assert rec4["source"] == "computed now"
    other = copy.copy(model)
    other.provenance = dataclasses.replace(model.provenance, file_sha256="0" * 64)
    assert workspace_ranking(other, "fast", ws, params, log=lines.append)[1]["source"] == "computed now"
    no_prefix = LoadedModel(model.hf, model.tokenizer, dataclasses.replace(model.provenance),
                            prefix=choose_prefix(model.tokenizer, model.hf.config, "none"))
    assert no_prefix.prefix.to_dict() != model.prefix.to_dict()
    assert workspace_ranking(no_prefix, "fast", ws, params, log=lines.append)[1]["source"] == "computed now"
    # Parameters not given are free: the newest finished run of this model and prefix (rec4's,
    # n_depths=1) is taken, not a new run with the detector's defaults; one given must agree.
    with Store(ws) as store:
        n_runs = len(store.runs())
    assert workspace_ranking(model, "fast", ws, None, log=lines.append)[1]["run_id"] == rec4["run_id"]
    assert workspace_ranking(model, "fast", ws, {"n_depths": GRID["n_depths"]},
                             log=lines.append)[1]["run_id"] == fast_id
    with Store(ws) as store:
        assert len(store.runs()) == n_runs


def test_ranking_params_are_checked() -> None:
    assert parse_ranking_params(["n_needles=1", "--max-length=300"]) == {"n_needles": 1, "max_length": 300}
    for bad in (["n_needles"], ["mode=fast"], ["bogus=1"], ["n_needles=x"]):
        with pytest.raises(UserError):
            parse_ranking_params(bad)


# ---------------------------------------------------------------- the decore-eval detector


def test_decore_eval_config_checks_and_unit_plan(tiny_llama_hf) -> None:
    det = ev.DecoreEvalDetector()
    cfg = det.parse_params({"heads": "0.1,1.2,2.3", "ks": "3,1", "tasks": "memotrap,closedbook", "method": "zero"})
    assert cfg.ks == (3, 1)
    assert cfg.tasks == ("memotrap", "closedbook")
    assert cfg.to_dict()["heads"] == ["0.1", "1.2", "2.3"]
    assert det.variant(cfg) == "zero-mask.masked-prefill"
    assert det.variant(det.parse_params({})) == "uniform-mask.masked-prefill"
    assert re.fullmatch(r"[a-z0-9]+([-./+=][a-z0-9]+)*", det.variant(cfg))
    model = loaded(copy.deepcopy(tiny_llama_hf), "bridge")
    # Given heads: no ranking unit; the ks run in increasing order whatever order they are listed in.
    assert [u.key for u in det.units(model, cfg)] == [
        f"{task}/{m}/k{k}" for task in ("memotrap", "closedbook")
        for m, k in [("greedy", 0)] + [(m, k) for m in ev.METHODS[1:] for k in (1, 3)]
    ]
    assert det.units(model, det.parse_params({"ks": "1", "tasks": "memotrap"}))[0].key == "ranking"
    for raw, match in [
        ({"ks": ""}, "ks"),
        ({"ks": "0,1"}, "ks"),
        ({"tasks": ","}, "task"),
        ({"tasks": "nqswap,trivia"}, "task"),
        ({"heads": "0.1", "ks": "2"}, "heads"),
        ({"heads": "0.1,0.1", "ks": "1"}, "listed twice"),
    ]:
        with pytest.raises(UserError, match=match):
            det.parse_params(raw)
    with pytest.raises(UserError, match="not below"):
        det.units(model, det.parse_params({"ks": "12"}))
    with pytest.raises(UserError, match="control heads"):
        det.units(model, det.parse_params({"ks": "2", "exclude_top": "11"}))


def test_decore_eval_detector_tables_agree_with_its_items(tiny_llama_hf) -> None:
    model = loaded(copy.deepcopy(tiny_llama_hf), "bridge")
    det = ev.DecoreEvalDetector()
    raw = {"heads": "1.0,2.3", "ks": "2,1", "tasks": "memotrap", "max_items": 2}
    cfg = det.parse_params(raw)
    assert det.dataset_hash(model, cfg) == ev.data_hash(ev.build_tasks(model, 0, 2, ["memotrap"]))
    summary, units = run_in_memory(model, det, raw)
    assert summary.variant == "uniform-mask.masked-prefill"
    per_item = [json.loads(js) for name, js in zip(units["artifacts"]["name"], units["artifacts"]["json"], strict=True)
                if name == "per_item"]
    assert sorted((a["method"], a["k"]) for a in per_item) == sorted(
        [("greedy", 0)] + [(m, k) for m in ev.METHODS[1:] for k in (1, 2)]
    )
    # Each unit's accuracy is the mean correctness of its items, per split.
    um = units["metrics"]
    for a in per_item:
        unit = f"memotrap/{a['method']}/k{a['k']}"
        if a["method"] in ("decore-vanilla", "decore-entropy"):
            assert [tuple(h) for h in a["heads"]] == [(1, 0), (2, 3)][: a["k"]]
        for split in ("validation", "test"):
            ok = [r["correct"] for r in a["items"] if r["split"] == split]
            row = um[(um["unit"] == unit) & (um["name"] == f"accuracy:{split}")].iloc[0]
            assert row["value"] == pytest.approx(sum(ok) / len(ok))
            assert row["n"] == len(ok) == 2
    # The control never draws a masked retrieval head (it avoids the top max(k, exclude_top)).
    for a in per_item:
        if a["method"] == "control-entropy":
            assert len(a["draw_heads"]) == cfg.n_random == 20
            for heads in a["draw_heads"]:
                assert not {tuple(h) for h in heads} & {(1, 0), (2, 3)}
    final = summary.tables
    assert set(final["curves"]["curve"]) == {f"memotrap:{s}:{m}" for s in ("validation", "test") for m in ev.METHODS}
    results = tables.read_artifact(final["artifacts"], "results_table")
    assert {r["method"] for r in results} == set(ev.METHODS)
    for r in results:
        assert summary.metrics[f"memotrap:{r['method']}:k"] == r["k"]
        name = f"memotrap:test:{r['method']}:k{r['k']}"
        fm = final["metrics"]
        assert fm[fm["name"] == name]["value"].iloc[0] == pytest.approx(r["test_accuracy"])
        # The test accuracy with its interval: in the summary, its JSON and the stored metrics.
        iv = summary.intervals[f"memotrap:{r['method']}:test_accuracy"]
        assert (iv.value, iv.n) == (pytest.approx(r["test_accuracy"]), r["n_test"])
        row = fm[fm["name"] == f"memotrap:{r['method']}:test_accuracy"].iloc[0]
        assert (row["ci_low"], row["ci_high"], row["n"]) == (iv.lo, iv.hi, iv.n)
        assert summary.to_json()["intervals"][f"memotrap:{r['method']}:test_accuracy"]["method"] == "wilson"
        if r["method"] != "greedy":
            assert summary.intervals[f"memotrap:{r['method']}:minus_greedy"].n == r["n_test"]
