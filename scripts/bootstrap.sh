#!/usr/bin/env bash
# Installs what bot-bottle's demo and tests need on a fresh Debian machine, and starts
# the Docker engine if it is not running. Idempotent: a second run does nothing.
set -euo pipefail

log() { printf 'bootstrap: %s\n' "$*" >&2; }
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"

retry() {
  # retry ATTEMPTS CMD...: package mirrors and registries flake; never hang or give up early.
  local attempts=$1 n=1; shift
  until "$@"; do
    if [ "$n" -ge "$attempts" ]; then log "failed after $n attempts: $*"; return 1; fi
    log "attempt $n failed: $*; retrying in $((n * 10))s"; sleep $((n * 10)); n=$((n + 1))
  done
}

need_pkgs=()
command -v dockerd >/dev/null 2>&1 || need_pkgs+=(docker.io)
command -v mmdebstrap >/dev/null 2>&1 || need_pkgs+=(mmdebstrap)
command -v curl >/dev/null 2>&1 || need_pkgs+=(curl)
command -v git >/dev/null 2>&1 || need_pkgs+=(git)
command -v tmux >/dev/null 2>&1 || need_pkgs+=(tmux)  # the interactive tests drive `start` in a real terminal
command -v openssl >/dev/null 2>&1 || need_pkgs+=(openssl)
command -v python3 >/dev/null 2>&1 || need_pkgs+=(python3)
command -v node >/dev/null 2>&1 || need_pkgs+=(nodejs)
# The provenance test checks envelopes with an independent DSSE verifier in a venv.
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need_pkgs+=(python3-venv)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  log "installing ${need_pkgs[*]}"
  APT_OPTS=(-o Acquire::Retries=5 -o Acquire::http::Timeout=60 -o DPkg::Lock::Timeout=300)
  retry 3 timeout 600 $SUDO apt-get "${APT_OPTS[@]}" update -q
  retry 3 timeout 1200 $SUDO env DEBIAN_FRONTEND=noninteractive apt-get "${APT_OPTS[@]}" install -y -q --no-install-recommends "${need_pkgs[@]}"
fi

# Python securesystemslib's DSSE verifier, pinned, for the provenance test
# (crates/cli/tests/it/provenance.rs finds it at $BOT_BOTTLE_PYENV/bin/python).
PYENV_DIR=${BOT_BOTTLE_PYENV:-/var/tmp/bot-bottle-pyenv}
SSLIB_VERSION=1.6.0
if ! "$PYENV_DIR/bin/python" -c "import sys, cryptography, securesystemslib; sys.exit(securesystemslib.__version__ != '$SSLIB_VERSION')" >/dev/null 2>&1; then
  log "installing securesystemslib $SSLIB_VERSION into $PYENV_DIR"
  [ -x "$PYENV_DIR/bin/pip" ] || python3 -m venv "$PYENV_DIR"
  retry 3 timeout 600 "$PYENV_DIR/bin/pip" install -q --disable-pip-version-check "securesystemslib[crypto]==$SSLIB_VERSION"
fi

if ! timeout 20 docker info >/dev/null 2>&1; then
  log "starting dockerd"
  $SUDO sh -c 'nohup dockerd >/var/log/bot-bottle-dockerd.log 2>&1 &'
  for _ in $(seq 1 60); do
    timeout 5 docker info >/dev/null 2>&1 && break
    sleep 1
  done
  if ! timeout 20 docker info >/dev/null 2>&1; then
    log "dockerd did not come up; its log:"; tail -50 /var/log/bot-bottle-dockerd.log >&2 || true
    exit 1
  fi
fi
log "docker engine $(docker version --format '{{.Server.Version}}' 2>/dev/null) is up"

# The tripwire (a bottle's audited dead end for direct connections) needs a TUN device on
# the Docker host. Most kernels have the module; some images lack the device node.
if [ ! -c /dev/net/tun ]; then
  log "creating /dev/net/tun for the tripwire"
  $SUDO modprobe tun 2>/dev/null || true
  [ -c /dev/net/tun ] || { $SUDO mkdir -p /dev/net && $SUDO mknod -m 0600 /dev/net/tun c 10 200; } || true
fi
[ -c /dev/net/tun ] || log "warning: no /dev/net/tun on this host; bottles need BOT_BOTTLE_TRIPWIRE=off here (direct attempts then fail unaudited)"
