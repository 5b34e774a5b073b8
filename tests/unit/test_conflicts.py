"""Knowledge-conflict dataset, memory/context head attribution and PH3 pruning on tiny models.

The references are plain HF forward passes over separate, never-bridged copies of the tiny
models, with raw torch hooks written out here.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import pandas as pd
import pytest
import torch
from scipy import stats as st

from circuits.data import conflicts
from circuits.data.conflicts import ConflictItem, build_dataset, make_item, rates, score_items
from circuits.data.facts import FACT_SOURCES, Fact
from circuits.detectors import ph3
from circuits.detectors.conflict_heads import ConflictHeadsDetector, rank_agreement, ranked_heads
from circuits.methods.direct_path import head_effects, total_effects
from interp.errors import UserError
from interp.model.interventions import AblateHeads, ablate_heads
from interp.model.loaded import LoadedModel
from interp.runs import tables
from interp.runs.runner import run_in_memory
from interp.runs.units import Part, Unit
from tests.known_facts import own_answer_facts, use_known_facts
from tests.tiny import loaded, no_hooks_left

# ---------------------------------------------------------------- helpers


def _layers(hf: Any) -> list[Any]:
    return list(hf.model.layers) if hasattr(hf, "model") else list(hf.transformer.h)


def _attn(layer: Any) -> Any:
    return layer.self_attn if hasattr(layer, "self_attn") else layer.attn


def _o_proj(layer: Any) -> Any:
    return layer.self_attn.o_proj if hasattr(layer, "self_attn") else layer.attn.c_proj


def _final_norm(hf: Any) -> Any:
    return hf.model.norm if hasattr(hf, "model") else hf.transformer.ln_f


def _ids(model: LoadedModel, text: str) -> torch.Tensor:
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor([[0, *ids]])


def _tiny_item(model: LoadedModel) -> ConflictItem:
    fact = Fact(subject="w5", prompt="w5 w6 w7", answer="w10", relation="r", type="t")
    return make_item(model, fact, "w11")


def _hf_run(hf: Any, ids: torch.Tensor, pre: dict[int, Any] | None = None, attn_out: dict[int, Any] | None = None,
            mlp_out: dict[int, Any] | None = None, record: bool = False) -> dict[str, Any]:
    """Plain HF forward with raw hooks: pre-hooks on output projections (edit z), attention and
    MLP outputs replaced by given tensors; optionally records z, attention and MLP outputs."""
    rec: dict[str, Any] = {"z": {}, "attn": {}, "mlp": {}}
    handles = []
    for i, layer in enumerate(_layers(hf)):
        def pre_hook(mod: Any, args: Any, i: int = i) -> Any:
            z = args[0]
            if pre and i in pre:
                z = pre[i](z.clone())
            if record:
                rec["z"][i] = z.detach().clone()
            return (z, *args[1:])

        def attn_hook(mod: Any, args: Any, out: Any, i: int = i) -> Any:
            if record:
                rec["attn"][i] = out[0].detach().clone()
            if attn_out and i in attn_out:
                return (attn_out[i], *out[1:])
            return None

        def mlp_hook(mod: Any, args: Any, out: Any, i: int = i) -> Any:
            if record:
                rec["mlp"][i] = out.detach().clone()
            if mlp_out and i in mlp_out:
                return mlp_out[i]
            return None

        handles.append(_o_proj(layer).register_forward_pre_hook(pre_hook))
        handles.append(_attn(layer).register_forward_hook(attn_hook))
        handles.append(layer.mlp.register_forward_hook(mlp_hook))
    try:
        with torch.no_grad():
            out = hf(ids, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    rec["logits"] = out.logits
    # hidden_states[-1] is after the final norm in HF; the pre-norm residual is rebuilt below.
    rec["out"] = out
    return rec


def _pre_norm_residual(hf: Any, ids: torch.Tensor, **kw: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(final residual before the final norm at the last position, logits at the last position)."""
    captured: dict[str, torch.Tensor] = {}
    norm = _final_norm(hf)
    h = norm.register_forward_pre_hook(lambda m, a: captured.__setitem__("r", a[0].detach().clone()))
    try:
        rec = _hf_run(hf, ids, **kw)
    finally:
        h.remove()
    return captured["r"][0, -1], rec["logits"][0, -1]


# ---------------------------------------------------------------- dataset


def test_make_item_rejects_context_equal_to_memory(tiny_llama_hf: Any) -> None:
    model = loaded(copy.deepcopy(tiny_llama_hf), "bridge")
    fact = Fact("w5", "w5 w6 w7", "w10", "r", "t")
    with pytest.raises(UserError, match="equals the memory answer"):
        make_item(model, fact, "w10")


