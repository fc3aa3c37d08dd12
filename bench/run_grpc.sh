#!/bin/sh
# gRPC layer benchmark: starts `kvserve serve` on a free loopback port with
# the model given (default: the bundled one), runs bench_grpc at 1 and 64
# concurrent streams, then stops the server with SIGTERM.  Environment:
# MAX_TOKENS (default 512) per stream, SERVE_FLAGS added to `kvserve serve`.
# Usage: bench/run_grpc.sh [build dir] [model]   (defaults: build, bundled)
set -eu
cd "$(dirname "$0")/.."
BUILD=${1:-build}
MODEL=${2:-weights/kvserve-main.gguf}
mkdir -p bench/out
out=$(mktemp)
# shellcheck disable=SC2086 # SERVE_FLAGS is zero or more words
"$BUILD/kvserve" serve --model "$MODEL" --host 127.0.0.1 --port 0 --max-model-len 2048 \
    --max-num-seqs 64 --num-kv-blocks 8192 ${SERVE_FLAGS:-} >"$out" 2>bench/out/grpc-server.log &
pid=$!
trap 'kill -TERM $pid 2>/dev/null || true; rm -f "$out"' EXIT
i=0
until grep -q "listening on" "$out"; do
    i=$((i + 1))
    if [ $i -gt 300 ] || ! kill -0 $pid 2>/dev/null; then
        echo "run_grpc: the server did not start; see bench/out/grpc-server.log" >&2
        exit 1
    fi
    sleep 0.1
done
addr=$(sed -n 's/^kvserve: listening on //p' "$out")
"$BUILD/bench_grpc" --addr "$addr" --streams 1,64 --max-tokens "${MAX_TOKENS:-512}" --prompt-len 32 \
    --json "bench/out/grpc-$(basename "$MODEL" .gguf).json"
