"""Dashboard page logic with Streamlit's AppTest, on a workspace built from tiny-model runs.

Chart contents are checked against the stored rows read back with naive loops, and the
on-demand attention pattern against a plain Hugging Face forward pass (output_attentions).
"""

from __future__ import annotations

import base64
import copy
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from app import dashboard, jobs, uploads
from interp import figures
from interp.errors import UserError
from interp.runs.registry import UnitResult
from interp.runs.runner import run_detector
from interp.runs.store import Store
from tests.tiny import loaded, tiny_llama, tiny_tokenizer

APP = Path(__file__).resolve().parents[2] / "app"

PARAMS = {"seq_len": 8, "n_prompts": 4, "batch_size": 2}
WARNING = "only 4 prompts: scores are noisy"


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    path = tmp_path_factory.mktemp("app-ws")
    hf = tiny_llama()
    with Store(path) as s:
        a = run_detector(loaded(copy.deepcopy(hf)), "induction", PARAMS, s, progress=False).run_id
        b = run_detector(loaded(copy.deepcopy(hf)), "induction", {**PARAMS, "seed": 1}, s, progress=False).run_id
        # A run of a detector this installation does not know, with every other table kind and
        # warnings as the runner stores them: the pages must render it generically.
        run = s.start_run(model="toy", model_hash=None, detector="toy-trace", variant="v", params={},
                          dataset_hash=None, seed=None, code_version=None, provenance={"source": "object"})
        tl = pd.DataFrame(
            [("restored", 0, t, f"tok{t}", layer, float(t * 10 + layer)) for t in range(4) for layer in range(3)],
            columns=["kind", "item", "token_index", "token", "layer", "value"],
        )
        curves = pd.DataFrame({"curve": ["by_bucket"] * 3, "x": [0.0, 1.0, 2.0], "y": [0.1, 0.5, 0.2]})
        metrics = pd.DataFrame({"name": ["memory_rate"], "value": [0.25], "ci_low": [None], "ci_high": [None], "n": [4]})
        # Its settings as the runner writes them: the output it declared, routing it to the
        # Causal tracing page although no installed detector declares it.
        run.commit_unit("settings", UnitResult({"artifacts": pd.DataFrame(
            {"name": ["settings"], "json": [json.dumps({"output": "token_layer", "n_units": 0})]})}), 0.0)
        run.commit_unit("final", UnitResult({"token_layer": tl, "curves": curves, "metrics": metrics}), 0.0)
        run.commit_unit("warnings", UnitResult({"artifacts": pd.DataFrame(
            {"name": ["warnings"], "json": [json.dumps([WARNING])]})}), 0.0)
        run.finish("done")
        toy = run.id
    folder = tmp_path_factory.mktemp("tiny-model")
    hf.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return {"path": path, "a": a, "b": b, "toy": toy, "hf": hf, "folder": folder}


@pytest.fixture
def env(ws: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.setenv("INTERP_WORKSPACE", str(ws["path"]))
    return ws


def _app(page: str, **query: Any) -> Any:
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(APP / page), default_timeout=120)
    for k, v in query.items():
        at.query_params[k] = str(v)
    return at.run()


def _ok(at: Any) -> None:
    assert not at.exception, [e.value for e in at.exception]


def _decode(value: Any) -> Any:
    """Plotly serialises numpy arrays as {"dtype", "bdata" (base64), "shape"}: back to lists."""
    if isinstance(value, dict) and "bdata" in value:
        arr = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
        if "shape" in value:
            arr = arr.reshape([int(n) for n in str(value["shape"]).split(",")])
        return arr.tolist()
    if isinstance(value, dict):
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def _charts(at: Any) -> list[dict[str, Any]]:
    return [_decode(json.loads(el.proto.spec)) for el in at.get("plotly_chart")]