def test_make_item_rejects_shared_first_token_and_counts_tokens(tiny_llama_hf: Any) -> None:
    model = loaded(copy.deepcopy(tiny_llama_hf), "bridge")
    fact = Fact("w5", "w5 w6 w7", "w10", "r", "t")
    with pytest.raises(UserError, match="share their first token"):
        make_item(model, fact, "w10 w12")
    item = make_item(model, fact, "w11 w12")
    assert (item.memory_n_tokens, item.context_n_tokens, item.equal_token_count) == (1, 2, False)
    # Documented handling: the first token of each answer is what gets compared.
    assert item.memory_token == model.tokenizer("w10")["input_ids"][-1]
    assert item.context_token == model.tokenizer("w11")["input_ids"][-1]
    with pytest.raises(UserError, match="has 1 tokens"):
        make_item(model, fact, "w11 w12", require_equal_token_count=True)


def _item(subject: str, prompt: str, relation: str, mem: str, ctx: str) -> ConflictItem:
    return ConflictItem(f"{relation}:{subject}->{ctx}", subject, relation, "t", prompt, mem, ctx, 5, 6, 1, 1)


def test_prompt_formats_and_alignment() -> None:
    item = _item("France", "The capital of France is", "capital", "Paris", "Rome")
    assert item.conflict_prompt("restated") == "The capital of France is Rome. The capital of France is"
    assert item.conflict_prompt("qa") == "The capital of France is Rome. Q: What is the capital of France? A:"
    assert item.plain_prompt("qa") == "Q: What is the capital of France? A:"
    assert item.conflict_prompt("qa").endswith(item.plain_prompt("qa"))
    other = _item("x", "The mascot of x is", "mascot", "y", "z")
    assert other.plain_prompt("qa") == "Q: The mascot of x is what? A:"
    with pytest.raises(UserError, match="unknown conflict format"):
        item.conflict_prompt("cloze")
    with pytest.raises(UserError, match=r"parameter 'formats\[1\]' must be one of"):
        ConflictHeadsDetector.parse_params({"formats": "restated,nope"})


def test_build_dataset_filters_known_and_splits_by_seed(tiny_llama_hf: Any) -> None:
    model = loaded(copy.deepcopy(tiny_llama_hf), "bridge")
    facts = own_answer_facts(model, 12)
    answers = {f.answer for f in facts}
    wrong = next(f"w{i}" for i in range(4, 128) if f"w{i}" not in answers)
    unknown = Fact("w50", "w50 w51 w52", wrong, "r", "t")
    with torch.no_grad():
        assert model.tokenizer.decode([int(model.run(_ids(model, unknown.prompt)).logits[0, -1].argmax())]) != wrong
    ds = build_dataset(model, [*facts, unknown], seed=3)
    ids = [i.id for i in ds.validation + ds.test]
    assert not any(i.startswith("r:w50->") for i in ids)
    assert ds.n_known == len({f.key for f in facts})
    assert not {i.id for i in ds.validation} & {i.id for i in ds.test}
    for item in ds.validation + ds.test:
        assert item.memory_token != item.context_token
        assert item.context_answer != item.memory_answer
    again = build_dataset(model, [*facts, unknown], seed=3)
    assert again.split_record() == ds.split_record()
    other = build_dataset(model, [*facts, unknown], seed=4)
    assert other.split_record()["hash"] != ds.split_record()["hash"]


def test_empty_split_is_a_clear_error(tiny_llama_hf: Any) -> None:
    model = loaded(copy.deepcopy(tiny_llama_hf), "bridge")
    facts = own_answer_facts(model, 2)[:1]
    # One known fact plus an unknown of the same type (a substitute pool) makes one item.
    facts.append(Fact("w31", "w31 w32 w33", "w126" if facts[0].answer != "w126" else "w125", "r", "t"))
    with pytest.raises(UserError, match="split needs items on both sides"):
        build_dataset(model, facts, seed=0)


def test_rates_hand_worked() -> None:
    df = pd.DataFrame(
        {
            "top1": [5, 6, 7, 5],
            "memory_token": [5, 5, 5, 5],
            "context_token": [6, 6, 6, 6],
            "logit_memory": [3.0, 1.0, 2.0, 4.0],
            "logit_context": [1.0, 2.0, 2.5, 0.0],
        }
    )
    r = rates(df)
    assert r["memory_rate"] == 0.5
    assert r["context_rate"] == 0.25
    assert r["other_rate"] == 0.25
    assert r["memory_preferred_rate"] == 0.5
    assert r["mean_logit_diff"] == pytest.approx((2 - 1 - 0.5 + 4) / 4)


