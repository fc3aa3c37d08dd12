#!/bin/sh
# Installs what kvserve needs, builds it and runs every test.  This is the
# README's test command; .ci/run runs it too.
set -eu
cd "$(dirname "$0")/.."
./scripts/setup.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo
cmake --build build -j"$(nproc)"
ctest --test-dir build --output-on-failure -j"$(nproc)"
