"""Generated gRPC stubs for proto/agent.proto (do not edit; run scripts/gen-proto.sh)."""
