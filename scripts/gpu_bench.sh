#!/bin/bash
# gpu_bench.sh — on a GPU machine, after scripts/gpu_build.sh (or gpu_check.sh): builds
# tests/backend/bench_cuda_decode.cu against the CUDA backend library and times a Qwen3-8B-shaped
# batch-1 decode step (int4, then bf16) at context 512 next to a copy-bandwidth probe of the same
# run. Output to stdout and $OUT/bench.txt. Usage: scripts/gpu_bench.sh [extra bench args]
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${BUILD:-$root/build-gpu}
out=${OUT:-/tmp/gpu-check}
mkdir -p "$out"
cd "$root"
# the cuBLAS the build found (toolkit or pip wheel)
cublas=$(sed -n 's/^CUDA_cublas_LIBRARY:[A-Z]*=//p' "$build/CMakeCache.txt")
cuflags=$(sed -n 's/^CMAKE_CUDA_FLAGS:[A-Z]*=//p' "$build/CMakeCache.txt")
nvcc -O2 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -Isrc $cuflags tests/backend/bench_cuda_decode.cu \
    "$build/libquill_cuda.a" "${cublas:--lcublas}" -Xlinker -rpath -Xlinker "$(dirname "${cublas:-/x}")" \
    -o "$build/bench_cuda_decode" || exit 1
{
    date -u +"%Y-%m-%d %H:%M UTC"
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
    timeout 100 "$build/bench_cuda_decode" --dtype int4 --ctx 512 "$@"
    timeout 100 "$build/bench_cuda_decode" --dtype bf16 --ctx 512 "$@"
} 2>&1 | tee "$out/bench.txt"
