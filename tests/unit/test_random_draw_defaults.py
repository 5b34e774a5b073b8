"""Random controls are distributions by default (issue 26): every detector that compares a top
head set with random head sets draws at least 20 of them unless told otherwise, and takes 1 to
MAX_DRAWS (tests/unit/test_param_validation.py sends 0 and MAX_DRAWS + 1 through the CLI)."""

from __future__ import annotations

import pytest

from interp.errors import UserError
from interp.runs.config import MAX_DRAWS
from interp.runs.registry import all_detectors

# detector: its parameter that counts the random draws
DRAWS = {"ph3": "n_random", "retrieval-masking": "n_random", "episodic-ablation": "n_draws", "circuit": "draws",
         "decore-eval": "n_random"}


@pytest.mark.parametrize("detector", sorted(DRAWS))
def test_at_least_twenty_draws_by_default(detector: str) -> None:
    det = all_detectors()[detector]
    p = {x.name: x for x in det.params}[DRAWS[detector]]
    assert p.default >= 20
    assert (p.low, p.high) == (1, MAX_DRAWS)
    assert getattr(det.parse_params({}), DRAWS[detector]) == p.default


@pytest.mark.parametrize("detector", sorted(DRAWS))
@pytest.mark.parametrize("bad", [0, MAX_DRAWS + 1])
def test_bad_draw_counts_are_one_line_errors(detector: str, bad: int) -> None:
    det = all_detectors()[detector]
    with pytest.raises(UserError, match=DRAWS[detector]) as err:
        det.parse_params({DRAWS[detector]: str(bad)})
    assert "\n" not in str(err.value)
