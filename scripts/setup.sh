#!/usr/bin/env bash
# Create .venv in the repo root if missing and install the workbench with its test tools.
# torch is installed first, pinned, so that no multi-GB CUDA build is pulled onto a CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv" >&2
  "$PY" -m venv .venv
fi
stamp=.venv/.interp-installed
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && .venv/bin/python -c "import interp, torch" 2>/dev/null; then
  exit 0
fi
.venv/bin/python -m pip install -q --upgrade pip >&2
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "installing torch 2.13.0 (CPU wheel where one lies on disk)" >&2
  .venv/bin/python -m pip install -q "torch==2.13.0" >&2
fi
echo "installing interp-workbench and its dependencies" >&2
.venv/bin/python -m pip install -q -e ".[dev]" >&2
echo "$want" > "$stamp"
