#!/usr/bin/env bash
# The GPU check in one call (bench/gpu_check.py has the stages and their time boxes):
#   bash bench/gpu_check.sh OUT_DIR             on the GPU machine, with .gpu-bundle carried (make gpu-bundle)
#   bash bench/gpu_check.sh --dry-run OUT_DIR   the same stages on the CPU at tiny sizes (CI runs this)
# The interpreter: $PYTHON if set, else this checkout's .venv (the CPU machines), else python3 (the GPU image's).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then py=$PYTHON
elif [ -x .venv/bin/python ]; then py=.venv/bin/python
else py=python3
fi
exec "$py" -m bench.gpu_check "$@"
