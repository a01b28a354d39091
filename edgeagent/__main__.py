"""edge-agent: the composition root of the model server.

Parses settings once, builds every collaborator here and passes them in by
constructor, restores the models the device was serving, starts the gRPC
server on the Unix socket, tells systemd it is ready, and shuts down in order
on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgeagent import __doc__ as package_doc
from edgeagent.capture import StatusBook
from edgeagent.capture.spool import CaptureSpool, spool_config
from edgeagent.capture.upload import CaptureConfigError, Uploader, build_destination
from edgeagent.grpc_server import (
    SocketInUseError,
    TransportLimits,
    build_server,
    prepare_socket_path,
)
from edgeagent.health import HealthState
from edgeagent.package import PackageError, load_trusted_keys
from edgeagent.registry import ModelRegistry, StateStore
from edgeagent.runtime import RuntimeOptions
from edgeagent.service import AgentService, PackageLoader
from edgeagent.settings import AgentSettings, ConfigError, load_settings
from edgeagent.wire.server import Server
from edgecommon.logging import configure_logging
from edgecommon.memory import tune_malloc
from edgecommon.sdnotify import Notifier

log = structlog.get_logger("edgeagent")


class AgentApp:
    """Everything one agent process runs, built in one place."""

    def __init__(self, settings: AgentSettings, *, notifier: Notifier | None = None) -> None:
        self.settings = settings
        self.notifier = notifier or Notifier()
        self.trusted_keys = self._trusted_keys()
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        loader = PackageLoader(
            trusted_keys=self.trusted_keys,
            require_signature=settings.require_signature,
            runtime_options=RuntimeOptions(
                intra_op_threads=settings.intra_op_threads,
                inter_op_threads=settings.inter_op_threads,
                chunk=settings.inference_chunk,
                memory_arena=settings.memory_arena,
            ),
            golden_check=settings.golden_check,
        )
        self.registry = ModelRegistry(
            loader=loader, store=StateStore(settings.state_dir), max_models=settings.max_models
        )
        self.capture_statuses = StatusBook(ttl_seconds=settings.capture_status_ttl_seconds)
        try:
            destination = build_destination(settings)
        except ValueError as exc:
            raise CaptureConfigError(str(exc)) from exc
        self.capture_spool = CaptureSpool(
            directory=settings.state_dir / "capture",
            statuses=self.capture_statuses,
            config=spool_config(settings),
        )
        self.capture_spool.open()  # takes the spool's lock, recovers what a crash left
        self.capture_uploader = Uploader(
            spool=self.capture_spool,
            destination=destination,
            device_id=settings.device_id,
            prefix=settings.capture_prefix,
            retry_max=settings.capture_retry_max_seconds,
        )
        self.service = AgentService(
            registry=self.registry,
            capture_sink=self.capture_spool,
            capture_statuses=self.capture_statuses,
            max_batch=settings.max_batch,
        )
        self.server: Server | None = None
        self.health: HealthState | None = None

    def _trusted_keys(self) -> list[Ed25519PublicKey]:
        directory = self.settings.trusted_keys
        if directory is None or not directory.is_dir():
            if self.settings.require_signature:
                log.warning(
                    "no trusted package keys: every LoadModel will be refused",
                    trusted_keys=str(directory),
                )
            return []
        return load_trusted_keys(directory)

    def start(self) -> None:
        # a live agent on the socket wins: find out before touching any state
        prepare_socket_path(self.settings.socket)
        self.capture_spool.start()
        self.capture_uploader.start()
        if threading.current_thread() is threading.main_thread():
            # `edgectl capture flush` (or `kill -USR1`): seal and upload the spool now
            signal.signal(signal.SIGUSR1, lambda _signum, _frame: self.flush_captures())
        failed = self.registry.restore()
        self.server, self.health = build_server(
            self.service,
            socket_path=self.settings.socket,
            workers=self.settings.workers,
            max_message_bytes=self.settings.max_message_bytes,
            socket_group=self.settings.socket_group,
            limits=TransportLimits(
                max_connections=self.settings.max_connections,
                handshake_timeout=self.settings.handshake_timeout_seconds,
                send_stall=self.settings.send_stall_seconds,
                connection_workers=self.settings.connection_workers,
            ),
        )
        models = [m.info.name for m in self.registry.loaded()]
        log.info(
            "agent serving",
            socket=str(self.settings.socket),
            models=models,
            restore_failed=failed,
            trusted_keys=len(self.trusted_keys),
        )
        self.notifier.ready(f"serving {len(models)} model(s) on {self.settings.socket}")

    def stop(self, grace: float = 5.0) -> None:
        self.notifier.stopping()
        if self.health is not None:
            self.health.enter_graceful_shutdown()
        if self.server is not None:
            self.server.stop(grace)
        # the uploader first, so that nothing touches the spool once its lock is gone
        self.capture_uploader.close(timeout=grace)
        self.capture_spool.close()  # what was acknowledged is fsynced before we exit
        log.info("agent stopped")

    def flush_captures(self) -> None:
        """Seal the open capture segment and retry uploads now."""
        self.capture_spool.flush()
        self.capture_uploader.kick()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="edge-agent", description=(package_doc or "").strip())
    parser.add_argument("--socket", "-a", type=Path, help="Unix socket path to serve on")
    parser.add_argument("--trusted-keys", type=Path, help="directory of trusted public keys")
    parser.add_argument(
        "--config", "-c", type=Path, help="TOML config, or a SageMaker Edge Agent JSON config"
    )
    parser.add_argument("--state-dir", type=Path, help="state directory (loaded models, spool)")
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING, ERROR")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = load_settings(
            args.config,
            socket=args.socket,
            trusted_keys=args.trusted_keys,
            state_dir=args.state_dir,
            log_level=args.log_level,
        )
    except ConfigError as exc:
        print(f"edge-agent: {exc}", file=sys.stderr)  # noqa: T201 - before logging exists
        return 2
    configure_logging(level=settings.log_level)
    tune_malloc()  # before any thread starts: see edgecommon.memory

    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal received", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        app = AgentApp(settings)
        app.start()
    except SocketInUseError as exc:
        log.error("cannot start", error=str(exc))
        print(f"edge-agent: {exc}", file=sys.stderr)  # noqa: T201 - the operator's terminal
        return 1
    except (PackageError, OSError, ConfigError) as exc:
        log.error("cannot start", error=str(exc), error_type=type(exc).__name__)
        print(f"edge-agent: {exc}", file=sys.stderr)  # noqa: T201 - the operator's terminal
        return 1
    stop.wait()
    app.stop()
    return 0


__all__ = ["AgentApp", "main"]

if __name__ == "__main__":
    sys.exit(main())
