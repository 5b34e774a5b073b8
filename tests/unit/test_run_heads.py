"""The ranked heads of a stored run (interp.heads, ``interp heads``) and ``interp prune --save``
on the tiny Llama: the stored conflict-heads run gives back the heads its summary listed, in
order, per role too; a PH3 run gives the heads PH3 pruned; an induction run its summary's order;
bad input is one line."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

import interp
from circuits.data import conflicts
from circuits.detectors.conflict_heads import ranked_heads
from interp.errors import StoreError, UserError
from interp.model.interventions import ablate_heads
from interp.model.loaded import LoadedModel
from interp.runs import tables
from interp.runs.registry import UnitResult
from interp.runs.runner import RunResult, run_detector
from interp.runs.schema import FINAL_UNIT
from interp.runs.store import Store
from tests.known_facts import own_answer_facts
from tests.tiny import loaded, run_cli


@pytest.fixture(scope="module")
def stored(tiny_llama_hf: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A workspace holding a conflict-heads, a PH3 and an induction run of the tiny Llama (the
    conflict facts replaced by facts it knows), with each run's in-memory result."""
    model = loaded(copy.deepcopy(tiny_llama_hf), "bridge")
    facts = own_answer_facts(model, 24)
    mp = pytest.MonkeyPatch()
    mp.setattr(conflicts, "load_facts", lambda source=None: list(facts))
    ws = tmp_path_factory.mktemp("ws")
    try:
        with Store(ws) as store:
            runs = {
                "conflict-heads": run_detector(model, "conflict-heads", {"max_items": 12, "formats": "restated",
                                                                         "n_top": 3}, store, progress=False),
                "ph3": run_detector(model, "ph3", {"max_items": 12, "formats": "restated", "ks": "1,3",
                                                   "scale_heads": 0}, store, progress=False),
                "induction": run_detector(model, "induction", {"n_prompts": 2, "seq_len": 8}, store, progress=False),
            }
    finally:
        mp.undo()
    return {"ws": ws, "model": model, "runs": runs}


def _labels(text: str) -> list[tuple[int, int]]:
    return [(int(x.split("H")[0][1:]), int(x.split("H")[1])) for x in text.split(",") if x]


def test_conflict_heads_run_gives_its_summary_heads_in_order(stored: dict[str, Any]) -> None:
    result: RunResult = stored["runs"]["conflict-heads"]
    summary = result.summary
    assert summary.heads is not None
    got = interp.heads(stored["ws"], result.run_id)
    assert got.heads == [(h["layer"], h["head"]) for h in summary.heads]
    assert got.scores == [h["score"] for h in summary.heads]
    assert got.metric == "pooled.memory_score"
    # The summary's top memory / context heads (its n_top = 3), and every head of each kind.
    memory = interp.heads(stored["ws"], result.run_id, role="memory")
    assert memory.heads[:3] == _labels(summary.metrics["top_memory_heads"])
    assert memory.heads == [(h["layer"], h["head"]) for h in summary.heads if h["role"] == "memory"]
    context = interp.heads(stored["ws"], result.run_id, role="context", top=3)
    assert context.heads == _labels(summary.metrics["top_context_heads"])
    # Independently: the detector's own ranking function on the stored pooled path deltas.
    hs = summary.tables["head_scores"]
    deltas = hs[hs["metric"] == "pooled.path_delta"].rename(columns={"value": "path_delta"})
    mem, ctx = ranked_heads(deltas)
    assert memory.heads == mem
    assert context.heads == ctx[:3]
    model: LoadedModel = stored["model"]
    assert (got.model, got.dtype) == (model.name, "float32")
    assert "<bos>" in got.prefix
    assert got.ids[0] == f"{got.heads[0][0]}.{got.heads[0][1]}"