def test_score_items_matches_plain_hf(tiny_hf: Any) -> None:
    model = loaded(copy.deepcopy(tiny_hf), "bridge")
    ref = copy.deepcopy(tiny_hf)
    fact = Fact("w5", "w5 w6 w7", "w10", "r", "t")
    items = [make_item(model, fact, "w11"), make_item(model, Fact("w8", "w8 w9", "w12", "r", "t"), "w13")]
    df = score_items(model, items, "restated")
    for row, item in zip(df.to_dict("records"), items, strict=True):
        with torch.no_grad():
            logits = ref(_ids(model, item.conflict_prompt("restated"))).logits[0, -1]
        assert row["top1"] == int(logits.argmax())
        assert row["logit_memory"] == pytest.approx(float(logits[item.memory_token]), abs=1e-4)
        assert row["logit_context"] == pytest.approx(float(logits[item.context_token]), abs=1e-4)


# ---------------------------------------------------------------- path patching


@pytest.mark.parametrize("fmt", ["restated", "qa"])
def test_path_patching_equals_hand_written_frozen_downstream(tiny_hf: Any, fmt: str) -> None:
    """Independent check: patch head (l, h) at the final position from the no-conflict run,
    freeze every other component (other heads of layer l, all MLPs from l on, all later
    attention layers) at conflict-run values by raw hooks on a plain HF copy, and read the
    logits through HF's own final norm (recomputed) and lm_head. Under Gemma's post-attention
    norm the hooks change the attention output before that norm, which HF recomputes."""
    model = loaded(copy.deepcopy(tiny_hf), "bridge")
    ref = copy.deepcopy(tiny_hf)
    item = _tiny_item(model)
    conflict = _ids(model, item.conflict_prompt(fmt))
    plain = _ids(model, item.plain_prompt(fmt))
    d_head = model.info.d_head
    n_layers = model.info.n_layers
    got = head_effects(model, [item], fmt).set_index(["layer", "head"])

    conf_rec = _hf_run(ref, conflict, record=True)
    clean_rec = _hf_run(ref, plain, record=True)
    r_conf, logits_conf = _pre_norm_residual(ref, conflict)
    toks = [item.memory_token, item.context_token]
    checked = 0
    for layer, head in [(0, 1), (1, 3), (n_layers - 1, 0), (n_layers - 1, 2)]:
        cols = slice(head * d_head, (head + 1) * d_head)

        def patch_z(z: torch.Tensor, cols: slice = cols, layer: int = layer) -> torch.Tensor:
            z[0, -1, cols] = clean_rec["z"][layer][0, -1, cols]
            return z

        r_new, logits_new = _pre_norm_residual(
            ref,
            conflict,
            pre={layer: patch_z},
            attn_out={i: conf_rec["attn"][i] for i in range(layer + 1, n_layers)},
            mlp_out={i: conf_rec["mlp"][i] for i in range(layer, n_layers)},
        )
        d_logit = (logits_new - logits_conf)[toks]
        row = got.loc[(layer, head)]
        assert row["path_delta_memory_logit"] == pytest.approx(float(d_logit[0]), abs=2e-4)
        assert row["path_delta_context_logit"] == pytest.approx(float(d_logit[1]), abs=2e-4)
        assert row["path_delta"] == pytest.approx(float(d_logit[0] - d_logit[1]), abs=3e-4)
        # Frozen-norm variant, by hand: the residual change divided by the conflict run's RMS
        # (LayerNorm: centred and divided by its std), times the norm weight, onto W_U; under a
        # post-attention norm the head's output change first goes through that norm frozen at
        # the conflict run's attention output.
        norm = _final_norm(ref)
        dr = r_new - r_conf
        block = _layers(ref)[layer]
        # Llama's post_attention_layernorm is the MLP's input norm; Gemma's normalises the attention output.
        post = block.post_attention_layernorm if hasattr(block, "pre_feedforward_layernorm") else None
        if post is not None:
            w_o = _o_proj(block).weight[:, cols]
            d_out = w_o @ (clean_rec["z"][layer][0, -1, cols] - conf_rec["z"][layer][0, -1, cols])
            s = conf_rec["attn"][layer][0, -1]
            dr = (d_out / torch.sqrt(s.pow(2).mean() + post.eps) * (1 + post.weight)).detach()
        if isinstance(norm, torch.nn.LayerNorm):
            dn = (dr - dr.mean()) / torch.sqrt(r_conf.var(unbiased=False) + norm.eps) * norm.weight
        elif post is not None:
            dn = dr / torch.sqrt(r_conf.pow(2).mean() + norm.eps) * (1 + norm.weight)
        else:
            dn = dr / torch.sqrt(r_conf.pow(2).mean() + norm.variance_epsilon) * norm.weight
        w_u = ref.get_output_embeddings().weight
        lin = (w_u[toks] @ dn).detach()
        assert row["path_delta_frozen_norm"] == pytest.approx(float(lin[0] - lin[1]), abs=2e-4)
        checked += 1
    assert checked == 4
    # The frozen downstream matters: the effect differs from total-effect patching somewhere.
    assert max(abs(v) for v in got["path_delta"].tolist()) > 1e-3


