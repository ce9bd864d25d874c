#!/bin/bash
# gpu_build.sh — build quill with the CUDA backend on a machine that has nvcc, cmake and ninja but
# none of the -dev packages (the lent GPU machines): unpacks .debs/ (scripts/fetch_debs.sh) into a
# private prefix, points pkg-config at it, and links with an RPATH into it, so the binaries run
# there with no environment set. Works the same on a machine that has the packages installed.
#
# Usage: scripts/gpu_build.sh [BUILD_DIR]   (default: build-gpu in the repository)
# Environment: DEBROOT (default /tmp/debroot), CUDA_ARCH (default 90a), JOBS (default nproc).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${1:-$root/build-gpu}
debroot=${DEBROOT:-/tmp/debroot}
libdir=$debroot/usr/lib/x86_64-linux-gnu

ls "$root"/.debs/*.deb >/dev/null 2>&1 || { echo "gpu_build.sh: no .debs/*.deb (run scripts/fetch_debs.sh where apt works)" >&2; exit 1; }
mkdir -p "$debroot"
for f in "$root"/.debs/*.deb; do
    if command -v dpkg-deb >/dev/null; then
        dpkg-deb -x "$f" "$debroot"
    else
        (cd "$debroot" && ar p "$f" "$(ar t "$f" | grep '^data\.tar')" | tar -x -a -f - 2>/dev/null ||
            ar p "$f" "$(ar t "$f" | grep '^data\.tar')" | tar -x --zstd -f -)
    fi
done
# absolute links inside the packages (libfoo.so -> /usr/lib/...) must stay inside the prefix
find "$debroot" -type l | while read -r l; do
    t=$(readlink "$l")
    case "$t" in /*) ln -sfn "$debroot$t" "$l" ;; esac
done
# pkg-config: the unpacked pkgconf (its library found through a wrapper), reading only our .pc
# files, whose /usr prefix the sysroot moves under $debroot; nothing filtered as a system dir
cat > "$debroot/pkg-config" <<EOS
#!/bin/sh
LD_LIBRARY_PATH=$libdir\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH} exec $debroot/usr/bin/pkgconf "\$@"
EOS
chmod +x "$debroot/pkg-config"
export PKG_CONFIG_LIBDIR=$libdir/pkgconfig:$debroot/usr/share/pkgconfig
export PKG_CONFIG_SYSROOT_DIR=$debroot
export PKG_CONFIG_SYSTEM_INCLUDE_PATH=/nonexistent PKG_CONFIG_SYSTEM_LIBRARY_PATH=/nonexistent
"$debroot/pkg-config" --cflags --libs jansson libpcre2-8 libutf8proc libmicrohttpd libcurl >/dev/null

# cuBLAS: from the CUDA toolkit, else from the pip wheel (nvidia-cublas) that images with PyTorch have
extra=()
cudalib=$(dirname "$(command -v nvcc)")/../lib64
if ! ls "$cudalib"/libcublas.so* >/dev/null 2>&1; then
    py=$(python3 -c 'import nvidia.cublas as c; print(list(c.__path__)[0])' 2>/dev/null || true)
    if [ -n "$py" ] && ls "$py"/lib/libcublas.so.* >/dev/null 2>&1; then
        extra=(-DCUDA_cublas_LIBRARY="$(ls "$py"/lib/libcublas.so.* | head -1)" -DCMAKE_CUDA_FLAGS="-I$py/include")
        echo "gpu_build.sh: cuBLAS from $py"
    fi
fi
cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DQUILL_CUDA=ON "${extra[@]}" \
    -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCH:-90a}" -DPKG_CONFIG_EXECUTABLE="$debroot/pkg-config" \
    -DCMAKE_C_FLAGS="-isystem $debroot/usr/include" \
    -DCMAKE_EXE_LINKER_FLAGS="-Wl,--disable-new-dtags,-rpath,$libdir,-rpath-link,$libdir" >"$build.cmake.log" 2>&1 ||
    { cat "$build.cmake.log"; exit 1; }
ninja -C "$build" -j"${JOBS:-$(nproc)}"
