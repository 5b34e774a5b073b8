"""PH3's random-head control as a distribution (issue 26): every draw's test rates, their mean and
the pruned set's percentile and empirical p, against plain Hugging Face forward passes with the
heads' z zeroed by raw hooks, one prompt at a time, for the same seeded random head sets."""

from __future__ import annotations

import copy
import random
from typing import Any

import pytest
import torch

from circuits.data import conflicts
from circuits.data.conflicts import ConflictItem, score_items
from circuits.detectors import ph3
from circuits.detectors.ph3_draws import control_draws, score_head_sets, versus_random
from circuits.methods.heads import all_heads, random_heads
from interp.model.interventions import ablate_heads
from interp.model.loaded import LoadedModel
from interp.runs import tables
from interp.runs.runner import run_in_memory
from interp.stats import Interval, mean_interval, newcombe_paired, wilson
from tests.known_facts import own_answer_facts, use_known_facts
from tests.tiny import loaded

N_DRAWS = 10
FORMATS = ("restated", "qa")


@pytest.fixture
def knowing(tiny_llama_hf: Any, monkeypatch: pytest.MonkeyPatch) -> LoadedModel:
    """The tiny Llama, with the conflict detectors' facts replaced by facts it knows."""
    return use_known_facts(loaded(copy.deepcopy(tiny_llama_hf), "bridge"), monkeypatch)


def _naive_draws(n_layers: int, n_heads: int, pruned: list[tuple[int, int]], n: int, seed: int) -> list[list[tuple[int, int]]]:
    """The control's contract written out: one generator seeded with the run's seed, each draw
    ``random.sample`` of as many heads as pruned from every other head, layer by layer."""
    rng = random.Random(seed)
    pool = [(la, h) for la in range(n_layers) for h in range(n_heads) if (la, h) not in set(pruned)]
    return [sorted(rng.sample(pool, min(len(pruned), len(pool)))) for _ in range(n)]


def _plain_rates(hf: Any, model: LoadedModel, items: list[ConflictItem], fmt: str, conflict: bool,
                 heads: list[tuple[int, int]]) -> dict[str, float]:
    """Rates of one head set from plain HF forwards (:func:`_plain_outcomes`)."""
    out = _plain_outcomes(hf, model, items, fmt, conflict, heads)
    n = len(items)
    return {"memory_rate": sum(out["memory"]) / n, "context_rate": sum(out["context"]) / n,
            "other_rate": (n - sum(out["memory"]) - sum(out["context"])) / n,
            "memory_preferred_rate": sum(d > 0 for d in out["diff"]) / n, "mean_logit_diff": sum(out["diff"]) / n}


