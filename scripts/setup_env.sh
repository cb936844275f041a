# Sourced by demo.sh and test.sh: create/refresh .venv and install the project.
# Usage: . scripts/setup_env.sh [EXTRA]   (EXTRA e.g. "test")
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EXTRA="${1:-}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x "$ROOT/.venv/bin/python" ]; then
  echo "[setup] creating $ROOT/.venv with $($PY --version)"
  "$PY" -m venv "$ROOT/.venv"
fi
# shellcheck disable=SC1091
. "$ROOT/.venv/bin/activate"
SPEC="$ROOT"
[ -n "$EXTRA" ] && SPEC="$ROOT[$EXTRA]"
# Reinstall only when pyproject.toml (or the extra) changed since the last successful install.
STAMP="$ROOT/.venv/.installed-$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)-${EXTRA:-base}"
if [ ! -f "$STAMP" ]; then
  echo "[setup] installing llava-mindspore${EXTRA:+[$EXTRA]} into .venv (first run takes a few minutes)"
  python -m pip install -q --upgrade pip
  # torch==2.13.0 is pinned so pip takes the local CPU build instead of a multi-GB CUDA one.
  python -m pip install -q -e "$SPEC"
  touch "$STAMP"
fi
# MindSpore/MindFormers are chatty on import; keep the console for our own messages.
export GLOG_v="${GLOG_v:-3}"
export PYTHONPATH="$ROOT:${PYTHONPATH:-}"