def test_direct_attribution_per_answer_by_hand(tiny_llama_hf: Any) -> None:
    model = loaded(copy.deepcopy(tiny_llama_hf), "bridge")
    ref = copy.deepcopy(tiny_llama_hf)
    item = _tiny_item(model)
    ids = _ids(model, item.conflict_prompt("restated"))
    rec = _hf_run(ref, ids, record=True)
    r, _ = _pre_norm_residual(ref, ids)
    got = head_effects(model, [item], "restated").set_index(["layer", "head"])
    d = model.info.d_head
    layer, head = 2, 1
    w_o = ref.model.layers[layer].self_attn.o_proj.weight[:, head * d : (head + 1) * d]
    out = w_o @ rec["z"][layer][0, -1, head * d : (head + 1) * d]
    normed = out.detach() / torch.sqrt(r.pow(2).mean() + ref.model.norm.variance_epsilon) * ref.model.norm.weight
    w_u = ref.lm_head.weight.detach()
    assert got.loc[(layer, head), "dla_memory"] == pytest.approx(float(w_u[item.memory_token] @ normed), abs=1e-4)
    assert got.loc[(layer, head), "dla_context"] == pytest.approx(float(w_u[item.context_token] @ normed), abs=1e-4)


def test_total_effect_equals_hand_written_patch(tiny_hf: Any) -> None:
    model = loaded(copy.deepcopy(tiny_hf), "bridge")
    ref = copy.deepcopy(tiny_hf)
    item = _tiny_item(model)
    conflict = _ids(model, item.conflict_prompt("restated"))
    plain = _ids(model, item.plain_prompt("restated"))
    d = model.info.d_head
    got = total_effects(model, [item], "restated", rows_per_pass=5).set_index(["layer", "head"])
    assert len(got) == model.info.n_layers * model.info.n_heads
    clean_rec = _hf_run(ref, plain, record=True)
    base = _hf_run(ref, conflict)["logits"][0, -1]
    toks = [item.memory_token, item.context_token]
    for layer, head in [(0, 0), (1, 2), (2, 3)]:
        cols = slice(head * d, (head + 1) * d)

        def patch_z(z: torch.Tensor, cols: slice = cols, layer: int = layer) -> torch.Tensor:
            z[0, -1, cols] = clean_rec["z"][layer][0, -1, cols]
            return z

        new = _hf_run(ref, conflict, pre={layer: patch_z})["logits"][0, -1]
        delta = (new - base)[toks]
        assert got.loc[(layer, head), "total_delta"] == pytest.approx(float(delta[0] - delta[1]), abs=3e-4)


def test_rank_agreement_and_ranking_hand_worked() -> None:
    idx = pd.MultiIndex.from_tuples([(0, 0), (0, 1), (1, 0), (1, 1)], names=["layer", "head"])
    a = pd.Series([-2.0, -1.0, 0.5, 3.0], index=idx)
    b = pd.Series([-1.0, -2.0, 0.1, 4.0], index=idx)
    ag = rank_agreement(a, b, top=1)
    assert ag["spearman"] == pytest.approx(0.8)
    assert ag["top1_overlap_memory"] == 0.0
    assert ag["top1_overlap_context"] == 1.0
    mem, ctx = ranked_heads(a.rename("path_delta").reset_index())
    assert mem == [(0, 0), (0, 1)]
    assert ctx == [(1, 1), (1, 0)]


def test_detector_on_model_that_knows_nothing_is_a_clear_error(tiny_llama_hf: Any) -> None:
    model = loaded(copy.deepcopy(tiny_llama_hf), "bridge")
    det = ConflictHeadsDetector()
    cfg = det.parse_params({"facts": "builtin"})
    with pytest.raises(UserError, match="known conflict items"):
        det.run_unit(model, cfg, Unit("format", 0, label="restated"))
    with pytest.raises(UserError, match="must be one of"):
        det.parse_params({"norm": "sideways"})


