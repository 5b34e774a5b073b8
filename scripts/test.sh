#!/usr/bin/env bash
# Run every test tier: unit (tiny in-process models), integration (the zoo default,
# converted once from its PyPI package), notebooks, and the dashboard in headless Chromium.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
# Headless Chromium (Debian's package) for the dashboard's browser tests.
if [ -f scripts/install-browser.sh ]; then bash scripts/install-browser.sh || exit 1; fi
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing on purpose" >&2
  exit 1
fi
exit "$rc"
