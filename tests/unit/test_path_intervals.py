"""Intervals of path patching and circuits (tiny float64 Llama), against independent computations.

- the per-pair values an interval rests on equal plain-hook runs of each pair
  (tests/unit/path_reference.py, no engine code): m(patched) - m(clean) per edge, m(clean),
  m(corrupt) and a circuit run's m(C) per pair;
- each interval equals scipy's on those values: Student's t (``scipy.stats.t``) for the edge
  scores, m(clean), m(corrupt) and the gap; ``scipy.stats.bootstrap`` over pairs with a pair's
  three runs resampled together (BCa, 9,999 resamples, the run's seed) for the faithfulness;
- the mean of the per-pair values is the stored point score, and n is the number of pairs;
- the intervals reach the ``edges`` artifact, ``Summary.intervals`` and the final metrics table.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from scipy import stats

from circuits.methods.circuit_tasks import induction_pairs
from interp.patching import faithfulness_interval, parse_receiver, parse_sender
from interp.runs import tables
from interp.runs.runner import RunResult, run_detector
from interp.runs.store import Store
from tests.tiny import loaded, tiny_llama
from tests.unit.path_reference import PlainRef

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N_PAIRS, SEQ_LEN, SEED = 6, 6, 3
TOL = 1e-8


@pytest.fixture(scope="module")
def hf() -> torch.nn.Module:
    return tiny_llama().double()


@pytest.fixture(scope="module")
def reference(hf: torch.nn.Module) -> dict[str, Any]:
    """The task's pairs and the plain-hook clean and corrupt runs of them."""
    pairs = induction_pairs(loaded(copy.deepcopy(hf)), N_PAIRS, SEQ_LEN, SEED)
    ref = PlainRef(copy.deepcopy(hf), list(pairs.answers))
    return {"pairs": pairs, "ref": ref, "clean": ref.run(pairs.clean), "corrupt": ref.run(pairs.corrupt)}


def _tuple(name: str) -> tuple:
    s = parse_sender(name)
    return ("embed",) if s.kind == "embed" else (s.kind, s.layer) if s.kind == "mlp" else ("head", s.layer, s.head)


def _receiver(name: str) -> tuple:
    r = parse_receiver(name)
    if r.kind == "logits":
        return ("logits",)
    return ("mlp", r.layer) if r.kind == "mlp" else (r.kind, r.layer, r.head)


def _t(values: np.ndarray) -> tuple[float, float]:
    """scipy's 95 % Student t interval of the mean (mean..mean where every value is the same:
    scipy's scale 0 gives nan there)."""
    if np.ptp(values) == 0:
        return float(values[0]), float(values[0])
    lo, hi = stats.t.interval(0.95, len(values) - 1, loc=values.mean(), scale=stats.sem(values))
    return float(lo), float(hi)


def _run(hf: torch.nn.Module, name: str, params: dict[str, Any], ws: Path) -> tuple[RunResult, tuple[Any, Any]]:
    with Store(ws) as store:
        result = run_detector(loaded(copy.deepcopy(hf)), name, params, store, progress=False)
        run = store.run(result.run_id)
        return result, (run.results("artifacts"), run.results("metrics"))



def _final_metric(metrics: Any, name: str) -> dict[str, Any]:
    rows = metrics[(metrics["unit"] == "final") & (metrics["name"] == name)]
    assert len(rows) == 1, name
    return rows.iloc[0].to_dict()


def _check_gap_intervals(result: RunResult, metrics: Any, ref: dict[str, Any]) -> None:
    """clean_metric, corrupt_metric (t) and gap (paired t) against scipy on the plain-hook runs."""
    clean, corrupt = ref["clean"]["metric"].numpy(), ref["corrupt"]["metric"].numpy()
    for name, values in (("clean_metric", clean), ("corrupt_metric", corrupt), ("gap", clean - corrupt)):
        iv = result.summary.intervals[name]
        assert (iv.n, iv.method) == (N_PAIRS, "paired-t" if name == "gap" else "t")
        assert iv.value == pytest.approx(float(values.mean()), abs=TOL)
        assert result.summary.metrics[name] == pytest.approx(iv.value, abs=1e-12)
        assert (iv.lo, iv.hi) == pytest.approx(_t(values), abs=TOL)
        row = _final_metric(metrics, name)
        assert (row["ci_low"], row["ci_high"], row["n"]) == pytest.approx((iv.lo, iv.hi, N_PAIRS), abs=1e-12)