# The run key's variant: a short lowercase slug.
SLUG = re.compile(r"^[a-z0-9]+([-./+=][a-z0-9]+)*$")


def test_configs_keep_the_parameters_typed_and_checked() -> None:
    assert [p.name for p in ConflictHeadsDetector.params] == [
        "seed", "formats", "facts", "val_fraction", "max_items", "norm", "total_effect", "total_items", "n_top",
        "batch_size",
    ]
    cfg = ConflictHeadsDetector.parse_params({})
    assert (cfg.formats, cfg.facts, cfg.val_fraction, cfg.max_items) == (("restated", "qa"), "auto", 0.5, 80)
    assert (cfg.norm, cfg.total_effect, cfg.total_items, cfg.n_top, cfg.batch_size) == ("recomputed", False, 4, 10, 16)
    facts = next(p for p in ConflictHeadsDetector.params if p.name == "facts")
    assert facts.choices == FACT_SOURCES
    # `interp run --top` is the CLI's own option (table rows): the parameter is n_top.
    with pytest.raises(UserError, match="unknown parameter 'top'"):
        ConflictHeadsDetector.parse_params({"top": "3"})
    assert [p.name for p in ph3.PH3Detector.params] == [
        "seed", "formats", "facts", "val_fraction", "max_items", "ks", "scale_heads", "factors", "n_random", "batch_size",
    ]
    seed = next(p for p in ph3.PH3Detector.params if p.name == "seed")
    assert seed.help == "seed of the context answers, the split and the random-head control"
    d = ph3.PH3Detector.parse_params({})
    assert (d.ks, d.factors, d.scale_heads, d.batch_size) == ((1, 3, 5, 7, 9, 15), (0.0, 0.5, 1.0, 2.0, 4.0), 1, 32)
    p = ph3.PH3Detector.parse_params({"ks": "1,3", "factors": "0,2.5", "formats": "qa"})
    assert (p.ks, p.factors, p.formats) == ((1, 3), (0.0, 2.5), ("qa",))
    for raw, text in [
        ({"formats": ","}, "no conflict format"),
        ({"formats": "qa,qa"}, "'qa' twice"),
        ({"ks": "0,3"}, r"parameter 'ks\[0\]' must be >= 1"),
        ({"ks": "1,three"}, r"parameter 'ks\[1\]' expects int"),
        ({"ks": ","}, "no candidate k given in ks"),
        ({"factors": "0,nan"}, r"parameter 'factors\[1\]' must be a finite number"),
        ({"factors": ""}, "no scale factor given in factors"),
        ({"val_fraction": "1"}, r"parameter 'val_fraction' must be in \(0, 1\)"),
    ]:
        with pytest.raises(UserError, match=text):
            ph3.PH3Detector.parse_params(raw)


def test_variants_are_slugs_that_name_the_method() -> None:
    det = ConflictHeadsDetector()
    seen = set()
    for norm in ("recomputed", "frozen"):
        for total in (False, True):
            cfg = det.parse_params({"norm": norm, "total_effect": total})
            v = det.variant(cfg)
            assert SLUG.match(v), v
            assert len(v) <= 40, v
            assert norm in v
            assert ("total-effect" in v) == total
            assert norm in det.method_text(cfg)
            assert ("total-effect" in det.method_text(cfg)) == total
            seen.add(v)
    assert len(seen) == 4
    v = ph3.PH3Detector().variant(ph3.PH3Detector.parse_params({}))
    assert SLUG.match(v), v
    assert len(v) <= 40, v


@pytest.fixture
def knowing(tiny_llama_hf: Any, monkeypatch: pytest.MonkeyPatch) -> LoadedModel:
    """The tiny Llama, with the conflict detectors' facts replaced by facts it knows."""
    return use_known_facts(loaded(copy.deepcopy(tiny_llama_hf), "bridge"), monkeypatch)


