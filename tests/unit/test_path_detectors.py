"""The path-patching and circuit detectors on tiny models (float64), against independent computations.

- path-patching's stored edges equal plain-hook path patching (tests/unit/path_reference.py,
  no engine code), in both modes, and the stored shape is exactly the documented one;
- circuit's confirmed edges equal the plain-hook direct path patching of each edge, its
  attribution the engine's EAP-IG, its stored faithfulness the plain-hook circuit run;
- a run interrupted after some units resumes to the same edges as a run never interrupted;
- bad input is a one-line error with no run stored (before loading where no model is needed);
- ``--json`` lists the edges as the ``edges`` artifact stores them.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from circuits.detectors.circuit import CircuitDetector
from circuits.detectors.path_patching import PathPatchingDetector
from circuits.methods.circuit_tasks import induction_pairs
from circuits.methods.edge_records import EDGE_KEYS
from interp.model.loaded import LoadedModel
from interp.patching import (
    LogProb,
    edge_attribution,
    encode_pair,
    full_graph,
    pair_runs,
    parse_receiver,
    parse_sender,
)
from interp.runs import tables
from interp.runs.runner import RunResult, run_detector
from interp.runs.store import Store
from tests.tiny import loaded, run_cli, tiny_llama
from tests.unit.path_reference import PlainRef

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT, CORRUPT = "w10 w11 w12 w13 w14 w15 w11 w12", "w10 w40 w41 w42 w14 w15 w11 w12"
ANSWER = "w13"
TOL = 1e-8


@pytest.fixture(scope="module")
def hf() -> torch.nn.Module:
    return tiny_llama().double()


def _model(hf: torch.nn.Module) -> LoadedModel:
    return loaded(copy.deepcopy(hf))


def _tuple(name: str) -> tuple:
    s = parse_sender(name)
    return ("embed",) if s.kind == "embed" else (s.kind, s.layer) if s.kind == "mlp" else ("head", s.layer, s.head)


def _receiver(name: str) -> tuple:
    r = parse_receiver(name)
    if r.kind == "logits":
        return ("logits",)
    return ("mlp", r.layer) if r.kind == "mlp" else (r.kind, r.layer, r.head)


def _stored_edges(ws: Path, run_id: int) -> list[dict[str, Any]]:
    with Store(ws) as store:
        return tables.read_artifact(store.run(run_id).results("artifacts"), "edges")


# ---------------------------------------------------------------------------------- path-patching


@pytest.mark.parametrize("mode", ["direct", "frozen"])
def test_path_patching_edges_equal_plain_hooks(hf: torch.nn.Module, mode: str, tmp_path: Path) -> None:
    model = _model(hf)
    receivers = ["k:2.0", "q:2.3", "mlp:1", "logits"]
    params = {"prompt": PROMPT, "corrupt_prompt": CORRUPT, "answer": ANSWER, "receivers": ",".join(receivers),
              "mode": mode}
    with Store(tmp_path) as store:
        result = run_detector(model, "path-patching", params, store, progress=False)
    edges = _stored_edges(tmp_path, result.run_id)
    assert result.summary.variant == mode
    assert result.summary.edges == edges
    assert all(tuple(e) == EDGE_KEYS for e in edges)
    assert all(e["attribution"] is None and e["in_circuit"] is False for e in edges)

    clean, corrupt = encode_pair(model, PROMPT, CORRUPT)
    target = model.encode(" " + ANSWER, prefix=False)[:1]
    ref = PlainRef(copy.deepcopy(hf), target)
    rec_clean, rec_corrupt = ref.run(clean), ref.run(corrupt)
    reference = ref.direct if mode == "direct" else ref.frozen
    # Default senders: every head below the lowest receiver (the MLP of layer 1: heads of layers 0, 1).
    senders = [f"{layer}.{h}" for layer in (0, 1) for h in range(4)]
    assert [(e["sender"], e["receiver"]) for e in edges] == [(s, r) for r in receivers for s in senders]
    largest = 0.0
    for e in edges:
        want = reference(clean, rec_clean, rec_corrupt, [_tuple(e["sender"])], _receiver(e["receiver"]))
        effect = float((want - rec_clean["metric"]).mean())
        assert e["score"] == pytest.approx(effect, abs=TOL), f"{e['sender']}->{e['receiver']}"
        largest = max(largest, abs(effect))
    assert largest > 1e-2  # the edges move the metric: the comparison can fail


def _interrupt(monkeypatch: pytest.MonkeyPatch, cls: type, group: str) -> None:
    """The first unit of ``group`` raises once (a crash mid-run); later runs go through."""
    original = cls.run_unit
    state = {"armed": True}

    def run_unit(self: Any, model: LoadedModel, cfg: Any, unit: Any) -> Any:
        if unit.group == group and state["armed"]:
            state["armed"] = False
            raise RuntimeError("killed mid-run")
        return original(self, model, cfg, unit)

    monkeypatch.setattr(cls, "run_unit", run_unit)


def _resumed(model: LoadedModel, name: str, params: dict[str, Any], ws: Path, monkeypatch: pytest.MonkeyPatch,
             cls: type, group: str) -> RunResult:
    _interrupt(monkeypatch, cls, group)
    with Store(ws) as store:
        with pytest.raises(RuntimeError, match="killed mid-run"):
            run_detector(model, name, params, store, progress=False)
        return run_detector(model, name, params, store, progress=False)


def test_path_patching_resumes_to_the_same_edges(hf: torch.nn.Module, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model(hf)
    params = {"prompt": PROMPT, "corrupt_prompt": CORRUPT, "answer": ANSWER, "receivers": "k:2.1,v:1.0,logits",
              "senders": "embed,0.1,mlp:0"}
    with Store(tmp_path / "whole") as store:
        whole = run_detector(model, "path-patching", params, store, progress=False)
    original = PathPatchingDetector.run_unit
    state = {"n": 0}

    def third_fails(self: Any, model: LoadedModel, cfg: Any, unit: Any) -> Any:
        state["n"] += 1
        if state["n"] == 3:
            raise RuntimeError("killed mid-run")
        return original(self, model, cfg, unit)

    monkeypatch.setattr(PathPatchingDetector, "run_unit", third_fails)
    with Store(tmp_path / "resumed") as store:
        with pytest.raises(RuntimeError, match="killed mid-run"):
            run_detector(model, "path-patching", params, store, progress=False)
        again = run_detector(model, "path-patching", params, store, progress=False)
    assert (again.resumed_units, again.computed_units) == (2, 1)
    assert _stored_edges(tmp_path / "resumed", again.run_id) == _stored_edges(tmp_path / "whole", whole.run_id)


# ---------------------------------------------------------------------------------- circuit

CIRCUIT = {"task": "induction", "n_prompts": 3, "seq_len": 6, "metric": "logprob", "top_n": 12, "draws": 4,
           "confirm_units": 3, "stored_edges": 0}


def test_circuit_edges_and_faithfulness_equal_independent_computations(hf: torch.nn.Module, tmp_path: Path) -> None:
    model = _model(hf)
    with Store(tmp_path) as store:
        result = run_detector(model, "circuit", CIRCUIT, store, progress=False)
    edges = _stored_edges(tmp_path, result.run_id)
    graph = full_graph(model.info)
    assert [tuple(e) for e in edges] == [EDGE_KEYS] * len(graph.edges)

    pairs = induction_pairs(model, 3, 6, 0)
    runs = pair_runs(model, pairs.clean, pairs.corrupt, LogProb(list(pairs.answers)))
    scores = edge_attribution(model, runs, graph, method="eap-ig", steps=5)
    engine = {(e.sender.name, e.receiver.name): float(scores.scores[i]) for i, e in enumerate(scores.edges)}
    assert all(e["attribution"] == pytest.approx(engine[(e["sender"], e["receiver"])], abs=1e-10) for e in edges)

    # The confirmed edges are the 12 largest |attribution|, each equal to plain-hook path patching.
    confirmed = [e for e in edges if e["score"] is not None]
    ranked = sorted(engine, key=lambda k: -abs(engine[k]))[:12]
    assert sorted((e["sender"], e["receiver"]) for e in confirmed) == sorted(ranked)
    ref = PlainRef(copy.deepcopy(hf), list(pairs.answers))
    rec_clean, rec_corrupt = ref.run(pairs.clean), ref.run(pairs.corrupt)
    for e in confirmed:
        want = ref.direct(pairs.clean, rec_clean, rec_corrupt, [_tuple(e["sender"])], _receiver(e["receiver"]))
        assert e["score"] == pytest.approx(float((want - rec_clean["metric"]).mean()), abs=TOL)

    # The circuit: confirmed edges above the threshold (on paths to the logits); its faithfulness
    # is the plain-hook circuit run's share of the clean - corrupt gap.
    m = result.summary.metrics
    kept = [e for e in edges if e["in_circuit"]]
    assert kept, "the circuit is empty: the faithfulness check would be vacuous"
    assert m["n_circuit_edges"] == len(kept)
    assert all(e["score"] is not None and abs(e["score"]) >= m["threshold"] for e in kept)
    circuit = ref.circuit(pairs.clean, rec_clean, rec_corrupt,
                          {(_tuple(e["sender"]), _receiver(e["receiver"])) for e in kept})
    full, empty = float(rec_clean["metric"].mean()), float(rec_corrupt["metric"].mean())
    assert m["faithfulness"] == pytest.approx((float(circuit.mean()) - empty) / (full - empty), abs=1e-7)
    assert m["n_confirmed"] == 12
    assert -1 <= m["spearman"] <= 1


def test_circuit_resumes_to_the_same_result(hf: torch.nn.Module, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Interrupted at the faithfulness unit, the run resumes in a new detector (nothing kept in
    memory): the attribution and confirmations it needs are recomputed, the result unchanged."""
    model = _model(hf)
    params = {**CIRCUIT, "stored_edges": 30}
    with Store(tmp_path / "whole") as store:
        whole = run_detector(model, "circuit", params, store, progress=False)
    again = _resumed(model, "circuit", params, tmp_path / "resumed", monkeypatch, CircuitDetector, "faithfulness")
    assert (again.resumed_units, again.computed_units) == (4, 1)
    assert _stored_edges(tmp_path / "resumed", again.run_id) == _stored_edges(tmp_path / "whole", whole.run_id)
    assert again.summary.metrics == whole.summary.metrics
    assert again.summary.intervals == whole.summary.intervals  # the bootstrap is seeded with the run's seed
    assert set(whole.summary.intervals) >= {"faithfulness", "gap"}


