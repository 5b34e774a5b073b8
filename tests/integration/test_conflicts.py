"""Knowledge conflicts on smollm2-135m: dataset, path patching against plain HF, detectors, CLI.

Sized to a few minutes on 2 cores: a seeded subset of the shared facts, few items.
"""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout
from typing import Any

import pytest
import torch

from circuits.data.conflicts import build_dataset
from circuits.data.facts import load_facts
from circuits.detectors import ph3
from circuits.methods.direct_path import head_effects, total_effects
from interp.model.loaded import LoadedModel
from interp.runs import tables

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def plain_hf(smol: LoadedModel) -> Any:
    """An independent, never-bridged HF copy of the zoo default."""
    from transformers import AutoModelForCausalLM

    from interp.model.zoo import model_dir

    return AutoModelForCausalLM.from_pretrained(str(model_dir("smollm2-135m")), attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def dataset(smol: LoadedModel) -> Any:
    facts = load_facts("auto")[:150]
    return build_dataset(smol, facts, seed=0, max_items=12)


def _ids(model: LoadedModel, text: str) -> torch.Tensor:
    return model.to_tokens(text)


def test_dataset_items_are_known_and_reproducible(smol: LoadedModel, plain_hf: Any, dataset: Any) -> None:
    items = dataset.validation + dataset.test
    assert len(items) == 12
    for item in items:
        with torch.no_grad():
            logits = plain_hf(_ids(smol, item.fact_prompt)).logits[0, -1]
        assert int(logits.argmax()) == item.memory_token
        assert item.context_token != item.memory_token
    again = build_dataset(smol, load_facts("auto")[:150], seed=0, max_items=12)
    assert again.split_record() == dataset.split_record()


def _record(hf: Any, ids: torch.Tensor, pre: dict[int, Any] | None = None, attn: dict[int, Any] | None = None,
            mlp: dict[int, Any] | None = None) -> dict[str, Any]:
    rec: dict[str, Any] = {"z": {}, "attn": {}, "mlp": {}}
    handles = []
    for i, layer in enumerate(hf.model.layers):
        def pre_hook(m: Any, args: Any, i: int = i) -> Any:
            z = pre[i](args[0].clone()) if pre and i in pre else args[0]
            rec["z"][i] = z.detach().clone()
            return (z, *args[1:])

        def attn_hook(m: Any, args: Any, out: Any, i: int = i) -> Any:
            rec["attn"][i] = out[0].detach().clone()
            return (attn[i], *out[1:]) if attn and i in attn else None

        def mlp_hook(m: Any, args: Any, out: Any, i: int = i) -> Any:
            rec["mlp"][i] = out.detach().clone()
            return mlp[i] if mlp and i in mlp else None

        handles += [
            layer.self_attn.o_proj.register_forward_pre_hook(pre_hook),
            layer.self_attn.register_forward_hook(attn_hook),
            layer.mlp.register_forward_hook(mlp_hook),
        ]
    try:
        with torch.no_grad():
            rec["logits"] = hf(ids).logits[0, -1]
    finally:
        for h in handles:
            h.remove()
    return rec


def test_path_and_total_patching_match_plain_hf(smol: LoadedModel, plain_hf: Any, dataset: Any) -> None:
    item = dataset.validation[0]
    fmt = "qa"
    conflict, plain = _ids(smol, item.conflict_prompt(fmt)), _ids(smol, item.plain_prompt(fmt))
    n_layers, d = smol.info.n_layers, smol.info.d_head
    conf = _record(plain_hf, conflict)
    clean = _record(plain_hf, plain)
    toks = [item.memory_token, item.context_token]
    path = head_effects(smol, [item], fmt).set_index(["layer", "head"])
    heads = [(24, 4), (29, 1)]
    total = total_effects(smol, [item], fmt, heads=heads).set_index(["layer", "head"])
    for layer, head in heads:
        cols = slice(head * d, (head + 1) * d)

        def patch(z: torch.Tensor, cols: slice = cols, layer: int = layer) -> torch.Tensor:
            z[0, -1, cols] = clean["z"][layer][0, -1, cols]
            return z

        frozen = _record(
            plain_hf, conflict, pre={layer: patch},
            attn={i: conf["attn"][i] for i in range(layer + 1, n_layers)},
            mlp={i: conf["mlp"][i] for i in range(layer, n_layers)},
        )
        dp = (frozen["logits"] - conf["logits"])[toks]
        assert path.loc[(layer, head), "path_delta"] == pytest.approx(float(dp[0] - dp[1]), abs=2e-3)
        full = _record(plain_hf, conflict, pre={layer: patch})
        dt = (full["logits"] - conf["logits"])[toks]
        assert total.loc[(layer, head), "total_delta"] == pytest.approx(float(dt[0] - dt[1]), abs=2e-3)


def test_detectors_end_to_end_reproducible(smol: LoadedModel, tmp_path: Any) -> None:
    from interp.runs.runner import run_detector
    from interp.runs.store import Store

    params = {"max_items": "12", "formats": "restated,qa", "facts": "builtin"}
    with Store(tmp_path / "a") as a, Store(tmp_path / "b") as b:
        r1 = run_detector(smol, "conflict-heads", params, a, progress=False)
        r2 = run_detector(smol, "conflict-heads", params, b, progress=False)
    s1, s2 = r1.summary, r2.summary
    assert s1.heads == s2.heads
    assert s1.metrics == s2.metrics
    assert s1.metrics["n_validation"] == 6
    assert s1.metrics["n_test"] == 6
    assert s1.heads is not None
    assert len(s1.heads) == smol.info.n_total_heads
    for fmt in ("restated", "qa"):
        total = sum(s1.metrics[f"{fmt}.test.{k}"] for k in ("memory_rate", "context_rate", "other_rate"))
        assert total == pytest.approx(1.0)
    split = tables.read_artifact(s1.tables["artifacts"], "split")
    assert len(split["validation"]) == 6
    assert not set(split["validation"]) & set(split["test"])


def test_ph3_detector_stores_k_and_split(smol: LoadedModel, tmp_path: Any) -> None:
    from interp.runs.runner import run_detector
    from interp.runs.store import Store

    params = {"max_items": "12", "formats": "restated", "ks": "1,3", "scale_heads": "1", "factors": "0,2", "facts": "builtin"}
    with Store(tmp_path / "ph3") as store:
        res = run_detector(smol, "ph3", params, store, progress=False)
    m = res.summary.metrics
    assert m["prune-context.k"] in (1, 3)
    assert m["prune-memory.k"] in (1, 3)
    assert m["n_validation"] == 6
    assert m["n_test"] == 6
    assert "test.unpruned.no-conflict.restated.memory_rate" in m
    # Every kept item is known, so unpruned plain recall on the no-conflict prompt is perfect.
    assert m["test.unpruned.no-conflict.restated.memory_rate"] == 1.0
    settings = tables.read_artifact(res.summary.tables["artifacts"], "selection")
    assert settings["chosen_k"]["prune-context"] == m["prune-context.k"]
    assert len(res.summary.tables["curves"]) > 0


def test_prune_cli_prints_both_generations(smol: LoadedModel) -> None:
    from interp.cli import main

    buf = io.StringIO()
    with redirect_stdout(buf):
        main(["prune", "--heads", "24.4,29.0", "--prompt", "The capital of France is", "--max-new-tokens", "3", "--json"])
    out = json.loads(buf.getvalue().strip().splitlines()[-1])
    assert out["heads"] == ["L24H4", "L29H0"]
    assert out["unpruned"] == ph3.greedy_continuation(smol, "The capital of France is", 3)
    with ph3.prune(smol, [(24, 4), (29, 0)]):
        assert out["pruned"] == ph3.greedy_continuation(smol, "The capital of France is", 3)
    with pytest.raises(SystemExit):
        main(["prune", "--heads", "99.0", "--prompt", "x"])
