"""DeCoRe's random-head control as a distribution (issue 26): every draw's outputs, correctness and
accuracy against DeCoRe computed by hand on a plain HF copy (raw hooks, no cache, one prompt at a
time, tests/decore_reference.py) for the same seeded head sets; the control's accuracy as their
mean; DeCoRe-entropy's percentile and empirical p among them by hand; the batched head sets
against one set at a time; the n_random checks."""

from __future__ import annotations

import copy
import json
import random
from typing import Any

import pytest
import torch
from scipy import stats

from circuits.detectors import decore_eval as ev
from circuits.detectors.decore_draws import control_draws, versus_random
from circuits.detectors.decore_results import test_intervals as decore_test_intervals
from circuits.methods.decore import DecoreSettings, decore_generate, decore_generate_sets
from circuits.methods.decore_scoring import decore_score, decore_score_sets
from circuits.methods.heads import all_heads, random_heads
from interp.errors import UserError
from interp.model.loaded import LoadedModel
from interp.runs.runner import run_in_memory
from tests.decore_reference import hand_decode, hand_entropy, raw_mask
from tests.known_facts import use_known_facts
from tests.tiny import loaded

N_DRAWS = 6
RANKING = [(1, 0), (2, 3), (0, 2)]
RAW = {"heads": "1.0,2.3,0.2", "ks": "2,1", "tasks": "nqswap,memotrap", "max_items": 4, "n_random": N_DRAWS,
       "seed": 3, "batch_size": 5}
# A word the tiny model starts some continuations with under some random heads and not under
# others, so the draws' accuracies differ (checked below: else the test could not fail).
TARGET, OTHER = "w103", "w31"


@pytest.fixture
def knowing(tiny_llama_hf: Any, monkeypatch: pytest.MonkeyPatch) -> LoadedModel:
    """The tiny Llama with conflict facts it knows, the nqswap targets set to ``TARGET`` and the
    MemoTrap endings to words of its vocabulary (the shipped ones are all one unknown token)."""
    model = use_known_facts(loaded(copy.deepcopy(tiny_llama_hf), "bridge"), monkeypatch)
    build = ev.build_tasks

    def retargeted(*args: Any, **kwargs: Any) -> dict[str, list[ev.EvalItem]]:
        tasks = build(*args, **kwargs)
        if "nqswap" in tasks:
            tasks["nqswap"] = [ev.EvalItem(i.id, i.task, i.split, i.prompt, TARGET, OTHER) for i in tasks["nqswap"]]
        if "memotrap" in tasks:
            tasks["memotrap"] = [ev.EvalItem(i.id, i.task, i.split, i.prompt, f" w{40 + j} w{41 + j}", f" w{70 + j}")
                                 for j, i in enumerate(tasks["memotrap"])]
        return tasks

    monkeypatch.setattr(ev, "build_tasks", retargeted)
    return model


def _naive_draws(pool_of: list[tuple[int, int]], top: list[tuple[int, int]], k: int, n: int, seed: int) -> list[list[tuple[int, int]]]:
    """The control's contract written out: one generator seeded with seed * 1000 + k * 10, each
    draw ``random.sample`` of k heads from every head outside ``top``, layer by layer."""
    rng = random.Random(seed * 1000 + k * 10)
    pool = [h for h in pool_of if h not in set(top)]
    return [sorted(rng.sample(pool, k)) for _ in range(n)]


def _hand_generation(hf: Any, model: LoadedModel, prompt: str, heads: list[tuple[int, int]], steps: int,
                     seen: dict[Any, str]) -> str:
    """DeCoRe-entropy's text by hand (``seen``: by heads and prompt, as a draw may repeat another)."""
    key = (tuple(heads), prompt, steps)
    if key not in seen:
        seen[key] = _decode_text(model, hand_decode(hf, model.encode(prompt), heads, "uniform", "entropy", steps)[0])
    return seen[key]


def _decode_text(model: LoadedModel, toks: list[int]) -> str:
    eos = model.tokenizer.eos_token_id
    if eos in toks:
        toks = toks[: toks.index(eos) + 1]
    return str(model.tokenizer.decode(toks, skip_special_tokens=True))