def test_conflict_heads_detector_runs_and_stores_its_tables(knowing: LoadedModel) -> None:
    det = ConflictHeadsDetector()
    cfg = det.parse_params({"max_items": 8, "formats": "restated", "total_effect": True, "total_items": 2,
                            "n_top": 2})
    assert det.dataset(knowing, cfg) is det.dataset(knowing, cfg)  # one dataset per run
    summary, results = run_in_memory(knowing, det, cfg)
    m = summary.metrics
    assert summary.variant == "direct-path.recomputed-norm+total-effect"
    assert m["n_validation"] + m["n_test"] == 8
    assert summary.heads is not None
    assert len(summary.heads) == knowing.info.n_total_heads
    assert [h["score"] for h in summary.heads] == sorted((h["score"] for h in summary.heads), reverse=True)
    assert len(str(m["top_memory_heads"]).split(",")) <= 2
    assert "path_vs_total.spearman" in m
    assert "restated.path_vs_total.spearman" in m
    assert sum(m[f"restated.test.{k}"] for k in ("memory_rate", "context_rate", "other_rate")) == pytest.approx(1.0)
    assert list(results["metrics"].columns[:len(tables.columns("metrics"))]) == tables.columns("metrics")
    numeric = {k: float(v) for k, v in m.items() if not isinstance(v, str)}
    assert dict(zip(summary.tables["metrics"]["name"], summary.tables["metrics"]["value"], strict=True)) == numeric
    split = tables.read_artifact(summary.tables["artifacts"], "split")
    assert split["hash"] == m["split_hash"]
    assert len(split["validation"]) == m["n_validation"]
    assert tables.read_artifact(summary.tables["artifacts"], "patching")["final_norm"] == "recomputed"
    hs = summary.tables["head_scores"]
    assert list(hs.columns) == tables.columns("head_scores")
    pooled = hs[hs["metric"] == "pooled.memory_score"].set_index(["layer", "head"])["value"]
    for h in summary.heads:
        assert pooled[(h["layer"], h["head"])] == h["score"]
    ids = det.example_tokens(knowing, cfg)
    assert ids is not None
    assert knowing.tokenizer.decode(ids[0, len(knowing.prefix):].tolist()).endswith(" w20 w60 w90")


def test_ph3_detector_runs_and_stores_k_and_split(knowing: LoadedModel) -> None:
    det = ph3.PH3Detector()
    cfg = det.parse_params({"max_items": 8, "formats": "restated", "ks": "1", "factors": "0,2"})
    summary, results = run_in_memory(knowing, det, cfg)
    m = summary.metrics
    assert summary.variant == "zero-ablation.direct-path-ranking"
    assert (m["prune-context.k"], m["prune-memory.k"]) == (1, 1)
    # Every kept item is known, so unpruned plain recall on the no-conflict prompt is perfect.
    assert m["test.unpruned.no-conflict.restated.memory_rate"] == 1.0
    selection = tables.read_artifact(summary.tables["artifacts"], "selection")
    assert selection["chosen_k"] == {"prune-context": 1, "prune-memory": 1}
    assert selection["k_grid"] == [1]
    assert tables.read_artifact(summary.tables["artifacts"], "split")["hash"] == m["split_hash"]
    assert selection["pruned_heads"] == tables.read_artifact(results["artifacts"], "pruned_heads")
    curves = summary.tables["curves"]
    assert list(curves.columns) == tables.columns("curves")
    assert set(curves["curve"]) == {
        "validation.prune-context.memory_rate", "validation.prune-memory.context_rate",
        "test.scale_value.restated.context_rate", "test.scale_value.restated.memory_rate",
    }
    assert sorted(set(curves.loc[curves["curve"].str.startswith("test."), "x"])) == [0.0, 2.0]
    # The scaling rates are shares of the test items (Wilson); the validation sweep averages the
    # formats' rates over the same items, which is no share of independent trials: no interval.
    test = curves[curves["curve"].str.startswith("test.")]
    assert set(test["ci_method"]) == {"wilson"}
    assert set(test["n"]) == {m["n_test"]}
    assert ((test["ci_low"] <= test["y"]) & (test["y"] <= test["ci_high"])).all()
    assert curves.loc[curves["curve"].str.startswith("validation."), "ci_low"].isna().all()


# ---------------------------------------------------------------- pruning


def _count_hooks(model: LoadedModel) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.hf.modules())


def test_prune_equals_zeroed_output_weights_and_removes_hooks(tiny_hf: Any) -> None:
    model = loaded(copy.deepcopy(tiny_hf), "bridge")
    ids = _ids(model, "w5 w6 w7 w8 w9")
    heads = [(0, 1), (2, 3), (2, 0)]
    base = model.run(ids).logits
    before = _count_hooks(model)
    with no_hooks_left(model), ph3.prune(model, heads):
        assert _count_hooks(model) > before
        pruned = model.run(ids).logits
        pruned_hf = model.hf(ids).logits
    assert _count_hooks(model) == before
    # Independent: a plain copy with those heads' columns of W_O zeroed.
    ref = copy.deepcopy(tiny_hf)
    d = model.info.d_head
    with torch.no_grad():
        for layer, head in heads:
            mod = _o_proj(_layers(ref)[layer])
            if isinstance(mod, torch.nn.Linear):
                mod.weight[:, head * d : (head + 1) * d] = 0.0
            else:
                mod.weight[head * d : (head + 1) * d, :] = 0.0
        expected = ref(ids).logits
    assert torch.allclose(pruned, expected, atol=1e-4)
    assert torch.allclose(pruned_hf, expected, atol=1e-4)
    assert torch.allclose(model.run(ids).logits, base)
    zero = model.run(ids, interventions=[AblateHeads(0, (1,)), AblateHeads(2, (0, 3))]).logits
    assert torch.allclose(zero, expected, atol=1e-4)


