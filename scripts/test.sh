#!/usr/bin/env bash
# Set up .venv with the test extra (torch CPU + transformers: the Hugging Face oracle; Playwright) and Debian's
# Chromium for the browser test, then run all tests.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup_env.sh test
# tests/test_page.py drives Debian's Chromium (never Playwright's downloaded browsers): install it when missing.
if [ ! -x /usr/bin/chromium ]; then
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo -n"
  echo "[test] installing chromium with apt-get (for the browser test)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
python -m pytest "$@"
