#!/usr/bin/env bash
# One-shot GPU check, run from anywhere as:  bash benchmarks/gpu_check.sh
#
# Made for the device machine (python3 with torch+CUDA, transformers, ... but no network and no
# model weights). It needs, beside the working tree, the ignored folders .whl/ (wheels of the
# packages missing there: transformer-lens and what it imports, and this venv's transformers /
# huggingface_hub versions) and .gpu/ (config + tokenizer files of smollm2-135m, no weights).
#
#   a. install .whl/*.whl into $GPU_CHECK_SITE (default /tmp/site), print versions and the device;
#   b. benchmarks/gpu_check.py: the tiny test models (and smollm2-135m with random weights) on
#      cuda vs cpu: forward, AblateHeads, Patch from a cache, engine sweeps, KV-cached decoding.
#      (The unit tests cannot be pointed at a device: their fixtures build CPU models.)
#   c. python3 -m benchmarks.patching_heads --random-init: engine vs TransformerLens idiom on the
#      GPU with the full setting (16 prompts, all heads); --quick when CUDA is absent.
#
# Logs and JSON go to $OUT (default .gpu/out/). Exit status: 0 when every step passed.
# Local knobs: GPU_CHECK_PY (python, default python3), GPU_CHECK_SITE, GPU_CHECK_NO_INSTALL=1
# (wheels already in GPU_CHECK_SITE), GPU_CHECK_NO_WHEELS=1 (use the interpreter's own packages),
# GPU_CHECK_ROUNDS (timing rounds on cuda, default 3).

set -u -o pipefail
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
OUT_DIR=${OUT:-$ROOT/.gpu/out}
mkdir -p "$OUT_DIR"
PY=${GPU_CHECK_PY:-python3}
SITE=${GPU_CHECK_SITE:-/tmp/site}
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false
export INTERP_CACHE_DIR=${INTERP_CACHE_DIR:-/tmp/interp-gpu-check-cache}  # never the user's cache

main() {
  local t0=$SECONDS status=0
  echo "=== a. environment ($(date -u +%FT%TZ), $(uname -m), $(nproc) cpus)"
  if [ "${GPU_CHECK_NO_WHEELS:-0}" = 1 ]; then
    export PYTHONPATH=$ROOT
  else
    if [ "${GPU_CHECK_NO_INSTALL:-0}" != 1 ]; then
      ls .whl/*.whl >/dev/null 2>&1 || { echo "FATAL: no .whl/*.whl (carry .whl)"; return 2; }
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
        || { echo "FATAL: wheel install failed"; return 2; }
      echo "installed $(ls .whl/*.whl | wc -l) wheels into $SITE in $((SECONDS - t0)) s"
    fi
    export PYTHONPATH=$SITE:$ROOT
  fi
  [ -f .gpu/smollm2-135m/config.json ] || { echo "FATAL: no .gpu/smollm2-135m/config.json (carry .gpu)"; return 2; }
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" - <<'EOF' || { echo "FATAL: imports failed"; return 2; }
import importlib, importlib.metadata as md, platform, sys
import torch
print("python", platform.python_version(), sys.executable)
for dist in ("torch", "transformers", "transformer-lens", "huggingface-hub", "datasets", "tokenizers",
             "accelerate", "safetensors", "numpy", "pandas", "pyarrow", "fsspec", "regex", "typer",
             "einops", "jaxtyping"):
    try:
        print(f"  {dist:16} {md.version(dist)}")
    except md.PackageNotFoundError:
        print(f"  {dist:16} ABSENT")
for mod in ("transformers", "transformer_lens", "interp"):
    print(f"  {mod} from {importlib.import_module(mod).__file__}")
for mod in ("interp.patching.execution", "interp.model.backends", "circuits.methods.decore", "transformer_lens.model_bridge",
            "transformer_lens.patching", "benchmarks.patching_heads", "tests.tiny"):
    importlib.import_module(mod)
print("cuda available:", torch.cuda.is_available(), "| torch.version.cuda:", torch.version.cuda)
if torch.cuda.is_available():
    print("device:", torch.cuda.get_device_name(), "| capability", torch.cuda.get_device_capability(),
          "| tf32 matmul", torch.backends.cuda.matmul.allow_tf32)
EOF
  local cuda
  cuda=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
  echo "--- a. done in $((SECONDS - t0)) s"

  echo "=== b. cuda vs cpu correctness (benchmarks/gpu_check.py)"
  local t1=$SECONDS
  timeout 150 "$PY" -m benchmarks.gpu_check --smollm --out "$OUT_DIR/gpu_check.json"
  local rc=$?
  echo "--- b. exit $rc in $((SECONDS - t1)) s"
  [ $rc = 0 ] || status=1

  echo "=== c. patching_heads --random-init (engine vs TransformerLens idiom)"
  t1=$SECONDS
  local args=(--random-init)
  if [ "$cuda" = 1 ]; then
    args+=(--rounds "${GPU_CHECK_ROUNDS:-3}")
  else
    echo "no CUDA: --quick on the CPU"
    args+=(--quick)
  fi
  timeout 210 "$PY" -m benchmarks.patching_heads "${args[@]}" >"$OUT_DIR/patching_heads.json" 2>"$OUT_DIR/patching_heads.err"
  rc=$?
  tail -n 20 "$OUT_DIR/patching_heads.err"
  cat "$OUT_DIR/patching_heads.json"
  "$PY" - "$OUT_DIR/patching_heads.json" <<'EOF' || rc=1
import json, sys
lines = [l for l in open(sys.argv[1]) if l.strip().startswith("{")]
if not lines:
    sys.exit("patching_heads: no JSON result")
r = json.loads(lines[-1])
ok = r["max_abs_diff"] <= 1e-4
print(f"patching_heads on {r['device']}: {r['n_variants']} heads x {r['n_prompts']} prompts (seq {r['seq_len']}), "
      f"engine {r['engine_s']:.3f} s, TL idiom {r['baseline_s']:.3f} s, ratio {r['ratio']:.1f}x, "
      f"plain forward {r['plain_forward_s'] * 1e3:.1f} ms, plain_fraction {r['plain_fraction']:.2f}, "
      f"engine vs TL max diff {r['max_abs_diff']:.3g} ({'pass' if ok else 'FAIL'} at 1e-4)")
sys.exit(0 if ok else 1)
EOF
  echo "--- c. exit $rc in $((SECONDS - t1)) s"
  [ $rc = 0 ] || status=1

  echo "=== gpu_check.sh: $([ $status = 0 ] && echo PASS || echo FAIL) in $((SECONDS - t0)) s; files in $OUT_DIR"
  return $status
}

main 2>&1 | tee "$OUT_DIR/gpu_check.log"
exit "${PIPESTATUS[0]}"
