"""The two consoles every command writes to: ``out`` (results, stdout) and ``err`` (logs and
progress, stderr), and :func:`fail_line`, the one-line form of an error. Commands outside the
core CLI (the atlas, the dashboard's launcher) use these, not ``interp.cli``."""

from __future__ import annotations

import sys

from rich.console import Console

err = Console(stderr=True)
out = Console()


def fail_line(prefix: str, message: str) -> None:
    """One line on stderr, never wrapped: scripts grep it."""
    sys.stderr.write(f"{prefix}: {' '.join(str(message).split())}\n")
    sys.stderr.flush()
