"""A pruned model saved as a plain Hugging Face folder (interp.save_pruned) on the four tiny
architectures: loaded by plain transformers in a fresh process that imports nothing of this
package, it gives the logits of run-time zero ablation (AblateHeads, the bridge backend) to 1e-5;
the same check fails on two broken bakes written out here (rows instead of columns of W_O, and
the shared kv head's value slice instead of the query head's output); bad input is refused with
nothing written."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

import interp
from interp.errors import UserError
from interp.model.interventions import ablate_heads
from interp.model.layout import ModelInfo, layout_of
from interp.model.loaded import LoadedModel
from tests.conftest import TINY_FAMILIES
from tests.plain_hf_logits import fresh_logits
from tests.tiny import loaded, tiny_tokenizer

pytestmark = pytest.mark.subprocess

HEADS = [(0, 1), (2, 0), (2, 3)]
PROMPTS = [[0, 5, 6, 7, 8, 9], [0, *range(40, 60)], [0, 100, 101, 3, 102, 7, 7, 7]]
TOLERANCE = 1e-5


def runtime_logits(model: LoadedModel, heads: list[tuple[int, int]]) -> list[torch.Tensor]:
    """The reference: run-time zero ablation of z through the hook backend."""
    with torch.no_grad():
        return [model.run(torch.tensor([ids]), interventions=ablate_heads(heads, "zero")).logits[0] for ids in PROMPTS]


def max_diff(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    return max(float((g - w).abs().max()) for g, w in zip(got, want, strict=True))


def broken_folder(hf: torch.nn.Module, variant: str, folder: Path) -> Path:
    """A plain copy of ``hf`` with HEADS 'pruned' the wrong way, saved as a folder."""
    hf = copy.deepcopy(hf)
    layout, info = layout_of(hf), ModelInfo.from_config(hf.config)
    d = info.d_head
    with torch.no_grad():
        for layer, head in HEADS:
            if variant == "rows":  # the head's slice of W_O's OUTPUT (rows of [out, in])
                layout.weight(hf, "o", layer)[head * d : (head + 1) * d, :] = 0.0
            else:  # the value slice of the kv head the query head reads, shared by its group
                kv = head // info.group_size
                layout.value_weight(hf, layer, info)[kv * d : (kv + 1) * d] = 0.0
                bias = getattr(layout.module(hf, "v", layer), "bias", None)
                if bias is not None:
                    bias[kv * d : (kv + 1) * d] = 0.0
    hf.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=TINY_FAMILIES)
def measured(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Per family: the folder save_pruned wrote from a bridged LoadedModel, the broken bakes, the
    fresh process's logits of each, and the run-time reference."""
    family = request.param
    hf = request.getfixturevalue(f"tiny_{family}_hf")
    work = tmp_path_factory.mktemp(f"pruned-{family}")
    model = loaded(copy.deepcopy(hf), "bridge")
    before = [model.run(torch.tensor([ids])).logits[0] for ids in PROMPTS]  # bridges the module tree
    folders = {"save_pruned": interp.save_pruned(model, HEADS, work / "pruned"),
               "rows": broken_folder(hf, "rows", work / "rows")}
    info = ModelInfo.from_config(hf.config)
    if info.n_kv_heads < info.n_heads:
        folders["kv-slice"] = broken_folder(hf, "kv-slice", work / "kv-slice")
    got = fresh_logits(list(folders.values()), PROMPTS, work)
    return {"family": family, "model": model, "folders": folders, "before": before,
            "got": {name: got[str(f)] for name, f in folders.items()}, "want": runtime_logits(model, HEADS)}


def test_saved_folder_equals_runtime_zero_ablation_in_a_fresh_process(measured: dict[str, Any]) -> None:
    got = measured["got"]["save_pruned"]
    diff = max_diff(got["logits"], measured["want"])
    print(f"{measured['family']}: max |logit diff| saved folder vs run-time AblateHeads(zero) = {diff:.3g}")
    assert diff < TOLERANCE
    # The heads matter (else the check proves nothing), and the source model is untouched.
    assert max_diff(got["logits"], measured["before"]) > 1e-2
    model = measured["model"]
    assert max_diff([model.run(torch.tensor([ids])).logits[0] for ids in PROMPTS], measured["before"]) == 0.0
    assert got["vocab"] == model.tokenizer.get_vocab()
    folder = measured["folders"]["save_pruned"]
    expected = {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "README.md"}
    assert expected <= set(os.listdir(folder))
    assert not [p for p in folder.parent.iterdir() if ".partial-" in p.name or ".old-" in p.name]


@pytest.mark.parametrize("variant", ["rows", "kv-slice"])
def test_a_wrong_bake_fails_the_same_check(measured: dict[str, Any], variant: str) -> None:
    if variant not in measured["got"]:
        # GPT-2 has a kv head per query head: zeroing the head's own value slice zeroes exactly
        # its z (pattern @ 0), so that variant is not wrong there.
        pytest.skip("no grouped-query attention in this family")
    diff = max_diff(measured["got"][variant]["logits"], measured["want"])
    print(f"{measured['family']} {variant}: max |logit diff| = {diff:.3g}")
    with pytest.raises(AssertionError):
        assert diff < TOLERANCE


