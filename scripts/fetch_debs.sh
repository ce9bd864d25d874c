#!/bin/sh
# fetch_debs.sh — download (here, where apt works) the Debian packages quill's build needs, with
# their library dependencies, into .debs/ (git-ignored), so scripts/gpu_build.sh can unpack them
# on a GPU machine that has a compiler and CUDA but none of these packages and no network.
#
# The C library, the compiler runtime and a few base libraries every Linux image has (OpenSSL,
# zlib, zstd) are left out on purpose: unpacked next to the host's own copies they would shadow
# them. Usage: scripts/fetch_debs.sh [DEST] (default: .debs beside this script's repository).
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
dest=${1:-$root/.debs}
want="libjansson-dev libpcre2-dev libutf8proc-dev libmicrohttpd-dev libcurl4-openssl-dev pkgconf pkgconf-bin libpkgconf3"
skip=" libc6 libc6-dev libc-dev-bin linux-libc-dev libcrypt-dev libcrypt1 gcc-12-base libgcc-s1 libstdc++6 "
skip="$skip libssl3 zlib1g libzstd1 libnsl-dev libnsl2 libtirpc-dev libtirpc3 libtirpc-common rpcsvc-proto "
pkgs=$(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
        --no-replaces --no-enhances $want | grep -v '^ ' | grep -v '^<' | sort -u)
mkdir -p "$dest"
cd "$dest"
rm -f ./*.deb
for p in $pkgs; do
    case "$skip" in *" $p "*) continue ;; esac
    apt-get download "$p" >/dev/null 2>&1 || { echo "apt-get download $p failed" >&2; exit 1; }
done
echo "$(ls ./*.deb | wc -l) packages, $(du -sh . | cut -f1) in $dest"