def test_ph3_run_gives_the_heads_it_pruned(stored: dict[str, Any]) -> None:
    result: RunResult = stored["runs"]["ph3"]
    m = result.summary.metrics
    for direction, role in (("prune-memory", "memory"), ("prune-context", "context")):
        pruned = _labels(m[f"heads.{direction}"])
        got = interp.heads(stored["ws"], result.run_id, role=role, top=m[f"{direction}.k"])
        assert got.heads == pruned, direction


def test_a_run_without_roles_gives_its_summary_order(stored: dict[str, Any]) -> None:
    result: RunResult = stored["runs"]["induction"]
    assert result.summary.heads is not None
    got = interp.heads(stored["ws"], result.run_id, top=5)
    assert got.heads == [(h["layer"], h["head"]) for h in result.summary.heads[:5]]
    assert (got.n_ranked, got.metric) == (12, "induction")
    with pytest.raises(UserError, match="has no roles"):
        interp.heads(stored["ws"], result.run_id, role="memory")


def test_cli_heads_json_and_table(stored: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    run_id = stored["runs"]["conflict-heads"].run_id
    want = interp.heads(stored["ws"], run_id, role="memory", top=2)
    code, out, err = run_cli(capsys, ["heads", str(run_id), "-w", str(stored["ws"]), "--role", "memory",
                                      "--top", "2", "--json"])
    assert code == 0, err
    doc = json.loads(out)
    assert doc["heads"] == want.ids
    assert (doc["model"], doc["dtype"], doc["detector"], doc["role"]) == (stored["model"].name, "float32",
                                                                          "conflict-heads", "memory")
    code, out, err = run_cli(capsys, ["heads", str(run_id), "-w", str(stored["ws"]), "--role", "memory", "--top", "2"])
    assert code == 0, err
    assert out.rstrip().splitlines()[-1] == f"--heads {','.join(want.ids)}"
    assert "memory heads ranked by pooled.memory_score (2 of" in out


def _store_run_without_head_scores(ws: Path) -> int:
    """A finished causal-trace run (token_layer rows only), written through the store's API."""
    with Store(ws) as store:
        run = store.start_run(model="tiny-LlamaForCausalLM", model_hash="", detector="causal-trace",
                              variant="window-10", params={}, dataset_hash=None, seed=0, code_version="test",
                              provenance={"dtype": "torch.float32"})
        rows = tables.token_layer([("mlp", 0, 0, "w5", 0, 0.5)])
        run.commit_unit(FINAL_UNIT, UnitResult(tables={"token_layer": rows}), 0.0)
        run.finish("done")
        unfinished = store.start_run(model="tiny-LlamaForCausalLM", model_hash="", detector="induction",
                                     variant="x", params={"a": 1}, dataset_hash=None, seed=0, code_version="test",
                                     provenance={})
        assert unfinished.id == run.id + 1
        return run.id


def test_bad_input_is_one_line(stored: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ws = stored["ws"]
    run_id = stored["runs"]["conflict-heads"].run_id
    with pytest.raises(UserError, match="no run with id 999"):
        interp.heads(ws, 999)
    with pytest.raises(UserError, match=f"run {run_id} is of tiny-LlamaForCausalLM, not of smollm2-135m"):
        interp.heads(ws, run_id, model="smollm2-135m")
    assert interp.heads(ws, run_id, model=stored["model"]).run_id == run_id
    with pytest.raises(UserError, match="top must be >= 1"):
        interp.heads(ws, run_id, top=0)
    with pytest.raises(StoreError, match="no results store"):
        interp.heads(tmp_path / "nothing", 1)
    other = tmp_path / "other"
    trace = _store_run_without_head_scores(other)
    with pytest.raises(UserError, match="is a causal-trace run and holds no head scores"):
        interp.heads(other, trace)
    with pytest.raises(UserError, match="is running: it has no final head scores"):
        interp.heads(other, trace + 1)
    for args, message in (
        (["heads", "999", "-w", str(ws)], "error: no run with id 999"),
        (["heads", str(trace), "-w", str(other)], "holds no head scores"),
        (["heads", str(run_id), "-w", str(ws), "--role", "neither"], "--role must be memory or context"),
        (["heads", str(run_id), "-w", str(ws), "-m", "smollm2-135m"], "not of smollm2-135m"),
    ):
        code, out, err = run_cli(capsys, args)
        assert code != 0
        assert out == ""
        assert len(err.strip().splitlines()) == 1, err
        assert message in err


def _saved_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder).eval()(ids).logits


def test_prune_save_from_a_run(stored: dict[str, Any], tiny_llama_hf: Any, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    """``interp prune --run --top --role --save`` on a folder of the tiny Llama: the saved folder
    is the run-time ablation of the run's top memory heads, and its card names the run."""
    from tests.tiny import save_folder

    folder = save_folder(copy.deepcopy(tiny_llama_hf), tmp_path / "tiny")
    ws = stored["ws"]
    run_id = stored["runs"]["conflict-heads"].run_id
    out_dir = tmp_path / "pruned"
    args = ["prune", "-m", str(folder), "--prompt", "w5 w6 w7", "--max-new-tokens", "2", "--run", str(run_id),
            "--top", "2", "--role", "memory", "-w", str(ws), "--save", str(out_dir), "--json"]
    # The stored run is of the in-process model object, not of this folder: refused.
    code, out, err = run_cli(capsys, args)
    assert code != 0
    assert f"run {run_id} is of tiny-LlamaForCausalLM, not of {folder.resolve()}" in err
    assert not out_dir.exists()
    code, out, err = run_cli(capsys, ["prune", "-m", str(folder), "--prompt", "w5 w6 w7", "--max-new-tokens", "2",
                                      "--heads", "0.1,2.3", "--save", str(out_dir), "--json"])
    assert code == 0, err
    doc = json.loads(out)
    assert doc["saved"] == str(out_dir.absolute())
    model = loaded(copy.deepcopy(tiny_llama_hf), "bridge")
    ids = model.to_tokens("w5 w6 w7 w8")
    want = model.run(ids, interventions=ablate_heads([(0, 1), (2, 3)], "zero")).logits
    assert float((_saved_logits(out_dir, ids) - want).abs().max()) < 1e-5
    code, _, err = run_cli(capsys, ["prune", "-m", str(folder), "--prompt", "w5", "--heads", "0.1", "--save",
                                    str(out_dir)])
    assert code != 0
    assert "not empty" in err
    ranked = interp.heads(ws, run_id, role="memory", top=2)
    card_dir = interp.save_pruned(model, ranked, tmp_path / "from-run")
    card = (card_dir / "README.md").read_text()
    assert f"From run {run_id} of the results store" in card
    assert "`conflict-heads`" in card
    assert "ranked by `pooled.memory_score`, role memory, the top 2" in card
    assert json.loads((card_dir / "interp_pruning.json").read_text())["run"]["heads"] == ranked.ids


def test_prune_option_errors_come_before_loading(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["prune", "-m", str(tmp_path / "no-such-model"), "--prompt", "w5"]
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    for extra, message in (
        ([], "give the heads to prune"),
        (["--heads", "1.1", "--run", "1", "--top", "1"], "not both"),
        (["--heads", "1.1", "--top", "2"], "give --run RUN"),
        (["--run", "1"], "give --top K with --run"),
        (["--heads", "1.1", "--overwrite"], "--overwrite goes with --save"),
        (["--heads", "1.1", "--save", str(busy)], "not empty"),
        (["--run", "7", "--top", "2", "-w", str(tmp_path)], "no results store"),
    ):
        code, out, err = run_cli(capsys, base + extra)
        assert code != 0
        assert out == ""
        assert len(err.strip().splitlines()) == 1, err
        assert message in err, (extra, err)


def test_the_article_before_a_detector_name() -> None:
    from interp.runs.heads import _article  # pyright: ignore[reportPrivateUsage]

    assert [_article(w) for w in ("atlas", "induction", "ph3", "causal-trace", "episodic-ablation")] == [
        "an", "an", "a", "a", "an"]
