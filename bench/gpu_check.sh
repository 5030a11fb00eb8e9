#!/usr/bin/env bash
# GPU check for a machine with a CUDA GPU, an installed torch (2.11+) and triton, and no internet:
#   1. build fastops._C for this GPU (pip, no build isolation, no index: the installed torch is the one
#      the extension must link against, and nothing can be downloaded there),
#   2. python -m fastops info,
#   3. pytest -m gpu tests/,
#   4. the bench_gpu benchmark subset, time-boxed so the whole script ends within GPU_CHECK_BUDGET_S
#      (default 470 s, under 8 minutes on an H200), with its roofline table printed at the end.
# Results go to bench/results/ and, when $OUT is set, are copied there with the logs.
#
#   bash bench/gpu_check.sh            # PYTHON=python3.12 bash bench/gpu_check.sh to pick a python
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-470}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
# Triton must compile for the GPU here, never interpret.
unset TRITON_INTERPRET

if [[ -n "${OUT:-}" ]]; then
  mkdir -p "$OUT"
  exec > >(tee -a "$OUT/gpu_check.log") 2>&1
fi

elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( BUDGET - $(elapsed) )); }
section() { printf '\n===== %s  [t=%ss, %ss left] =====\n' "$1" "$(elapsed)" "$(left)"; }
# clamp LO X HI
clamp() { local v=$2; (( v < $1 )) && v=$1; (( v > $3 )) && v=$3; echo "$v"; }

section "machine"
nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi: not available"
"$PY" - <<'EOF'
import sys, torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"cuda available: {torch.cuda.is_available()}")
try:
    import triton
    print(f"triton {triton.__version__}")
except Exception as e:
    print(f"triton: unavailable ({e})")
if not torch.cuda.is_available():
    sys.exit("no CUDA device visible: this script is for a GPU machine")
EOF
if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
  TORCH_CUDA_ARCH_LIST=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")
fi
export TORCH_CUDA_ARCH_LIST
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export FASTOPS_CUDA=${FASTOPS_CUDA:-1}

section "build fastops._C (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS, FASTOPS_CUDA=$FASTOPS_CUDA)"
BUILD_LOG=${OUT:-/tmp}/build.log
build_rc=0
timeout "$(clamp 60 "$(( $(left) - 150 ))" 270)" \
  "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e . >"$BUILD_LOG" 2>&1 || build_rc=$?
# setup.py prints its configuration; show it whatever happened.
grep -A4 "fastops build configuration" "$BUILD_LOG" | head -n 6 || true
if (( build_rc != 0 )); then
  echo "BUILD FAILED (exit $build_rc; 124 = out of time). Last lines of $BUILD_LOG:"
  tail -n 60 "$BUILD_LOG"
  exit 1
fi
echo "build: ok"

section "python -m fastops info"
"$PY" -m fastops info

section "pytest -m gpu tests/"
tests_rc=0
if [[ -d tests ]]; then
  timeout "$(clamp 30 "$(( $(left) - 120 ))" 150)" \
    "$PY" -m pytest -m gpu tests/ -q -p no:cacheprovider -o addopts="" || tests_rc=$?
else
  tests_rc=5
fi
case $tests_rc in
  0) echo "gpu tests: passed" ;;
  5) echo "gpu tests: none selected"; tests_rc=0 ;;
  124) echo "gpu tests: OUT OF TIME" ;;
  *) echo "gpu tests: FAILED (exit $tests_rc)" ;;
esac

section "benchmarks (-m bench_gpu)"
bench_rc=0
if ! "$PY" -c "import pytest_benchmark" 2>/dev/null; then
  echo "pytest-benchmark is not installed here: benchmarks skipped"
  bench_rc=1
else
  # The inner deadline stops timing new cases early enough for the table, JSON and PNG to be written;
  # the outer timeout is only a backstop.
  remaining=$(left)
  timeout "$(clamp 30 "$(( remaining - 5 ))" 100000)" \
    "$PY" -m pytest bench/ --benchmark-only -m bench_gpu -q -p no:cacheprovider -o addopts="" \
      --bench-budget "${BENCH_BUDGET_S:-0.1}" --bench-deadline "$(clamp 15 "$(( remaining - 45 ))" 100000)" \
    || bench_rc=$?
fi
if [[ -n "${OUT:-}" ]]; then
  for f in bench/results/latest.json bench/results/roofline.png; do
    [[ -f "$f" ]] && cp "$f" "$OUT/"
  done
  echo "copied results to $OUT"
fi

section "done"
echo "build: ok; gpu tests: exit $tests_rc; benchmarks: exit $bench_rc; total $(elapsed) s"
(( tests_rc == 0 && bench_rc == 0 ))
