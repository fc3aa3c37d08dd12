#!/bin/sh
# Installs every Debian package kvserve needs to build, test and run, and
# the linters of deploy/ (deploy/lint.sh); with --run, only what building
# and running the server needs (scripts/run.sh).
# Called by the README's two commands and by .ci/run; safe to run again:
# when everything is present it changes nothing and touches no network.
set -eu

RUN_PKGS="build-essential cmake pkg-config git
      libuv1-dev libgrpc-dev protobuf-c-compiler libprotobuf-c-dev
      libcmocka-dev libopenblas-dev libmicrohttpd-dev libpcre2-dev libjansson-dev"
TEST_PKGS="clang libclang-rt-14-dev clang-format python3-numpy
      protobuf-compiler python3-grpcio python3-protobuf nodejs openssl
      prometheus yamllint shellcheck"
run_only=0
[ "${1:-}" = "--run" ] && run_only=1
PKGS=$RUN_PKGS
[ $run_only = 1 ] || PKGS="$RUN_PKGS $TEST_PKGS"

missing=""
for p in $PKGS; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing="$missing $p"
    fi
done

if [ $run_only = 0 ]; then
    # Debian's nodejs comes without npm; NodeSource's nodejs conflicts with
    # Debian's npm package because it carries its own.
    if ! command -v npm >/dev/null 2>&1; then
        missing="$missing npm"
    fi
    # deploy/lint.sh renders with `kubectl kustomize`: any kubectl will do,
    # so Debian's (1.20) only where none is on PATH.
    if ! command -v kubectl >/dev/null 2>&1; then
        missing="$missing kubernetes-client"
    fi
fi

SUDO=""
if [ "$(id -u)" != 0 ]; then
    SUDO="sudo"
fi
if [ -n "$missing" ]; then
    echo "setup: installing$missing" >&2
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    # shellcheck disable=SC2086
    $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
    # The tests run prometheus themselves; the package's own service,
    # started by its install on every interface, is not wanted.
    case " $missing " in
    *" prometheus "*)
        if command -v systemctl >/dev/null 2>&1; then
            $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true
        fi
        ;;
    esac
fi
[ $run_only = 1 ] && exit 0

# The Node test client's packages, exactly as locked.
root=$(cd "$(dirname "$0")/.." && pwd)
if [ -f "$root/tests/node/package-lock.json" ] && [ ! -d "$root/tests/node/node_modules" ]; then
    (cd "$root/tests/node" && npm ci --no-audit --no-fund --loglevel=error)
fi
# The deploy linters' packages (kubernetes-models, dockerfilelint, ...).
if [ -f "$root/deploy/lint/package-lock.json" ] && [ ! -d "$root/deploy/lint/node_modules" ]; then
    (cd "$root/deploy/lint" && npm ci --no-audit --no-fund --loglevel=error)
fi
