"""Time the CMR grid simulation (circuits/cmr_model.py) and its Monte-Carlo agreement.

    python benchmarks/cmr_grid.py [--threads 2] [--estimator expected] [--n-sims 1] [--check]

Prints the wall and CPU time of simulating the whole reference grid (no disk cache). With
``--check`` it also simulates two beta_enc slices with 50 sampled trials per start position
(the reference's estimator) and reports the largest CRP difference.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import numpy as np
import torch

from circuits.methods import cmr_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--estimator", default="expected", choices=["expected", "sampled"])
    ap.add_argument("--n-sims", type=int, default=1)
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", RuntimeWarning)
    spec = cmr_model.GridSpec(estimator=args.estimator, n_sims=args.n_sims)
    t0, c0 = time.perf_counter(), time.process_time()
    crp = cmr_model.simulate_grid(spec)
    out: dict[str, object] = {
        "estimator": args.estimator,
        "n_sims_per_start": args.n_sims,
        "threads": args.threads,
        "grid_shape": list(crp.shape),
        "wall_s": round(time.perf_counter() - t0, 2),
        "cpu_s": round(time.process_time() - c0, 2),
    }
    if args.check:
        sub = (spec.beta_enc[5], spec.beta_enc[13])
        fast = cmr_model.simulate_grid(cmr_model.GridSpec(beta_enc=sub, estimator=args.estimator, n_sims=args.n_sims))
        ref = cmr_model.simulate_grid(cmr_model.GridSpec(beta_enc=sub, estimator="sampled", n_sims=50, seed=1))
        out["max_abs_diff_vs_sampled50"] = float(np.abs(fast - ref).max())
        out["mean_abs_diff_vs_sampled50"] = float(np.abs(fast - ref).mean())
    print(json.dumps(out))


if __name__ == "__main__":
    main()
