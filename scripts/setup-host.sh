#!/usr/bin/env bash
# Set up a Debian 12 build host for lprnet-edge: cross compilers, SSH client/server, and the
# Python package with its host extras. Idempotent; run as root (or with sudo available).
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
APT_PACKAGES=(g++ g++-aarch64-linux-gnu g++-arm-linux-gnueabihf file binutils
              openssh-client openssh-server zstd qemu-user-static debootstrap binfmt-support
              qemu-user libglib2.0-dev pkg-config llvm-19)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "==> apt-get install ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
# CPU-only PyTorch: a local CPU wheel if the machine has one, else PyPI's default build.
if ! "$PY" -c "import torch" 2>/dev/null; then
  whl=$(ls /opt/wheels/torch-2.13.0+cpu-*.whl 2>/dev/null | head -n 1 || true)
  echo "==> pip install ${whl:-torch}"
  "$PY" -m pip install -q "${whl:-torch}"
fi
echo "==> pip install -e .[host,dev]"
"$PY" -m pip install -q -e ".[host,dev]"
"$PY" -c "import tvm, tvm_ffi; print('TVM', tvm.__version__, '/ tvm-ffi', tvm_ffi.__version__)"

# The cost instrument (lprnet_edge/compiler/cost): a qemu TCG plugin that counts executed
# guest blocks. Debian's dynamic qemu-user loads plugins (the static one used for binfmt does
# not); the plugin API header ships only in the qemu source package, so fetch that once
# (deb-src on the same mirror and keyring as the deb entry) and keep the header alone.
CACHE=${LPRNET_EDGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lprnet-edge}/qemu-plugin
HDR="$CACHE/include/qemu-plugin.h"
if [ ! -s "$HDR" ]; then
  if ! grep -rqs '^Types: deb-src' /etc/apt/sources.list.d/ && ! grep -qs '^deb-src' /etc/apt/sources.list; then
    # The mirror and keyring of the host's Debian entry (deb822 or one-line format).
    mirror=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' \
             | grep -m1 '/debian/\?$' || true)
    [ -n "$mirror" ] || mirror=$(awk '$1 == "deb" && $0 !~ /security/ {for (i = 2; i <= NF; i++)
                                  if ($i ~ /^http/) {print $i; exit}}' /etc/apt/sources.list 2>/dev/null)
    keyring=$(grep -hs '^Signed-By:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' \
              | grep -m1 debian-archive || true)
    mirror=${mirror:-http://deb.debian.org/debian}
    keyring=${keyring:-/usr/share/keyrings/debian-archive-keyring.gpg}
    echo "==> adding a deb-src entry for bookworm from $mirror (qemu's plugin header)"
    printf 'Types: deb-src\nURIs: %s\nSuites: bookworm\nComponents: main\nSigned-By: %s\n' \
      "$mirror" "$keyring" | $SUDO tee /etc/apt/sources.list.d/lprnet-edge-src.sources >/dev/null
    $SUDO apt-get update -qq
  fi
  tmp=$(mktemp -d)
  echo "==> apt-get source --download-only qemu (for include/qemu/qemu-plugin.h)"
  (cd "$tmp" && apt-get source --download-only -qq qemu >/dev/null)
  mkdir -p "$CACHE/include"
  tar -xf "$tmp"/qemu_*.orig.tar.* -C "$tmp" --wildcards '*/include/qemu/qemu-plugin.h'
  cp "$tmp"/qemu*/include/qemu/qemu-plugin.h "$HDR"
  rm -rf "$tmp"
fi
"$PY" -m lprnet_edge.compiler.cost.plugin --build
