#!/usr/bin/env bash
# Set up a Debian 12 build host for lprnet-edge: cross compilers, SSH client/server, and the
# Python package with its host extras. Idempotent; run as root (or with sudo available).
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
APT_PACKAGES=(g++ g++-aarch64-linux-gnu g++-arm-linux-gnueabihf file binutils
              openssh-client openssh-server zstd qemu-user-static debootstrap binfmt-support)
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