def test_model_card_and_record_name_source_heads_and_intervention(measured: dict[str, Any]) -> None:
    folder = measured["folders"]["save_pruned"]
    card = (folder / "README.md").read_text()
    record = json.loads((folder / "interp_pruning.json").read_text())
    assert record["heads"] == ["0.1", "2.0", "2.3"]
    assert record["run"] is None
    assert record["source"]["model"] == measured["model"].name
    assert "0.1, 2.0, 2.3" in card
    assert 'AblateHeads(layer, heads, method="zero")' in card
    layout = measured["model"].layout
    axis = 0 if layout.weight_in_out else 1
    assert [c["axis"] for c in record["intervention"]["baked_into"]] == [axis, axis]
    assert f"`{layout.path('o', 2)}.weight{'[0:16, :]' if axis == 0 else '[:, 0:16]'}`" in card
    assert "grouped-query attention" in card
    assert "post-attention norm" in card


def test_plain_hf_model_with_tokenizer_is_saved_unchanged(tiny_llama_hf: Any, tmp_path: Path) -> None:
    hf = copy.deepcopy(tiny_llama_hf)
    weights = {k: v.clone() for k, v in hf.state_dict().items()}
    with pytest.raises(UserError, match="without tokenizer="):
        interp.save_pruned(hf, HEADS, tmp_path / "a")
    folder = interp.save_pruned(hf, HEADS, tmp_path / "a", tokenizer=tiny_tokenizer())
    assert all(torch.equal(v, hf.state_dict()[k]) for k, v in weights.items())
    back = AutoModelForCausalLM.from_pretrained(folder)
    o = back.model.layers[2].self_attn.o_proj.weight
    assert torch.count_nonzero(o[:, 0:16]) == 0
    assert torch.count_nonzero(o[:, 48:64]) == 0
    assert torch.equal(o[:, 16:48], weights["model.layers.2.self_attn.o_proj.weight"][:, 16:48])
    assert torch.equal(back.model.layers[1].self_attn.o_proj.weight, weights["model.layers.1.self_attn.o_proj.weight"])


def _left(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_bad_input_is_refused_with_nothing_written(tiny_llama_hf: Any, tmp_path: Path) -> None:
    model = loaded(copy.deepcopy(tiny_llama_hf), "bridge")
    for heads, match in (([(3, 0)], "layer 3 out of range"), ([(0, 4)], "head 4 out of range"),
                         ([(0, 1), (0, 1)], "listed twice"), ([], "no heads")):
        with pytest.raises(UserError, match=match):
            interp.save_pruned(model, heads, tmp_path / "out")
    with pytest.raises(UserError, match="bias"):
        interp.save_pruned(model, HEADS, tmp_path / "out", method="mean")
    assert _left(tmp_path) == []
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        interp.save_pruned(model, HEADS, busy)
    assert _left(busy) == ["keep.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        interp.save_pruned(model, HEADS, tmp_path / "file")
    with pytest.raises(UserError, match="is a file"):
        interp.save_pruned(model, HEADS, tmp_path / "file" / "out")
    with pytest.raises(UserError, match="cannot"):
        interp.save_pruned(model, HEADS, Path("/proc/interp-workbench-test/out"))
    assert _left(tmp_path) == ["busy", "file"]


def test_overwrite_replaces_and_a_failed_write_keeps_the_old_folder(tiny_llama_hf: Any, tmp_path: Path) -> None:
    model = loaded(copy.deepcopy(tiny_llama_hf), "bridge")
    target = tmp_path / "deep" / "er" / "out"

    class FailingTokenizer:
        def save_pretrained(self, folder: Any) -> None:
            (Path(folder) / "half.json").write_text("{")
            raise OSError(28, "No space left on device")

    with pytest.raises(UserError, match="No space left"):
        interp.save_pruned(model.hf, HEADS, target, tokenizer=FailingTokenizer())  # type: ignore[arg-type]
    assert _left(tmp_path) == []  # neither the folder, its parents nor a temporary one
    interp.save_pruned(model, [(0, 1)], target)
    (target / "extra.txt").write_text("old")
    with pytest.raises(UserError, match="No space left"):
        interp.save_pruned(model.hf, HEADS, target, tokenizer=FailingTokenizer(), overwrite=True)  # type: ignore[arg-type]
    assert "extra.txt" in _left(target)
    assert json.loads((target / "interp_pruning.json").read_text())["heads"] == ["0.1"]
    interp.save_pruned(model, HEADS, target, overwrite=True)
    assert "extra.txt" not in _left(target)
    assert json.loads((target / "interp_pruning.json").read_text())["heads"] == ["0.1", "2.0", "2.3"]
    assert _left(target.parent) == ["out"]
