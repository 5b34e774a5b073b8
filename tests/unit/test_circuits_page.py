"""The Circuits page and a head's edges on Head maps, on a store holding a hand-written edge run
(the ``edges`` artifact as the path-patching and circuit detectors store it) beside an
induction run, both on a tiny grouped-query Llama saved as a folder (4 query heads, 2 kv heads:
its config gives the layout's kv grouping).

Positions, widths, colours, styles, the circuit filter, a head's edges and the export are
checked against values worked out by hand from the edges written here; the pages with
Streamlit's AppTest, against the same hand-written list.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from app import circuits_view as cv
from app.routing import Route, run_url
from interp.errors import UserError
from interp.model.layout import ModelInfo
from interp.runs import tables
from interp.runs.registry import UnitResult
from interp.runs.runner import run_detector
from interp.runs.store import Store
from tests.tiny import save_folder, tiny_llama

APP = Path(__file__).resolve().parents[2] / "app"

# 3 layers, 4 query heads, 2 kv heads (group size 2).
EDGES: list[dict[str, Any]] = [
    {"sender": "embed", "receiver": "q:1.0", "score": 0.5, "attribution": 0.4, "in_circuit": True},
    {"sender": "0.1", "receiver": "k:1.1", "score": -2.0, "attribution": -1.5, "in_circuit": True},
    {"sender": "0.3", "receiver": "v:2.0", "score": 1.0, "attribution": None, "in_circuit": False},
    {"sender": "1.2", "receiver": "logits", "score": 4.0, "attribution": 3.0, "in_circuit": True},
    {"sender": "mlp:0", "receiver": "mlp:1", "score": -0.25, "attribution": 0.1, "in_circuit": False},
    {"sender": "1.3", "receiver": "kq:2.3", "score": None, "attribution": 0.2, "in_circuit": False},
    {"sender": "0.0", "receiver": "mlp:0", "score": 0.75, "attribution": -0.3, "in_circuit": True},
]
NAMES = [f"{e['sender']}->{e['receiver']}" for e in EDGES]
SCORED = [n for n, e in zip(NAMES, EDGES, strict=True) if e["score"] is not None]
CIRCUIT = [n for n, e in zip(NAMES, EDGES, strict=True) if e["score"] is not None and e["in_circuit"]]
SHAPE = cv.Shape(n_layers=3, n_heads=4, group_size=2)
# As the detectors store edges since they have intervals: the score's lo, hi, n, method (null
# bounds from one pair, every key null without a score).
WITH_CI: list[dict[str, Any]] = [
    {"sender": "0.1", "receiver": "k:1.1", "score": -2.0, "lo": -2.5, "hi": -1.25, "n": 8, "method": "paired-t",
     "attribution": -1.5, "in_circuit": True},
    {"sender": "1.2", "receiver": "logits", "score": 4.0, "lo": None, "hi": None, "n": 1, "method": "paired-t",
     "attribution": 3.0, "in_circuit": True},
    {"sender": "1.3", "receiver": "kq:2.3", "score": None, "lo": None, "hi": None, "n": None, "method": None,
     "attribution": 0.2, "in_circuit": False},
]


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    import interp

    folder = save_folder(tiny_llama(), tmp_path_factory.mktemp("tiny-gqa"))
    path = tmp_path_factory.mktemp("circuits-ws")
    model = interp.load_model(str(folder))
    with Store(path) as s:
        heads = run_detector(model, "induction", {"seq_len": 4, "n_prompts": 2, "batch_size": 1}, s,
                             progress=False).run_id
        row = s.runs().set_index("id").loc[heads]
        edges = _edge_run(s, str(row["model"]), json.loads(row["provenance_json"]), EDGES)
        bad = _edge_run(s, str(row["model"]), json.loads(row["provenance_json"]),
                        [{**EDGES[0], "receiver": "q:0.1", "sender": "1.0"}])
        ci = _edge_run(s, str(row["model"]), json.loads(row["provenance_json"]), WITH_CI)
    return {"path": path, "heads": heads, "edges": edges, "bad": bad, "ci": ci, "model": str(row["model"])}


def _edge_run(s: Store, model: str, provenance: dict[str, Any], doc: list[dict[str, Any]]) -> int:
    """An edge run as the runner stores one: settings (output "edges"), then the final unit."""
    run = s.start_run(model=model, model_hash=None, detector="path-patching", variant="path-patching.direct",
                      params={"mode": "direct"}, dataset_hash=None, seed=None, code_version=None,
                      provenance=provenance)
    run.commit_unit("settings", UnitResult({"artifacts": tables.artifact(
        "settings", {"output": "edges", "n_units": 1})}), 0.0)
    metrics = tables.metrics({"clean": -0.5, "corrupt": -3.0})
    run.commit_unit("final", UnitResult({"artifacts": tables.artifact("edges", doc), "metrics": metrics}), 0.0)
    run.finish("done")
    return run.id


@pytest.fixture
def env(ws: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.setenv("INTERP_WORKSPACE", str(ws["path"]))
    return ws


def _app(page: str, **query: Any) -> Any:
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(APP / page), default_timeout=120)
    for k, v in query.items():
        at.query_params[k] = str(v)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _edges() -> list[cv.StoredEdge]:
    return cv.parse_edges(EDGES)


def _traces(fig: Any) -> list[Any]:
    return list(fig.data)


def _by_id(nodes: list[cv.Node]) -> dict[str, tuple[str, float, float]]:
    return {n.id: (n.kind, n.x, n.y) for n in nodes}


# -- shaping, by hand ---------------------------------------------------------------------------


def test_nodes_sit_where_layer_head_and_kv_group_put_them() -> None:
    nodes = _by_id(cv.nodes_of(_edges(), SHAPE))
    assert nodes == {
        "embed": ("embed", -1.0, 1.5),  # left, at mid height of heads 0..3
        "0.0": ("head", 0.0, 0.0), "0.1": ("head", 0.0, 1.0), "0.3": ("head", 0.0, 3.0),
        "1.0": ("head", 1.0, 0.0), "1.2": ("head", 1.0, 2.0), "1.3": ("head", 1.0, 3.0),
        "2.3": ("head", 2.0, 3.0),  # kq:2.3 is query head 3's own view: its head
        "kv:1.1": ("kv", 0.7, 2.5),  # kv head 1 serves query heads 2 and 3
        "kv:2.0": ("kv", 1.7, 0.5),  # kv head 0 serves query heads 0 and 1
        "mlp:0": ("mlp", 0.45, -1.5), "mlp:1": ("mlp", 1.45, -1.5),
        "logits": ("logits", 3.0, 1.5),
    }
    # Without the model's config: the shape the edges allow, each kv head at its own index.
    inferred = cv.shape_of(_edges())
    assert inferred == cv.Shape(3, 4, 1)
    assert _by_id(cv.nodes_of(_edges(), inferred))["kv:1.1"] == ("kv", 0.7, 1.0)
    info = ModelInfo("LlamaForCausalLM", 3, 4, 2, 16, 64, 128, 256, 128)
    assert cv.shape_of(_edges(), info) == SHAPE


def test_widths_are_proportional_to_score_colours_its_sign_styles_the_receiver() -> None:
    fig = cv.graph_figure(cv.drawn_edges(_edges(), show_all=True), SHAPE)
    lines = {t.name.removeprefix("edge "): t for t in _traces(fig) if str(t.name).startswith("edge ")}
    assert sorted(lines) == sorted(SCORED)  # the edge without a score is not drawn by score
    want_dash = {"q": "solid", "k": "dash", "v": "dot", "mlp": "dashdot", "logits": "solid"}
    for e in EDGES:
        name = f"{e['sender']}->{e['receiver']}"
        if e["score"] is None:
            continue
        line = lines[name].line
        assert line.width == pytest.approx(8.0 * abs(e["score"]) / 4.0), name  # 4.0: the largest |score|
        assert line.color == ("#b2182b" if e["score"] < 0 else "#2166ac"), name
        assert line.dash == want_dash[str(e["receiver"]).split(":")[0]], name
        [edge] = cv.parse_edges([e])
        sender, receiver = cv.sender_node(edge.sender, SHAPE), cv.receiver_node(edge.receiver, SHAPE)
        assert (list(lines[name].x), list(lines[name].y)) == ([sender.x, receiver.x], [sender.y, receiver.y])
    # Hover: each edge's middle names sender, receiver, score and attribution.
    mids = next(t for t in _traces(fig) if t.name == "edges")
    hover = dict(zip([f"{a}->{b}" for a, b in mids.customdata], mids.text, strict=True))
    assert "0.1 → k:1.1" in hover["0.1->k:1.1"]
    assert "score -2<br>attribution -1.5" in hover["0.1->k:1.1"]
    assert "attribution —" in hover["0.3->v:2.0"]
    # By attribution: its own scale (3.0), the edge without one left out.
    by_attr = cv.graph_figure(cv.drawn_edges(_edges(), show_all=True, by="attribution"), SHAPE, by="attribution")
    widths = {t.name.removeprefix("edge "): t.line.width for t in _traces(by_attr) if str(t.name).startswith("edge ")}
    assert widths == pytest.approx({n: 8.0 * abs(e["attribution"]) / 3.0 for n, e in zip(NAMES, EDGES, strict=True)
                                    if e["attribution"] is not None})


def test_the_circuit_filter_and_emphasis() -> None:
    assert sorted(e.name for e in cv.drawn_edges(_edges(), show_all=False)) == sorted(CIRCUIT)
    assert sorted(e.name for e in cv.drawn_edges(_edges(), show_all=True)) == sorted(SCORED)
    strongest = [e.name for e in cv.drawn_edges(_edges(), show_all=True, limit=2)]
    assert strongest == ["1.2->logits", "0.1->k:1.1"]  # |4| then |-2|
    fig = cv.graph_figure(cv.drawn_edges(_edges(), show_all=True), SHAPE)
    opacity = {t.name.removeprefix("edge "): t.opacity for t in _traces(fig) if str(t.name).startswith("edge ")}
    assert {n for n, o in opacity.items() if o == 1.0} == set(CIRCUIT)
    assert {n for n, o in opacity.items() if o < 1.0} == set(SCORED) - set(CIRCUIT)
    # No edge in a circuit (a plain path-patching run): every edge drawn, none faded.
    plain = cv.parse_edges([{**e, "in_circuit": False} for e in EDGES])
    assert len(cv.drawn_edges(plain, show_all=False)) == len(SCORED)


def test_a_heads_strongest_edges_follow_its_kv_group() -> None:
    incoming, outgoing = cv.head_edges(_edges(), 1, 2, SHAPE)
    # Query head 2 of layer 1 reads kv head 1 (heads 2 and 3): 0.1 -> k:1.1 comes in.
    assert list(zip(incoming["sender"], incoming["receiver"], strict=True)) == [("0.1", "k:1.1")]
    assert list(zip(outgoing["sender"], outgoing["receiver"], strict=True)) == [("1.2", "logits")]
    assert list(incoming["score"]) == [-2.0]
    # Query head 1 of layer 1 is in kv group 0: the key edge of group 1 is not its.
    incoming, _ = cv.head_edges(_edges(), 1, 1, SHAPE)
    assert incoming.empty
    incoming, _ = cv.head_edges(_edges(), 1, 0, SHAPE)
    assert list(incoming["sender"]) == ["embed"]
    # kq:2.3 has no exact score: by attribution it comes in.
    assert cv.head_edges(_edges(), 2, 3, SHAPE)[0].empty
    assert list(cv.head_edges(_edges(), 2, 3, SHAPE, by="attribution")[0]["sender"]) == ["1.3"]


def test_a_click_names_the_heads_to_open() -> None:
    edges = _edges()
    assert cv.selected_heads([{"customdata": ["0.1", "k:1.1"]}], edges, SHAPE) == [
        ("sender 0.1", (0, 1)), ("receiver kv:1.1", (1, 2))]  # kv head 1's first query head
    assert cv.selected_heads([{"customdata": ["1.2"]}], edges, SHAPE) == [("node 1.2", (1, 2))]
    assert cv.selected_heads([{"customdata": ["embed"]}, {"x": 1}], edges, SHAPE) == []
    assert cv.selected_heads([{"customdata": ["1.2", "logits"]}], edges, SHAPE) == [("sender 1.2", (1, 2))]
    assert cv.graph_heads(edges, SHAPE) == [(0, 0), (0, 1), (0, 3), (1, 0), (1, 2), (1, 3), (2, 0), (2, 3)]


def test_the_export_is_the_documented_shape() -> None:
    doc = cv.export_graph(_edges(), SHAPE, run_id=7, model="m", detector="circuit", variant="v", mode="frozen")
    assert {k: doc[k] for k in ("run_id", "model", "detector", "variant", "mode")} == {
        "run_id": 7, "model": "m", "detector": "circuit", "variant": "v", "mode": "frozen"}
    assert doc["layout"] == {"n_layers": 3, "n_heads": 4, "group_size": 2}
    # Every stored edge, as stored, with the ids of its two nodes.
    assert [{k: e[k] for k in cv.EDGE_KEYS} for e in doc["edges"]] == EDGES
    ends = {(e["sender"], e["receiver"]): (e["from"], e["to"]) for e in doc["edges"]}
    assert ends[("0.1", "k:1.1")] == ("0.1", "kv:1.1")
    assert ends[("1.3", "kq:2.3")] == ("1.3", "2.3")
    nodes = {n["id"]: n for n in doc["nodes"]}
    assert set(nodes) == {i for pair in ends.values() for i in pair}
    assert nodes["kv:1.1"] == {"id": "kv:1.1", "kind": "kv", "layer": 1, "head": 1, "x": 0.7, "y": 2.5}
    assert nodes["logits"]["layer"] is None
    assert json.loads(json.dumps(doc)) == doc


def test_stored_intervals_reach_the_hover_the_table_and_the_export() -> None:
    edges = cv.parse_edges(WITH_CI)
    assert edges[0].interval == cv.ScoreInterval(-2.5, -1.25, 8, "paired-t")
    assert [e.record() for e in edges] == WITH_CI  # as stored, key order included
    assert [e.record() for e in _edges()] == EDGES  # a run without intervals: none invented
    assert "score -2 (95% CI -2.5 to -1.25 (n=8, paired-t))<br>" in cv.edge_hover(edges[0])
    assert "score 4 (no interval (n=1))<br>" in cv.edge_hover(edges[1])
    assert "score —<br>" in cv.edge_hover(edges[2])
    table = cv.edge_table(edges)
    assert list(table.columns) == ["sender", "receiver", "score", "lo", "hi", "n", "attribution", "in_circuit"]
    assert (table["lo"][0], table["hi"][0], table["n"][0]) == (-2.5, -1.25, 8)
    assert list(cv.edge_table(_edges()).columns) == list(cv.EDGE_KEYS)
    doc = cv.export_graph(edges, SHAPE, run_id=1, model="m", detector="circuit", variant="v", mode="direct")
    assert [{k: v for k, v in e.items() if k not in ("from", "to")} for e in doc["edges"]] == WITH_CI
    with pytest.raises(UserError, match="n is '8'"):
        cv.parse_edges([{**WITH_CI[0], "n": "8"}])
    with pytest.raises(UserError, match="lo is"):
        cv.parse_edges([{**WITH_CI[0], "lo": "low"}])


def test_malformed_edges_are_one_line_errors() -> None:
    with pytest.raises(UserError, match="unknown sender 'L1H2'"):
        cv.parse_edges([{**EDGES[0], "sender": "L1H2"}])
    with pytest.raises(UserError, match="reads at or before"):
        cv.parse_edges([{**EDGES[0], "sender": "2.0", "receiver": "k:1.0"}])
    with pytest.raises(UserError, match="lacks some of"):
        cv.parse_edges([{"sender": "embed", "receiver": "logits"}])
    with pytest.raises(UserError, match="in_circuit"):
        cv.parse_edges([{**EDGES[0], "in_circuit": "yes"}])
    with pytest.raises(UserError, match="not a number"):
        cv.parse_edges([{**EDGES[0], "score": "0.5"}])
    with pytest.raises(UserError, match="not a list"):
        cv.parse_edges({"edges": EDGES})
    assert cv.parse_edges([{**EDGES[0], "score": float("nan")}])[0].score is None


# -- the pages ----------------------------------------------------------------------------------


def _spec_edges(at: Any) -> set[str]:
    [chart] = at.get("plotly_chart")
    spec = json.loads(chart.proto.spec)
    return {str(t["name"]).removeprefix("edge ") for t in spec["data"] if str(t.get("name", "")).startswith("edge ")}


def _table_edges(at: Any) -> list[str]:
    [frame] = [d.value for d in at.dataframe if {"sender", "receiver", "in_circuit"} <= set(d.value.columns)]
    return [f"{s}->{r}" for s, r in zip(frame["sender"], frame["receiver"], strict=True)]


def test_the_circuits_page_draws_exactly_the_stored_edges(env: dict[str, Any]) -> None:
    at = _app("pages/6_Circuits.py", run=env["edges"])
    assert not at.error, [e.value for e in at.error]
    # Only edge runs are listed: not the induction run.
    [box] = [b for b in at.selectbox if b.key == "cc-run"]
    assert {int(str(o).split()[0][1:]) for o in box.options} == {env["edges"], env["bad"], env["ci"]}
    # The circuit's edges by default, strongest first; every scored edge with the toggle.
    assert _spec_edges(at) == set(CIRCUIT)
    assert _table_edges(at) == ["1.2->logits", "0.1->k:1.1", "0.0->mlp:0", "embed->q:1.0"]
    at.toggle(key=f"cc-all-{env['edges']}").set_value(True).run()
    assert _spec_edges(at) == set(SCORED)
    assert sorted(_table_edges(at)) == sorted(SCORED)
    # Width by attribution: the edges that have one.
    at.radio(key=f"cc-by-{env['edges']}").set_value("attribution").run()
    assert _spec_edges(at) == {n for n, e in zip(NAMES, EDGES, strict=True) if e["attribution"] is not None}
    # The model's config was read: kv head 1 of layer 1 sits at the middle of query heads 2 and 3.
    spec = json.loads(at.get("plotly_chart")[0].proto.spec)
    nodes = next(t for t in spec["data"] if t.get("name") == "nodes")
    assert dict(zip(nodes["text"], zip(nodes["x"], nodes["y"], strict=True), strict=True))["kv:1.1"] == (0.7, 2.5)
    assert any(b.label == "Download graph JSON" for b in at.get("download_button"))
    # The rest of the run: its metrics, not the edges artifact again.
    assert any({"name", "value"} <= set(d.value.columns) and "clean" in set(d.value["name"]) for d in at.dataframe)
    assert not any("artifact: edges" in str(e.proto.label) for e in at.get("expandable"))


def test_the_circuits_page_lists_each_scores_interval(env: dict[str, Any]) -> None:
    at = _app("pages/6_Circuits.py", run=env["ci"])
    assert not at.error, [e.value for e in at.error]
    [frame] = [d.value for d in at.dataframe if {"sender", "receiver", "in_circuit"} <= set(d.value.columns)]
    row = frame[frame["sender"] == "0.1"].iloc[0]
    assert (row["lo"], row["hi"], row["n"]) == (-2.5, -1.25, 8)
    assert any("95% interval over n prompt pairs" in m.value for m in at.markdown)


def test_a_head_of_the_graph_opens_in_head_maps(env: dict[str, Any]) -> None:
    at = _app("pages/6_Circuits.py", run=env["edges"])
    at.selectbox(key=f"cc-head-{env['edges']}").set_value((1, 2)).run()
    links = [m.value for m in at.markdown if "in Head maps" in m.value]
    assert links == [f"[open head (L1H2) in Head maps](./Head_maps?run={env['heads']}&layer=1&head=2)"]
    # Head maps at that link: the head picked, and its strongest edges from the edge run.
    hm = _app("pages/1_Head_maps.py", run=env["heads"], layer=1, head=2)
    assert hm.selectbox(key=f"hd-layer-{env['heads']}").value == 1
    assert hm.selectbox(key=f"hd-head-{env['heads']}").value == 2
    frames = [d.value for d in hm.dataframe if {"sender", "receiver", "score"} <= set(d.value.columns)]
    pairs = {tuple(zip(f["sender"], f["receiver"], strict=True)) for f in frames}
    assert pairs == {(("0.1", "k:1.1"),), (("1.2", "logits"),)}
    # A head the user then picks wins over the URL's.
    hm.selectbox(key=f"hd-head-{env['heads']}").set_value(3).run()
    assert hm.selectbox(key=f"hd-head-{env['heads']}").value == 3


def test_a_malformed_edge_run_is_an_error_on_the_page(env: dict[str, Any]) -> None:
    at = _app("pages/6_Circuits.py", run=env["bad"])
    assert any("reads at or before" in e.value for e in at.error), [e.value for e in at.error]
    assert not at.get("plotly_chart")
    # Head maps skips it (the Circuits page names what is wrong).
    _app("pages/1_Head_maps.py", run=env["heads"], layer=1, head=2)


def test_edge_runs_route_to_the_circuits_page(env: dict[str, Any]) -> None:
    assert run_url(Route("edges"), 7) == "./Circuits?run=7"
    [box] = [b for b in _app("pages/1_Head_maps.py").selectbox if b.key == "hm-run"]
    assert {int(str(o).split()[0][1:]) for o in box.options} == {env["heads"]}


def test_no_edge_runs_says_which_commands_fill_the_page(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INTERP_WORKSPACE", str(tmp_path))
    with Store(tmp_path) as s:
        run = s.start_run(model="toy", model_hash=None, detector="induction", variant="v", params={},
                          dataset_hash=None, seed=None, code_version=None, provenance={"source": "object"})
        run.commit_unit("final", UnitResult({"head_scores": tables.head_scores([("induction", 0, 0, 0.5)])}), 0.0)
        run.finish("done")
    at = _app("pages/6_Circuits.py")
    assert any("interp run path-patching" in i.value for i in at.info)