def _hand_choice(hf: Any, model: LoadedModel, item: ev.EvalItem, heads: list[tuple[int, int]]) -> int:
    """MemoTrap by hand: the summed DeCoRe-entropy score of each ending, the higher one's index."""
    prompt = model.encode(item.prompt)
    totals = []
    for ending in (item.target, item.other):
        ans = [int(t) for t in model.tokenizer(ending, add_special_tokens=False)["input_ids"]]
        ids = torch.tensor([prompt + ans])
        with torch.no_grad():
            base = hf(ids).logits[0].double()
            with raw_mask(hf, heads, "uniform"):
                masked = hf(ids).logits[0].double()
        total = 0.0
        for j, t in enumerate(ans):
            pos = len(prompt) - 1 + j
            a = hand_entropy(base[pos])
            total += float((1 + a) * torch.log_softmax(base[pos], -1)[t] - a * torch.log_softmax(masked[pos], -1)[t])
        totals.append(total)
    return 0 if totals[0] >= totals[1] else 1  # a tie: the first, as the detector's idxmax


def _artifacts(results: dict[str, Any], name: str) -> list[Any]:
    art = results["artifacts"]
    return [json.loads(js) for n, js in zip(art["name"], art["json"], strict=True) if n == name]


def test_each_draw_equals_decore_by_hand_and_decore_is_placed_among_them(knowing: LoadedModel, tiny_llama_hf: Any) -> None:
    det = ev.DecoreEvalDetector()
    cfg = det.parse_params(RAW)
    summary, results = run_in_memory(knowing, det, cfg)
    m, final = summary.metrics, summary.tables["metrics"]
    final_value = dict(zip(final["name"], final["value"], strict=True))
    records = [r for recs in _artifacts(results, "random_draws") for r in recs]
    control_items = {(a["task"], a["k"]): a for a in _artifacts(results, "per_item") if a["method"] == "control-entropy"}
    data = ev.build_tasks(knowing, cfg.seed, cfg.max_items, cfg.tasks)
    hf = copy.deepcopy(tiny_llama_hf)
    varied: set[str] = set()
    seen: dict[Any, str] = {}
    for task in cfg.tasks:
        items = data[task]
        n_new = ev.max_answer_tokens(knowing, items) + 2
        for k in (1, 2):
            draws = _naive_draws(all_heads(knowing), RANKING[:2], k, N_DRAWS, cfg.seed)
            got = {(r["draw"], r["split"]): r for r in records if (r["task"], r["k"]) == (task, k)}
            assert set(got) == {(i, s) for i in range(N_DRAWS) for s in ("validation", "test")}
            correct: dict[tuple[int, str], list[bool]] = {}
            for i, heads in enumerate(draws):
                for split in ("validation", "test"):
                    rec, want = got[(i, split)], [it for it in items if it.split == split]
                    assert [tuple(h) for h in rec["heads"]] == heads
                    assert [r["item"] for r in rec["items"]] == [it.id for it in want]
                    if task == "memotrap":
                        outputs = [(it.target, it.other)[_hand_choice(hf, knowing, it, heads)] for it in want]
                    else:
                        outputs = [_hand_generation(hf, knowing, it.prompt, heads, n_new, seen) for it in want]
                    assert [r["output"] for r in rec["items"]] == outputs, (task, k, i, split)
                    ok = [ev.prefix_em(o, it.target) if task == "nqswap" else o == it.target
                          for o, it in zip(outputs, want, strict=True)]
                    correct[(i, split)] = ok
                    assert [r["correct"] for r in rec["items"]] == ok
                    assert (rec["n"], rec["accuracy"]) == (len(want), pytest.approx(sum(ok) / len(ok)))
                    if task == "nqswap":
                        mem = [ev.prefix_em(o, OTHER) for o in outputs]
                        assert rec["memory_rate"] == pytest.approx(sum(mem) / len(mem))
            # The control's rows: the mean over the draws, per split and per item.
            for split in ("validation", "test"):
                accs = [sum(correct[(i, split)]) / len(correct[(i, split)]) for i in range(N_DRAWS)]
                assert final_value[f"{task}:{split}:control-entropy:k{k}"] == pytest.approx(sum(accs) / N_DRAWS)
            per_item = [r["correct"] for r in control_items[(task, k)]["items"] if r["split"] == "test"]
            per_draw = [correct[(i, "test")] for i in range(N_DRAWS)]
            assert per_item == pytest.approx([sum(c) / N_DRAWS for c in zip(*per_draw, strict=True)])
            # DeCoRe-entropy's test accuracy among the draws', by hand.
            rand = [sum(c) / len(c) for c in per_draw]
            if len(set(rand)) > 1:
                varied.add(task)
            value = final_value[f"{task}:test:decore-entropy:k{k}"]
            below = sum(r < value - 1e-12 for r in rand)
            ties = sum(abs(r - value) <= 1e-12 for r in rand)
            assert m[f"{task}:decore-entropy:k{k}:vs_random_percentile"] == pytest.approx(100 * (below + ties / 2) / N_DRAWS)
            assert m[f"{task}:decore-entropy:k{k}:vs_random_p"] == pytest.approx((1 + N_DRAWS - below) / (1 + N_DRAWS))
            assert final_value[f"{task}:decore-entropy:k{k}:vs_random_p"] == m[f"{task}:decore-entropy:k{k}:vs_random_p"]
            if m[f"{task}:decore-entropy:k"] == k:
                assert m[f"{task}:control-entropy:random_test_accuracies"] == pytest.approx(rand)
                for what in ("percentile", "p"):
                    assert m[f"{task}:decore-entropy:vs_random_{what}"] == m[f"{task}:decore-entropy:k{k}:vs_random_{what}"]
    # The draws' nqswap accuracies differ, so a wrong draw could show (MemoTrap's endings are
    # chosen alike by every draw of this tiny model; its batched scores are checked below).
    assert "nqswap" in varied
    assert m["n_random"] == N_DRAWS
    assert not [w for w in summary.warnings if "stored draws" in w]
    # Units stored before the control had draws (no random_draws): said, and no place among draws.
    art = results["artifacts"]
    stale = det.finalize(knowing, cfg, {**results, "artifacts": art[art["name"] != "random_draws"]})
    assert len([w for w in stale.warnings if "0 stored draws" in w]) == len(cfg.tasks) * 2
    assert not [name for name in stale.metrics if "vs_random" in name]


