#!/usr/bin/env bash
# Regenerates the gRPC stubs (and their type stubs) from proto/agent.proto.
# Usage: scripts/gen-proto.sh [OUTPUT_DIR]   (default: edgeagent/_proto)
# tests/agent/test_proto_fresh.py runs this into a temporary directory and
# fails when the committed stubs differ from what it produces.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-"$root/edgeagent/_proto"}
py=${PYTHON:-"$root/.venv/bin/python"}
mkdir -p "$out"
export PATH="$(dirname "$py"):$PATH"  # protoc-gen-mypy lives beside the interpreter
"$py" -m grpc_tools.protoc -I"$root/proto" \
  --python_out="$out" --grpc_python_out="$out" \
  --mypy_out="$out" --mypy_grpc_out="$out" \
  "$root/proto/agent.proto"
# protoc writes absolute imports ("import agent_pb2"); the stubs live in a
# package, so make the sibling imports relative.
for f in "$out/agent_pb2_grpc.py" "$out/agent_pb2_grpc.pyi"; do
  sed -i -e 's/^import agent_pb2 as agent__pb2$/from . import agent_pb2 as agent__pb2/' \
         -e 's/^import agent_pb2$/from . import agent_pb2/' \
         -e 's/^import agent_pb2 as _agent_pb2$/from . import agent_pb2 as _agent_pb2/' "$f"
done
[ -f "$out/__init__.py" ] || printf '"""Generated gRPC stubs for proto/agent.proto (do not edit; run scripts/gen-proto.sh)."""\n' > "$out/__init__.py"
