"""``interp app``: serve the dashboard (registered as a command through the ``interp.plugins``
entry point, so the core CLI does not know where the dashboard lives)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from interp.console import err
from interp.errors import UserError
from interp.options import WorkspaceOpt
from interp.runs.registry import command
from interp.runs.store import Store

HOME = Path(__file__).resolve().parent / "Home.py"


@command("app")
def dashboard(
    workspace: WorkspaceOpt = None,
    port: Annotated[int, typer.Option("--port", help="port to serve on")] = 8501,
    host: Annotated[
        str, typer.Option("--host", help="address to bind (default: this machine only)")
    ] = "127.0.0.1",
) -> None:
    """Start the dashboard (Streamlit, headless) on a workspace; open the printed address."""
    if not 1 <= port <= 65535:
        raise UserError(f"--port must be in 1..65535, got {port}")
    # Fails here, in one line, on a workspace with no store (nothing to show: run a scan first)
    # or a results.db that is not a workbench store; read-only, so either is left as it was.
    store = Store(workspace, read_only=True)
    ws = store.workspace.resolve()
    store.close()
    cmd = [
        sys.executable, "-m", "streamlit", "run", str(HOME),
        "--server.headless", "true",
        "--server.address", host,
        "--server.port", str(port),
        "--server.fileWatcherType", "none",
        # Uploads are dataset files; the app validates them again (size, schema).
        "--server.maxUploadSize", "5",
        "--browser.gatherUsageStats", "false",
        "--client.toolbarMode", "viewer",
    ]
    err.print(f"dashboard on http://{host}:{port} (workspace {ws})")
    sys.stderr.flush()
    sys.stdout.flush()
    # exec, not a child: signals (Ctrl-C, a test's terminate) reach the server itself.
    os.execve(sys.executable, cmd, {**os.environ, "INTERP_WORKSPACE": str(ws)})
