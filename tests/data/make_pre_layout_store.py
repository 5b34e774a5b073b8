"""Write tests/data/store_pre_layout/results.db with interp-workbench as it stood before the
layout change (commit 7dbaffb): on the tiny Llama, an induction run interrupted after one of
its two units, a finished one with other parameters, a finished lag-crp run, and a finished
copying run (whose head ``score`` was then the prefix-matching score).

Run against that commit's tree, not this one:
    git archive 7dbaffb | tar -x -C /tmp/old
    cd /tmp/old && PYTHONPATH=/tmp/old python <this file> <out dir>
"""

import sys
from pathlib import Path

# Also imported by tests/unit/test_pre_layout_store.py: the same commands, run again today.
INDUCTION = {"n_prompts": "4", "batch_size": "2", "seq_len": "12"}
LAG_CRP = {"n_prompts": "4", "seq_len": "12", "batch_size": "2", "max_lag": "4"}
COPYING = {"n_prompts": "4", "seq_len": "12"}
INDUCTION_DONE = {"n_prompts": "4", "batch_size": "2", "seq_len": "10"}

if __name__ == "__main__":
    # The old tree's modules (imported here, so that today's test can read the parameters).
    from circuits.induction import InductionDetector
    from interp.runner import run_detector
    from interp.store import Store

    from tests.tiny import loaded, tiny_llama
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    model = loaded(tiny_llama())
    real = InductionDetector.run_unit
    seen: list[str] = []

    def interrupted(self, model, params, unit):  # type: ignore[no-untyped-def]
        if seen:
            raise KeyboardInterrupt
        seen.append(unit)
        return real(self, model, params, unit)

    with Store(out) as s:
        run_detector(model, "lag-crp", LAG_CRP, s, progress=False)
        run_detector(model, "copying", COPYING, s, progress=False)
        run_detector(model, "induction", INDUCTION_DONE, s, progress=False)
        InductionDetector.run_unit = interrupted  # type: ignore[method-assign]
        try:
            run_detector(model, "induction", INDUCTION, s, progress=False)
        except KeyboardInterrupt:
            print("induction interrupted after", seen)
        print(s.runs()[["id", "detector", "variant", "params_json", "status", "n_units"]].to_string())
