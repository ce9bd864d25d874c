#!/bin/bash
# gpu_serve_bench.sh — serving throughput on a GPU machine, after scripts/gpu_build.sh: for each
# dtype, `quill serve --random-weights PRESET --dtype D` (weights built in GPU memory, no files),
# then `quill bench serve` with vLLM's random dataset (IN prompt tokens, OUT output tokens,
# end-of-sequence ignored) at each concurrency, 2 x C prompts (at least 16). Prints each run's
# summary and writes $OUT/serve_D_cC.json (vLLM's keys).
#
# Usage: scripts/gpu_serve_bench.sh [BUILD_DIR]
# Environment: PRESET (qwen3-8b), DTYPES ("int4 bf16"), CONC ("1 8 64 256"), IN (512), OUT_LEN (256),
#              KV (the --kv-cache-memory, 32G: 256 sequences of 768 tokens need 28.3 GB in bf16),
#              BATCHED (--max-num-batched-tokens, 8192: the prefill chunk, vLLM's and quill serve's
#              default on a GPU of 70 GiB or more), SERVE_ARGS (more `quill serve` options, e.g.
#              "--kv-cache-dtype fp8"; TAG names their output files). Start CONC at 1: the first
#              requests after the server starts pay for graph captures and cuBLAS set-up.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${1:-$root/build-gpu}
out=${OUT:-/tmp/gpu-check}
preset=${PRESET:-qwen3-8b}
port=8123
mkdir -p "$out"
healthy() { # GET /health through bash's /dev/tcp (the GPU machine may lack curl)
    { exec 3<>"/dev/tcp/127.0.0.1/$port"; } 2>/dev/null || return 1
    printf 'GET /health HTTP/1.0\r\n\r\n' >&3
    local line
    read -r line <&3
    exec 3<&-
    [[ $line == *" 200 "* ]]
}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
for dtype in ${DTYPES:-int4 bf16}; do
    "$build/quill" serve --random-weights "$preset" --dtype "$dtype" --port $port --max-num-seqs 256 \
        --max-num-batched-tokens "${BATCHED:-8192}" \
        --kv-cache-memory "${KV:-32G}" --disable-log-requests ${SERVE_ARGS:-} 2>"$out/serve_$dtype${TAG:-}.log" &
    server=$!
    for _ in $(seq 300); do
        healthy && break
        kill -0 $server 2>/dev/null || break
        sleep 0.5
    done
    if ! healthy; then
        echo "serve ($dtype) did not come up:"
        tail -5 "$out/serve_$dtype${TAG:-}.log"
        kill $server 2>/dev/null
        continue
    fi
    for c in ${CONC:-1 8 64 256}; do
        n=$((2 * c > 16 ? 2 * c : 16))
        echo "== $preset $dtype ${SERVE_ARGS:-}, concurrency $c, $n prompts, ${IN:-512} in / ${OUT_LEN:-256} out"
        timeout 300 "$build/quill" bench serve --base-url "http://127.0.0.1:$port" --model "$preset" \
            --dataset random --input-len "${IN:-512}" --output-len "${OUT_LEN:-256}" --num-prompts $n \
            --max-concurrency "$c" --ignore-eos --json "$out/serve_${dtype}${TAG:-}_c$c.json" 2>&1 |
            grep -E "throughput|TTFT|TPOT|ITL|Successful|Failed|duration" | grep -vE "P99|Median ITL"
    done
    kill -INT $server
    wait $server
done
