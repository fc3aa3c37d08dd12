#!/bin/sh
# Reproduces kvserve's bundled models: installs the training dependencies
# (Debian's python3-torch; libopenblas0-openmp, without which fp32 matrix
# products run ~20x slower), trains the main and the draft model (resuming
# from weights/ckpt/ if a run was interrupted) and exports them to GGUF.
# Usage: weights/train.sh [main-minutes] [draft-minutes]
set -eu
cd "$(dirname "$0")/.."
MAIN_MIN=${1:-95}
DRAFT_MIN=${2:-30}
need=""
for p in python3-torch python3-numpy libopenblas0-openmp; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need="$need $p"
done
if [ -n "$need" ]; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $need
fi
mkdir -p weights/ckpt
/usr/bin/python3 weights/train.py --out weights/ckpt/main --preset main --minutes "$MAIN_MIN" \
    --max-len 2048 | tee -a weights/ckpt/main.log
/usr/bin/python3 weights/export_gguf.py weights/ckpt/main.pt weights/kvserve-main.gguf --dtype f16
/usr/bin/python3 weights/train.py --out weights/ckpt/draft --preset draft --minutes "$DRAFT_MIN" \
    --max-len 2048 | tee -a weights/ckpt/draft.log
/usr/bin/python3 weights/export_gguf.py weights/ckpt/draft.pt weights/kvserve-draft.gguf --dtype f16