# ---------------------------------------------------------------------------------- path-patching


def test_path_patching_edge_intervals_are_paired_t_on_plain_hook_pairs(hf: torch.nn.Module, reference: dict[str, Any],
                                                                       tmp_path: Path) -> None:
    params = {"task": "induction", "n_prompts": N_PAIRS, "seq_len": SEQ_LEN, "seed": SEED,
              "receivers": "k:2.0,logits", "senders": "embed,0.1,1.2,mlp:0"}
    result, (arts, metrics) = _run(hf, "path-patching", params, tmp_path)
    edges = tables.read_artifact(arts, "edges")
    assert result.summary.edges == edges
    ref, pairs = reference["ref"], reference["pairs"]
    widths = []
    for e in edges:
        patched = ref.direct(pairs.clean, reference["clean"], reference["corrupt"], [_tuple(e["sender"])],
                             _receiver(e["receiver"]))
        deltas = (patched - reference["clean"]["metric"]).numpy()  # per pair: m(patched) - m(clean)
        assert e["score"] == pytest.approx(float(deltas.mean()), abs=TOL), e  # the mean is the point score
        assert (e["n"], e["method"]) == (N_PAIRS, "paired-t")
        assert (e["lo"], e["hi"]) == pytest.approx(_t(deltas), abs=TOL), e
        widths.append(e["hi"] - e["lo"])
    assert max(widths) > 1e-3  # the pairs differ: a wrong n or a mean over the wrong axis shows
    _check_gap_intervals(result, metrics, reference)
    best = max(edges, key=lambda e: abs(e["score"]))
    strongest = result.summary.intervals["strongest_score"]
    assert (strongest.value, strongest.lo, strongest.hi, strongest.n) == (best["score"], best["lo"], best["hi"],
                                                                          N_PAIRS)


def test_one_pair_has_no_edge_interval(hf: torch.nn.Module, tmp_path: Path) -> None:
    params = {"prompt": "w10 w11 w12 w13 w14 w15 w11 w12", "corrupt_prompt": "w10 w40 w41 w42 w14 w15 w11 w12",
              "answer": "w13", "receivers": "logits", "senders": "0.1,1.2"}
    result, _ = _run(hf, "path-patching", params, tmp_path)
    assert result.summary.edges
    assert all((e["lo"], e["hi"], e["n"], e["method"]) == (None, None, 1, "paired-t") for e in result.summary.edges)
    assert not result.summary.intervals["gap"].defined


# ---------------------------------------------------------------------------------- circuit

CIRCUIT = {"task": "induction", "n_prompts": N_PAIRS, "seq_len": SEQ_LEN, "seed": SEED, "metric": "logprob",
           "top_n": 12, "draws": 4, "confirm_units": 2, "stored_edges": 0}


def _faithfulness(x: np.ndarray, y: np.ndarray, z: np.ndarray, axis: int = -1) -> np.ndarray:
    """(m(C) - m(corrupt)) / (m(clean) - m(corrupt)) from the three per-pair arrays."""
    c, f, e = (np.mean(v, axis=axis) for v in (x, y, z))
    return (c - e) / (f - e)


