#!/bin/sh
# Offline lint of the deployment assets under deploy/: YAML style, kustomize
# renders, Kubernetes schema and policy, Dockerfiles, Prometheus config and
# shell scripts. Prints PASS/FAIL per check and exits non-zero if any failed.
# Tools come from scripts/setup.sh. Usage: sh deploy/lint.sh
# (KUBECTL=/path/to/kubectl picks another kubectl.)
set -u
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
cd "$root" || exit 2
KUBECTL=${KUBECTL:-kubectl}
bin=deploy/lint/node_modules/.bin
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
trap 'exit 130' INT TERM
passed=0
failed=0

# pass NAME [NOTE] / fail NAME: count and print one line; on failure the
# captured output follows, indented.
pass() {
    passed=$((passed + 1))
    echo "PASS $1${2:+ ($2)}"
}
fail() {
    failed=$((failed + 1))
    echo "FAIL $1"
    sed 's/^/    /' "$tmp/out"
}

# need TOOL...: true when every tool is on PATH, else notes which are missing.
need() {
    for t in "$@"; do
        if ! command -v "$t" >/dev/null 2>&1; then
            echo "$t not found; run scripts/setup.sh" >"$tmp/out"
            return 1
        fi
    done
}

# check NAME CMD...: passes when CMD exits 0.
check() {
    name=$1
    shift
    if "$@" >"$tmp/out" 2>&1; then pass "$name"; else fail "$name"; fi
}

# quiet NAME CMD...: passes when CMD exits 0 and prints nothing (for linters
# that report problems but always exit 0).
quiet() {
    name=$1
    shift
    if "$@" >"$tmp/out" 2>&1 && [ ! -s "$tmp/out" ]; then pass "$name"; else fail "$name"; fi
}

if need shellcheck; then
    check "shellcheck deploy/lint.sh scripts/*.sh bench/*.sh bench/gpu/*.sh" shellcheck deploy/lint.sh scripts/*.sh bench/*.sh bench/gpu/*.sh
else fail "shellcheck"; fi

if need yamllint; then
    check "yamllint deploy/" yamllint --strict -c deploy/.yamllint deploy
else fail "yamllint deploy/"; fi

# Render each kustomization; each render then goes through the schema and
# policy check (stderr is kept apart: newer kustomize warns about the
# v2.0.3-compatible 'bases' and 'patchesStrategicMerge' fields).
schema=yes
need node && [ -d deploy/lint/node_modules ] || schema=no
for k in base overlays/cpu overlays/cuda; do
    name=$(basename "$k")
    if need "$KUBECTL" && "$KUBECTL" kustomize "deploy/k8s/$k" >"$tmp/$name.yaml" 2>"$tmp/out"; then
        pass "kustomize $k"
    else
        fail "kustomize $k"
        continue
    fi
    flag=""
    [ "$name" = cuda ] && flag=--gpu
    if [ $schema = no ]; then
        echo "node or deploy/lint/node_modules missing; run scripts/setup.sh" >"$tmp/out"
        fail "k8s schema $k"
    elif node deploy/lint/validate.mjs "$name" $flag <"$tmp/$name.yaml" >"$tmp/out" 2>&1; then
        pass "k8s schema $k" "$(tail -n 1 "$tmp/out")"
    else
        fail "k8s schema $k"
    fi
done

for f in deploy/docker/Dockerfile.cpu deploy/docker/Dockerfile.cuda; do
    if need "$bin/dockerfilelint"; then
        check "dockerfilelint $f" "$bin/dockerfilelint" "$f"
    else fail "dockerfilelint $f"; fi
    if need "$bin/dockerfile-utils"; then
        quiet "dockerfile-utils lint $f" "$bin/dockerfile-utils" lint "$f"
    else fail "dockerfile-utils lint $f"; fi
done

if need promtool; then
    check "promtool check config" promtool check config deploy/prometheus/prometheus.yml
else fail "promtool check config"; fi

echo "lint: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