def test_prune_removes_hooks_on_exception(tiny_llama_hf: Any) -> None:
    model = loaded(copy.deepcopy(tiny_llama_hf), "bridge")
    before = _count_hooks(model)
    with pytest.raises(RuntimeError, match="boom"), ph3.prune(model, [(1, 1)]):
        raise RuntimeError("boom")
    assert _count_hooks(model) == before
    with pytest.raises(UserError, match="out of range"), ph3.prune(model, [(1, 9)]):
        pass
    assert _count_hooks(model) == before


@pytest.mark.parametrize("backend", ["bridge", "nnsight"])
def test_prune_is_ablate_heads_zero(tiny_hf: Any, backend: str) -> None:
    """prune applies AblateHeads (zero) on the output projection's input: exactly the logits
    and the greedy text of model.run with those interventions."""
    model = loaded(copy.deepcopy(tiny_hf), backend)
    ids = _ids(model, "w5 w6 w7 w8 w9")
    heads = [(0, 1), (2, 3), (2, 0)]
    ivs = ablate_heads(heads, "zero")
    want = model.run(ids, interventions=ivs).logits
    with ph3.prune(model, heads):
        got = model.run(ids).logits
        text = ph3.greedy_continuation(model, "w5 w6 w7", 6)
    assert torch.equal(got, want)
    assert text == ph3.greedy_continuation(model, "w5 w6 w7", 6, ivs)


def test_greedy_generate_matches_hf_argmax(tiny_llama_hf: Any) -> None:
    model = loaded(copy.deepcopy(tiny_llama_hf), "bridge")
    ref = copy.deepcopy(tiny_llama_hf)
    text = ph3.greedy_continuation(model, "w5 w6", max_new_tokens=4)
    ids = _ids(model, "w5 w6")
    for _ in range(4):
        with torch.no_grad():
            nxt = int(ref(ids).logits[0, -1].argmax())
        if nxt == 1:
            break
        ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    assert text == model.tokenizer.decode(ids[0, 3:].tolist())


@pytest.mark.parametrize("backend", ["bridge", "nnsight"])
def test_pruned_greedy_generate_matches_hf_with_zeroed_heads(tiny_llama_hf: Any, backend: str) -> None:
    """The KV-cached loop (bridge) and the recomputing loop (nnsight) under pruning both equal
    plain HF argmax decoding with the heads' o_proj input columns zeroed by hand."""
    model = loaded(copy.deepcopy(tiny_llama_hf), backend)
    ref = copy.deepcopy(tiny_llama_hf)
    d = model.info.d_head
    heads = [(0, 1), (1, 3)]

    def zero(cols: slice) -> Any:
        def hook(_m: Any, args: Any) -> Any:
            z = args[0].clone()
            z[..., cols] = 0.0
            return (z, *args[1:])

        return hook

    handles = [ref.model.layers[la].self_attn.o_proj.register_forward_pre_hook(zero(slice(h * d, (h + 1) * d)))
               for la, h in heads]
    ids = _ids(model, "w5 w6 w7")
    n0 = ids.shape[1]
    try:
        for _ in range(6):
            with torch.no_grad():
                nxt = int(ref(ids).logits[0, -1].argmax())
            if nxt == model.tokenizer.eos_token_id:
                break
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    finally:
        for h in handles:
            h.remove()
    with ph3.prune(model, heads):
        text = ph3.greedy_continuation(model, "w5 w6 w7", max_new_tokens=6)
    assert text == model.tokenizer.decode(ids[0, n0:].tolist())


