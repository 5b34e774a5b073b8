"""What "equal" means when a test compares two computations of the same numbers (issue 27).

Where the order of summation varies in this code:
- torch threads: a matrix product or a reduction split over N threads sums its partial results
  in another order than over M threads. A Dask worker of a local cluster has cpu_count // N
  threads, the driver cpu_count (``DaskExecutor``); a process's default is its core count.
- batching: a unit split into parts (``Detector.split_unit``) runs its rows in other forward
  passes than the whole unit, with other padding and other matrix shapes.
- unit order and the store: none. Units are committed in the order they finish, but the runner
  hands ``finalize`` their rows in the detector's unit order (``runner.unit_rows``); the store
  keeps float32 results as float64, which is exact, and every ``finalize`` sums in float64.

So two runs are **exact** (``Layout.SAME``) when every unit was computed with the same torch
thread count and the same batching, whatever process computed it: a resumed run against a fresh
one, a cluster against a serial run at the workers' thread count. The tests pin the thread
count for that. Otherwise (``Layout.REORDERED``: another thread count, another batching, or
another decomposition of the same forward pass, such as the patching engine's against plain HF)
they agree to :data:`REORDERED_RTOL` and :data:`REORDERED_ATOL`. float32 rounds each operation
to 2**-24 (6e-8) relative, and a forward pass through a few dozen layers compounds reordered
sums; a probability, the softmax of logits of magnitude ~20, turns their absolute differences
into relative ones. Measured on smollm2-135m: 1.1e-7 relative on attention and logits between 1
and 16 torch threads; 1.2e-6 on p(" Rome") for the prompt in a batch of 11 against alone; 1.2e-5
on the same probability computed by the causal trace (the engine's clean row) against plain HF.
The bound is 8 times the largest of these, and 10 times below the smallest difference a test
tells apart between two methods (bfloat16 against float32: above 1e-3).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping

import pandas as pd

REORDERED_RTOL = 1e-4
REORDERED_ATOL = 1e-6


class Layout(enum.Enum):
    """How the two computations were laid out over threads and batches."""

    SAME = "same"  # same thread count and batching: bit for bit
    REORDERED = "reordered"  # another thread count or batching: float32 rounding apart


def assert_frames_equal(got: pd.DataFrame, want: pd.DataFrame, layout: Layout, obj: str = "table") -> None:
    """Two tables of results equal as ``layout`` allows (columns, dtypes and row order exact)."""
    if layout is Layout.SAME:
        pd.testing.assert_frame_equal(got, want, check_exact=True, obj=obj)
    else:
        pd.testing.assert_frame_equal(got, want, check_exact=False, rtol=REORDERED_RTOL, atol=REORDERED_ATOL,
                                      obj=obj)


def assert_values_equal(got: Mapping[object, float], want: Mapping[object, float], layout: Layout,
                        what: str = "value") -> None:
    """Two mappings of numbers (scores by head, metrics by name) equal as ``layout`` allows."""
    assert got.keys() == want.keys(), f"{what}: keys differ"
    for key, w in want.items():
        g = got[key]
        if layout is Layout.SAME:
            assert g == w or (math.isnan(g) and math.isnan(w)), f"{what} {key}: {g!r} != {w!r}"
        else:
            assert math.isclose(g, w, rel_tol=REORDERED_RTOL, abs_tol=REORDERED_ATOL), f"{what} {key}: {g!r} vs {w!r}"
