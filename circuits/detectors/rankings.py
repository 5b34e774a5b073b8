"""How each head detector's stored run ranks its heads, for ``interp heads`` and :func:`interp.heads`.

Each declaration names the metric of the run's stored ``head_scores`` that orders the detector's
summary (its ``heads``, best first) and, for the knowledge-conflict detectors, the two roles
(Jin et al. 2024, sec. 3): memory heads push the memory answer (memory score = -path_delta > 0),
context heads the context answer (path_delta > 0). Induction and retrieval runs follow the
convention (the metric named like the detector) and are declared anyway, so that a renamed
metric breaks a test instead of a ranking.
"""

from __future__ import annotations

from interp.runs.heads import HeadRanking, declare_ranking

ROLES = {"memory": 1, "context": -1}

# Pooled over formats, -path_delta on the validation split (the summary's order).
declare_ranking("conflict-heads", HeadRanking("pooled.memory_score", roles=ROLES))
# PH3 carries the validation ranking it prunes from: memory heads have path_delta < 0.
declare_ranking("ph3", HeadRanking("validation.path_delta", sign=-1, roles=ROLES))
declare_ranking("induction", HeadRanking("induction"))
declare_ranking("retrieval", HeadRanking("retrieval"))
# The copying score (the summary's ``score``) ranks; prefix matching is a second column.
declare_ranking("copying", HeadRanking("copying"))
# The smaller the distance to the CMR fit, the more CMR-like (the summary's score is -distance).
declare_ranking("cmr", HeadRanking("cmr_distance", sign=-1))
declare_ranking("lag-crp", HeadRanking("crp_plus1"))
# The retrieval ranking these interventions masked from (absent when heads were given by hand).
declare_ranking("retrieval-masking", HeadRanking("ranking_retrieval", unit="ranking"))
declare_ranking("decore-eval", HeadRanking("ranking_retrieval", unit="ranking"))

__all__ = ["ROLES"]
