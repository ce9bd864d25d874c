#!/bin/sh
# sass.sh — the machine code (SASS) of a CUDA source's kernels, on a machine without a GPU or the
# toolkit's disassembler: compiles FILE for sm_90a (the flags of the CMake build) to a cubin and
# runs cuobjdump (with nvdisasm, which it calls) from NVIDIA's PyPI wheels, fetched once into
# build-tools/. What it is for: check
# what ptxas made of a kernel change (registers, spills, where the wgmma waits and barriers sit,
# whether two variants compiled to identical code) before spending GPU time on it.
#
# Usage: scripts/sass.sh FILE [NAME]   (NAME: print only functions whose mangled name contains it,
#        e.g. gemm_q4_wgILi64ELi2E; ptxas's register and spill report goes to stderr, with its
#        performance warnings: C7512, wgmma serialized for want of registers, costs more than a spill)
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
file=${1:?usage: scripts/sass.sh FILE [NAME]}
name=${2:-}
tools=$root/build-tools
cuobjdump=$tools/nvidia/cu13/bin/cuobjdump
if [ ! -x "$cuobjdump" ] || [ ! -x "$tools/nvidia/cu13/bin/nvdisasm" ]; then
    mkdir -p "$tools/whl"
    pip download --quiet --no-deps --dest "$tools/whl" nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm >&2
    for w in "$tools"/whl/*.whl; do python3 -m zipfile -e "$w" "$tools"; done
    chmod +x "$tools"/nvidia/cu13/bin/*
fi
PATH=$tools/nvidia/cu13/bin:$PATH
cubin=$tools/$(basename "$file" .cu).cubin
nvcc -O3 -std=c++17 -arch=sm_90a -cubin -I"$root/src" -D_GNU_SOURCE --use_fast_math -lineinfo -Xptxas -v \
    "$file" -o "$cubin" 2>&1 | grep -E "Compiling entry|spill|Used [0-9]+ registers|Potential Performance Loss" >&2 || true
"$cuobjdump" -sass "$cubin" | awk -v name="$name" '
    /Function : / { show = name == "" || index($0, name) > 0 }
    show'