# ---------------------------------------------------------------------------------- bad input

BEFORE_LOADING = [
    (["path-patching", "--receivers", "x:1"], "unknown receiver 'x:1'"),
    (["path-patching", "--receivers", "logits", "--senders", "1.x"], "unknown sender '1.x'"),
    (["path-patching", "--receivers", "k:1.0", "--senders", "2.0"], "receiver must be above"),
    (["path-patching", "--receivers", "q:1.0", "--mode", "linear"], "mode"),
    (["path-patching", "--prompt", "w4 w5", "--corrupt-prompt", "w6 w5"], "--answer"),
    (["path-patching", "--task", "induction", "--prompt", "w4"], "not both"),
    (["circuit", "--task", "story"], "task"),
]


def _one_line_error(code: int, err: str, text: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code != 0
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    assert text in lines[0], err


@pytest.mark.parametrize(("argv", "text"), BEFORE_LOADING, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_names_fail_before_loading(argv: list[str], text: str, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    ws = tmp_path / "ws"
    code, _, err = run_cli(capsys, ["run", *argv, "-m", str(tmp_path / "no-such-model"), "-w", str(ws)])
    _one_line_error(code, err, text)
    assert not ws.exists()


AFTER_LOADING = [
    (["path-patching", "--receivers", "k:2.5", "--prompt", "w4 w5", "--corrupt-prompt", "w6 w5", "--answer", "w7"],
     "kv head 5 out of range"),
    (["path-patching", "--prompt", "w4 w5 w6", "--corrupt-prompt", "w6 w5", "--answer", "w7"],
     "differ in token length"),
    (["circuit", "--task", "fact"], "knows none of the"),
]


@pytest.mark.parametrize(("argv", "text"), AFTER_LOADING, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_input_needing_the_model_stores_no_run(argv: list[str], text: str, tiny_folder: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    ws = tmp_path / "ws"
    code, _, err = run_cli(capsys, ["run", *argv, "-m", str(tiny_folder), "-w", str(ws)])
    # After the loading lines, one line: the error (no traceback).
    lines = err.strip().splitlines()
    assert code != 0
    assert lines[-1].startswith("error: "), err
    assert text in lines[-1], err
    assert "Traceback" not in err, err
    assert sum("error" in ln for ln in lines) == 1, err
    with Store(ws, create=False) as store:
        assert len(store.runs()) == 0


def test_json_lists_the_stored_edges(tiny_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ws = tmp_path / "ws"
    code, out, err = run_cli(capsys, ["run", "path-patching", "--prompt", PROMPT, "--corrupt-prompt", CORRUPT,
                                      "--answer", ANSWER, "--receivers", "v:2.1,logits", "-m", str(tiny_folder),
                                      "-w", str(ws), "--json"])
    assert code == 0, err
    doc = json.loads(out)
    assert doc["detector"] == "path-patching"
    assert doc["variant"] == "direct"
    assert doc["edges"] == _stored_edges(ws, doc["run_id"])
    assert len(doc["edges"]) == 2 * 8
    assert doc["metrics"]["n_edges"] == 16
