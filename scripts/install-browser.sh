#!/usr/bin/env bash
# Headless Chromium for the dashboard's browser tests: Debian's `chromium` package, driven by
# Playwright through executable_path (never a Playwright browser download). Idempotent and quiet.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    SUDO="sudo -n"
  else
    echo "install-browser: /usr/bin/chromium is missing and this user cannot run apt-get (no root, no sudo)" >&2
    exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends chromium; } >"$log" 2>&1; then
  echo "install-browser: installing Debian's chromium failed:" >&2
  tail -n 20 "$log" >&2
  exit 1
fi
if [ ! -x /usr/bin/chromium ]; then
  echo "install-browser: apt-get finished but /usr/bin/chromium is missing" >&2
  exit 1
fi