def test_batched_head_sets_equal_one_set_at_a_time(tiny_llama_hf: Any) -> None:
    """Rows of several head sets in one batch, each set's masking on its own rows only, decode and
    score as each set does alone (decore_generate, decore_score: checked by hand in test_decore.py)."""
    model = loaded(copy.deepcopy(tiny_llama_hf), "bridge")
    sets = [[], [(0, 1)], [(1, 0), (2, 3)], [(0, 1)], [(2, 0), (2, 1), (2, 2)]]
    prompts = [[0, 5, 9, 17, 33, 40, 41], [0, 77, 12], [0, 64, 65, 66, 70]]
    settings = DecoreSettings()
    batched = decore_generate_sets(model, prompts, sets, settings, max_new_tokens=5, batch_size=4)
    for heads, gens in zip(sets, batched, strict=True):
        alone = decore_generate(model, None, prompts, heads, max_new_tokens=5, batch_size=1)
        assert [g.tokens for g in gens] == [g.tokens for g in alone]
        for g, a in zip(gens, alone, strict=True):
            assert g.scores == pytest.approx(a.scores, abs=1e-4)
            assert g.alphas == pytest.approx(a.alphas, abs=1e-4)
    # The sets differ, so a batch that leaked one set's masking onto other rows would show.
    assert len({tuple(round(s, 3) for g in gens for s in g.scores) for gens in batched}) == 4
    texts = ["w5 w9 w17 w33", "w70 w71"]
    answers = [["w40 w41 w42", "w50"], ["w90 w91", "w100 w101 w102 w103"]]
    scored = decore_score_sets(model, texts, answers, sets, settings, batch_size=1)
    for heads, frame in zip(sets, scored, strict=True):
        alone = decore_score(model, texts, answers, heads, batch_size=1)
        assert frame["decore"].tolist() == pytest.approx(alone["decore"].tolist(), abs=1e-4)
        assert frame["base"].tolist() == pytest.approx(alone["base"].tolist(), abs=1e-4)
    assert len({tuple(f["decore"].round(3)) for f in scored}) == 4


