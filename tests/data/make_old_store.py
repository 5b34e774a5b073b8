"""Write tests/data/store_v0_1/results.db: an interrupted decore-eval run on the tiny Llama, as
interp-workbench 0.1 at commit fff6814 stored it (comma-string lists, the old variant string).

Run against that commit's tree, not this one:
    git archive fff6814 | tar -x -C /tmp/old
    PYTHONPATH=/tmp/old python tests/data/make_old_store.py tests/data/store_v0_1
"""

import sys
from pathlib import Path

from circuits.detectors.decore_eval import DecoreEvalDetector
from interp.runs.runner import run_detector
from interp.runs.store import Store
from tests.tiny import loaded, tiny_llama

# Also imported by tests/unit/test_run_key_migration.py: the same command, run again today.
RAW = {"heads": "0.1,1.2,2.3", "ks": "1,2", "tasks": "memotrap", "max_items": "2", "batch_size": "4"}
UNITS_BEFORE_INTERRUPT = 2

if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    real = DecoreEvalDetector.run_unit
    seen: list[str] = []

    def interrupted(self, model, params, unit):  # type: ignore[no-untyped-def]
        if len(seen) == UNITS_BEFORE_INTERRUPT:
            raise KeyboardInterrupt
        seen.append(unit)
        return real(self, model, params, unit)

    DecoreEvalDetector.run_unit = interrupted  # type: ignore[method-assign]
    with Store(out) as s:
        try:
            run_detector(loaded(tiny_llama()), "decore-eval", RAW, s, progress=False)
        except KeyboardInterrupt:
            print("interrupted after", seen)
        print(s.runs()[["id", "detector", "variant", "params_json", "status", "n_units"]].to_string())
