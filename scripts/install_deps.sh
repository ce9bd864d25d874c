#!/usr/bin/env bash
# Installs what building and testing quill needs on Debian/Ubuntu (run as root or with sudo).
set -euo pipefail
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends \
  build-essential cmake ninja-build pkg-config git ca-certificates xz-utils \
  libjansson-dev libpcre2-dev libutf8proc-dev libmicrohttpd-dev libcurl4-openssl-dev \
  python3 python3-pip >/dev/null
# Test clients: the official openai package, HF tokenizers, safetensors + numpy readers, and
# jsonschema (an independent validator of the structured outputs).
python3 -m pip install -q -r "$(dirname "$0")/../tests/requirements.txt"
