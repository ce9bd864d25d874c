#!/bin/bash
# gpu_ab.sh — on a GPU machine: measures the working tree against an earlier commit in one call,
# so that both sides share the card, its clocks and its copy bandwidth (a lent machine may be an
# H100 or an H200; numbers are comparable only within a call). Builds the working tree
# (scripts/gpu_check.sh: build + CUDA tests) and BASE (git archive into build-ab/base, its own
# scripts/gpu_build.sh) side by side, links bench_cuda_decode for both, then runs, alternating
# new and base, the parts asked for:
#   decode   batch-1 int4 decode step at context 512 (ROUNDS rounds)
#   matmul   one step's int4 matmuls at MATMUL_M (first round), M = 1, 32, 64 (later rounds)
#   attn     decode attention (1, 8, 64, 256 sequences, ctx 640) and prefill attention (ctx 512)
#   latency  quill bench latency --random-weights qwen3-8b --dtype int4 --input-len 256 --output-len 256
#   serve    scripts/gpu_serve_bench.sh, int4 at CONC, for both sides
# Usage (after scripts/gpu_stage.sh here; carry .debs and build-shared):
#   OUT=$OUT scripts/gpu_ab.sh BASE [decode matmul attn latency serve]   (default: all but serve)
# BASE is a commit, or a directory holding a source tree (`git archive REV | tar -x -C DIR` here,
# DIR carried: the machine's copy of .git is the session's first checkout, without later commits).
# Environment: ROUNDS (2), MATMUL_M (1,2,3,8,16,24,32,48,64,96,128,192,256,512,2048), CONC ("1 8 64 256").
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
base_rev=${1:?usage: gpu_ab.sh BASE [decode matmul attn latency serve]}
shift
parts=${*:-decode matmul attn latency}
out=${OUT:-/tmp/gpu-ab}
mkdir -p "$out"
export QUILL_ASSETS=$root/assets
want() { [[ " $parts " == *" $1 "* ]]; }

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
base=$root/build-ab/base
rm -rf "$base" && mkdir -p "$base"
if [ -d "$base_rev" ]; then # a source tree (e.g. a commit the machine's copy of .git lacks, carried)
    cp -a "$base_rev"/. "$base"/
else
    git archive "$base_rev" | tar -x -C "$base" || { echo "gpu_ab.sh: no commit $base_rev here"; exit 1; }
fi
ln -sfn "$root/.debs" "$base/.debs"
(cd "$base" && DEBROOT=/tmp/debroot-ab JOBS=6 scripts/gpu_build.sh build-gpu >"$out/base_build.log" 2>&1
 echo "base build rc=$?" >>"$out/base_build.log") &
OUT=$out/check JOBS=10 scripts/gpu_check.sh 2>&1 | grep -E "SUMMARY|passed|FAIL" | tail -4
wait
tail -1 "$out/base_build.log"

link_bench() { # SOURCE_ROOT OUTPUT
    local b=$1/build-gpu cublas cuflags
    cublas=$(sed -n 's/^CUDA_cublas_LIBRARY:[A-Z]*=//p' "$b/CMakeCache.txt")
    cuflags=$(sed -n 's/^CMAKE_CUDA_FLAGS:[A-Z]*=//p' "$b/CMakeCache.txt")
    nvcc -O2 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -I"$1/src" $cuflags "$1/tests/backend/bench_cuda_decode.cu" \
        "$b/libquill_cuda.a" "${cublas:--lcublas}" -Xlinker -rpath -Xlinker "$(dirname "${cublas:-/x}")" -o "$2"
}
link_bench "$root" "$out/bench_new" &
link_bench "$base" "$out/bench_base" &
wait
build_of() { [ "$1" = new ] && echo "$root/build-gpu" || echo "$base/build-gpu"; }

for round in $(seq "${ROUNDS:-2}"); do
    for side in new base; do
        bench=$out/bench_$side
        echo "== $side, round $round"
        want decode && timeout 60 "$bench" --dtype int4 --ctx 512 | grep -E "copy probe|decode step .upload"
        if want matmul; then
            m=${MATMUL_M:-1,2,3,8,16,24,32,48,64,96,128,192,256,512,2048}
            [ "$round" -gt 1 ] && m=1,32,64
            timeout 200 "$bench" --dtype int4 --matmul-m "$m" | grep -A2 "matmul-step" | grep -v "^--"
        fi
        if want attn && [ "$round" = 1 ]; then
            timeout 60 "$bench" --ctx 640 --attn-seqs 1,8,64,256 | grep "attention S="
            timeout 60 "$bench" --ctx 512 --prefill-seqs 1,16 | grep "attention S="
        fi
        if want latency; then
            timeout 120 "$(build_of $side)/quill" bench latency --random-weights qwen3-8b --dtype int4 \
                --input-len 256 --output-len 256 2>&1 | grep -E "percentile|decode:|peak memory"
        fi
    done
done
if want serve; then
    for side in new base; do
        echo "== serve $side"
        DTYPES=int4 CONC=${CONC:-1 8 64 256} OUT=$out/serve_$side timeout 300 scripts/gpu_serve_bench.sh "$(build_of $side)" 2>&1 |
            grep -E "^==|Output token throughput|Mean TPOT|Mean TTFT"
    done
fi
