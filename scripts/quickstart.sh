#!/usr/bin/env bash
# Sets quill up on a fresh Debian/Ubuntu machine and runs its main job on the embedded default:
# build, generate the tiny random-weight Qwen3 (real tokenizer), quantize it to int4 with HQQ,
# and generate from a chat prompt with both. Everything stays under ./models.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_deps.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
ninja -C build
q=build/quill
[ -d models/tiny-qwen3 ] || $q random-model --preset tiny-qwen3 models/tiny-qwen3
[ -d models/tiny-qwen3-int4 ] || $q quantize models/tiny-qwen3 models/tiny-qwen3-int4
prompt=${1:-"Give me a short introduction to large language models."}
echo "(random weights: the text is meaningless; this shows the pipeline end to end)"
echo "--- bf16: quill run models/tiny-qwen3 -p \"$prompt\" -n 48"
$q run models/tiny-qwen3 -p "$prompt" -n 48 --seed 1
echo "--- int4 (HQQ, group 128): quill run models/tiny-qwen3-int4 -p \"$prompt\" -n 48"
$q run models/tiny-qwen3-int4 -p "$prompt" -n 48 --seed 1