def test_select_k_prefers_best_validation_rate_then_smaller_k(monkeypatch: pytest.MonkeyPatch) -> None:
    table = {0: 0.2, 1: 0.3, 3: 0.6, 5: 0.6, 7: 0.5, 9: 0.1, 15: 0.0}

    def fake_evaluate(model: Any, items: Any, formats: Any, heads: Any, **kw: Any) -> dict[str, dict[str, float]]:
        v = table[len(heads)]
        return {f: {"memory_rate": v, "context_rate": 0.0, "mean_logit_diff": 1.0} for f in formats}

    monkeypatch.setattr(ph3, "evaluate", fake_evaluate)
    heads = [(0, i) for i in range(20)]
    k, sweep = ph3.select_k(None, [], ["restated", "qa"], heads, "prune-context")  # type: ignore[arg-type]
    assert k == 3
    assert list(sweep["k"]) == [1, 3, 5, 7, 9, 15]
    with pytest.raises(UserError, match="no heads"):
        ph3.select_k(None, [], ["restated"], [], "prune-memory")  # type: ignore[arg-type]
    with pytest.raises(UserError, match="unknown PH3 direction"):
        ph3.select_k(None, [], ["restated"], heads, "prune-both")  # type: ignore[arg-type]


def test_conflict_heads_unit_split_by_items_joins_to_the_whole(knowing: LoadedModel) -> None:
    """A format's unit split by validation items (as the Dask executor does when a run has fewer
    units than workers): the parts' path patching joined equals run_unit's; a part missing or
    repeated is refused."""
    det = ConflictHeadsDetector()
    cfg = det.parse_params({"max_items": 8, "formats": "restated", "total_effect": True, "total_items": 2,
                            "n_top": 2})
    [unit] = det.units(knowing, cfg)
    assert det.max_parts(knowing, cfg, unit) >= 3
    parts = [det.run_part(knowing, cfg, Part(unit, i, 3)) for i in range(3)]
    whole = det.run_unit(knowing, cfg, unit).tables
    joined = det.join_parts(knowing, cfg, unit, parts).tables
    for table in ("head_scores", "metrics"):
        pd.testing.assert_frame_equal(joined[table], whole[table], check_exact=False, rtol=1e-5, atol=1e-6,
                                      obj=table)
    with pytest.raises(ValueError, match="cover"):
        det.join_parts(knowing, cfg, unit, parts[:2])
    with pytest.raises(ValueError, match="cover"):
        det.join_parts(knowing, cfg, unit, [*parts, parts[1]])


def _wilson_closed_form(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5
    return centre - half, centre + half


def test_rate_intervals_hand_worked() -> None:
    df = pd.DataFrame({"top1": [5, 6, 7, 5], "memory_token": [5] * 4, "context_token": [6] * 4,
                       "logit_memory": [3.0, 1.0, 2.0, 4.0], "logit_context": [1.0, 2.0, 2.5, 0.0]})
    ivs = conflicts.rate_intervals(df)
    assert (ivs["memory_rate"].lo, ivs["memory_rate"].hi) == pytest.approx(_wilson_closed_form(2, 4))
    assert (ivs["context_rate"].lo, ivs["context_rate"].hi) == pytest.approx(_wilson_closed_form(1, 4))
    diff = [2.0, -1.0, -0.5, 4.0]
    mean, sd = sum(diff) / 4, float(pd.Series(diff).std())
    half = 3.182446305284263 * sd / 2  # t(0.975, 3) * sd / sqrt(4)
    assert (ivs["mean_logit_diff"].lo, ivs["mean_logit_diff"].hi) == pytest.approx((mean - half, mean + half))
    assert {iv.n for iv in ivs.values()} == {4}
    assert {k: iv.value for k, iv in ivs.items()} == {k: v for k, v in rates(df).items() if k != "n"}


def test_conflict_heads_answer_rates_carry_their_intervals(knowing: LoadedModel) -> None:
    det = ConflictHeadsDetector()
    cfg = det.parse_params({"max_items": 8, "formats": "restated", "n_top": 2})
    summary, _ = run_in_memory(knowing, det, cfg)
    scored = score_items(knowing, det.dataset(knowing, cfg).split("test"), "restated")
    n = len(scored)
    k = int((scored["top1"] == scored["memory_token"]).sum())
    iv = summary.intervals["restated.test.memory_rate"]
    assert (iv.value, iv.n, iv.method) == (k / n, n, "wilson")
    assert (iv.lo, iv.hi) == pytest.approx(_wilson_closed_form(k, n))
    diff = scored["logit_memory"] - scored["logit_context"]
    t = summary.intervals["restated.test.mean_logit_diff"]
    assert t.value == pytest.approx(float(diff.mean()), abs=1e-5)
    if n > 1:
        half = float(st.t.ppf(0.975, n - 1)) * float(diff.std()) / n**0.5
        assert (t.lo, t.hi) == pytest.approx((diff.mean() - half, diff.mean() + half), abs=1e-5)
    final = summary.tables["metrics"].set_index("name")
    assert final.loc["restated.test.memory_rate", "ci_low"] == pytest.approx(iv.lo)
