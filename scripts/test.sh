#!/usr/bin/env bash
# Runs every test: builds a normal (Release, with the CUDA backend when nvcc exists) and an
# ASan+UBSan configuration, and runs the C unit tests (ctest) and the end-to-end tests (pytest,
# driving the real binary) against each. Reference data is read from ../shared.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
jobs=$(nproc)
status=0

run_suite() { # NAME BUILD_DIR PYTEST_MARKERS CMAKE_ARGS...
  local name=$1 dir=$2 markers=$3
  shift 3
  echo "=== $name: configure + build ($dir)"
  cmake -S . -B "$dir" -G Ninja "$@" >/dev/null
  ninja -C "$dir" -j "$jobs"
  echo "=== $name: ctest"
  (cd "$dir" && ctest --output-on-failure -j 1) || status=1
  echo "=== $name: pytest"
  local rc=0
  QUILL_BIN="$root/$dir/quill" QUILL_SHARED="$root/../shared" python3 -m pytest -q -m "$markers" tests/e2e || rc=$?
  # 5 = no tests collected: not a failure of the code under test.
  if [ $rc -ne 0 ] && [ $rc -ne 5 ]; then status=1; fi
}

# The release suite runs everything; the sanitizer suite skips the slow numeric checks (same code
# paths as the fast ones, at 3x the cost) and the CUDA sources (no GPU here to run them).
run_suite release build "" -DCMAKE_BUILD_TYPE=Release
ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=print_stacktrace=1 \
  run_suite asan build-asan "not slow" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DQUILL_SANITIZE=ON -DQUILL_CUDA=OFF
[ $status = 0 ] && echo "=== all suites passed" || echo "=== FAILURES (see above)"
exit $status
