"""One loopback HTTP(S) server on a thread of its own: what the admin API and credentials share."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["JsonHandler", "LoopbackServer", "ServerThread"]


class JsonHandler(BaseHTTPRequestHandler):
    """HTTP/1.1, JSON answers, no access log on stderr (the processes log with structlog)."""

    protocol_version = "HTTP/1.1"
    server_version = "windedge-local-stand-in"

    def log_message(self, format: str, *args: Any) -> None:
        return

    def send_json(self, status: int, answer: Any) -> None:
        """``answer`` as JSON (None: an empty body)."""
        data = b"" if answer is None else json.dumps(answer).encode()
        self.send_response(status)
        if data:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class LoopbackServer(ThreadingHTTPServer):
    """Threads per request, never blocking the process's exit."""

    daemon_threads = True


class ServerThread:
    """Serves ``server`` on a daemon thread; ``port`` is the one it bound."""

    def __init__(self, server: LoopbackServer, name: str) -> None:
        self.server = server
        self.port: int = server.server_address[1]
        self._thread = threading.Thread(
            target=server.serve_forever, args=(0.1,), name=name, daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
