"""``interp atlas``: several models x detectors in one store, the summary and its claims.

The CLI tests run on two tiny random models (Llama and Qwen2 layouts) with induction, copying
and retrieval: the first two run in seconds, and retrieval cannot feed a 256-token model (its
haystack is longer), so it exercises the "not measurable" path. The summary is checked on
hand-made Summary objects against hand-computed numbers.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import pytest

from circuits.atlas.budget import assess
from circuits.atlas.claims import (
    CLAIMS,
    FAILS,
    HOLDS,
    INCONCLUSIVE,
    NM,
    ModelResults,
    jaccard,
    summarize,
    top_sets,
)
from circuits.atlas.stored import latest_atlas
from interp.runs.registry import Summary
from interp.runs.store import Store
from tests.tiny import run_cli

pytestmark = pytest.mark.slow  # whole atlases on two models; its claims are in the loop (test_atlas_claim_sides)

DETS = "induction,copying,retrieval"
PAGE = Path(__file__).resolve().parents[2] / "app" / "pages" / "5_Atlas.py"


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from tests.tiny import save_folder, tiny_llama, tiny_qwen2

    return [save_folder(make(), tmp_path_factory.mktemp(name))
            for name, make in (("tiny-llama", tiny_llama), ("tiny-qwen2", tiny_qwen2))]


def _atlas(folders: list[Path], ws: Path, *extra: str) -> list[str]:
    return ["atlas", "--models", ",".join(map(str, folders)), "-d", DETS, "-w", str(ws), "--top", "3", *extra]


@pytest.fixture(scope="module")
def first_run(folders: list[Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """One atlas run with --json, shared by the CLI tests (each run costs seconds)."""
    from interp.cli import main

    ws = tmp_path_factory.mktemp("atlas-ws")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        main(_atlas(folders, ws, "--json"))
    return ws, json.loads(buf.getvalue())


def test_atlas_stores_one_run_per_model_and_detector(first_run: tuple[Path, dict[str, Any]], folders: list[Path]) -> None:
    ws, doc = first_run
    with Store(ws) as s:
        runs = s.runs()
    done = runs[runs["status"] == "done"]
    assert sorted(done["detector"]) == ["atlas", "copying", "copying", "induction", "induction"]
    assert len(set(done.loc[done["detector"] != "atlas", "model"])) == 2
    # retrieval refuses the tiny models before a run is opened: not measurable, the atlas goes on.
    assert "retrieval" not in set(runs["detector"])
    for m in map(str, folders):
        assert doc["runs"][m]["induction"]["units_computed"] > 0
        assert doc["runs"][m]["retrieval"]["not_measurable"]


def test_atlas_is_a_stored_run_whose_claims_equal_the_json_ones(
    first_run: tuple[Path, dict[str, Any]], folders: list[Path]
) -> None:
    """The atlas's result is one finished run of the store (no atlas.json): its claim rows are
    the claims --json printed, value by value, in order, and its document is the whole of it."""
    ws, doc = first_run
    assert not list(ws.rglob("atlas.json"))
    with Store(ws) as s:
        runs = s.runs()
        atlas = runs[runs["detector"] == "atlas"]
        assert len(atlas) == 1
        row = atlas.iloc[0]
        assert row["status"] == "done"
        assert row["model"] == ",".join(map(str, folders))
        assert row["variant"] == DETS
        assert json.loads(str(row["params_json"])) == {
            "models": list(map(str, folders)), "detectors": DETS.split(","), "top": 3, "prefix": "auto"}
        # Every detector run the document points at is a run of this store.
        assert {r["run_id"] for per in doc["runs"].values() for r in per.values() if "run_id" in r} == set(
            runs.loc[runs["detector"] != "atlas", "id"])
        found = latest_atlas(s)
        arts = s.run(int(row["id"])).to_frame("artifacts")
    assert found is not None
    assert found.run_id == int(row["id"])
    assert found.claims == doc["claims"]
    assert [c["id"] for c in found.claims] == [c.id for c in CLAIMS]
    for stored_claim, printed in zip(found.claims, doc["claims"], strict=True):
        for m in doc["models"]:
            for field in ("verdict", "value", "detail"):
                assert stored_claim["models"][m][field] == printed["models"][m][field]
    assert found.document == doc
    # One artifact row per claim and one document, all in the final unit; the settings route it.
    final = arts[arts["unit"] == "final"]
    assert list(final["name"]) == ["claim"] * len(CLAIMS) + ["atlas"]
    assert set(arts["unit"]) == {"final", "settings"}


def test_atlas_json_has_heads_overlaps_and_claims(first_run: tuple[Path, dict[str, Any]], folders: list[Path]) -> None:
    _, doc = first_run
    models = [str(f) for f in folders]
    assert list(doc["models"]) == models
    assert doc["top"] == 3
    for m in models:
        info = doc["models"][m]
        assert info["n_layers"] == 3
        assert info["n_heads"] > 0
        assert info["label"]
        heads = doc["detectors"]["induction"][m]["heads"]
        assert len(heads) == 3
        assert [h["score"] for h in heads] == sorted((h["score"] for h in heads), reverse=True)
        for h in heads:
            assert h["label"] == f"L{h['layer']}H{h['head']}"
            assert h["relative_depth"] == pytest.approx(h["layer"] / 3)
        assert "not_measurable" in doc["detectors"]["retrieval"][m]
        assert doc["overlap"][m] == []  # only induction among the overlap sets ran
    claims = {c["id"]: c for c in doc["claims"]}
    assert set(claims) == {"retrieval-sparse", "retrieval-masking", "memory-context-late", "ph3-beats-random",
                           "decore-beats-greedy", "mlp-peak-early", "cmr-mid-late", "induction-exists",
                           "induction-retrieval-overlap", "induction-keys-previous-token"}
    for m in models:
        assert claims["retrieval-sparse"]["models"][m]["verdict"] == NM
        assert claims["memory-context-late"]["models"][m]["verdict"] == NM  # conflict-heads not asked
        ind = claims["induction-exists"]["models"][m]
        # Random weights: no head reaches the 0.4 threshold (Olsson et al. 2022's diagnostic).
        assert ind["verdict"] == FAILS
        assert ind["value"] == pytest.approx(doc["detectors"]["induction"][m]["heads"][0]["score"])


def test_atlas_rerun_computes_nothing_and_tables_fit_80_columns(
    first_run: tuple[Path, dict[str, Any]], folders: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    ws, _ = first_run
    with Store(ws) as s:
        before = s.runs()
    code, out, err = run_cli(capsys, _atlas(folders, ws))
    assert code == 0, err
    with Store(ws) as s:
        after = s.runs()
        newest = latest_atlas(s)
    # Finished detector runs reused, not rerun; the atlas itself is a new run of this call.
    assert list(after.loc[after["detector"] != "atlas", "id"]) == list(before.loc[before["detector"] != "atlas", "id"])
    atlas_ids = list(after.loc[after["detector"] == "atlas", "id"])
    assert len(atlas_ids) == len(before[before["detector"] == "atlas"]) + 1
    assert newest is not None
    assert newest.run_id == max(atlas_ids)
    assert f"atlas: run {newest.run_id}" in err
    lines = out.splitlines()
    assert max(map(len, lines)) <= 80, max(lines, key=len)
    assert any("induction exists" in ln and ln.count(" no ") == 2 for ln in lines), out
    assert any("retrieval sparse" in ln and ln.count("n.m.") == 2 for ln in lines), out
    code, out, err = run_cli(capsys, [*_atlas(folders, ws), "--json"])
    assert code == 0, err
    runs = json.loads(out)["runs"]
    for m in map(str, folders):
        for det in ("induction", "copying"):
            assert runs[m][det]["units_computed"] == 0
            assert runs[m][det]["units_resumed"] > 0


@pytest.mark.parametrize(
    ("models", "dets", "needle"),
    [
        ("no-such-model", "induction", "unknown model 'no-such-model' (zoo: smollm2-135m"),
        ("/nonexistent/model-folder", "induction", "no such folder: '/nonexistent/model-folder'"),
        ("smollm2-135m", "induction,nope", "unknown detector 'nope' (available: "),
    ],
)
def test_atlas_bad_input_is_one_line_and_creates_nothing(
    models: str, dets: str, needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ws = tmp_path / "ws"
    code, out, err = run_cli(capsys, ["atlas", "--models", models, "-d", dets, "-w", str(ws)])
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code != 0
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    assert needle in lines[0], err
    assert not ws.exists()
    assert out == ""


# -- the summary on hand-made summaries ---------------------------------------------------------


def _heads(*rows: tuple[int, int, float], **extra: Any) -> list[dict[str, Any]]:
    return [{"layer": la, "head": h, "score": s, **extra} for la, h, s in rows]


def _model() -> ModelResults:
    """4 layers x 2 heads = 8 heads."""
    induction = Summary(detector="induction", variant="v", heads=_heads((3, 0, 0.9), (2, 1, 0.5), (1, 0, 0.1)),
                        metrics={"threshold": 0.4, "n_heads_above_threshold": 2})
    retrieval = Summary(detector="retrieval", variant="v", heads=_heads((2, 1, 0.3), (0, 0, 0.2), (3, 1, 0.05)),
                        metrics={"share_heads_above_threshold": 2 / 8, "n_heads_above_threshold": 2,
                                 "n_heads": 8, "threshold": 0.1, "too_few_counted": 0})
    cmr = Summary(detector="cmr", variant="v", heads=[
        {"layer": 3, "head": 1, "score": -0.1, "cmr_like": True},
        {"layer": 2, "head": 0, "score": -0.3, "cmr_like": True},
        {"layer": 0, "head": 1, "score": -0.7, "cmr_like": False},
        {"layer": 1, "head": 1, "score": None, "cmr_like": False},  # flat lag-CRP: no distance
    ])
    conflict = Summary(detector="conflict-heads", variant="v", heads=[
        {"layer": 3, "head": 0, "score": 0.8, "role": "memory"},
        {"layer": 1, "head": 1, "score": 0.2, "role": "memory"},
        {"layer": 0, "head": 0, "score": -0.1, "role": "context"},
        {"layer": 2, "head": 0, "score": -0.6, "role": "context"},
    ])
    return ModelResults(n_layers=4, n_heads=8, summaries={
        "induction": induction, "retrieval": retrieval, "cmr": cmr, "conflict-heads": conflict})


def test_top_sets_rank_context_heads_by_the_most_negative_memory_score() -> None:
    sets = top_sets(_model(), 2)
    labels = {k: [(h["layer"], h["head"]) for h in v] for k, v in sets.items()}
    assert labels == {"induction": [(3, 0), (2, 1)], "retrieval": [(2, 1), (0, 0)], "cmr": [(3, 1), (2, 0)],
                      "memory": [(3, 0), (1, 1)], "context": [(2, 0), (0, 0)]}


def test_summary_relative_depth_jaccard_and_claims_by_hand() -> None:
    atlas = summarize({"m": _model()}, ["induction", "retrieval", "cmr", "conflict-heads", "copying"], 2)
    heads = atlas["detectors"]["induction"]["m"]["heads"]
    assert [(h["label"], h["relative_depth"], h["score"]) for h in heads] == [("L3H0", 0.75, 0.9), ("L2H1", 0.5, 0.5)]
    assert atlas["detectors"]["copying"]["m"] == {"not_measurable": "not run"}
    overlap = {(p["a"], p["b"]): p["jaccard"] for p in atlas["overlap"]["m"]}
    # induction {L3H0, L2H1} vs retrieval {L2H1, L0H0}: 1 shared of 3.
    assert overlap[("induction", "retrieval")] == pytest.approx(1 / 3)
    assert overlap[("induction", "cmr")] == 0.0          # {L3H1, L2H0}
    assert overlap[("induction", "memory")] == pytest.approx(1 / 3)  # {L3H0, L1H1}
    assert overlap[("retrieval", "context")] == pytest.approx(1 / 3)  # {L2H0, L0H0}
    assert len(overlap) == 10  # 5 sets, every pair once
    claims = {c["id"]: c["models"]["m"] for c in atlas["claims"]}
    # 2 of 8 heads above 0.1 = 25 %, not below 5 %.
    assert (claims["retrieval-sparse"]["verdict"], claims["retrieval-sparse"]["value"]) == (FAILS, 0.25)
    # memory L3, L1 and context L2, L0: mean layer 1.5 of 4 = 0.375; depths 0.75, 0.25, 0.5, 0
    # (sd 0.323): t interval 0.375 +- 3.18 x 0.161 = [-0.14, 0.89], which contains 0.5.
    assert claims["memory-context-late"]["verdict"] == INCONCLUSIVE
    assert (claims["memory-context-late"]["lo"], claims["memory-context-late"]["hi"]) == pytest.approx(
        (0.375 - 3.182446305284263 * 0.3227486121839514 / 2, 0.375 + 3.182446305284263 * 0.3227486121839514 / 2))
    assert claims["memory-context-late"]["value"] == pytest.approx(0.375)
    # CMR-like: L3 and L2 -> (3 + 2) / 2 / 4 = 0.625; share 2 of 4 heads; two heads' t interval
    # (half-width 12.7 x 0.125) cannot place them.
    assert claims["cmr-mid-late"]["verdict"] == INCONCLUSIVE
    assert claims["cmr-mid-late"]["value"] == pytest.approx(0.625)
    assert claims["cmr-mid-late"]["share"] == 0.5
    assert (claims["induction-exists"]["verdict"], claims["induction-exists"]["value"]) == (HOLDS, 0.9)
    # One shared head of two: random top-2 sets of 8 heads share at least one with p 13/28, and
    # their Jaccard averages 5/28 (test_atlas_claim_sides works it out).
    assert claims["induction-retrieval-overlap"]["verdict"] == INCONCLUSIVE
    assert claims["induction-retrieval-overlap"]["value"] == pytest.approx(1 / 3 - 5 / 28)
    assert claims["induction-retrieval-overlap"]["p"] == pytest.approx(13 / 28)
    # Four heads' depths: wide, but a model's heads are not a sample a budget could enlarge.
    assert claims["memory-context-late"]["half_width"] > 0.1
    assert "need" not in claims["memory-context-late"]
    json.dumps(atlas)  # one JSON object


def test_missing_detectors_make_claims_not_measurable() -> None:
    res = ModelResults(n_layers=4, n_heads=8,
                       summaries={"induction": Summary(detector="induction", variant="v", heads=_heads((0, 0, 0.2)),
                                                       metrics={"threshold": 0.4})},
                       not_measurable={"conflict-heads": "cannot patch Gemma's layout"})
    claims = {c["id"]: c["models"]["m"] for c in summarize({"m": res}, ["induction"], 10)["claims"]}
    assert claims["induction-exists"]["verdict"] == FAILS
    assert claims["memory-context-late"]["verdict"] == NM
    assert "cannot patch Gemma's layout" in claims["memory-context-late"]["detail"]
    for cid in ("retrieval-sparse", "cmr-mid-late", "induction-retrieval-overlap"):
        assert claims[cid]["verdict"] == NM
        assert claims[cid]["value"] is None
    # A retrieval run with no correctly answered sample has no share: not measurable either.
    res2 = ModelResults(4, 8, {"retrieval": Summary(detector="retrieval", variant="v", heads=[], metrics={"n_heads": 8})})
    c = {c["id"]: c["models"]["m"] for c in summarize({"m": res2}, ["retrieval"], 10)["claims"]}
    assert c["retrieval-sparse"]["verdict"] == NM


def test_jaccard_of_empty_sets_is_undefined() -> None:
    assert jaccard([], []) is None
    assert jaccard(_heads((0, 0, 1.0)), _heads((0, 1, 1.0))) == 0.0


def test_many_models_split_the_claims_table_to_fit_80_columns(capsys: pytest.CaptureFixture[str]) -> None:
    from circuits.atlas.workflow import print_atlas

    names = [f"some-long-model-name-{i}" for i in range(6)]
    atlas = summarize(dict.fromkeys(names, _model()), ["induction", "conflict-heads"], 10)
    # DeCoRe on 20 items, its interval across 0: inconclusive at this budget.
    decore = next(c for c in atlas["claims"] if c["id"] == "decore-beats-greedy")
    decore["models"] = {n: assess({"verdict": INCONCLUSIVE, "value": -0.05, "lo": -0.27, "hi": 0.18, "n": 20,
                                   "n_of": "items", "method": "newcombe", "threshold": 0.0}) for n in names}
    capsys.readouterr()
    print_atlas(atlas, {n: n for n in names})
    lines = capsys.readouterr().out.splitlines()
    assert max(map(len, lines)) <= 80, max(lines, key=len)
    assert sum(ln.startswith("│ induction exists") for ln in lines) >= 2  # columns split over tables
    assert all(any(n in ln for ln in lines) for n in names)
    # Starred, with what it needs on a line of its own under the table; memory/context late is
    # inconclusive on 4 heads' depths, which no budget changes: not starred.
    assert any(ln.startswith("│ DeCoRe vs greedy") and "inconcl.*" in ln for ln in lines)
    assert sum(ln.strip().startswith("* DeCoRe vs greedy, some-long-model-name-") for ln in lines) == len(names)
    assert not any(ln.startswith("│ mem/ctx late") and "*" in ln for ln in lines)


def test_claim_costs_sum_the_runs_each_claim_reads() -> None:
    from circuits.atlas.workflow import add_claim_costs

    atlas = summarize({"m": _model()}, ["induction", "retrieval", "cmr", "conflict-heads"], 2)
    runs = {"m": {"induction": {"compute_s": 10.0}, "retrieval": {"compute_s": 5.5}, "cmr": {"compute_s": None},
                  "path-patching": {"not_measurable": "x"}}}
    add_claim_costs(atlas, runs)
    cost = {c["id"]: c["models"]["m"]["cost_s"] for c in atlas["claims"]}
    assert cost["induction-retrieval-overlap"] == 15.5  # induction + retrieval
    assert cost["induction-keys-previous-token"] == 10.0  # path-patching has no time
    assert cost["cmr-mid-late"] == 0.0
    assert cost["induction-exists"] == 10.0


def test_new_claims_by_hand() -> None:
    """Retrieval masking, PH3, DeCoRe and the MLP peak, each from hand-made metrics."""
    masking = Summary(detector="retrieval-masking", variant="v", metrics={
        "top_k": 3, "n_random": 2, "n_samples": 8, "accuracy:none": 0.75, "accuracy:top3": 0.25,
        "accuracy:random-mean": 0.625})
    ph3 = Summary(detector="ph3", variant="v", metrics={
        "prune-memory.k": 3, "formats": ["qa", "restated"],
        "test.unpruned.conflict.qa.context_rate": 0.2, "test.unpruned.conflict.restated.context_rate": 0.4,
        "test.prune-memory.conflict.qa.context_rate": 0.5, "test.prune-memory.conflict.restated.context_rate": 0.4,
        "test.prune-memory.random-control.conflict.qa.context_rate": 0.3,
        "test.prune-memory.random-control.conflict.restated.context_rate": 0.5})
    decore = Summary(detector="decore-eval", variant="v", metrics={
        "nqswap:greedy:test_accuracy": 0.6, "nqswap:decore-entropy:test_accuracy": 0.5,
        "nqswap:decore-entropy:k": 3, "nqswap:n_test": 10})
    trace = Summary(detector="causal-trace", variant="v", metrics={
        "peak_layer_mlp_last_subject": 1, "peak_value_mlp_last_subject": 0.3, "n_facts_traced": 2})
    res = ModelResults(n_layers=4, n_heads=8, summaries={
        "retrieval-masking": masking, "ph3": ph3, "decore-eval": decore, "causal-trace": trace})
    claims = {c["id"]: c for c in summarize({"m": res}, ["ph3"], 10)["claims"]}
    got = {k: (c["models"]["m"]["verdict"], c["models"]["m"]["value"]) for k, c in claims.items()}
    # top-3 masked 0.25 vs random 0.625: the top heads cost 0.375 more.
    assert got["retrieval-masking"] == (HOLDS, pytest.approx(0.375))
    # (0.5 - 0.3 + 0.4 - 0.5) / 2 formats = 0.05 more context answers than random pruning.
    assert got["ph3-beats-random"] == (HOLDS, pytest.approx(0.05))
    assert got["decore-beats-greedy"] == (FAILS, pytest.approx(-0.1))
    assert got["mlp-peak-early"] == (HOLDS, 0.25)  # layer 1 of 4
    assert claims["ph3-beats-random"]["detectors"] == ["ph3"]
    # An unmasked model that answers nothing cannot show a drop.
    res.summaries["retrieval-masking"].metrics["accuracy:none"] = 0.0  # type: ignore[index]
    c = {c["id"]: c["models"]["m"] for c in summarize({"m": res}, ["ph3"], 10)["claims"]}
    assert c["retrieval-masking"]["verdict"] == NM


def test_retrieval_ranked_detectors_get_the_retrieval_ranking() -> None:
    from circuits.atlas.workflow import atlas_params

    retrieval = Summary(detector="retrieval", variant="v", heads=_heads((0, 1, 0.1), (2, 0, 0.5), (1, 1, 0.3)))
    params = atlas_params("decore-eval", {"retrieval": retrieval})
    assert params["heads"] == "2.0,1.1,0.1"
    assert "heads" not in atlas_params("decore-eval", {})
    assert "heads" not in atlas_params("retrieval", {"retrieval": retrieval})


def test_unsupported_architecture_is_refused_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], folders: list[Path]
) -> None:
    from transformers import MambaConfig, MambaForCausalLM

    mamba = tmp_path / "mamba"
    MambaForCausalLM(MambaConfig(vocab_size=128, hidden_size=16, state_size=4, num_hidden_layers=2)).save_pretrained(mamba)
    ws = tmp_path / "ws"
    # The supported model comes first: it must not run either.
    code, _out, err = run_cli(capsys, ["atlas", "--models", f"{folders[0]},{mamba}", "-d", "induction", "-w", str(ws)])
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code != 0
    assert len(lines) == 1, err
    assert "unsupported architecture MambaForCausalLM" in lines[0], err
    assert not ws.exists()


def test_a_failing_detector_does_not_stop_the_atlas_and_an_interrupted_one_resumes(
    folders: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Faults injected into the induction detector's units: an exception at its third unit (the
    atlas goes on with copying and exits 2), then Ctrl-C at its fourth (exit 130); each rerun
    resumes the stored units instead of recomputing them."""
    from circuits.detectors.induction import InductionDetector

    ws = tmp_path / "ws"
    args = ["atlas", "--models", str(folders[0]), "-d", "induction,copying", "-w", str(ws), "--json"]
    real = InductionDetector.run_unit
    calls: list[str] = []

    def faulty(fault: type[BaseException], at: int) -> Any:
        def run_unit(self: Any, model: Any, cfg: Any, unit: Any) -> Any:
            calls.append(unit)
            if len(calls) == at:
                raise fault("injected")
            return real(self, model, cfg, unit)
        return run_unit

    monkeypatch.setattr(InductionDetector, "run_unit", faulty(RuntimeError, 3))
    code, out, err = run_cli(capsys, args)
    assert code == 2  # the CLI's exit code for errors the user can act on
    assert "1 run(s) failed (induction on tiny-llama" in err, err
    doc = json.loads(out)
    assert doc["runs"][str(folders[0])]["copying"]["units_computed"] > 0
    assert "failed: RuntimeError: injected" in doc["runs"][str(folders[0])]["induction"]["failed"]
    with Store(ws) as s:
        runs = s.runs().set_index("detector")
        assert runs.loc["induction", "status"] == "failed"
        assert s.run(int(runs.loc["induction", "id"])).done_units() == {"settings", "batch-0", "batch-1"}

    calls.clear()
    monkeypatch.setattr(InductionDetector, "run_unit", faulty(KeyboardInterrupt, 2))
    code, _, err = run_cli(capsys, args)
    assert code == 130, err

    monkeypatch.setattr(InductionDetector, "run_unit", real)
    code, out, err = run_cli(capsys, args)
    assert code == 0, err
    run = json.loads(out)["runs"][str(folders[0])]["induction"]
    # 2 units before the failure, 1 more before the interrupt: 3 resumed, the rest computed.
    assert run["units_resumed"] == 3
    assert run["units_computed"] > 0
    assert json.loads(out)["runs"][str(folders[0])]["copying"]["units_computed"] == 0
    with Store(ws) as s:
        runs = s.runs()
    assert list(runs["status"]) == ["done"] * 4
    # Three calls, one finished atlas each but the interrupted one, which the third resumed.
    assert sorted(runs["detector"]) == ["atlas", "atlas", "copying", "induction"]


