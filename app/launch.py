"""``interp app``: serve the dashboard (registered as a command through the ``interp.plugins``
entry point, so the core CLI does not know where the dashboard lives).

A workspace with no results yet opens on the Home page's run form (the first run started there
creates the store): the default workspace, or any path given with ``--new``. An explicit
``--workspace`` without ``--new`` must hold a store, so a mistyped path is a one-line error.
"""

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
from interp.runs.store import DB_NAME, WORKSPACE_ENV, Store

HOME = Path(__file__).resolve().parent / "Home.py"


def served_workspace(workspace: Path | None, new: bool) -> Path:
    """The workspace to serve, resolved; nothing is created here.

    An explicit ``workspace`` must hold a store unless ``new`` (one line: no results store at
    ...). The default workspace (``$INTERP_WORKSPACE`` or ``./.interp``) or a ``new`` one may
    have none yet: the dashboard then opens on its run form."""
    if workspace is not None and not new:
        Store(workspace, read_only=True).close()
        return workspace.expanduser().resolve()
    path = (workspace or Path(os.environ.get(WORKSPACE_ENV) or ".interp")).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise UserError(f"workspace {path} is a file, not a folder")
    if (path / DB_NAME).is_file():
        Store(path, read_only=True).close()  # an unreadable store fails here, in one line
    return path


@command("app")
def dashboard(
    workspace: WorkspaceOpt = None,
    new: Annotated[
        bool, typer.Option("--new", help="a workspace with no results yet: open on the run form, whose first run "
                           "creates it (without --new, a --workspace must hold a store)")
    ] = False,
    port: Annotated[int, typer.Option("--port", help="port to serve on")] = 8501,
    host: Annotated[
        str, typer.Option("--host", help="address to bind (default: this machine only)")
    ] = "127.0.0.1",
) -> None:
    """Start the dashboard (Streamlit, headless) on a workspace; open the printed address."""
    if not 1 <= port <= 65535:
        raise UserError(f"--port must be in 1..65535, got {port}")
    ws = served_workspace(workspace, new)
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
    fresh = "" if (ws / DB_NAME).is_file() else ", no results yet: start the first run on the page"
    err.print(f"dashboard on http://{host}:{port} (workspace {ws}{fresh})", soft_wrap=True, markup=False)
    sys.stderr.flush()
    sys.stdout.flush()
    # exec, not a child: signals (Ctrl-C, a test's terminate) reach the server itself.
    os.execve(sys.executable, cmd, {**os.environ, "INTERP_WORKSPACE": str(ws)})
