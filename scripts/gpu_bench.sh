#!/bin/bash
# gpu_bench.sh — on a GPU machine, after scripts/gpu_build.sh (or gpu_check.sh): builds
# tests/backend/bench_cuda_decode.cu against the CUDA backend library and times a Qwen3-8B-shaped
# batch-1 decode step (int4, then bf16) at context 512 next to a copy-bandwidth probe of the same
# run, then one step's linear layers alone at M = 1 .. 2048 tokens (both dtypes), then decode and
# prefill attention. Output to stdout and $OUT/bench.txt. Usage: scripts/gpu_bench.sh [extra args]
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
    for dt in int4 bf16; do # one step's linear layers alone, from decode to prefill token counts
        timeout 150 "$build/bench_cuda_decode" --dtype $dt --matmul-m 1,2,8,16,32,64,128,256,512,1024,2048 "$@"
    done
    # batched decode attention at the serving benchmark's mean context (512 prompt + 128)
    timeout 100 "$build/bench_cuda_decode" --ctx 640 --attn-seqs 1,8,64,256 "$@"
    # prefill attention: one 512-token prompt, and an 8192-token step of 16 of them
    timeout 100 "$build/bench_cuda_decode" --ctx 512 --prefill-seqs 1,16 "$@"
} 2>&1 | tee "$out/bench.txt"
# PROFILE=1: Nsight Compute over the kernels of one 2-layer int4 decode step (clocks as found)
if [ "${PROFILE:-0}" = 1 ] && command -v ncu >/dev/null; then
    timeout 150 ncu --clock-control none --launch-count 40 --section SpeedOfLight --section WarpStateStats \
        --section LaunchStats --section Occupancy "$build/bench_cuda_decode" --layers 2 --profile >"$out/ncu.txt" 2>&1
    grep -E "^  [a-z_A-Z].*\(|Duration|Memory Throughput|DRAM Throughput|Registers Per|Achieved Occupancy|Block Size|Grid Size" \
        "$out/ncu.txt" | head -150
fi
