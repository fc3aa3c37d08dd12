#!/bin/sh
# Installs what kvserve needs, builds it and runs it on the bundled model
# (a random tiny model generated on first use until trained weights ship).
# Extra arguments go to `kvserve run`.
set -eu
cd "$(dirname "$0")/.."
./scripts/setup.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build -j"$(nproc)" >/dev/null
model=weights/kvserve-main.gguf
if [ ! -f "$model" ]; then
    model=build/kvserve-tiny-random.gguf
    [ -f "$model" ] || ./build/kvserve model random --shape tiny --dtype q8_0 --seed 1 --out "$model"
fi
if [ $# -eq 0 ]; then
    set -- --prompt "The grass is green. The sky is" --max-tokens 64
fi
exec ./build/kvserve run --model "$model" "$@"