def _plain_outcomes(hf: Any, model: LoadedModel, items: list[ConflictItem], fmt: str, conflict: bool,
                    heads: list[tuple[int, int]]) -> dict[str, list[float]]:
    """Per item, in ``items``' order, from plain HF forwards with the heads' columns of o_proj's
    input (z) zeroed by a raw pre-hook: top-1 is the memory answer, the context answer (0/1),
    and logit(memory) - logit(context)."""
    d = int(hf.config.head_dim)
    by_layer: dict[int, list[int]] = {}
    for la, h in heads:
        by_layer.setdefault(la, []).append(h)

    def zero(hs: list[int]) -> Any:
        def hook(_m: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
            z = args[0].clone()
            for h in hs:
                z[..., h * d:(h + 1) * d] = 0.0
            return (z, *args[1:])
        return hook

    handles = [hf.model.layers[la].self_attn.o_proj.register_forward_pre_hook(zero(hs)) for la, hs in by_layer.items()]
    # One plain forward per prompt length (no padding), the prompts of that length stacked.
    by_len: dict[int, list[tuple[ConflictItem, torch.Tensor]]] = {}
    for it in items:
        ids = model.to_tokens(it.conflict_prompt(fmt) if conflict else it.plain_prompt(fmt))[0]
        by_len.setdefault(len(ids), []).append((it, ids))
    per: dict[int, tuple[float, float, float]] = {}
    try:
        for group in by_len.values():
            with torch.no_grad():
                last = hf(torch.stack([ids for _, ids in group])).logits[:, -1]
            for (it, _), logits in zip(group, last, strict=True):
                top = int(logits.argmax())
                per[id(it)] = (float(top == it.memory_token), float(top == it.context_token),
                               float(logits[it.memory_token] - logits[it.context_token]))
    finally:
        for hd in handles:
            hd.remove()
    rows = [per[id(it)] for it in items]
    return {"memory": [r[0] for r in rows], "context": [r[1] for r in rows], "diff": [r[2] for r in rows]}


def test_each_draw_equals_plain_hooks_and_the_pruned_set_is_placed_among_them(
    knowing: LoadedModel, tiny_llama_hf: Any
) -> None:
    det: Any = ph3.PH3Detector()
    cfg = det.parse_params({"max_items": 24, "formats": ",".join(FORMATS), "ks": "3", "scale_heads": 0,
                            "n_random": N_DRAWS, "seed": 5, "batch_size": 7})
    summary, results = run_in_memory(knowing, det, cfg)
    m = summary.metrics
    test = det.dataset(knowing, cfg).split("test")
    hf = copy.deepcopy(tiny_llama_hf)
    records = tables.read_artifact(results["artifacts"], "random_draws")
    assert len(records) == 2 * N_DRAWS * 2 * len(FORMATS)  # directions x draws x settings x formats
    pruned_labels = tables.read_artifact(results["artifacts"], "pruned_heads")
    n_layers, n_heads = knowing.info.n_layers, knowing.info.n_heads
    for d, (_kind, target, _sign) in ph3.DIRECTIONS.items():
        pruned = [(int(x[1:].split("H")[0]), int(x.split("H")[1])) for x in pruned_labels[d]]
        assert len(pruned) == 3
        draws = _naive_draws(n_layers, n_heads, pruned, N_DRAWS, cfg.seed)
        assert len({tuple(x) for x in draws}) > 1  # the draws differ from each other
        want: dict[tuple[int, str, str], dict[str, float]] = {}
        for i, heads in enumerate(draws):
            for setting in ("conflict", "no-conflict"):
                for f in FORMATS:
                    want[(i, setting, f)] = _plain_rates(hf, knowing, test, f, setting == "conflict", heads)
        got = {(r["draw"], r["setting"], r["format"]): r for r in records if r["direction"] == d}
        assert set(got) == set(want)
        for key, r in want.items():
            assert [tuple(h) for h in got[key]["heads"]] == draws[key[0]], key
            assert got[key]["n"] == len(test)
            for name, v in r.items():
                assert got[key][name] == pytest.approx(v, abs=1e-4), (d, key, name)
        # The stored random-control rate is the mean over the draws.
        for setting in ("conflict", "no-conflict"):
            for f in FORMATS:
                for name in want[(0, setting, f)]:
                    mean = sum(want[(i, setting, f)][name] for i in range(N_DRAWS)) / N_DRAWS
                    assert m[f"test.{d}.random-control.{setting}.{f}.{name}"] == pytest.approx(mean, abs=1e-4)
        # The pruned set among the draws: target rate on conflict prompts, mean over formats.
        top = {f: _plain_rates(hf, knowing, test, f, True, pruned)[target] for f in FORMATS}
        scopes = {"": (sum(top.values()) / len(FORMATS),
                       [sum(want[(i, "conflict", f)][target] for f in FORMATS) / len(FORMATS) for i in range(N_DRAWS)])}
        scopes.update({f"_{f}": (top[f], [want[(i, "conflict", f)][target] for i in range(N_DRAWS)]) for f in FORMATS})
        stem = d.replace("-", "_")
        for scope, (value, rand) in scopes.items():
            below = sum(r < value - 1e-12 for r in rand)
            ties = sum(abs(r - value) <= 1e-12 for r in rand)
            above = N_DRAWS - below - ties
            assert m[f"{stem}{scope}_vs_random_percentile"] == pytest.approx(100 * (below + ties / 2) / N_DRAWS)
            assert m[f"{stem}{scope}_vs_random_p"] == pytest.approx((1 + above + ties) / (1 + N_DRAWS))
        assert m[f"{stem}_random_{target}s"] == pytest.approx(scopes[""][1])
    assert m["n_random"] == N_DRAWS
    # The unpruned and pruned rates' intervals, and each target's change as the paired difference
    # on the same items, from the plain forwards' per-item outcomes.
    for d, (_kind, target, _sign) in ph3.DIRECTIONS.items():
        pruned = [(int(x[1:].split("H")[0]), int(x.split("H")[1])) for x in pruned_labels[d]]
        for f in FORMATS:
            before = _plain_outcomes(hf, knowing, test, f, True, [])
            after = _plain_outcomes(hf, knowing, test, f, True, pruned)
            key = target.removesuffix("_rate")
            assert summary.intervals[f"test.unpruned.conflict.{f}.{target}"] == _close(wilson(before[key]))
            assert summary.intervals[f"test.{d}.conflict.{f}.{target}"] == _close(wilson(after[key]))
            change = summary.intervals[f"test.{d}.{f}.{target}_change"]
            assert change == _close(newcombe_paired(after[key], before[key]))
            assert change.value == pytest.approx(m[f"test.{d}.{f}.{target}_change"])
            assert summary.intervals[f"test.unpruned.conflict.{f}.mean_logit_diff"] == _close(mean_interval(before["diff"]))
    # Not all ties: the percentiles above are not 50 by construction.
    assert any(m[f"{d.replace('-', '_')}{s}_vs_random_percentile"] != 50.0
               for d in ph3.DIRECTIONS for s in ("", "_restated", "_qa"))


def _close(iv: Interval) -> Any:
    """Matches an Interval with the same method and n and fields equal to 1e-4 (fp32 logits
    batched or not: a tie of two logits may not fall the same way)."""

    class Close:
        def __eq__(self, other: object) -> bool:
            return (isinstance(other, Interval) and other.method == iv.method and other.n == iv.n
                    and all(getattr(other, k) == pytest.approx(getattr(iv, k), abs=1e-4) for k in ("value", "lo", "hi")))

        def __repr__(self) -> str:
            return repr(iv)

    return Close()


def test_batched_head_sets_equal_one_set_at_a_time(knowing: LoadedModel) -> None:
    """Rows of several head sets in one batch, each ablation on its own rows only, score as each
    set does alone (score_items, checked against plain HF in test_conflicts.py)."""
    ds = conflicts.build_dataset(knowing, own_answer_facts(knowing, 24), seed=0)
    items = ds.validation + ds.test
    sets = [[], [(0, 1), (2, 3)], [(1, 0)], [(0, 1), (2, 3)], [(2, 0), (2, 1), (2, 2)]]
    for conflict in (True, False):
        batched = score_head_sets(knowing, items, "restated", sets, conflict=conflict, batch_size=5)
        for heads, got in zip(sets, batched, strict=True):
            alone = score_items(knowing, items, "restated", ablate_heads(heads, "zero") if heads else [],
                                conflict=conflict, batch_size=32)
            assert got["top1"].tolist() == alone["top1"].tolist()
            assert got["logit_memory"].to_numpy() == pytest.approx(alone["logit_memory"].to_numpy(), abs=1e-4)
            assert got["logit_context"].to_numpy() == pytest.approx(alone["logit_context"].to_numpy(), abs=1e-4)
    # The sets differ, so a batch that leaked one set's ablation onto other rows would show.
    assert len({tuple(f["logit_memory"].round(4)) for f in batched}) == 4


def test_draw_zero_is_the_former_single_control(knowing: LoadedModel) -> None:
    pruned = [(2, 1), (0, 3)]
    draws = control_draws(knowing, pruned, 4, seed=9)
    assert draws == _naive_draws(3, 4, pruned, 4, 9)
    # Before several draws, PH3 drew its control once per direction from random.Random(seed).
    assert draws[0] == random_heads(all_heads(knowing), pruned, 2, random.Random(9))


def test_versus_random_by_hand() -> None:
    recs = [{"direction": "prune-memory", "setting": "conflict", "draw": i, "format": f, "context_rate": v}
            for i, (a, b) in enumerate([(0.1, 0.3), (0.5, 0.5), (0.2, 0.2), (0.6, 0.0)]) for f, v in (("qa", a), ("restated", b))]
    recs.append({"direction": "prune-memory", "setting": "no-conflict", "draw": 0, "format": "qa", "context_rate": 9.0})
    out = versus_random(recs, {"qa": 0.5, "restated": 0.3}, "prune-memory", "context_rate", ("qa", "restated"))
    # Means over formats: draws 0.2, 0.5, 0.2, 0.3; pruned 0.4: 3 below, 1 above.
    assert out["prune_memory_random_context_rates"] == pytest.approx([0.2, 0.5, 0.2, 0.3])
    assert out["prune_memory_vs_random_percentile"] == 75.0
    assert out["prune_memory_vs_random_p"] == pytest.approx(2 / 5)
    # qa: draws 0.1, 0.5, 0.2, 0.6, pruned 0.5: 2 below, 1 tie, 1 above.
    assert out["prune_memory_qa_vs_random_percentile"] == pytest.approx(62.5)
    assert out["prune_memory_qa_vs_random_p"] == pytest.approx(3 / 5)

