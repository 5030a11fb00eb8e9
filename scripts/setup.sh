#!/usr/bin/env bash
# From scratch: a virtual environment in .venv with the pinned toolchain, then fastops built into it
# (CPU kernels always; CUDA kernels whenever nvcc is present, GPU or not).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q -r requirements-dev.txt
# --no-build-isolation: build against the torch just installed, never a second one.
log=.venv/fastops-build.log
if ! MAX_JOBS=${MAX_JOBS:-2} python -m pip install -v --no-build-isolation --no-deps -e . >"$log" 2>&1; then
  tail -n 60 "$log" >&2
  echo "fastops build failed; full log: $log" >&2
  exit 1
fi
grep -E "^ *(fastops build configuration|torch [0-9]|CPU sources|CUDA)" "$log" || true
python -c "import fastops._C" || { echo "fastops._C failed to build or import" >&2; exit 1; }
python -m fastops info
