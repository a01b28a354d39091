#!/usr/bin/env bash
# Builds the bundled model package, models/wind-turbine-1.0.tar.gz:
#   - the autoencoder graph (cloud/autoencoder.py, seeded untrained weights),
#   - the preprocessing block: the seed statistics (edgeapp.features defaults),
#   - a golden input of 8 windows of seeded standard-normal float32 data,
#     the expected output computed by ONNX Runtime (rtol 1e-4, atol 1e-5),
#   - signed with the DEVELOPMENT key in models/dev-keys/ (created if absent).
# Deterministic: running it again with the same key gives the same bytes.
# Run scripts/setup.sh first.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

py=.venv/bin/python
edgectl=${EDGECTL:-.venv/bin/edgectl}
name=wind-turbine
version=1.0
keys=models/dev-keys
key_name=windedge-dev

log() { printf 'build-model: %s\n' "$*" >&2; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if [ ! -f "$keys/$key_name.key" ]; then
  log "no development key yet: creating $keys/$key_name.{key,pub}"
  "$edgectl" package keygen --out "$keys" --name "$key_name"
fi

"$py" - "$work" <<'PY'
import json
import sys
from pathlib import Path

import numpy as np

from cloud.autoencoder import build_autoencoder_onnx, default_preprocessing_block

work = Path(sys.argv[1])
build_autoencoder_onnx(work / "model.onnx", seed=0)
(work / "preprocessing.json").write_text(json.dumps(default_preprocessing_block(), indent=2))
golden = np.random.default_rng(0).standard_normal((8, 6, 10, 10), dtype=np.float32)
np.save(work / "golden-input.npy", golden, allow_pickle=False)
PY

"$edgectl" package build \
  --model "$work/model.onnx" \
  --name "$name" --version "$version" \
  --signing-key "$keys/$key_name.key" \
  --preprocessing-json "$work/preprocessing.json" \
  --golden-input "$work/golden-input.npy" \
  --rtol 1e-4 --atol 1e-5 \
  --out models

"$edgectl" package verify "models/$name-$version.tar.gz" --trusted-keys "$keys" --golden
