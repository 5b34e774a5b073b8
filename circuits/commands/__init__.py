"""Extra CLI commands (``interp decore``, ``interp prune``), registered with
:func:`interp.runs.registry.command` when imported. They may import ``interp``, the detectors and
the methods."""

from circuits.commands import decore, prune

__all__ = ["decore", "prune"]
