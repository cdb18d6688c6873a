#!/usr/bin/env bash
# Installs the Debian packages the build, the stack and the tests need.
# Used by `make run`, `make test` and `make bench`; does nothing when all are
# present, so it is cheap to call every time.
set -euo pipefail
# libmicrohttpd-dev: billing's admin API and the device simulator (the
# gateway has its own HTTP server and does not link it).
# clang, libclang-rt-14-dev (the sanitizer and libFuzzer runtimes clang links;
# only recommended by clang, and recommends are not installed here),
# libfuzzer-14-dev: the fuzz harnesses (make fuzz, make test). nodejs: the
# reference HTTP parser (llhttp) of tests/e2e/test_differential.py.
# prometheus (brings promtool): the metrics, rules and dashboard tests;
# python3-yaml: the manifest tests (tests/e2e/test_deploy.py);
# libcurl4-openssl-dev: billing's webhook deliveries; zlib1g-dev: its ledger archives.
pkgs=(build-essential pkg-config postgresql redis-server libmicrohttpd-dev libpq-dev
      libhiredis-dev libjansson-dev libsodium-dev libevent-dev
      curl jq python3 nginx wrk procps bc
      clang libclang-rt-14-dev libfuzzer-14-dev nodejs
      prometheus python3-yaml libcurl4-openssl-dev zlib1g-dev)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
if [ ${#missing[@]} -gt 0 ]; then
    echo "deps: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The Kubernetes JSON schemas (npm registry), pinned; optional: without them
# test_deploy.py says it skipped the schema check, and nothing else needs them.
# npm: Debian's own package where node came from Debian (a nodesource node
# brings its npm and conflicts with Debian's): best effort either way.
if ! command -v npm >/dev/null; then
    $SUDO apt-get install -y -qq --no-install-recommends npm >/dev/null 2>&1 ||
        echo "deps: npm not installed (the manifests' schema check will be skipped)" >&2
fi
models="$(npm root -g 2>/dev/null)/kubernetes-models"
if command -v npm >/dev/null && [ ! -d "$models" ]; then
    echo "deps: npm install -g kubernetes-models@5.1.0" >&2
    $SUDO npm install -g --no-fund --no-audit --loglevel=error kubernetes-models@5.1.0 >/dev/null 2>&1 ||
        echo "deps: kubernetes-models not installed (the manifests' schema check will be skipped)" >&2
fi
# Debian's package starts system-wide services where it can; the project never
# uses them (the stack runs its own instances on free ports).
