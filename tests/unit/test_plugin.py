"""A detector added by one file outside ``circuits/`` (tests/plugins/attention_sink.py) and an
entry point: it registers, is listed, runs, stores, resumes, and shows in the dashboard's head
map, with no other file naming it. Its scores are checked against plain HF attentions."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

import interp
from interp.runs import registry
from interp.runs.store import Store
from tests.tiny import run_cli

MODULE = "tests.plugins.attention_sink"
APP = Path(__file__).resolve().parents[2] / "app"


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Installed the way a package installs it: a distribution whose ``interp.plugins`` entry
    point names the module (a dist-info folder on sys.path), nothing else."""
    assert "attention-sink" not in registry.all_detectors()  # not known before it is installed
    site = tmp_path / "site"
    dist = site / "sink_example-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: sink-example\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[interp.plugins]\nsink = {MODULE}\n")
    monkeypatch.syspath_prepend(str(site))
    yield
    registry._REGISTRY.pop("attention-sink", None)  # pyright: ignore[reportPrivateUsage]
    sys.modules.pop(MODULE, None)


def test_a_plugin_detector_registers_runs_stores_resumes_and_shows(
    plugin: None, tiny_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    code, out, err = run_cli(capsys, ["detectors", "--json"])
    assert code == 0, err
    [listed] = [d for d in json.loads(out)["detectors"] if d["name"] == "attention-sink"]
    assert [p["name"] for p in listed["params"]] == ["seq_len", "n_prompts", "seed"]

    ws = tmp_path / "ws"
    args = ["run", "attention-sink", "--seq-len", "12", "--n-prompts", "3", "-m", str(tiny_folder), "-w", str(ws)]
    # Interrupted at the third prompt: two units are committed.
    cls = registry.all_detectors()["attention-sink"]
    real = cls.run_unit

    def interrupted(self: Any, model: Any, cfg: Any, unit: Any) -> Any:
        if unit.key == "prompt-2":
            raise KeyboardInterrupt
        return real(self, model, cfg, unit)

    monkeypatch.setattr(cls, "run_unit", interrupted)
    code, _, err = run_cli(capsys, args)
    assert code == 130, err
    monkeypatch.setattr(cls, "run_unit", real)
    code, out, err = run_cli(capsys, [*args, "--json"])
    assert code == 0, err
    result = json.loads(out)
    assert (result["units_resumed"], result["units_computed"]) == (2, 1)
    assert result["variant"] == "first-token-mass"

    # The stored scores are the mean attention to position 0, by plain HF (eager attention).
    hf = AutoModelForCausalLM.from_pretrained(tiny_folder, attn_implementation="eager").eval()
    det = cls()
    model = interp.load_model(str(tiny_folder))
    cfg = det.parse_params({"seq_len": 12, "n_prompts": 3})
    with torch.no_grad():
        attn = [torch.stack(hf(det.prompt(model, cfg, i), output_attentions=True).attentions) for i in range(3)]
    expected = torch.stack([a[:, 0, :, 1:, 0].mean(-1) for a in attn]).mean(0)  # [layer, head]
    with Store(ws, create=False) as s:
        [run_id] = s.runs()["id"].tolist()
        final = s.run(int(run_id)).to_frame("head_scores", "final")
    assert len(final) == expected.numel()
    for layer, head, value in zip(final["layer"], final["head"], final["value"], strict=True):
        assert value == pytest.approx(float(expected[layer, head]), abs=1e-5)

    # The dashboard's head map lists the run and draws the stored table.
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("INTERP_WORKSPACE", str(ws))
    at = AppTest.from_file(str(APP / "pages/1_Head_maps.py"), default_timeout=120)
    at.query_params["run"] = str(run_id)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    heat = json.loads(at.get("plotly_chart")[0].proto.spec)["data"][0]
    assert len(heat["y"]) * len(heat["x"]) == expected.numel()
