#!/bin/sh
# Downloads (does not install) the Debian packages scripts/gpu_check.sh needs
# on a GPU machine whose image lacks them and which cannot reach a package
# registry: they are carried in .deps/ (ignored by git) and unpacked there.
set -eu
cd "$(dirname "$0")/.."
mkdir -p .deps && cd .deps
apt-get download libopenblas0-pthread libopenblas-pthread-dev libopenblas-dev libopenblas0 \
    libcmocka0 libcmocka-dev libgfortran5 pkg-config