def test_draw_zero_is_the_former_single_control(tiny_llama_hf: Any) -> None:
    model = loaded(copy.deepcopy(tiny_llama_hf), "bridge")
    for k, excl, seed in ((1, 2, 0), (2, 3, 7), (3, 0, 4)):
        draws = control_draws(model, RANKING, k, excl, seed, 6)
        assert draws == _naive_draws(all_heads(model), RANKING[: max(k, excl)], k, 6, seed)
        # Before several draws, the control drew once from random.Random(seed * 1000 + k * 10 + 0).
        assert draws[0] == random_heads(all_heads(model), RANKING[: max(k, excl)], k, random.Random(seed * 1000 + k * 10))
        assert [ev.method_heads("control-entropy", k, RANKING, excl, model, seed, i) for i in range(6)] == draws


@pytest.mark.parametrize("bad", ["0", "1001", "-2", "many", "2.5"])
def test_bad_n_random_is_a_one_line_error_before_any_model(bad: str) -> None:
    with pytest.raises(UserError, match="n_random") as err:
        ev.DecoreEvalDetector().parse_params({"n_random": bad})
    assert "\n" not in str(err.value)
    assert ev.DecoreEvalDetector().parse_params({"n_random": "1000"}).n_random == 1000
    assert ev.DecoreEvalDetector().parse_params({}).n_random == 20


def test_versus_random_by_hand() -> None:
    accs = {1: [0.2, 0.5, 0.2, 0.6], 3: [0.4, 0.4, 0.1, 0.0]}
    recs = [{"task": "nqswap", "k": k, "draw": i, "split": "test", "accuracy": a}
            for k, v in accs.items() for i, a in enumerate(v)]
    recs.append({"task": "nqswap", "k": 1, "draw": 0, "split": "validation", "accuracy": 9.0})  # not test
    out = versus_random(recs, {("nqswap", 1): 0.5, ("nqswap", 3): 0.4, ("memotrap", 1): 0.5}, {"nqswap": 3})
    # k=1: draws 0.2, 0.5, 0.2, 0.6 around 0.5: 2 below, 1 tie, 1 above; p = (1 + 2) / 5.
    assert out["nqswap:decore-entropy:k1:vs_random_percentile"] == pytest.approx(62.5)
    assert out["nqswap:decore-entropy:k1:vs_random_p"] == pytest.approx(3 / 5)
    # k=3 (the chosen k): 0.4 among 0.4, 0.4, 0.1, 0.0: 2 below, 2 ties.
    assert out["nqswap:decore-entropy:k3:vs_random_percentile"] == pytest.approx(75.0)
    assert out["nqswap:decore-entropy:k3:vs_random_p"] == pytest.approx(3 / 5)
    assert out["nqswap:decore-entropy:vs_random_p"] == pytest.approx(3 / 5)
    assert out["nqswap:control-entropy:random_test_accuracies"] == accs[3]
    assert not [key for key in out if key.startswith("memotrap")]  # no draws stored for it


def test_a_control_over_several_draws_gets_t_intervals_and_the_paired_t_test() -> None:
    greedy = [1, 0, 1, 1, 0, 0]
    control = [0.75, 0.25, 1.0, 0.5, 0.0, 0.25]  # fractions of four draws
    rows = [{"task": "nqswap", "method": m, "k": k, "split": "test", "item": f"i{j}", "correct": c}
            for m, k, v in (("greedy", 0, greedy), ("control-entropy", 2, control)) for j, c in enumerate(v)]
    import pandas as pd

    table = pd.DataFrame([{"task": "nqswap", "method": "greedy", "k": 0},
                          {"task": "nqswap", "method": "control-entropy", "k": 2}])
    intervals, p = decore_test_intervals(pd.DataFrame(rows), table)
    acc = intervals["nqswap:control-entropy:test_accuracy"]
    t = stats.t.ppf(0.975, 5)
    sd = float(torch.tensor(control, dtype=torch.float64).std())
    assert (acc.method, acc.value) == ("t", pytest.approx(sum(control) / 6))
    assert (acc.lo, acc.hi) == (pytest.approx(sum(control) / 6 - t * sd / 6**0.5), pytest.approx(sum(control) / 6 + t * sd / 6**0.5))
    assert intervals["nqswap:control-entropy:minus_greedy"].method == "paired-t"
    assert p["nqswap:control-entropy:paired_t_p"] == pytest.approx(float(stats.ttest_rel(control, greedy).pvalue))
    assert "nqswap:control-entropy:mcnemar_p" not in p
    assert intervals["nqswap:greedy:test_accuracy"].method == "wilson"
