"""Record every detector's numbers on the zoo default, and compare two records.

A refactor must not move a number. ``record`` runs the default scan (default parameters) and
every other detector with small parameters on smollm2-135m in one process, and writes each
summary (heads with their scores, metrics) as JSON; ``compare`` flattens two records to
(detector, key) -> number and lists every pair that differs by more than the tolerance.

    .venv/bin/python scripts/check_numbers.py record before.json [--only retrieval-masking,...]
    .venv/bin/python scripts/check_numbers.py compare before.json after.json [--tol 1e-6]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

# Small settings: minutes in all on two CPU cores, yet every code path of each detector.
SMALL: dict[str, dict[str, Any]] = {
    "lag-crp": {"n_prompts": 2},
    "conflict-heads": {"max_items": 8, "total_effect": True, "total_items": 2},
    "ph3": {"max_items": 8, "ks": "1,3", "factors": "0,2"},
    "decore-eval": {"heads": "23.3,29.0", "ks": "1,2", "max_items": 4},
    "retrieval-masking": {"heads": "17.3,18.6", "n_random": 1, "n_lengths": 1, "n_depths": 2, "n_needles": 2,
                          "max_length": 300, "top_k": 2},
    "episodic-ablation": {"k": 3, "n_draws": 1, "n_texts": 2, "seq_len": 128, "late": 100, "early": 20,
                          "n_single": 1, "cum_sizes": "1", "rep_prompts": 2, "window": 10},
    "causal-trace": {"prompt": "The Colosseum is located in the city of", "subject": "The Colosseum",
                     "answer": "Rome", "samples": 2},
    "attention-knockout": {"limit": 3},
}


def record(path: Path, model_name: str, only: set[str] | None = None) -> None:
    import interp
    from interp.runs.registry import all_detectors
    from interp.runs.runner import run_in_memory

    model = interp.load_model(model_name)
    out: dict[str, Any] = {"model": model.name, "prefix": model.prefix.to_dict(), "runs": {}}
    if only and path.exists():  # add to (or redo part of) an earlier record
        out = json.loads(path.read_text())
    detectors = all_detectors()
    # The default scan as `interp scan` runs it, then every detector named in SMALL (default-scan
    # ones too, for the code paths their scan parameters skip) and every other with its defaults.
    plan = [(f"scan:{n}", n, dict(getattr(d, "scan_params", {}))) for n, d in detectors.items() if d.in_default_scan]
    plan += [(n, n, SMALL.get(n, {})) for n, d in detectors.items() if n in SMALL or not d.in_default_scan]
    for label, name, raw in plan:
        if only and label not in only:
            continue
        det = detectors[name]()
        t0 = time.perf_counter()
        summary, _ = run_in_memory(model, det, det.parse_params(raw))
        out["runs"][label] = {"params": raw, **summary.to_json()}
        print(f"{label}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        # Written after each run, so a failure late in the plan keeps what was measured.
        path.write_text(json.dumps(out, indent=1, default=_default, sort_keys=True))


def _default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def flatten(obj: Any, key: str = "") -> dict[str, Any]:
    """Leaves of a record by path; head lists are keyed by their head, not their rank, so a
    reordering of equal scores is not a difference."""
    if isinstance(obj, dict):
        return {k: v for name, value in obj.items() for k, v in flatten(value, f"{key}/{name}").items()}
    if isinstance(obj, list) and obj and all(isinstance(h, dict) and {"layer", "head"} <= set(h) for h in obj):
        return {
            k: v
            for h in obj
            for k, v in flatten({n: x for n, x in h.items() if n not in ("layer", "head")},
                                f"{key}/L{h['layer']}H{h['head']}").items()
        }
    if isinstance(obj, list):
        return {k: v for i, value in enumerate(obj) for k, v in flatten(value, f"{key}[{i}]").items()}
    return {key: obj}


def compare(a_path: Path, b_path: Path, tol: float) -> int:
    a = flatten(json.loads(a_path.read_text())["runs"])
    b = flatten(json.loads(b_path.read_text())["runs"])
    # A run recorded on one side only is one line (its label and how many values), not one per value.
    problems = [f"only in {name}: {run} ({n} values)" for name, keys in ((a_path.name, set(a) - set(b)),
                                                                     (b_path.name, set(b) - set(a)))
                for run, n in sorted(Counter(k.split("/")[1] for k in keys).items())]
    for k in sorted(set(a) & set(b)):
        x, y = a[k], b[k]
        if isinstance(x, bool) or isinstance(y, bool) or not isinstance(x, int | float) or not isinstance(y, int | float):
            if x != y and not k.endswith("seconds"):
                problems.append(f"{k}: {x!r} != {y!r}")
        elif not (math.isnan(x) and math.isnan(y)) and abs(x - y) > tol:
            problems.append(f"{k}: {x!r} != {y!r} (diff {abs(x - y):.3g})")
    numbers = sum(isinstance(v, int | float) and not isinstance(v, bool) for v in a.values())
    for p in problems:
        print(p)
    print(f"{len(problems)} differences over {len(a)} values ({numbers} numbers), tolerance {tol:g}")
    return 1 if problems else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    rec = sub.add_parser("record")
    rec.add_argument("out", type=Path)
    rec.add_argument("--model", default="smollm2-135m")
    rec.add_argument("--only", default="", help="comma-separated labels to (re)record into OUT")
    cmp_ = sub.add_parser("compare")
    cmp_.add_argument("a", type=Path)
    cmp_.add_argument("b", type=Path)
    cmp_.add_argument("--tol", type=float, default=1e-6)
    args = parser.parse_args()
    if args.cmd == "record":
        record(args.out, args.model, {x for x in args.only.split(",") if x} or None)
        return 0
    return compare(args.a, args.b, args.tol)


if __name__ == "__main__":
    raise SystemExit(main())
