#!/bin/sh
# bench/gpu/check.sh — the device check, run on a machine with an NVIDIA
# GPU, in this order: the card (nvidia-smi); the backend's start (one
# small test); the gpu test (tests/kernels/test_gpu.c), and its attention
# test again on the mma.sync prefill kernel; test_kern_ops, test_attn_policy and
# test_kv_quant, which add the cuda backend when there is one;
# test_batch_invariance on cuda (the same logits alone, batched, chunked,
# over scrambled blocks, through a forked prefix); the engine
# on the tiny random model, cuda against cpu logits (f32 KV, q8_0 KV with
# blocks sealed, f32 KV with CUDA graphs, f16 KV with chunked prefill,
# f16 KV with Quest at decode; the bundled model with speculative decoding on cuda, by prompt lookup
# and by the bundled draft model);
# then bench/bench_gpu.c, whose tables come last.
#
#   bench/gpu/check.sh [OUT_DIR]        (default $OUT, else .gpu-out)
#
# OUT_DIR gets check.log (this script's lines), bench_gpu.json,
# bench_gpu.log and logs.tar.gz: one log per step (backend, gpu_kernels,
# gpu_kernels_mma, test_kern_ops, test_attn_policy, test_kv_quant,
# batch_invariance, engine, bench_gpu), packed however the script ends
# (a device tool brings back few files).  Status: 0 all passed, 1
# something failed, 77 no GPU.
#
# Binaries come from .gpu/, which bench/gpu/prepare.sh fills on a machine
# with the project's build dependencies (the GPU machine may lack them and
# be unable to fetch them).  Without .gpu/ the script builds here instead
# (prepare.sh --no-pack), which needs those dependencies.  CUDA's own
# libraries are the GPU machine's: its toolkit, or PyTorch's nvidia-*
# packages.
#
# Time: the whole check aims at KVS_GPU_CHECK_SECONDS (default 420); each
# step runs under a timeout and bench_gpu gets what is left as its
# --budget (60 s at least).  No step runs past KVS_GPU_CHECK_LIMIT
# (default 540) from the start, so a caller's limit a little above it
# still gets the logs.  Without a GPU the gpu test and bench_gpu say so
# and the script stops there, before the cpu-only runs (CI does those).
set -u
cd "$(dirname "$0")/../.." || exit 1
OUT=${1:-${OUT:-.gpu-out}}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG=$OUT/check.log
: >"$LOG"
T0=$(date +%s)
ENVELOPE=${KVS_GPU_CHECK_SECONDS:-420}
LIMIT=${KVS_GPU_CHECK_LIMIT:-540}
say() { echo "$*" | tee -a "$LOG"; }
elapsed() { echo $(($(date +%s) - T0)); }
# cap SECONDS: SECONDS, or less so as to end 15 s before LIMIT (at least 1).
cap() {
    c=$((LIMIT - $(elapsed) - 15))
    [ "$c" -gt "$1" ] && c=$1
    [ "$c" -lt 1 ] && c=1
    echo "$c"
}
# shellcheck disable=SC2317 # run by the EXIT trap
pack() {
    (cd "$OUT" && ls ./*.log >/dev/null 2>&1 &&
        find . -maxdepth 1 -name '*.log' ! -name check.log ! -name bench_gpu.log |
        tar -czf logs.tar.gz -T - && find . -maxdepth 1 -name '*.log' ! -name check.log \
            ! -name bench_gpu.log -delete)
}
trap pack EXIT
# dash runs no EXIT trap for a signal's death: turn the signals a caller's
# time limit sends into exits.
trap 'exit 143' TERM
trap 'exit 130' INT
trap 'exit 129' HUP

# ---- binaries --------------------------------------------------------------
if [ ! -d .gpu ]; then
    say "check: no .gpu/ here: building (needs the project's build dependencies)"
    JOBS=$(nproc) bench/gpu/prepare.sh --no-pack >>"$LOG" 2>&1 || {
        say "check: build failed (see $LOG)"
        exit 1
    }
fi
if [ -f .gpu/kvs-gpu.tar.xz ]; then
    # Binaries packed from other sources would check old code: refuse them.
    want=$(bench/gpu/srchash.sh)
    have=$(sed -n 's/^sources: //p' .gpu/MANIFEST 2>/dev/null)
    if [ "$have" != "$want" ] && [ -z "${KVS_GPU_ALLOW_STALE:-}" ]; then
        say "check: .gpu/ was packed from other sources (${have:-unknown}, here $want):"
        say "check: run bench/gpu/prepare.sh again (or set KVS_GPU_ALLOW_STALE=1)"
        exit 1
    fi
    DIR=${TMPDIR:-/tmp}/kvs-gpu
    rm -rf "$DIR" && mkdir -p "$DIR"
    if command -v xz >/dev/null 2>&1; then
        xz -dc .gpu/kvs-gpu.tar.xz | tar -C "$DIR" -xf -
    else
        python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' \
            .gpu/kvs-gpu.tar.xz "$DIR"
    fi || {
        say "check: cannot unpack .gpu/kvs-gpu.tar.xz"
        exit 1
    }
    BIN=$DIR/bin
    LIBS=$DIR/lib
    [ -f .gpu/MANIFEST ] && sed -n '1,3p' .gpu/MANIFEST | sed 's/^/check: .gpu: /' | tee -a "$LOG"
else
    BIN=$PWD/.gpu/bin
    LIBS=
fi

# CUDA's runtime and cuBLAS (13.x): the toolkit first, then pip's nvidia-*.
CUDA_LIBS=
for d in /usr/local/cuda/lib64 /usr/local/cuda/lib /usr/local/cuda/targets/x86_64-linux/lib \
    /usr/local/cuda-13*/lib64 /usr/local/cuda-13*/lib \
    /usr/local/cuda-13*/targets/x86_64-linux/lib /usr/lib/x86_64-linux-gnu; do
    if [ -e "$d/libcublas.so.13" ] && [ -e "$d/libcudart.so.13" ]; then
        CUDA_LIBS=$d
        break
    fi
done
if [ -z "$CUDA_LIBS" ] && command -v python3 >/dev/null 2>&1; then
    site=$(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null)
    for s in $site; do
        [ -d "$s/nvidia" ] || continue
        dirs=$(find "$s/nvidia" \( -name 'libcublas.so.13' -o -name 'libcudart.so.13' \) \
            -exec dirname {} \; 2>/dev/null | sort -u | tr '\n' ':')
        CUDA_LIBS=$CUDA_LIBS${CUDA_LIBS:+:}${dirs%:}
    done
fi
# For our binaries only: other programs here keep their own libraries.
LIBPATH="${LIBS}${LIBS:+:}${CUDA_LIBS}${CUDA_LIBS:+:}${LD_LIBRARY_PATH:-}"
say "check: CUDA libraries from ${CUDA_LIBS:-the default search path}"
missing=$(LD_LIBRARY_PATH=$LIBPATH ldd "$BIN"/* 2>&1 | grep 'not found' | sort -u)
if [ -n "$missing" ]; then
    say "check: libraries not found:"
    say "$missing"
    exit 1
fi

# ---- the card ----------------------------------------------------------------
if command -v nvidia-smi >/dev/null 2>&1 &&
    card=$(nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit \
        --format=csv,noheader 2>&1); then
    say "check: GPU: $card"
else
    say "check: no GPU here (nvidia-smi: ${card:-not installed})"
fi

# ---- tests -------------------------------------------------------------------
# run NAME SECONDS CMD...: the log goes to OUT/NAME.log; prints its tail and
# the status (77: skipped).
STATUS=
FAILED=0
run() {
    name=$1 secs=$2
    shift 2
    t=$(date +%s)
    secs=$(cap "$secs")
    LD_LIBRARY_PATH=$LIBPATH timeout "$secs" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    case $rc in
    0) what=passed ;;
    77) what=skipped ;;
    124) what="TIMED OUT after ${secs} s" ;;
    *) what="FAILED ($rc)" ;;
    esac
    say "check: $name: $what in $(($(date +%s) - t)) s"
    if [ $rc != 0 ] && [ $rc != 77 ]; then
        FAILED=1
        grep -E '\[  FAILED  \]|error|Error|failed' "$OUT/$name.log" | head -20 | tee -a "$LOG"
    fi
    STATUS="$STATUS $name=$rc"
    return $rc
}

export KVS_TEST_VERBOSE=1
# The backend first, on one small test: on Hopper it checks its wgmma
# prefill kernel at start, and a fault there would end every later step;
# if it starts only without that kernel, the rest runs on mma.sync.
run backend 60 env KVS_TEST_FILTER=test_rmsnorm "$BIN/test_gpu"
be_rc=$?
if [ $be_rc != 0 ] && [ $be_rc != 77 ] &&
    run backend_mma 60 env KVS_CUDA_ATTN=mma KVS_TEST_FILTER=test_rmsnorm "$BIN/test_gpu"; then
    say "check: the backend starts only with KVS_CUDA_ATTN=mma: the rest runs on mma.sync"
    export KVS_CUDA_ATTN=mma
fi
grep -h 'prefill attention on\|wgmma' "$OUT/backend.log" | tee -a "$LOG"
run gpu_kernels 240 "$BIN/test_gpu"
gpu_rc=$?
if [ $gpu_rc = 77 ]; then
    grep -h 'no CUDA device\|no usable device' "$OUT/gpu_kernels.log" | tee -a "$LOG"
    run bench_gpu 60 "$BIN/bench_gpu" --json "$OUT/bench_gpu.json"
    grep -h 'no CUDA device' "$OUT/bench_gpu.log" | tee -a "$LOG"
    say "check: no CUDA device: stopping before the tests that add cuda (cpu-only here)"
    exit 77
fi
# On Hopper the prefill tiles run on wgmma; the dense attention test again
# on the mma.sync kernel that other GPUs run (the masks, codecs and page
# walks around the products are the same code in both).
run gpu_kernels_mma 120 env KVS_CUDA_ATTN=mma KVS_TEST_FILTER='test_attention*' "$BIN/test_gpu"
grep -h 'prefill attention on' "$OUT/gpu_kernels.log" "$OUT/gpu_kernels_mma.log" | tee -a "$LOG"
run test_kern_ops 90 "$BIN/test_kern_ops"
run test_attn_policy 60 "$BIN/test_attn_policy"
run test_kv_quant 60 "$BIN/test_kv_quant"
run batch_invariance 60 env KVS_TEST_BACKEND=cuda "$BIN/test_batch_invariance"

# ---- the engine: cuda against cpu on the tiny random model ------------------
# A 64-token prompt (the GEMM paths) and 16 greedy steps (the GEMV paths);
# logits rows are compared up to the first step whose greedy token differs
# (after that the two runs see different inputs).
SCRATCH=$PWD/.gpu-scratch
mkdir -p "$SCRATCH"
cat >"$SCRATCH/cmp.py" <<'PY'
import ast, struct, sys
from array import array
def load(path):  # .npy v1/v2, little-endian float32 [rows][cols]
    with open(path, "rb") as f:
        magic = f.read(8)
        assert magic[:6] == b"\x93NUMPY", path
        n = struct.unpack("<H" if magic[6] == 1 else "<I", f.read(2 if magic[6] == 1 else 4))[0]
        head = ast.literal_eval(f.read(n).decode("latin1"))
        assert head["descr"] == "<f4" and not head["fortran_order"], head
        rows, cols = head["shape"]
        data = array("f")
        data.frombytes(f.read(4 * rows * cols))
    return [data[r * cols:(r + 1) * cols] for r in range(rows)]
a, b = load(sys.argv[1]), load(sys.argv[2])
argmax = lambda row: max(range(len(row)), key=row.__getitem__)
n = min(len(a), len(b))
same = 0
while same < n and argmax(a[same]) == argmax(b[same]):
    same += 1
rows = min(n, same + 1)
scale = max(abs(v) for r in a[:rows] for v in r)
err = max(abs(x - y) for ra, rb in zip(a[:rows], b[:rows]) for x, y in zip(ra, rb)) / scale
print(f"engine: {n} logits rows, greedy tokens equal for {same}, "
      f"max|cuda - cpu| / max|cpu| = {err:.3g} over {rows} rows")
sys.exit(0 if n > 0 and err < 2e-2 else 1)
PY
# kv NAME DEV FLAGS...: a greedy run of kvserve on DEV writing its logits
# to SCRATCH/logits-DEV.npy; false (and a line saying so) when it fails.
# Block scores in f32 on cuda, so that block-choosing policies choose as
# on cpu.
kv() {
    name=$1 dev=$2
    shift 2
    LD_LIBRARY_PATH=$LIBPATH KVS_CUDA_SCORES=f32 timeout "$(cap 30)" "$BIN/kvserve" run \
        --temperature 0 --ignore-eos \
        --device "$dev" --logits-out "$SCRATCH/logits-$dev.npy" "$@" >/dev/null 2>"$SCRATCH/err" ||
        {
            echo "$name: kvserve run on $dev failed: $(tail -3 "$SCRATCH/err")"
            return 1
        }
}
# Every comparison runs, whatever failed before it; false when one did.
engine() {
    bad=0
    main=weights/kvserve-main.gguf
    grass="The grass is green. The sky is blue. The sun is yellow. The grass is"
    # The bundled model (head dim 64: its prefill attention on the tensor
    # cores).  Speculative decoding by prompt lookup on cuda (proposals
    # verified several rows a step, rejected entries truncated) against
    # plain decoding on cpu, on a text it goes on repeating, so that
    # proposals are accepted.
    n="f16 KV --num-speculative-tokens 4 (bundled model)"
    if kv "$n" cpu --model $main --prompt "$grass" --max-tokens 48 --kv-cache-dtype f16 &&
        kv "$n" cuda --model $main --prompt "$grass" --max-tokens 48 --kv-cache-dtype f16 \
            --num-speculative-tokens 4; then
        printf '%s: ' "$n"
        python3 "$SCRATCH/cmp.py" "$SCRATCH/logits-cpu.npy" "$SCRATCH/logits-cuda.npy" || bad=1
        # The bundled draft model's proposals on cuda (its KV in the device
        # draft pool, k forward passes a step) against the same plain cpu run.
        n="f16 KV --speculative-method draft (bundled models)"
        if kv "$n" cuda --model $main --prompt "$grass" --max-tokens 48 --kv-cache-dtype f16 \
            --num-speculative-tokens 4 --speculative-method draft \
            --draft-model weights/kvserve-draft.gguf; then
            printf '%s: ' "$n"
            python3 "$SCRATCH/cmp.py" "$SCRATCH/logits-cpu.npy" "$SCRATCH/logits-cuda.npy" || bad=1
        else
            bad=1
        fi
    else
        bad=1
    fi
    # The prompt prefilled 7 tokens a step into blocks of 4 on cuda (the
    # cpu reference takes it in one step, blocks of 16): chunks that attend
    # to the cache before them on the tensor-core kernel.  Block-sparse
    # prefill, each KV head's 2 blocks per query block (the per-head mask on
    # the tensor-core kernel), its blocks scored in f32 on cuda as on cpu so
    # that both choose the same.
    for v in "--batch-size 7 --block-size 4" \
        "--attention block-sparse --attn-sinks 4 --attn-window 16 --attn-top-k 2"; do
        case $v in --batch-size*) both='' own=$v ;; *) both=$v own='' ;; esac
        n="f16 KV $v (bundled model)"
        # shellcheck disable=SC2086 # $both and $own are zero or more words
        if kv "$n" cpu --model $main --prompt-tokens "$(seq -s, 1 200)" --max-tokens 16 \
            --kv-cache-dtype f16 $both &&
            kv "$n" cuda --model $main --prompt-tokens "$(seq -s, 1 200)" \
                --max-tokens 16 --kv-cache-dtype f16 $both $own; then
            printf '%s: ' "$n"
            python3 "$SCRATCH/cmp.py" "$SCRATCH/logits-cpu.npy" "$SCRATCH/logits-cuda.npy" || bad=1
        else
            bad=1
        fi
    done
    # Rejection sampling at temperature 1 on cuda: its draws need not be
    # cpu's (rounding moves the tests), so it must run, draw 48 tokens and
    # keep proposals.
    if LD_LIBRARY_PATH=$LIBPATH timeout "$(cap 30)" "$BIN/kvserve" run --model $main \
        --prompt "Once upon a time there was a little fox who" --max-tokens 48 --temperature 1 \
        --seed 7 --ignore-eos --kv-cache-dtype f16 --device cuda --num-speculative-tokens 4 \
        --speculative-method draft --speculative-acceptance rejection \
        --draft-model weights/kvserve-draft.gguf >/dev/null 2>"$SCRATCH/rej.err"; then
        printf 'f16 KV --speculative-acceptance rejection (bundled models): engine: %s\n' \
            "$(grep -o 'speculative decoding accepted.*' "$SCRATCH/rej.err")"
        grep -q 'speculative decoding accepted [1-9][0-9]* of' "$SCRATCH/rej.err" || bad=1
    else
        echo "rejection sampling: kvserve run on cuda failed: $(tail -3 "$SCRATCH/rej.err")"
        bad=1
    fi
    # The tiny random model (head dim 32: the general attention kernels):
    # f32 KV; q8_0 KV (blocks sealed as they fill); f32 KV with every decode
    # step replayed from a CUDA graph after the first.
    LD_LIBRARY_PATH=$LIBPATH timeout "$(cap 30)" "$BIN/kvserve" model random --shape tiny \
        --dtype f16 --out "$SCRATCH/tiny.gguf" || {
        echo "tiny model: kvserve model random failed"
        return 1
    }
    for v in "f32" "q8_0" "f32 --cuda-graphs"; do
        kvd=${v%% *}
        extra=${v#"$kvd"} # cuda's own flags; the cpu run is the reference
        n="$kvd KV$extra"
        # shellcheck disable=SC2086 # $extra is zero or more words
        if kv "$n" cpu --model "$SCRATCH/tiny.gguf" --prompt-tokens "$(seq -s, 1 64)" \
            --max-tokens 16 --kv-cache-dtype "$kvd" &&
            kv "$n" cuda --model "$SCRATCH/tiny.gguf" --prompt-tokens "$(seq -s, 1 64)" \
                --max-tokens 16 --kv-cache-dtype "$kvd" $extra; then
            printf '%s: ' "$n"
            python3 "$SCRATCH/cmp.py" "$SCRATCH/logits-cpu.npy" "$SCRATCH/logits-cuda.npy" || bad=1
        else
            bad=1
        fi
    done
    # Quest at decode on a 200-token prompt in blocks of 16: each decode row
    # choosing 2 of its 12 or more earlier blocks from bounds and scores made
    # on the device.
    n="f16 KV --decode-top-k 2"
    if kv "$n" cpu --model "$SCRATCH/tiny.gguf" --prompt-tokens "$(seq -s, 1 200)" \
        --max-tokens 16 --kv-cache-dtype f16 --decode-top-k 2 &&
        kv "$n" cuda --model "$SCRATCH/tiny.gguf" \
            --prompt-tokens "$(seq -s, 1 200)" --max-tokens 16 --kv-cache-dtype f16 \
            --decode-top-k 2; then
        printf '%s: ' "$n"
        python3 "$SCRATCH/cmp.py" "$SCRATCH/logits-cpu.npy" "$SCRATCH/logits-cuda.npy" || bad=1
    else
        bad=1
    fi
    return $bad
}
t=$(date +%s)
if engine >"$OUT/engine.log" 2>&1; then
    say "check: engine_cuda_vs_cpu: passed in $(($(date +%s) - t)) s"
    STATUS="$STATUS engine_cuda_vs_cpu=0"
else
    FAILED=1
    say "check: engine_cuda_vs_cpu: FAILED"
    STATUS="$STATUS engine_cuda_vs_cpu=1"
fi
grep -E ' KV.*: engine: |failed' "$OUT/engine.log" | tee -a "$LOG"

# ---- bench -------------------------------------------------------------------
# model_random_load's sparse metadata file: on this checkout's disk rather
# than a /tmp that may be a small tmpfs.
export TMPDIR="$SCRATCH"
budget=$((ENVELOPE - $(elapsed) - 20))
[ $budget -lt 60 ] && budget=60
say "check: bench_gpu with a budget of $budget s ($(elapsed) s spent so far)"
run bench_gpu $((budget + 60)) "$BIN/bench_gpu" --json "$OUT/bench_gpu.json" --budget "$budget"
rm -rf "$SCRATCH"
say "check: done in $(elapsed) s:$STATUS"
echo
# The tables last: they are what a reader of the output's tail needs; the
# status again after them, in case they push it out of a short tail.
sed -n '/^== bench_gpu/,$p' "$OUT/bench_gpu.log"
echo "check: done in $(elapsed) s:$STATUS"
exit $FAILED