def test_an_interrupted_atlas_leaves_no_finished_atlas_run_and_the_rerun_finishes_it(
    folders: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C after the detector runs, while the claims are being made: the atlas run is stored
    as interrupted with neither claims nor document, no atlas is found, the Atlas page says how
    to fill it; the rerun resumes that atlas run (detector runs reused) and finishes it."""
    from streamlit.testing.v1 import AppTest

    from circuits.atlas import workflow

    ws = tmp_path / "ws"
    args = ["atlas", "--models", str(folders[0]), "-d", "induction", "-w", str(ws), "--json"]

    def interrupted(*_: Any) -> Any:
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(workflow, "summarize", interrupted)
        code, out, _ = run_cli(capsys, args)
    assert code == 130
    assert out == ""
    with Store(ws) as s:
        runs = s.runs().set_index("detector")
        assert runs.loc["induction", "status"] == "done"
        assert runs.loc["atlas", "status"] == "interrupted"
        atlas_id = int(runs.loc["atlas", "id"])
        assert s.run(atlas_id).done_units() == {"settings"}
        assert latest_atlas(s) is None
    assert not list(ws.rglob("atlas.json"))
    monkeypatch.setenv("INTERP_WORKSPACE", str(ws))
    at = AppTest.from_file(str(PAGE), default_timeout=120).run()
    assert not at.exception, [e.value for e in at.exception]
    assert any(f"interp atlas -w {ws.resolve()}" in i.value for i in at.info)

    code, out, err = run_cli(capsys, args)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["runs"][str(folders[0])]["induction"]["units_computed"] == 0
    with Store(ws) as s:
        runs = s.runs()
        found = latest_atlas(s)
    assert list(runs["status"]) == ["done", "done"]
    assert found is not None
    assert found.run_id == atlas_id
    assert found.claims == doc["claims"]


def test_dashboard_atlas_page_links_claims_to_runs_and_places_heads_by_depth(
    first_run: tuple[Path, dict[str, Any]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from streamlit.testing.v1 import AppTest

    page = str(PAGE)
    monkeypatch.setenv("INTERP_WORKSPACE", str(tmp_path / "empty"))
    at = AppTest.from_file(page, default_timeout=120).run()
    assert not at.exception
    assert any("no atlas in this workspace" in i.value for i in at.info)

    ws, doc = first_run
    assert not list(ws.rglob("atlas.json"))  # the page reads the store
    with Store(ws) as s:
        found = latest_atlas(s)
    assert found is not None
    monkeypatch.setenv("INTERP_WORKSPACE", str(ws))
    at = AppTest.from_file(page, default_timeout=120).run()
    assert not at.exception, [e.value for e in at.exception]
    assert any(f"atlas run #{found.run_id} " in c.value for c in at.caption)
    table = next(m.value for m in at.markdown if m.value.startswith("| claim |"))
    rows = {ln.split("|")[1].strip(): ln for ln in table.splitlines()[2:]}
    assert len(rows) == len(doc["claims"])
    # Each cell: the stored claim's verdict and number.
    exists = next(c for c in found.claims if c["id"] == "induction-exists")
    for m in doc["models"]:
        assert f"no {exists['models'][m]['value']:.3g}" in rows["induction exists"]
    for m in doc["models"]:
        run_id = doc["runs"][m]["induction"]["run_id"]
        # induction is a head detector: its cell opens the Head maps page on that run.
        assert f"(./Head_maps?run={run_id})" in rows["induction exists"]
    assert "n.m." in rows["retrieval sparse"]
    assert "?run=" not in rows["retrieval sparse"]
    # One depth strip per detector with heads: each model's top heads at layer / n_layers.
    figs = {json.loads(c.proto.spec)["layout"]["title"]["text"]: json.loads(c.proto.spec)
            for c in at.get("plotly_chart")}
    fig = figs["induction: top-3 heads"]
    expected = [(doc["models"][m]["label"], h["relative_depth"])
                for m in doc["models"] for h in doc["detectors"]["induction"][m]["heads"]]
    assert len(expected) == 6
    assert list(zip(_values(fig["data"][0]["y"]), _values(fig["data"][0]["x"]), strict=True)) == expected


def test_atlas_runs_are_on_no_run_page_and_home_lists_them(
    first_run: tuple[Path, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An atlas run has no registered detector: its settings' output keeps it off the pages of
    detector runs (an unknown output would land on Head maps), and Home lists it without error."""
    from streamlit.testing.v1 import AppTest

    ws, doc = first_run
    with Store(ws) as s:
        runs = s.runs()
    atlas_ids = {int(i) for i in runs.loc[runs["detector"] == "atlas", "id"]}
    head_runs = {r["run_id"] for per in doc["runs"].values() for r in per.values() if "run_id" in r}
    monkeypatch.setenv("INTERP_WORKSPACE", str(ws))
    app = PAGE.parents[1]
    for page, key in (("pages/1_Head_maps.py", "hm-run"), ("pages/2_Causal_tracing.py", "ct-run"),
                      ("pages/3_Conflicts.py", "cf-run"), ("Home.py", "home-run")):
        at = AppTest.from_file(str(app / page), default_timeout=120).run()
        assert not at.exception, (page, [e.value for e in at.exception])
        boxes = [b for b in at.selectbox if b.key == key]
        listed = {int(str(o).split()[0].removeprefix("#")) for o in boxes[0].options} if boxes else set()
        if page == "Home.py":
            assert atlas_ids | head_runs <= listed
        else:
            assert not listed & atlas_ids, page
            if page == "pages/1_Head_maps.py":
                assert listed == head_runs  # induction and copying on both models


def _values(v: Any) -> list[Any]:
    """A plotly array as a list (numpy arrays are serialised as base64 "bdata")."""
    import base64

    import numpy as np

    if isinstance(v, dict) and "bdata" in v:
        return np.frombuffer(base64.b64decode(v["bdata"]), dtype=np.dtype(v["dtype"])).tolist()
    return list(v)
