"""Detectors and interventions of the papers, one module each.

Importing this package registers them with :mod:`interp.registry` (the ``interp.plugins``
entry point in pyproject.toml names it, so the core never imports it by name).
"""

from circuits import (
    atlas,
    causal_trace,
    conflict_heads,
    decore,
    decore_eval,
    episodic,
    induction,
    ph3,
    retrieval,
)

__all__ = ["atlas", "causal_trace", "conflict_heads", "decore", "decore_eval", "episodic", "induction", "ph3", "retrieval"]
