#!/bin/sh
# bench/gpu/prepare.sh — builds, on a machine with the project's build
# dependencies, what bench/gpu/check.sh runs on a GPU machine that has a
# CUDA toolkit but not those dependencies (OpenBLAS, PCRE2, gRPC, ...),
# and packs it into .gpu/ (ignored by git):
#
#   .gpu/kvs-gpu.tar.xz   bin/  test_gpu test_kern_ops test_attn_policy test_kv_quant
#                               test_batch_invariance bench_gpu kvserve
#                         lib/  every shared library they load that is neither
#                               the C/C++ runtime nor CUDA's (libcudart and
#                               libcublas come from the GPU machine's toolkit)
#   .gpu/MANIFEST         commit, build flags, what is inside and its size
#
# One xz archive, about 13 MB (OpenBLAS is most of it): it travels to the
# GPU machine with the checkout (about 53 MB on its own, 37 of them the
# training checkpoint weights/ckpt/main.pt), and the two must stay under
# 64 MiB; this script refuses past 64 MiB less 128 KiB, the margin left for
# untracked files that appear before the call.  Next to drop if it grows:
# libssl and libcrypto (1.7 MB packed), which the GPU machine's Python
# carries too.
#
# Build: build-gpu/ (Release, sm_90 code only, --as-needed so a binary
# loads only the libraries it uses).  Usage: bench/gpu/prepare.sh [--no-pack]
#   --no-pack  build only, and point .gpu/bin at the build (for check.sh
#              on a GPU machine that has the dependencies itself)
# Environment: KVS_GPU_BUILD (build dir), JOBS (parallel jobs, default 1).
set -eu
cd "$(dirname "$0")/../.."
BUILD=${KVS_GPU_BUILD:-build-gpu}
JOBS=${JOBS:-1}
BINS="test_gpu test_kern_ops test_attn_policy test_kv_quant test_batch_invariance bench_gpu kvserve"
PACK=1
[ "${1:-}" = "--no-pack" ] && PACK=0

# sm_90 code without PTX: the H200 needs no JIT, and PTX for every kernel
# in each of the six binaries would cost about 2 MB of the archive.
cmake -S . -B "$BUILD" -DKVS_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90-real -DCMAKE_BUILD_TYPE=Release \
    -DKVS_BUILD_TESTS=ON -DKVS_BUILD_BENCH=ON "-DCMAKE_EXE_LINKER_FLAGS=-Wl,--as-needed" >/dev/null
# shellcheck disable=SC2086
cmake --build "$BUILD" -j"$JOBS" --target $BINS

rm -rf .gpu
mkdir -p .gpu/bin
if [ $PACK = 0 ]; then
    case $BUILD in
    /*) from=$BUILD ;;
    *) from=../../$BUILD ;;
    esac
    for b in $BINS; do ln -s "$from/$b" ".gpu/bin/$b"; done
    echo "prepare: $BUILD built; .gpu/bin links to it (no libraries packed)"
    exit 0
fi

mkdir -p .gpu/lib
for b in $BINS; do
    cp "$BUILD/$b" .gpu/bin/
    strip --strip-unneeded ".gpu/bin/$b"
done
# Every library a binary loads, by the path the loader picked here.
ldd .gpu/bin/* | awk '$2 == "=>" && $3 ~ /^\// { print $1, $3 }' | sort -u |
    while read -r name path; do
        case "$name" in
        # The C and C++ runtime: every Linux machine has them (newer there).
        linux-vdso.so* | ld-linux* | libc.so.* | libm.so.* | libdl.so.* | libpthread.so.* | \
            librt.so.* | libutil.so.* | libresolv.so.* | libstdc++.so.* | libgcc_s.so.*) ;;
        # CUDA's own: taken from the GPU machine's toolkit, matching its driver.
        libcuda.so.* | libcudart.so.* | libcublas.so.* | libcublasLt.so.* | libnvrtc*) ;;
        *) cp -L "$path" ".gpu/lib/$name" ;;
        esac
    done
missing=$(ldd .gpu/bin/* | grep 'not found' || true)
if [ -n "$missing" ]; then
    echo "prepare: unresolved libraries here: $missing" >&2
    exit 1
fi

tar -C .gpu -cf - bin lib | xz -9 -T0 >.gpu/kvs-gpu.tar.xz
{
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with local changes)')"
    echo "sources: $(bench/gpu/srchash.sh)"
    echo "built: $(date -u '+%Y-%m-%d %H:%M UTC') on $(uname -m), $(nvcc --version 2>/dev/null | tail -1)"
    echo "flags: Release, CMAKE_CUDA_ARCHITECTURES=90-real (sm_90 code, no PTX), -Wl,--as-needed"
    echo "binaries:"
    for f in .gpu/bin/*; do printf '  %-40s %9d\n' "${f##*/}" "$(wc -c <"$f")"; done
    echo "libraries:"
    for f in .gpu/lib/*; do printf '  %-40s %9d\n' "${f##*/}" "$(wc -c <"$f")"; done
    echo "archive: $(wc -c <.gpu/kvs-gpu.tar.xz) bytes"
} >.gpu/MANIFEST
rm -rf .gpu/bin .gpu/lib
cat .gpu/MANIFEST
size=$(cat .gpu/* | wc -c)
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 cat 2>/dev/null | wc -c)
echo "prepare: .gpu/ is $size bytes; with the checkout ($tree), $((size + tree)) bytes travel to the GPU machine (at most $((64 * 1048576 - 131072)) here, 64 MiB there)"
if [ $((size + tree)) -gt $((64 * 1048576 - 131072)) ]; then
    echo "prepare: .gpu/ and the checkout are too large to send together" >&2
    exit 1
fi
