#!/usr/bin/env bash
# The device check (tools/device_check.py): on one GPU machine in at most 8 minutes, or on the CPU with --dry-run.
#   tools/device_check.sh OUT_DIR            # mnn on CuPy against PyTorch on the GPU, the GPU recipe; JSON in OUT_DIR
#   tools/device_check.sh OUT_DIR --dry-run  # the same stages in seconds: tiny sizes, the strict stand-in, torch on CPU
# Nothing is installed: mnn runs from this checkout (PYTHONPATH=.) with the Python on PATH
# (or $PYTHON; the checkout's .venv for a dry run when it has one).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ]; then
  echo "usage: tools/device_check.sh OUT_DIR [--dry-run] [--data FILE] [--budget SECONDS]" >&2
  exit 2
fi
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [[ " $* " == *" --dry-run "* ]] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" tools/device_check.py "$@"
