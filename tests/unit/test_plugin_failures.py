"""Plug-ins that misbehave (issue 27): one that raises at import, one that registers a detector
name the workbench has, one whose module does not exist, installed the way a package installs
them (a dist-info folder with ``interp.plugins`` entry points, first on the path, beside a
plug-in that works). Each is named by its entry point in one line, the rest keeps working:
``interp runs``, the workbench's own ``induction``, the good plug-in's detector. Each command runs
in a fresh process, as a user's would, so the order of installed packages is the real one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from interp.runs.store import Store

pytestmark = pytest.mark.subprocess

REPO = Path(__file__).resolve().parents[2]
ENTRY_POINTS = {
    "raises": "tests.plugins.raises_at_import",
    "duplicate": "tests.plugins.duplicate_name",
    "missing": "tests.plugins.no_such_module",
    "sink": "tests.plugins.attention_sink",
}
WHY = {
    "raises": "RuntimeError: this plug-in has a bug at import",
    "duplicate": "RuntimeError: detector 'induction' registered twice",
    "missing": "ModuleNotFoundError: No module named 'tests.plugins.no_such_module'",
}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    site = tmp_path_factory.mktemp("site")
    dist = site / "broken_example-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-example\nVersion: 0.1\n")
    lines = "".join(f"{name} = {module}\n" for name, module in ENTRY_POINTS.items())
    (dist / "entry_points.txt").write_text(f"[interp.plugins]\n{lines}")
    return site


def _cli(site: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{REPO}"}
    return subprocess.run([sys.executable, "-m", "interp.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300, check=False)


def _warnings(stderr: str) -> dict[str, str]:
    """The plug-in warning lines, by entry point name."""
    found: dict[str, str] = {}
    for line in stderr.splitlines():
        if line.startswith("warning: plug-in "):
            name = line.removeprefix("warning: plug-in '").split(" = ")[0]
            found[name] = line
    return found


def test_each_broken_plugin_is_named_once_and_runs_still_lists(site: Path, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    with Store(ws) as s:
        s.start_run(model="m", model_hash=None, detector="d", variant="v", params={}, dataset_hash=None,
                    seed=0, code_version=None, provenance={}).finish("done")
    proc = _cli(site, "runs", "--json", "-w", str(ws))
    assert proc.returncode == 0, proc.stderr
    assert [r["detector"] for r in json.loads(proc.stdout)["runs"]] == ["d"]
    found = _warnings(proc.stderr)
    assert set(found) == set(WHY), proc.stderr
    for name, why in WHY.items():
        assert f"'{name} = {ENTRY_POINTS[name]}' (from broken-example 0.1) was not loaded: {why}" in found[name]
    assert len(proc.stderr.splitlines()) == len(WHY), proc.stderr


def test_the_other_detectors_keep_working(site: Path, tiny_folder: Path, tmp_path: Path) -> None:
    proc = _cli(site, "detectors", "--json")
    assert proc.returncode == 0, proc.stderr
    listed = {d["name"]: d for d in json.loads(proc.stdout)["detectors"]}
    assert "attention-sink" in listed  # the plug-in that works, from the same package
    assert "half-registered" not in listed  # what the failing plug-in registered before its error
    assert listed["induction"]["output"] == "head_scores"  # the workbench's own, not the duplicate
    run = _cli(site, "run", "induction", "--seq-len", "8", "--n-prompts", "2", "--batch-size", "2",
               "-m", str(tiny_folder), "-w", str(tmp_path / "ws"), "--json")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["variant"] == "second-copy-only"
    # A detector only a broken plug-in has: unknown, and the error says which plug-in failed.
    gone = _cli(site, "run", "half-registered", "-m", str(tiny_folder), "-w", str(tmp_path / "ws2"))
    assert gone.returncode != 0
    last = gone.stderr.strip().splitlines()[-1]
    assert last.startswith("error: unknown detector 'half-registered'"), gone.stderr
    assert "plug-in 'raises = tests.plugins.raises_at_import'" in last
    assert "Traceback" not in gone.stderr
    assert not (tmp_path / "ws2").exists()
