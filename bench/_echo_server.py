"""A do-nothing grpcio server on a Unix socket: Predict echoes its input.

With a grpcio client, the floor of what a plain grpcio server adds to a
Predict on this machine; measured beside the agent by bench/agent_latency.py.
Run: python -m bench._echo_server SOCKET
"""

from __future__ import annotations

import sys
from concurrent import futures

import grpc

from edgeagent._proto import agent_pb2 as pb
from edgeagent._proto import agent_pb2_grpc as pb_grpc


class Echo(pb_grpc.AgentServicer):
    def Predict(
        self, request: pb.PredictRequest, context: grpc.ServicerContext
    ) -> pb.PredictResponse:
        return pb.PredictResponse(tensors=list(request.tensors))


def main() -> None:
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=8),
        options=[
            ("grpc.max_receive_message_length", 64 << 20),
            ("grpc.max_send_message_length", 64 << 20),
        ],
    )
    pb_grpc.add_AgentServicer_to_server(Echo(), server)
    server.add_insecure_port(f"unix://{sys.argv[1]}")
    server.start()
    server.wait_for_termination()


if __name__ == "__main__":
    main()
