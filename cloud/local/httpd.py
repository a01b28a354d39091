"""One loopback HTTP(S) server on a thread of its own: what the admin API and credentials share."""

from __future__ import annotations

import threading
from http.server import ThreadingHTTPServer

__all__ = ["LoopbackServer", "ServerThread"]


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
