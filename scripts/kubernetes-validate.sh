#!/usr/bin/env bash
# Ensures kubernetes-validate is installed and prints the absolute path of its command on stdout
# (and nothing else there; progress goes to stderr). tests/k8s.rs validates deploy/k8s/ with it:
#
#   VALIDATE=$(scripts/kubernetes-validate.sh)
#
# It is the PyPI package kubernetes-validate, which bundles the JSON schemas of the Kubernetes
# API (one set per Kubernetes version) and validates offline; it is installed into the
# git-ignored venv .venv-k8s/ at the repository root, with PyYAML (its dependency, which
# tests/k8s.rs also uses to read the manifests through the venv's python). When it is already
# there at the pinned version the script only checks it: well under a second.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=scripts/pip-venv.sh
. "$ROOT/scripts/pip-venv.sh"
VENV="$ROOT/.venv-k8s"
BIN="$VENV/bin/kubernetes-validate"
# 1.37 bundles the schemas of Kubernetes 1.25 to 1.37; tests/k8s.rs names the versions it
# validates against, so bump both together.
SPEC="${KUBERNETES_VALIDATE_SPEC:-kubernetes-validate~=1.37.0}"
WANT=1.37.

usable() {
  local version
  version=$("$BIN" --version 2>/dev/null) || return 1 # "1.37.0"
  [ "${version#"$WANT"}" != "$version" ] && "$VENV/bin/python" -c 'import yaml' 2>/dev/null
}

if ! usable; then
  exec 9>"$ROOT/.venv-k8s.lock"
  command -v flock >/dev/null 2>&1 && flock 9
  if ! usable; then
    pip_venv_install "$VENV" "$SPEC"
    usable || { echo "$SPEC installed no usable $BIN" >&2; exit 1; }
  fi
fi
echo "$BIN"
