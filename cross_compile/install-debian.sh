#!/bin/sh
# Install the cross compilers lprnet-edge uses to link modules for the Raspberry Pi
# (aarch64: rpi3/rpi4/rpi5/jetson-nano; armhf: rpi-armv7). Debian 12 / Ubuntu 22.04+, as root
# (or through sudo). Only the compiler and linker are needed: TVM generates the object code.
set -eu

if [ "$(id -u)" -ne 0 ]; then
    SUDO=sudo
else
    SUDO=
fi

$SUDO apt-get update
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
    g++-aarch64-linux-gnu g++-arm-linux-gnueabihf

for cc in aarch64-linux-gnu-g++ arm-linux-gnueabihf-g++; do
    printf '%s: %s\n' "$cc" "$(command -v "$cc" || echo MISSING)"
done
