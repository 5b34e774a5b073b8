"""The quick patching benchmark runs end to end and its engine agrees with TransformerLens's
per-index patching on the bridge. Timings are printed, never asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.integration
def test_quick_heads_benchmark() -> None:
    if os.environ.get("INTERP_SKIP_INTEGRATION"):
        pytest.skip("INTERP_SKIP_INTEGRATION is set")
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.patching_heads", "--quick", "--rounds", "1", "--threads", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=900, check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("engine_s", "baseline_s", "ratio", "plain_forward_s", "plain_fraction", "max_abs_diff", "n_cases"):
        assert key in result
    assert result["n_cases"] == 18
    assert result["max_abs_diff"] < 1e-5
    assert result["engine_stats"]["prefix_reuse"]
