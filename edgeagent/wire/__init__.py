"""gRPC over HTTP/2 on a Unix socket: the agent's own transport, both ends.

Why not grpcio here: measured on a 2-core device, a do-nothing grpcio server
costs ~360 us of CPU per unary call and grpcio's client ~200 us, more than
the model itself at batch 1. This package speaks the same protocol (HTTP/2
framing per RFC 9113, HPACK through the ``hpack`` library, gRPC's
length-prefixed messages, status in trailers) with one thread per connection
and no hand-off on the hot path. Any gRPC client works against the server
(the tests drive it with grpcio); the client is used by windedge's own
processes. What it deliberately does not do: TLS, compression (a compressed
request gets UNIMPLEMENTED), client streaming.
"""
