#!/bin/sh
# Installs what kvserve needs, builds it and starts the gRPC server on the
# bundled model (127.0.0.1:50051 unless told otherwise; a random tiny model
# is generated when the weights are missing).  Extra arguments go to
# `kvserve serve`.
set -eu
cd "$(dirname "$0")/.."
./scripts/setup.sh --run
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build -j"$(nproc)" >/dev/null
model=weights/kvserve-main.gguf
if [ ! -f "$model" ]; then
    model=build/kvserve-tiny-random.gguf
    [ -f "$model" ] || ./build/kvserve model random --shape tiny --dtype q8_0 --seed 1 --out "$model"
fi
exec ./build/kvserve serve --model "$model" "$@"
