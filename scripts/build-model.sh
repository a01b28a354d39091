#!/usr/bin/env bash
# Trains and packages the released models into models/ (docs/training.md):
#   wind-turbine-1.0          the original topology, 24 turbines x 30 simulated minutes
#   wind-turbine-1.1          the original topology, 32 turbines x 30 min, 10 epochs (the OTA update)
#   wind-turbine-compact-1.0  the compact variant (9.4x fewer multiply-adds), 1.1's data
#   wind-turbine-relational-1.0  the relational variant (4.4x fewer multiply-adds; each
#                             feature from the ones that determine it), 300 turbines x 6 min
# each signed with the DEVELOPMENT key in models/dev-keys/ (created if absent),
# with its training record <name>-<version>.training.json beside it.
# Seeded: on the same machine with the same thread count a rerun gives the same
# bytes. Takes ~15-40 minutes on a 2-core machine (see the README).
# Run scripts/setup.sh first.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

edgectl=${EDGECTL:-.venv/bin/edgectl}
keys=models/dev-keys
key_name=windedge-dev

log() { printf 'build-model: %s\n' "$*" >&2; }

if [ ! -f "$keys/$key_name.key" ]; then
  log "no development key yet: creating $keys/$key_name.{key,pub}"
  "$edgectl" package keygen --out "$keys" --name "$key_name"
fi

train() {
  log "training $*"
  "$edgectl" train --out models --signing-key "$keys/$key_name.key" "$@"
}
train --version 1.0
train --version 1.1 --turbines 32 --minutes 30 --stride-ticks 6 --epochs 10 --threads 1
train --name wind-turbine-compact --version 1.0 --variant compact --turbines 32 --minutes 30 \
  --stride-ticks 6 --epochs 10 --threads 1
train --name wind-turbine-relational --version 1.0 --variant relational --step 1 \
  --turbines 300 --minutes 6 --validation-fraction 0.1 --threshold-fraction 0.4 \
  --stride-ticks 2 --epochs 10 --batch-size 128 --learning-rate 0.002 --patience 3 \
  --threshold-quantile 0.9995 --threshold-margin 1.1 --threads 1

for package in models/wind-turbine-1.0.tar.gz models/wind-turbine-1.1.tar.gz \
               models/wind-turbine-compact-1.0.tar.gz models/wind-turbine-relational-1.0.tar.gz; do
  "$edgectl" package verify "$package" --trusted-keys "$keys" --golden
done
