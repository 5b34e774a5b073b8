#!/usr/bin/env bash
# The scale-out measurements of the GPU machine (one GPU, 16 CPU cores), in one call:
#
#   bash benchmarks/gpu_prepare.sh     # here: .whl/ (wheels, this package's too) and .gpu/ (configs)
#   bash benchmarks/gpu_scale.sh       # there, carrying .whl and .gpu
#
#   1. env:         versions, the GPU, the detectors registered through the installed entry points;
#      gpu_tests:   the GPU test tier (tests/gpu: every detector on cuda equals the CPU);
#   2. device_map:  half of smollm2-135m on cuda:0, the rest on the CPU, against the whole model on
#                   cuda (induction and copying, nnsight and bridge backends), to 1e-4 in fp32;
#   3. gpu_scan:    the default scan on the GPU against the CPU, stored numbers compared;
#   4. scaling_cpu: units per second of one induction run, serial and on 1, 2, 4, 8 local Dask
#                   workers (16 / N torch threads each), tables checked equal to the serial run's;
#   5. scaling_gpu: the same run on the GPU, serial and on one GPU worker.
#
# Random weights from the zoo configs (real weights cannot travel). Each step writes its output
# to $OUT/<step>.out ($OUT default .gpu/out) and its log to $OUT/log.txt; a step that fails or runs out of time
# does not stop the next. GPU_SCALE_STEPS (default: all, in the order above) picks steps by name.
# Exit status: the number of failed steps.

set -u -o pipefail
cd "$(dirname "$0")/.." || exit 99
OUT_DIR=${OUT:-$PWD/.gpu/out}
mkdir -p "$OUT_DIR"
LOG=$OUT_DIR/log.txt
PY=${GPU_SCALE_PY:-python3}
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false INTERP_CACHE_DIR=/tmp/interp-gpu-scale-cache
failed=0
T0=$SECONDS

if [ "${GPU_SCALE_NO_WHEELS:-0}" != 1 ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >>"$LOG" 2>&1 || { echo "FATAL: wheel install failed"; tail -20 "$LOG"; exit 99; }
  export PYTHONPATH=/tmp/site:$PWD
fi
echo "wheels installed in $((SECONDS - T0)) s" | tee -a "$LOG"

STEPS=" ${GPU_SCALE_STEPS:-env gpu_tests device_map gpu_scan scaling_cpu scaling_gpu} "
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2 t=$SECONDS rc
  shift 2
  [[ $STEPS == *" $name "* ]] || return 0
  echo "=== $name ($(date -u +%T))" | tee -a "$LOG"
  timeout "$limit" "$@" >"$OUT_DIR/$name.out" 2>>"$LOG"
  rc=$?
  cat "$OUT_DIR/$name.out"
  echo "--- $name: exit $rc in $((SECONDS - t)) s" | tee -a "$LOG"
  [ $rc = 0 ] || { failed=$((failed + 1)); tail -n 15 "$LOG"; }
}

step env 45 "$PY" - <<'EOF'
import importlib.metadata as md, json, os, platform
import torch
from interp.runs.registry import all_detectors, default_scan
import interp.runs.dask_executor, nnsight, transformer_lens  # noqa: F401
print(json.dumps({
    "python": platform.python_version(), "cpus": os.cpu_count(),
    "versions": {d: md.version(d) for d in ("torch", "transformers", "accelerate", "dask", "distributed",
                                            "nnsight", "transformer-lens", "interp-workbench")},
    "cuda": torch.cuda.is_available(),
    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    "detectors": len(all_detectors()), "default_scan": default_scan()}))
EOF
step gpu_tests 150 "$PY" -m pytest -q -p no:cacheprovider tests/gpu
step device_map 90 "$PY" -m benchmarks.device_map_check --model smollm2-135m
step gpu_scan 160 "$PY" -m benchmarks.gpu_scan --model smollm2-135m --random-init
step scaling_cpu 170 "$PY" -m benchmarks.scaling --model smollm2-135m --random-init --workers 1,2,4,8 \
  --params n_prompts=120,batch_size=5
step scaling_gpu 70 "$PY" -m benchmarks.scaling --model smollm2-135m --random-init --device cuda --workers 1 \
  --params n_prompts=120,batch_size=5
echo "=== gpu_scale.sh: $failed failed step(s) in $((SECONDS - T0)) s" | tee -a "$LOG"
exit "$failed"