def _stored(ws: dict[str, Any], run_id: int, metric: str) -> dict[tuple[int, int], float]:
    with Store(ws["path"]) as s:
        rows = s.run(run_id).results("head_scores")
    out = {}
    for unit, m, layer, head, value in zip(
        rows["unit"], rows["metric"], rows["layer"], rows["head"], rows["value"], strict=True
    ):
        if unit == "final" and m == metric:
            out[(int(layer), int(head))] = float(value)
    return out


def test_home_lists_runs_and_warnings(env: dict[str, Any]) -> None:
    at = _app("Home.py", run=env["toy"])
    _ok(at)
    frames = [el.value for el in at.dataframe]
    runs = next(f for f in frames if "detector" in f.columns and "status" in f.columns)
    assert set(runs["id"]) == {env["a"], env["b"], env["toy"]}
    assert set(runs["status"]) == {"done"}
    assert any(WARNING in w.value for w in at.warning)


def test_head_map_is_the_stored_table(env: dict[str, Any]) -> None:
    at = _app("pages/1_Head_maps.py", run=env["a"])
    _ok(at)
    assert not at.error
    [spec] = _charts(at)
    heat = spec["data"][0]
    stored = _stored(env, env["a"], "induction")
    for i, layer in enumerate(heat["y"]):
        for j, head in enumerate(heat["x"]):
            assert heat["z"][i][j] == pytest.approx(stored[(layer, head)])
    assert len(stored) == len(heat["y"]) * len(heat["x"]) == 3 * 4
    # Outlined heads: exactly those at or above the stored threshold.
    marked = {(y, x) for t in spec["data"][1:] for x, y in zip(t["x"], t["y"], strict=True)}
    assert marked == {k for k, v in stored.items() if v >= 0.4}
    # Another metric through the radio.
    at.radio(key=f"hm-{env['a']}-metric").set_value("previous_token").run()
    _ok(at)
    heat = _charts(at)[0]["data"][0]
    prev = _stored(env, env["a"], "previous_token")
    assert heat["z"][1][2] == pytest.approx(prev[(heat["y"][1], heat["x"][2])])


def test_attention_pattern_on_demand_matches_hf(env: dict[str, Any]) -> None:
    at = _app("pages/1_Head_maps.py", run=env["a"])
    rid = env["a"]
    at.selectbox(key=f"hd-layer-{rid}").set_value(1)
    at.selectbox(key=f"hd-head-{rid}").set_value(3)
    at.text_input(key=f"hd-model-{rid}").input(str(env["folder"]))
    at.text_input(key=f"hd-text-{rid}").input("w5 w6 w7 w8 w5 w6 w7")
    at.toggle(key=f"hd-go-{rid}").set_value(True)
    at.run()
    _ok(at)
    assert not at.error, [e.value for e in at.error]
    pattern = next(c for c in _charts(at) if "attention" in c["layout"]["title"]["text"])
    z = np.array(pattern["data"][0]["z"])
    ids = [0, *tiny_tokenizer()(["w5 w6 w7 w8 w5 w6 w7"], add_special_tokens=False)["input_ids"][0]]
    with torch.no_grad():
        ref = env["hf"](torch.tensor([ids]), output_attentions=True).attentions[1][0, 3].numpy()
    np.testing.assert_allclose(z, ref, atol=1e-5)


def test_head_detail_gathers_the_head_from_other_runs(env: dict[str, Any]) -> None:
    at = _app("pages/1_Head_maps.py", run=env["a"])
    rid = env["a"]
    at.selectbox(key=f"hd-layer-{rid}").set_value(1)
    at.selectbox(key=f"hd-head-{rid}").set_value(2)
    at.run()
    _ok(at)
    assert any(f"#{env['b']} induction" in m.value for m in at.markdown)
    b = _stored(env, env["b"], "induction")
    shown = [df.value for df in at.dataframe if {"metric", "value"} <= set(df.value.columns)]
    values = {float(v) for frame in shown for m, v in zip(frame["metric"], frame["value"], strict=True)
              if m == "induction"}
    assert b[(1, 2)] in values


