#!/usr/bin/env bash
# Sets up everything windedge needs on a Debian/Ubuntu machine:
#   - Debian packages that are missing (mosquitto for the local broker, systemd
#     and systemd-container for the device-installation tests),
#   - .venv/ in the repository root with the project installed editable,
#     with its dev extras and the train extra (torch, CPU build: the test suite
#     runs a short training).
# Safe to run again: it reinstalls only when pyproject.toml changed.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

log() { printf 'setup: %s\n' "$*" >&2; }

# --- Debian packages --------------------------------------------------------
need_apt=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need_apt+=(mosquitto)
# the device-installation tests: systemd-analyze/-sysusers/-tmpfiles, systemctl --root,
# and systemd-nspawn to boot the installed units under a real systemd
command -v systemd-analyze >/dev/null 2>&1 || need_apt+=(systemd)
command -v systemd-nspawn >/dev/null 2>&1 || need_apt+=(systemd-container)
# the dashboard's browser tests drive Debian's headless chromium through Playwright
command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ] || need_apt+=(chromium)
if ((${#need_apt[@]})); then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  if ! command -v apt-get >/dev/null 2>&1; then
    log "missing ${need_apt[*]} and no apt-get here: install them by hand"; exit 1
  fi
  log "installing Debian packages: ${need_apt[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  # the package enables a system-wide broker; windedge starts its own on
  # loopback and free ports, so leave the system one alone if it is not wanted
fi

# --- Python -----------------------------------------------------------------
pick_python() {
  for c in "${PYTHON:-}" python3.13 python3.12 python3.11 python3; do
    [ -n "$c" ] || continue
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$c"; return 0
    fi
  done
  return 1
}
if [ ! -x .venv/bin/python ]; then
  py=$(pick_python) || { log "Python >= 3.11 is required"; exit 1; }
  if ! "$py" -c 'import venv, ensurepip' 2>/dev/null; then
    log "installing python3-venv"
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq python3-venv >/dev/null
  fi
  log "creating .venv with $py"
  "$py" -m venv .venv
fi

stamp=.venv/.windedge-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  log "installing windedge (editable, dev, local and train extras) into .venv"
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  .venv/bin/python -m pip install -q -e '.[dev,local,train]' >.venv/pip-install.log 2>&1 || { cat .venv/pip-install.log >&2; exit 1; }
  .venv/bin/python -c 'import edgeagent, onnxruntime, grpc, torch' # fail loudly if the install did not work
  echo "$want" > "$stamp"
fi
log "ready (.venv/bin/edge-agent, .venv/bin/edgectl)"
