#!/usr/bin/env bash
# Set up .venv with the test extra (torch CPU + transformers: the Hugging Face oracle) and run all tests.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup_env.sh test
python -m pytest "$@"
