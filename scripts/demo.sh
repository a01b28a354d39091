#!/usr/bin/env bash
# Sets everything up, then runs the whole local system (edgectl demo):
#   - the local AWS stand-in (broker, S3, IoT Jobs emulator),
#   - per simulated device (5 by default) an edge-agent serving the newest
#     released model of models/ and an edge-app scoring its turbines,
#   - the wind farm simulator and its dashboard (the URL is printed).
# Ctrl-C stops everything. Arguments go to `edgectl demo` (e.g. --devices 3,
# --duration 60, --http-port 8081, --keep). The package walk-through of the
# earlier demo is scripts/package-walkthrough.sh.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/setup.sh
export PATH="$root/.venv/bin:$PATH"
exec edgectl demo "$@"
