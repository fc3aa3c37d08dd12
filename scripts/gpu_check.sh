#!/bin/sh
# Device check for a machine with an NVIDIA GPU: builds for sm_90, runs the
# kernel tests (every backend, cuda included, against the scalar reference)
# and the engine on the cuda backend, and prints the results.  Build
# dependencies that a bare GPU image lacks (OpenBLAS, cmocka) can be carried
# as unpacked Debian packages in .deps/ (see scripts/fetch_gpu_deps.sh).
# Usage: scripts/gpu_check.sh [OUT_DIR]
set -eu
cd "$(dirname "$0")/.."
OUT=${1:-build-gpu/out}
mkdir -p "$OUT"
if [ -d .deps ]; then
    for f in .deps/*.deb; do dpkg -x "$f" .deps/root; done
    export PKG_CONFIG_PATH=$PWD/.deps/root/usr/lib/x86_64-linux-gnu/pkgconfig:${PKG_CONFIG_PATH:-}
    export LD_LIBRARY_PATH=$PWD/.deps/root/usr/lib/x86_64-linux-gnu:$PWD/.deps/root/usr/lib/x86_64-linux-gnu/openblas-pthread:${LD_LIBRARY_PATH:-}
    export CPATH=$PWD/.deps/root/usr/include:$PWD/.deps/root/usr/include/x86_64-linux-gnu/openblas-pthread:${CPATH:-}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
cmake -S . -B build-gpu -DKVS_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_BUILD_TYPE=Release \
    -DKVS_BUILD_BENCH=ON >/dev/null
cmake --build build-gpu -j"$(nproc)" 2>&1 | tail -5
set +e
./build-gpu/test_kern_ops 2>&1 | tee "$OUT/test_kern_ops.txt"
./build-gpu/kvserve model random --shape tiny --dtype f16 --out build-gpu/tiny.gguf
for dev in cpu cuda; do
    ./build-gpu/kvserve run --model build-gpu/tiny.gguf --prompt-tokens 256,72,101,108 \
        --max-tokens 32 --temperature 0 --ignore-eos --kv-cache-dtype f32 --device $dev \
        --json --logits-out "$OUT/logits-$dev.npy" 2>&1 | tee "$OUT/run-$dev.txt"
done
echo "compare logits-cpu.npy with logits-cuda.npy (numpy): max relative error should be < 1e-4"
