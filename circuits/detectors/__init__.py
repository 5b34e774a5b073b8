"""The detectors, one module per paper or method; importing this package registers them all.

They may import ``interp`` and ``circuits.methods`` / ``circuits.data``; a detector module may
build on another's scoring (copying reads the induction scores), never on a command or the atlas.
"""

from circuits.detectors import (
    causal_trace,
    circuit,
    cmr,
    conflict_heads,
    copying,
    decore_eval,
    episodic_ablation,
    induction,
    knockout,
    lag_crp,
    path_patching,
    ph3,
    rankings,
    retrieval,
    retrieval_masking,
)

__all__ = [
    "causal_trace",
    "circuit",
    "cmr",
    "conflict_heads",
    "copying",
    "decore_eval",
    "episodic_ablation",
    "induction",
    "knockout",
    "lag_crp",
    "path_patching",
    "ph3",
    "rankings",
    "retrieval",
    "retrieval_masking",
]
