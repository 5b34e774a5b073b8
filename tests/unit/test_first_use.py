"""What a new user trips over (issue 18): a mistyped workspace, library noise, the scan's last word."""

from __future__ import annotations

import copy
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from interp.errors import StoreError
from interp.model.loaded import LoadedModel
from interp.runs.store import Store
from tests.tiny import loaded

pytestmark = pytest.mark.subprocess

REPO = Path(__file__).resolve().parents[2]
INTERP = [sys.executable, "-m", "interp.cli"]


def _cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k != "INTERP_WORKSPACE"}
    full_env["PYTHONPATH"] = str(REPO)
    return subprocess.run([*INTERP, *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd or REPO, env={**full_env, **(env or {})})


def _one_run(store: Store) -> None:
    store.start_run(model="m", model_hash=None, detector="d", variant="v", params={}, dataset_hash=None,
                    seed=0, code_version=None, provenance={}).finish("done")


# -- 1. read-only commands refuse a missing store and create nothing ------------------------------


def test_open_existing_store_refuses_a_missing_one_and_creates_nothing(tmp_path: Path) -> None:
    ws = tmp_path / "typo"
    with pytest.raises(StoreError, match="no results store at"):
        Store(ws, create=False)
    assert not ws.exists()
    # An existing folder without a results.db is no store either.
    ws.mkdir()
    with pytest.raises(StoreError, match="no results store at"):
        Store(ws, create=False)
    assert list(ws.iterdir()) == []
    # Once a writer made it, readers open it and see what it holds.
    with Store(ws) as s:
        _one_run(s)
    with Store(ws, create=False) as s:
        assert len(s.runs()) == 1


@pytest.mark.parametrize(
    "args",
    [
        ["runs", "--json"],
        ["export", "--out", "exported"],
        ["export", "1", "--format", "parquet", "--out", "exported"],
        ["app", "--port", "8599"],
    ],
)
def test_read_only_commands_refuse_a_mistyped_workspace(args: list[str], tmp_path: Path) -> None:
    proc = _cli(*args, "--workspace", "typo", cwd=tmp_path)
    assert proc.returncode != 0
    assert proc.stdout == ""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: no results store at ")
    assert str(tmp_path / "typo") in lines[0]
    assert "interp scan" in lines[0]
    assert list(tmp_path.iterdir()) == [], "a read-only command created files"


def test_default_workspace_without_a_store_then_with_one(tmp_path: Path) -> None:
    proc = _cli("runs", cwd=tmp_path)
    assert proc.returncode != 0
    assert proc.stderr.strip().startswith(f"error: no results store at {tmp_path / '.interp'}")
    assert not (tmp_path / ".interp").exists()
    # Once a writer made the store, the same commands read it.
    with Store(tmp_path / ".interp") as s:
        _one_run(s)
    proc = _cli("runs", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert '"detector": "d"' in proc.stdout
    proc = _cli("export", "--out", "exported", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "exported" / "runs.csv").is_file()


# -- 2. library noise -----------------------------------------------------------------------------


def test_zoo_name_that_is_a_transformerlens_alias_is_quiet(
    tiny_llama_hf: torch.nn.Module, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    model: LoadedModel = loaded(copy.deepcopy(tiny_llama_hf))
    model.provenance.model_id = "qwen2.5-0.5b"  # a TransformerLens alias of another model
    caplog.set_level(logging.WARNING)
    ids = torch.tensor([[0, 5, 6, 7, 8]])
    logits = model.run(ids).logits
    assert logits.shape[:2] == (1, 5)
    captured = capfd.readouterr()
    noise = captured.out + captured.err + caplog.text
    assert "DEPRECATED" not in noise
    assert "alias" not in noise
    # The bridge is not relabelled as TransformerLens's official model of that alias.
    assert "Qwen/" not in str(model.backend.bridge.cfg.model_name)  # type: ignore[attr-defined]


def test_verbose_flag_is_accepted() -> None:
    proc = _cli("--verbose", "detectors", "--json")
    assert proc.returncode == 0, proc.stderr
    assert '"detectors"' in proc.stdout


NOISY = """
import logging, sys, warnings
from interp import cli

@cli.app.command("noisy")
def noisy() -> None:
    logging.warning("DEPRECATED: a library on the root logger")
    logging.getLogger("nnsight").warning("a library on its own logger")
    warnings.warn("a library warning", UserWarning, stacklevel=1)
    cli.err.print("our own message")

cli.main(sys.argv[1:])
"""


def test_library_warnings_and_logging_only_with_verbose() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    quiet = subprocess.run([sys.executable, "-c", NOISY, "noisy"], capture_output=True, text=True, env=env, timeout=300)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == "our own message\n"
    loud = subprocess.run([sys.executable, "-c", NOISY, "--verbose", "noisy"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert loud.returncode == 0, loud.stderr
    for line in ("DEPRECATED: a library on the root logger", "a library on its own logger", "a library warning",
                 "our own message"):
        assert line in loud.stderr


# -- 3. the scan's last word ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["runs", "--bogus"], "No such option: --bogus"),
        (["run", "induction", "--top", "abc"], "Invalid value for '--top'"),
        (["scan", "--detectors"], "requires an argument"),
    ],
)
def test_bad_options_are_one_line_errors(args: list[str], says: str, tmp_path: Path) -> None:
    """typer vendors its own click: its usage errors are caught like ours (exit 2, one line)."""
    proc = _cli(*args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), lines
    assert says in lines[0], lines
