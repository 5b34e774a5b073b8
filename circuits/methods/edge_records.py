"""The stored shape of a graph's edges: the ``edges`` artifact of the path-patching and circuit
detectors, and the ``edges`` list of their ``--json`` output (docs/path_patching.md, "Stored shape").

Each edge is one object with exactly these keys:

- ``sender`` (str): ``embed``, a head ``L.H`` or ``mlp:L``;
- ``receiver`` (str): ``q:L.H``, ``k:L.G``, ``v:L.G``, ``kq:L.H``, ``vq:L.H``, ``mlp:L`` or ``logits``;
- ``score`` (float or null): the exact path-patching effect, mean over prompts of
  m(edge patched) - m(clean); null where the edge was not patched exactly (a circuit's
  unconfirmed edges);
- ``attribution`` (float or null): its EAP / EAP-IG score, null where none was computed;
- ``in_circuit`` (bool): whether the run's circuit keeps it (always false for path-patching,
  which builds no circuit).
"""

from __future__ import annotations

import math
from typing import Any

EDGE_KEYS: tuple[str, ...] = ("sender", "receiver", "score", "attribution", "in_circuit")


def _number(x: float | None) -> float | None:
    """A finite float, or None (JSON has no NaN)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def edge_record(sender: str, receiver: str, score: float | None, attribution: float | None,
                in_circuit: bool) -> dict[str, Any]:
    """One edge as stored (module docstring)."""
    return {"sender": str(sender), "receiver": str(receiver), "score": _number(score),
            "attribution": _number(attribution), "in_circuit": bool(in_circuit)}


__all__ = ["EDGE_KEYS", "edge_record"]