def test_retrieval_examples_are_the_heads_best_samples(tmp_path: Path) -> None:
    with Store(tmp_path) as s:
        run = s.start_run(model="toy", model_hash=None, detector="retrieval", variant="fast", params={},
                          dataset_hash=None, seed=None, code_version=None, provenance={"source": "object"})
        for i, score in enumerate([0.2, 0.9, 0.5, 0.7]):
            hs = pd.DataFrame({"metric": ["retrieval_sample"] * 2, "layer": [1, 1], "head": [2, 3],
                               "value": [score, 1.0 - score]})
            doc = {"needle": {"question": f"q{i}", "answer": f"a{i}", "sentence": "s"}, "response": f"r{i}",
                   "correct": i % 2 == 0, "context_tokens": 100 + i, "actual_depth": 0.5}
            run.commit_unit(f"s{i}", UnitResult({"head_scores": hs, "artifacts": pd.DataFrame(
                {"name": ["sample"], "json": [json.dumps(doc)]})}), 0.0)
        run.finish("done")
        row = s.runs().iloc[0].to_dict()
        ex = dashboard.retrieval_examples(s, row, 1, 2, n=2)
    assert list(ex["score"]) == [0.9, 0.7]
    assert list(ex["question"]) == ["q1", "q3"]
    assert list(ex["response"]) == ["r1", "r3"]


def test_unknown_model_in_head_detail_is_an_error_not_a_traceback(env: dict[str, Any]) -> None:
    at = _app("pages/1_Head_maps.py", run=env["a"])
    rid = env["a"]
    at.text_input(key=f"hd-model-{rid}").input("/no/such/model/folder")
    at.toggle(key=f"hd-go-{rid}").set_value(True)
    at.run()
    _ok(at)
    assert any("no such folder" in e.value for e in at.error)


def test_generic_tables_on_the_tracing_page(env: dict[str, Any]) -> None:
    at = _app("pages/2_Causal_tracing.py", run=env["toy"])
    _ok(at)
    assert any(WARNING in w.value for w in at.warning)
    charts = _charts(at)
    heat = next(c for c in charts if c["data"][0]["type"] == "heatmap")["data"][0]
    # token t, layer l was stored as 10 t + l.
    for i in range(4):
        for j, layer in enumerate(heat["x"]):
            assert heat["z"][i][j] == pytest.approx(10 * i + layer)
    assert heat["y"][2] == "tok2 [2]"
    line = next(c for c in charts if c["data"][0]["type"] == "scatter")["data"][0]
    assert line["y"] == pytest.approx([0.1, 0.5, 0.2])


