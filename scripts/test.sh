#!/usr/bin/env bash
# Sets everything up, then runs the whole check: lint, types, tests.
# Extra arguments go to pytest (e.g. scripts/test.sh -k agent -x).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/setup.sh
export PATH="$root/.venv/bin:$PATH"
echo "== ruff"
ruff check .
ruff format --check .
echo "== mypy (strict)"
mypy
echo "== pytest"
exec pytest "$@"
