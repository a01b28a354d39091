#!/usr/bin/env bash
# Sets everything up, then walks through a model package by hand:
#   - verifies and unpacks the bundled model package (models/) the way a
#     device installs it,
#   - starts edge-agent on a Unix socket in a temporary run directory,
#   - loads the model and runs sample predictions through edgectl (byte_data
#     and SysV shared memory), then stops the agent.
# DEMO_KEEP=1 leaves the run directory in place for a look afterwards.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/setup.sh
export PATH="$root/.venv/bin:$PATH"

run=$(mktemp -d "${TMPDIR:-/tmp}/windedge-demo.XXXXXX")
agent_pid=""
cleanup() {
  if [ -n "$agent_pid" ] && kill -0 "$agent_pid" 2>/dev/null; then
    kill -TERM "$agent_pid"; wait "$agent_pid" 2>/dev/null || true
  fi
  [ "${DEMO_KEEP:-0}" = 1 ] && echo "run directory kept: $run" || rm -rf "$run"
}
trap cleanup EXIT INT TERM

say() { printf '\n== %s\n' "$*"; }
sock="$run/agent.sock"
pkg="$run/models/wind-turbine/1.0"
mkdir -p "$run/models/wind-turbine"

say "verify and install the bundled package (signature, hashes, safe extraction)"
edgectl package verify models/wind-turbine-1.0.tar.gz --trusted-keys models/dev-keys
edgectl package extract models/wind-turbine-1.0.tar.gz "$pkg" --trusted-keys models/dev-keys

say "start edge-agent on $sock"
edge-agent --socket "$sock" --trusted-keys models/dev-keys --state-dir "$run/state" \
  --log-level WARNING &
agent_pid=$!
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done
[ -S "$sock" ] || { echo "edge-agent did not start" >&2; exit 1; }
export WINDEDGE_AGENT_SOCKET="$sock"

say "load the model (verification, ONNX Runtime session, golden check)"
edgectl models load wind-turbine "$pkg"
edgectl models list

say "predict: the package's golden input, 8 windows of [6, 10, 10]"
edgectl models predict wind-turbine "$pkg/golden/input.npy"

say "predict again through SysV shared memory"
edgectl models predict wind-turbine "$pkg/golden/input.npy" --shared-memory

say "an error is a clear message, and the agent keeps serving"
edgectl models describe no-such-model || true
edgectl models describe wind-turbine

say "done: stopping the agent"
