"""``interp app`` on a workspace without a store: the default workspace and ``--new`` serve the
dashboard (its Home page opens on the run form) and create nothing; a mistyped ``--workspace``
is refused in one line, as every reader refuses it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from app.launch import served_workspace
from interp.errors import UserError
from interp.runs.store import DB_NAME, Store

REPO = Path(__file__).resolve().parents[2]
INTERP = [sys.executable, "-m", "interp.cli"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "INTERP_WORKSPACE"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serves(args: list[str], cwd: Path) -> str:
    """Start ``interp app <args>``, wait until its server answers, stop it; its output."""
    port = _free_port()
    log = cwd / "app.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([*INTERP, "app", *args, "--port", str(port)], stdout=fh, stderr=subprocess.STDOUT,
                                cwd=cwd, env=_env())
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"interp app exited: {log.read_text()}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"interp app did not come up: {log.read_text()}"
            time.sleep(0.3)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    text = log.read_text()
    log.unlink()
    return text


def test_served_workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INTERP_WORKSPACE", raising=False)
    monkeypatch.chdir(tmp_path)
    # The default workspace may have no store yet; nothing is created.
    assert served_workspace(None, new=False) == tmp_path / ".interp"
    monkeypatch.setenv("INTERP_WORKSPACE", str(tmp_path / "env-ws"))
    assert served_workspace(None, new=False) == tmp_path / "env-ws"
    # An explicit one must hold a store, unless --new.
    with pytest.raises(UserError, match="no results store at"):
        served_workspace(Path("typo"), new=False)
    assert served_workspace(Path("fresh"), new=True) == tmp_path / "fresh"
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        served_workspace(Path("a-file"), new=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
    # A workspace with a store is served with or without --new.
    Store(tmp_path / "made").close()
    assert served_workspace(Path("made"), new=False) == served_workspace(Path("made"), new=True) == tmp_path / "made"


@pytest.mark.subprocess
@pytest.mark.parametrize("args", [[], ["--new", "--workspace", "fresh"]], ids=["default", "new"])
def test_app_serves_a_workspace_without_a_store_and_creates_nothing(args: list[str], tmp_path: Path) -> None:
    out = _serves(args, tmp_path)
    ws = tmp_path / (".interp" if not args else "fresh")
    assert f"(workspace {ws}, no results yet: start the first run on the page)" in out, out
    assert "error" not in out.lower(), out
    assert not ws.exists()
    assert not (ws / DB_NAME).exists()


@pytest.mark.subprocess
def test_app_refuses_a_mistyped_workspace_in_one_line(tmp_path: Path) -> None:
    proc = subprocess.run([*INTERP, "app", "--workspace", "typo", "--port", "8599"], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, env=_env())
    assert proc.returncode != 0
    assert proc.stdout == ""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines == [f"error: no results store at {tmp_path / 'typo'} (run `interp scan` or `interp run` to create one)"]
    assert list(tmp_path.iterdir()) == []
