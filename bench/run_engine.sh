#!/bin/sh
# Engine benchmark: makes llama-3.2-1b-shape random models (F16, Q8_0, and
# Q4_K, which mixes Q4_K and Q6_K as llama.cpp's Q4_K_M does) once under
# bench/out/, then prints prefill/decode tok/s at 1 and 2 threads against
# the decode ceiling measured in the same run, and each model's decode
# tok/s as a ratio to F16's (bench_engine.c).  Writing the Q4_K model runs
# ggml's reference quantizer over 1.2 B weights: several minutes.
# Usage: bench/run_engine.sh [build dir]   (default: build)
set -eu
cd "$(dirname "$0")/.."
BUILD=${1:-build}
mkdir -p bench/out
for t in f16 q8_0 q4_k; do
    f=bench/out/llama-3.2-1b-$t.gguf
    [ -f "$f" ] || "$BUILD/kvserve" model random --shape llama-3.2-1b --dtype $t --seed 1 --out "$f"
done
"$BUILD/bench_engine" --model bench/out/llama-3.2-1b-f16.gguf \
    --model bench/out/llama-3.2-1b-q8_0.gguf --model bench/out/llama-3.2-1b-q4_k.gguf \
    --threads 1,2 --prompt 128 --decode 32 \
    --json bench/out/engine.json
