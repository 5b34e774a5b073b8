"""Statistics for verdicts with error bars: intervals with their n (``interval``: the ``Interval``
record; ``binary``: Wilson; ``means``: t intervals and the paired t test; ``paired_binary``:
Newcombe's paired difference and McNemar's exact test; ``bootstrap``: BCa and paired bootstrap;
``choose``: the entry points that pick a method from the data), a top set against random draws
(``controls``), two sets' overlap against chance (``overlap``), the three verdicts (``verdicts``) and the checks of their input (``checks``).

Pure numpy and scipy: may import ``interp.errors`` only; never ``interp.model``,
``interp.patching``, ``interp.runs``, the front or a plug-in.
"""

from __future__ import annotations

from interp.stats.binary import wilson, wilson_counts
from interp.stats.bootstrap import bootstrap_interval, paired_bootstrap_interval
from interp.stats.choose import interval, paired_interval
from interp.stats.controls import Direction, RandomControl, against_random
from interp.stats.interval import Interval
from interp.stats.means import mean_interval, paired_p, paired_t_interval, t_interval
from interp.stats.overlap import OverlapVsChance, overlap_vs_chance
from interp.stats.paired_binary import mcnemar_exact_p, newcombe_paired, paired_table
from interp.stats.verdicts import Verdict, difference_verdict, verdict

__all__ = [
    "Direction",
    "Interval",
    "OverlapVsChance",
    "RandomControl",
    "Verdict",
    "against_random",
    "bootstrap_interval",
    "difference_verdict",
    "interval",
    "mcnemar_exact_p",
    "mean_interval",
    "newcombe_paired",
    "overlap_vs_chance",
    "paired_bootstrap_interval",
    "paired_interval",
    "paired_p",
    "paired_t_interval",
    "paired_table",
    "t_interval",
    "verdict",
    "wilson",
    "wilson_counts",
]
