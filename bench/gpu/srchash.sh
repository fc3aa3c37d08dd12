#!/bin/sh
# bench/gpu/srchash.sh — one hash of the sources a GPU build is made from
# (C, CUDA, headers, CMake files), so bench/gpu/check.sh can tell whether the
# binaries prepare.sh packed in .gpu/ still match the checkout.  Needs no
# git: the GPU machine gets a copy of the working tree, not the repository.
set -eu
cd "$(dirname "$0")/../.."
find base kernels cache model sched serve proto tests bench CMakeLists.txt -type f \
    \( -name '*.c' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' -o -name '*.proto' \
    -o -name 'CMakeLists.txt' -o -name '*.cmake' \) -not -path '*/node_modules/*' |
    LC_ALL=C sort | xargs cat | sha256sum | cut -c1-16