def _scipy_faithfulness(circuit: np.ndarray, clean: np.ndarray, corrupt: np.ndarray, paired: bool) -> tuple[float, float]:
    res = stats.bootstrap((circuit, clean, corrupt), _faithfulness, paired=paired, n_resamples=9_999,
                          confidence_level=0.95, method="BCa", rng=np.random.default_rng(SEED))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def test_circuit_faithfulness_and_edge_intervals_equal_scipy_on_plain_hook_pairs(
        hf: torch.nn.Module, reference: dict[str, Any], tmp_path: Path) -> None:
    result, (arts, metrics) = _run(hf, "circuit", CIRCUIT, tmp_path)
    ref, pairs = reference["ref"], reference["pairs"]
    rec_clean, rec_corrupt = reference["clean"], reference["corrupt"]
    edges = tables.read_artifact(arts, "edges")

    # Confirmed edges: paired t on plain-hook per-pair differences; the others have no interval.
    confirmed = [e for e in edges if e["score"] is not None]
    assert len(confirmed) == 12
    assert all((e["lo"], e["hi"], e["n"], e["method"]) == (None,) * 4 for e in edges if e["score"] is None)
    for e in confirmed:
        patched = ref.direct(pairs.clean, rec_clean, rec_corrupt, [_tuple(e["sender"])], _receiver(e["receiver"]))
        deltas = (patched - rec_clean["metric"]).numpy()
        assert e["score"] == pytest.approx(float(deltas.mean()), abs=TOL)
        assert (e["n"], e["method"]) == (N_PAIRS, "paired-t")
        assert (e["lo"], e["hi"]) == pytest.approx(_t(deltas), abs=TOL)

    # The circuit run of each pair (plain hooks) is the stored per-pair m(C).
    kept = [e for e in edges if e["in_circuit"]]
    assert kept, "the circuit is empty: its faithfulness interval would be a degenerate one"
    circuit = ref.circuit(pairs.clean, rec_clean, rec_corrupt,
                          {(_tuple(e["sender"]), _receiver(e["receiver"])) for e in kept}).numpy()
    doc = tables.read_artifact(arts, "unit_circuit")
    assert doc["circuit"] == pytest.approx(list(circuit), abs=1e-7)
    clean, corrupt = rec_clean["metric"].numpy(), rec_corrupt["metric"].numpy()
    assert doc["clean"] == pytest.approx(list(clean), abs=TOL)

    iv = result.summary.intervals["faithfulness"]
    m = result.summary.metrics
    assert iv.value == pytest.approx(m["faithfulness"], abs=1e-12)  # the point value, from the same means
    assert iv.value == pytest.approx(float(_faithfulness(circuit, clean, corrupt)), abs=1e-7)
    assert (iv.n, iv.method) == (N_PAIRS, "paired-bca-bootstrap")
    want = _scipy_faithfulness(circuit, clean, corrupt, paired=True)
    assert (iv.lo, iv.hi) == pytest.approx(want, abs=1e-6)
    # Resampling the three runs independently, or leaving a pair out, gives another interval:
    # the comparison above can tell them apart.
    unpaired = _scipy_faithfulness(circuit, clean, corrupt, paired=False)
    assert max(abs(unpaired[0] - iv.lo), abs(unpaired[1] - iv.hi)) > 1e-3
    short = faithfulness_interval(circuit[:-1], clean[:-1], corrupt[:-1], seed=SEED)
    assert max(abs(short.lo - iv.lo), abs(short.hi - iv.hi)) > 1e-3
    row = _final_metric(metrics, "faithfulness")
    assert (row["ci_low"], row["ci_high"], row["n"]) == pytest.approx((iv.lo, iv.hi, N_PAIRS), abs=1e-12)

    cm = result.summary.intervals["circuit_metric"]
    assert (cm.lo, cm.hi, cm.n) == pytest.approx((*_t(circuit), N_PAIRS), abs=1e-7)
    _check_gap_intervals(result, metrics, reference)
    gap_has_zero = result.summary.intervals["gap"].contains(0.0)
    assert any("contains 0" in w for w in result.summary.warnings) == gap_has_zero
    # The random circuits stay a distribution the circuit is placed in.
    assert 0 <= m["faithfulness_percentile"] <= 100
    assert "faithfulness_percentile" not in result.summary.intervals


def test_the_faithfulness_interval_resamples_whole_pairs() -> None:
    """On made-up per-pair values: scipy's paired bootstrap of the three arrays, not two ratios'
    parts drawn apart (the numerator and denominator of a pair move together)."""
    rng = np.random.default_rng(0)
    clean = rng.normal(2.0, 1.0, 15)
    corrupt = clean - rng.normal(1.5, 0.8, 15)  # a gap that varies from pair to pair
    circuit = corrupt + 0.7 * (clean - corrupt) + rng.normal(0, 0.1, 15)
    iv = faithfulness_interval(circuit, clean, corrupt, seed=SEED)
    assert (iv.lo, iv.hi) == pytest.approx(_scipy_faithfulness(circuit, clean, corrupt, paired=True), abs=1e-12)
    assert iv.value == pytest.approx(float(_faithfulness(circuit, clean, corrupt)), abs=1e-12)
    unpaired = _scipy_faithfulness(circuit, clean, corrupt, paired=False)
    assert unpaired[1] - unpaired[0] > 2 * (iv.hi - iv.lo)  # pairs' shared noise cancels in the ratio
