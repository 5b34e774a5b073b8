"""The stored shape of a graph's edges: the ``edges`` artifact of the path-patching and circuit
detectors, and the ``edges`` list of their ``--json`` output (docs/path_patching.md, "Stored shape").

Each edge is one object with exactly these keys:

- ``sender`` (str): ``embed``, a head ``L.H`` or ``mlp:L``;
- ``receiver`` (str): ``q:L.H``, ``k:L.G``, ``v:L.G``, ``kq:L.H``, ``vq:L.H``, ``mlp:L`` or ``logits``;
- ``score`` (float or null): the exact path-patching effect, mean over prompts of
  m(edge patched) - m(clean); null where the edge was not patched exactly (a circuit's
  unconfirmed edges);
- ``lo``, ``hi`` (float or null): the score's 95 % interval over prompt pairs (null where there
  is no score, or one pair only); ``n`` (int or null): the pairs; ``method`` (str or null): how
  the interval was made (``paired-t``: Student's t on the per-pair differences m(patched) -
  m(clean), :mod:`interp.patching.intervals`);
- ``attribution`` (float or null): its EAP / EAP-IG score, null where none was computed;
- ``in_circuit`` (bool): whether the run's circuit keeps it (always false for path-patching,
  which builds no circuit).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from interp.stats import Interval

EDGE_KEYS: tuple[str, ...] = ("sender", "receiver", "score", "lo", "hi", "n", "method", "attribution", "in_circuit")
INTERVAL_KEYS: tuple[str, ...] = ("lo", "hi", "n", "method")


def _number(x: float | None) -> float | None:
    """A finite float, or None (JSON has no NaN)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def interval_fields(iv: Interval | None) -> dict[str, Any]:
    """``lo``, ``hi``, ``n``, ``method`` of a score's interval as JSON values (bounds None where
    the method has none, as from one pair; every field None without an interval)."""
    if iv is None:
        return dict.fromkeys(INTERVAL_KEYS)
    return {"lo": _number(iv.lo), "hi": _number(iv.hi), "n": int(iv.n), "method": iv.method}


def edge_record(sender: str, receiver: str, score: float | None, attribution: float | None,
                in_circuit: bool, interval: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One edge as stored (module docstring); ``interval``: the score's ``lo``, ``hi``, ``n``,
    ``method`` (as :func:`interval_fields` gives them; missing keys are null)."""
    iv = interval or {}
    n = iv.get("n")
    method = iv.get("method")
    return {"sender": str(sender), "receiver": str(receiver), "score": _number(score),
            "lo": _number(iv.get("lo")), "hi": _number(iv.get("hi")), "n": None if n is None else int(n),
            "method": None if method is None else str(method),
            "attribution": _number(attribution), "in_circuit": bool(in_circuit)}


__all__ = ["EDGE_KEYS", "INTERVAL_KEYS", "edge_record", "interval_fields"]