def test_stored_trace_shows_one_fact_with_its_subject_marked(
    env: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INTERP_WORKSPACE", str(tmp_path))
    params = {"prompt": "w5 w9 w17 w23 w40 w41", "subject": "w17 w23", "answer": "w8", "samples": 2,
              "kinds": "state", "window": 2}
    with Store(tmp_path) as s:
        rid = run_detector(loaded(copy.deepcopy(env["hf"])), "causal-trace", params, s, progress=False).run_id
        rows = s.run(rid).results("token_layer")
    at = _app("pages/2_Causal_tracing.py", run=rid)
    _ok(at)
    charts = _charts(at)
    fact = next(c for c in charts if any("*" in str(y) for y in c["data"][0]["y"]))["data"][0]
    # BOS, w5, w9 then the subject w17 w23 at token indices 3 and 4.
    assert [y for y in fact["y"] if y.startswith("*")] == ["*w17 [3]", "*w23 [4]"]
    stored = rows[(rows["unit"] == "fact") & (rows["kind"] == "state")]
    for t, label in enumerate(fact["y"]):
        assert label.endswith(f"[{t}]")
        for j, layer in enumerate(fact["x"]):
            want = stored.loc[(stored["token_index"] == t) & (stored["layer"] == layer), "value"].to_numpy()
            assert fact["z"][t][j] == pytest.approx(float(want[0]))


def test_live_trace_subject_not_in_prompt(env: dict[str, Any]) -> None:
    at = _app("pages/2_Causal_tracing.py")
    if not any(t.key == "ct-prompt" for t in at.text_input):
        pytest.skip("circuits.methods.tracing is not installed")
    at.text_input(key="ct-prompt").input("The Louvre is in")
    at.text_input(key="ct-subject").input("Eiffel Tower")
    at.button[-1].click().run()
    _ok(at)
    assert any("is not in the prompt" in e.value for e in at.error)


def test_live_trace_is_a_stored_runs_trace_of_the_same_fact(
    env: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The live form traces through the causal-trace detector's public trace_prompt with the
    stored runs' noise: its map is the stored single-fact run's (same prompt and settings)."""
    monkeypatch.setenv("INTERP_WORKSPACE", str(tmp_path))
    params = {"prompt": "w5 w9 w17 w23 w40 w41", "subject": "w17 w23", "answer": "w8", "samples": 2,
              "kinds": "state", "window": 2}
    with Store(tmp_path) as s:
        rid = run_detector(loaded(copy.deepcopy(env["hf"])), "causal-trace", params, s, progress=False).run_id
        rows = s.run(rid).results("token_layer")
    at = _app("pages/2_Causal_tracing.py")
    for key in ("model", "prompt", "subject", "answer"):
        at.text_input(key=f"ct-{key}").input(str(env["folder"]) if key == "model" else params[key])
    next(n for n in at.number_input if n.label.startswith("samples")).set_value(2)
    next(n for n in at.number_input if n.label.startswith("window")).set_value(2)
    next(m for m in at.multiselect if m.label == "kinds").set_value(["state"])
    next(b for b in at.button if b.label == "trace").click().run()
    _ok(at)
    assert not at.error, [e.value for e in at.error]
    [live] = [c["data"][0] for c in _charts(at) if c["layout"]["title"]["text"].startswith("single restored state")]
    stored = pd.DataFrame(rows[(rows["unit"] == "fact") & (rows["kind"] == "state")])
    assert np.shape(live["z"]) == (stored["token_index"].nunique(), stored["layer"].nunique())
    for t, layer, value in zip(stored["token_index"], stored["layer"], stored["value"], strict=True):
        assert live["z"][t][layer] == pytest.approx(float(value), abs=1e-6)


def test_compare_difference_is_b_minus_a(env: dict[str, Any]) -> None:
    at = _app("pages/4_Compare.py", a=env["a"], b=env["b"])
    _ok(at)
    diff = next(c for c in _charts(at) if c["layout"]["title"]["text"] == "difference (B - A)")["data"][0]
    a, b = _stored(env, env["a"], "induction"), _stored(env, env["b"], "induction")
    for i, layer in enumerate(diff["y"]):
        for j, head in enumerate(diff["x"]):
            assert diff["z"][i][j] == pytest.approx(b[(layer, head)] - a[(layer, head)])


def test_conflicts_page_shows_rates(env: dict[str, Any]) -> None:
    at = _app("pages/3_Conflicts.py")
    _ok(at)


def _hf_greedy(hf: Any, text: str, n: int, zero: tuple[tuple[int, int], ...] = ()) -> str:
    """Plain HF argmax decoding from BOS + text, with heads zeroed at o_proj's input by hand."""
    tok = tiny_tokenizer()
    d = hf.config.hidden_size // hf.config.num_attention_heads

    def hook(cols: slice) -> Any:
        def pre(_m: Any, args: Any) -> Any:
            z = args[0].clone()
            z[..., cols] = 0.0
            return (z, *args[1:])

        return pre

    handles = [hf.model.layers[la].self_attn.o_proj.register_forward_pre_hook(hook(slice(h * d, (h + 1) * d)))
               for la, h in zero]
    ids = [0, *tok([text], add_special_tokens=False)["input_ids"][0]]
    new: list[int] = []
    try:
        for _ in range(n):
            with torch.no_grad():
                nxt = int(hf(torch.tensor([ids + new])).logits[0, -1].argmax())
            if nxt == 1:
                break
            new.append(nxt)
    finally:
        for h in handles:
            h.remove()
    return text + str(tok.decode(new))


def test_ph3_live_compare_matches_hf(env: dict[str, Any]) -> None:
    at = _app("pages/3_Conflicts.py")
    at.text_input(key="ph3-model").input(str(env["folder"]))
    at.text_input(key="ph3-heads").input("1.2,0.1")
    at.text_input(key="ph3-prompt").input("w5 w6 w7")
    at.number_input(key="ph3-tokens").set_value(5)
    next(b for b in at.button if b.label == "compare").click()
    at.run()
    _ok(at)
    assert not at.error, [e.value for e in at.error]
    codes = [c.value for c in at.code]
    hf = copy.deepcopy(env["hf"])
    assert codes[:2] == [_hf_greedy(hf, "w5 w6 w7", 5), _hf_greedy(hf, "w5 w6 w7", 5, ((1, 2), (0, 1)))]


def test_decore_live_greedy_side_and_bad_head(env: dict[str, Any]) -> None:
    at = _app("pages/3_Conflicts.py")
    at.text_input(key="dc-model").input(str(env["folder"]))
    at.text_input(key="dc-heads").input("1.0")
    at.text_area(key="dc-prompt").input("w5 w6 w7 w5")
    at.number_input(key="dc-tokens").set_value(4)
    next(b for b in at.button if b.label == "decode").click()
    at.run()
    _ok(at)
    assert not at.error, [e.value for e in at.error]
    codes = [c.value for c in at.code]
    assert codes[0] == _hf_greedy(copy.deepcopy(env["hf"]), "w5 w6 w7 w5", 4)
    assert len(codes) == 2
    at.text_input(key="dc-heads").input("9.0")
    next(b for b in at.button if b.label == "decode").click()
    at.run()
    _ok(at)
    assert any("out of range" in e.value or "layer" in e.value for e in at.error)


def test_bad_model_folder_in_the_form(env: dict[str, Any], tmp_path: Path) -> None:
    at = _app("Home.py")
    at.selectbox(key="start-model").set_value("local folder...").run()
    at.text_input(key="start-folder").input(str(tmp_path / "missing")).run()
    at.selectbox(key="start-detector").set_value("induction").run()
    at.button[-1].click().run()  # the form's submit button is the last button
    _ok(at)
    assert any("no such folder" in e.value for e in at.error)
    (tmp_path / "file.txt").write_text("x")
    at.text_input(key="start-folder").input(str(tmp_path / "file.txt")).run()
    at.button[-1].click().run()
    _ok(at)
    assert any("is a file" in e.value for e in at.error)
    assert not list((env["path"] / "jobs").glob("*.json")) if (env["path"] / "jobs").exists() else True


@pytest.mark.subprocess
def test_form_starts_the_cli_command(env: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Path, list[str], str, list[str]]] = []

    def fake_launch(workspace: Path, argv: list[str], label: str, detectors: list[str]) -> tuple[None, bool]:
        calls.append((Path(workspace), list(argv), label, list(detectors)))
        return None, True

    monkeypatch.setattr(jobs, "launch", fake_launch)
    at = _app("Home.py")
    at.selectbox(key="start-detector").set_value("induction").run()
    # Form widgets: their values travel with the submit.
    at.number_input(key="param-induction-seq_len").set_value(12)
    at.number_input(key="param-induction-n_prompts").set_value(3)
    at.button[-1].click().run()
    _ok(at)
    assert not at.error, [e.value for e in at.error]
    [(workspace, argv, label, detectors)] = calls
    assert detectors == ["induction"]
    assert workspace == env["path"].resolve()
    assert argv[:4] == ["run", "induction", "--model", "smollm2-135m"]
    opts = dict(zip(argv[4::2], argv[5::2], strict=True))
    assert opts == {"--prefix": "auto", "--device": "auto", "--dtype": "float32", "--seq-len": "12",
                    "--n-prompts": "3", "--batch-size": "5", "--seed": "0", "--level": "0.95"}
    assert label == "induction on smollm2-135m"
    assert any("started: induction" in s.value for s in at.success)

    # Device, dtype and Dask workers travel as the CLI's options.
    at.selectbox(key="start-dtype").set_value("bfloat16")
    at.number_input(key="start-workers").set_value(2).run()
    at.button[-1].click().run()
    _ok(at)
    opts = dict(zip(calls[-1][1][4::2], calls[-1][1][5::2], strict=True))
    assert (opts["--dtype"], opts["--workers"]) == ("bfloat16", "2")
    # A device this machine lacks is an error on the page; nothing is started.
    if not torch.cuda.is_available():
        at.selectbox(key="start-device").set_value("cuda").run()
        at.button[-1].click().run()
        assert len(calls) == 2
        assert any("CUDA is not available" in e.value for e in at.error), [e.value for e in at.error]


# -- jobs ---------------------------------------------------------------------------------------


def _wait(ws: Path, job_id: str, timeout: float = 300) -> jobs.Job:
    deadline = time.monotonic() + timeout
    while True:
        job = jobs.get_job(ws, job_id)
        assert job is not None
        if not job.active:
            return job
        assert time.monotonic() < deadline, "job did not finish"
        time.sleep(0.2)


@pytest.mark.subprocess
def test_job_runs_detached_once_and_reports_errors(tmp_path: Path) -> None:
    Store(tmp_path).close()  # `interp runs` reads an existing store only
    ok, started = jobs.launch(tmp_path, ["runs", "--json"], "list runs")
    again, started_again = jobs.launch(tmp_path, ["runs", "--json"], "list runs")
    assert started
    if again.id == ok.id:
        assert not started_again  # still running: not started twice
    done = _wait(tmp_path, ok.id)
    assert done.status == "done"
    assert done.returncode == 0
    assert '"runs": []' in done.log.read_text()
    bad, _ = jobs.launch(tmp_path, ["run", "no-such-detector"], "bad")
    failed = _wait(tmp_path, bad.id)
    assert failed.status == "failed"
    assert failed.error is not None
    assert failed.error.startswith("error: unknown detector 'no-such-detector'")
    # A reload reads the same jobs back from disk.
    assert {j.id for j in jobs.list_jobs(tmp_path)} >= {ok.id, bad.id}


def test_error_line() -> None:
    # A job's progress is read from the store (tests/unit/test_dashboard_runs.py), its error here.
    assert jobs.error_line("a\nerror: bad model 'x'\n") == "error: bad model 'x'"


# -- uploads ------------------------------------------------------------------------------------


def test_uploads_are_parsed_as_data_only(tmp_path: Path) -> None:
    import pickle

    good = b'{"subject": "Paris", "prompt": "Paris is the capital of", "answer": "France"}\n'
    path = uploads.save_upload(tmp_path, "facts.jsonl", good, ("subject", "prompt", "answer"))
    assert path.read_bytes() == good
    assert path.parent == tmp_path / "uploads"
    with pytest.raises(UserError, match="not UTF-8"):
        uploads.parse_records("x.jsonl", pickle.dumps({"a": 1}))
    with pytest.raises(UserError, match="unsupported file type"):
        uploads.parse_records("x.pkl", b"anything")
    with pytest.raises(UserError, match="over the"):
        uploads.parse_records("x.csv", b"a\n" + b"1\n" * 100, max_bytes=50)
    with pytest.raises(UserError, match="line 2 is not JSON"):
        uploads.parse_records("x.jsonl", b'{"a": 1}\nnot json\n')
    with pytest.raises(UserError, match="nested"):
        uploads.parse_records("x.json", b'[{"a": {"b": 1}}]')
    with pytest.raises(UserError, match="no 'answer'"):
        uploads.save_upload(tmp_path, "f.csv", b"subject,prompt\nParis,Paris is\n", ("subject", "prompt", "answer"))
    with pytest.raises(UserError, match="not in the prompt"):
        uploads.save_upload(tmp_path, "f.csv", b"subject,prompt,answer\nRome,Paris is,France\n",
                            ("subject", "prompt", "answer"))
    assert [p.name for p in (tmp_path / "uploads").iterdir()] == [path.name]


# -- figures ------------------------------------------------------------------------------------


def test_depth_difference_by_hand() -> None:
    # A: 2 layers (depths 0, 1); B: 3 layers (depths 0, 0.5, 1); one head each; 2 bins.
    a = pd.DataFrame({"layer": [0, 1], "head": [0, 0], "value": [0.2, 0.6]})
    b = pd.DataFrame({"layer": [0, 1, 2], "head": [0, 0, 0], "value": [0.1, 0.9, 0.3]})
    da, db = figures.depth_normalised(a, 2), figures.depth_normalised(b, 3)
    assert list(db["depth"]) == [0.0, 0.5, 1.0]
    diff = figures.depth_difference(da, db, bins=2)
    # Bin [0, .5): A 0.2, B 0.1. Bin [.5, 1]: A 0.6, B max(0.9, 0.3) = 0.9, mean 0.6.
    assert list(diff["max_diff"]) == pytest.approx([-0.1, 0.3])
    assert list(diff["mean_diff"]) == pytest.approx([-0.1, 0.0])
    with pytest.raises(UserError, match="same layers x heads"):
        figures.difference_heatmap(a, b)


def test_head_heatmap_needs_one_metric() -> None:
    frame = pd.DataFrame({"metric": ["m1", "m2"], "layer": [0, 0], "head": [0, 0], "value": [1.0, 2.0]})
    with pytest.raises(UserError, match="choose one metric"):
        figures.head_heatmap(frame)
    fig = figures.head_heatmap(frame, "m2", threshold=1.5)
    assert fig.data[0].z[0][0] == 2.0  # type: ignore[index]


def test_curve_axes_are_the_detectors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stored retrieval run's accuracy-vs-depth curve is plotted with the axis names its
    detector declares (not x and y), as one line."""
    from circuits.detectors.retrieval import RetrievalDetector

    monkeypatch.setenv("INTERP_WORKSPACE", str(tmp_path))
    with Store(tmp_path) as s:
        run = s.start_run(model="toy", model_hash=None, detector="retrieval", variant="fast", params={},
                          dataset_hash=None, seed=None, code_version=None, provenance={"source": "object"})
        hs = pd.DataFrame({"metric": ["retrieval"] * 2, "layer": [0, 1], "head": [0, 0], "value": [0.2, 0.4]})
        curves = pd.DataFrame({"curve": ["unmasked: accuracy vs depth"] * 2, "layer": [-1, -1], "head": [-1, -1],
                               "x": [0.0, 1.0], "y": [1.0, 0.5]})
        run.commit_unit("final", UnitResult({"head_scores": hs, "curves": curves}), 0.0)
        run.finish("done")
        rid = run.id
    at = _app("pages/1_Head_maps.py", run=rid)
    _ok(at)
    line = next(c for c in _charts(at) if c["layout"]["title"]["text"] == "unmasked: accuracy vs depth")
    want = RetrievalDetector.curve_axes["*: accuracy vs depth"]
    assert (line["layout"]["xaxis"]["title"]["text"], line["layout"]["yaxis"]["title"]["text"]) == want
    assert "depth" in want[0]
    assert "accuracy" in want[1]
    [trace] = line["data"]
    assert trace["y"] == pytest.approx([1.0, 0.5])
