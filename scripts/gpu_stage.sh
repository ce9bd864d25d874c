#!/bin/sh
# gpu_stage.sh — run HERE before a GPU call: puts what the lent GPU machine lacks inside the
# repository, in git-ignored folders that the call carries (carry: [".debs", "build-shared"]):
# the Debian packages of the build (scripts/fetch_debs.sh) and the reference files the tests
# read from ../shared, which does not travel (build-shared/reference; tests get
# QUILL_SHARED=build-shared there).
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
shared=${QUILL_SHARED:-$root/../shared}
ls "$root"/.debs/*.deb >/dev/null 2>&1 || "$root/scripts/fetch_debs.sh"
mkdir -p "$root/build-shared/reference"
for f in small_ref.safetensors small_int4_hqq_tensors.safetensors tiny_ref.safetensors \
         tiny_int4_hqq_tensors.safetensors tiny_int4_ref.safetensors README.md; do
    cp "$shared/reference/$f" "$root/build-shared/reference/"
done
du -sh "$root/.debs" "$root/build-shared"
