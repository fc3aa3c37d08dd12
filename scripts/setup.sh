#!/bin/sh
# Installs every Debian package kvserve needs to build, test and run.
# Called by the README's two commands and by .ci/run; safe to run again:
# when everything is present it changes nothing and touches no network.
set -eu

PKGS="build-essential cmake pkg-config git clang libclang-rt-14-dev clang-format
      libuv1-dev libgrpc-dev protobuf-c-compiler libprotobuf-c-dev
      libcmocka-dev libopenblas-dev libmicrohttpd-dev python3-numpy"

missing=""
for p in $PKGS; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing="$missing $p"
    fi
done

if [ -z "$missing" ]; then
    exit 0
fi

SUDO=""
if [ "$(id -u)" != 0 ]; then
    SUDO="sudo"
fi
echo "setup: installing$missing" >&2
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# shellcheck disable=SC2086
$SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
