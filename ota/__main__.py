"""edge-ota: the OTA updater's entry point (its one composition root).

Parses settings once, builds every collaborator, finishes or rolls back the
update a previous run left, then waits for jobs: one at a time, from
``start-next``, woken by notifications, connections, ``edgectl ota check``
(SIGUSR1) and an idle timer. Exit codes: 0 after SIGTERM/SIGINT, 2 for an
invalid configuration.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

import structlog

from edgecommon.iot_credentials import IotCredentialsConfig
from edgecommon.logging import configure_logging
from edgecommon.memory import tune_malloc
from edgecommon.sdnotify import Notifier
from ota.errors import ConfigError, TransientError
from ota.settings import OtaSettings, load_settings

log = structlog.get_logger("ota")


class App:
    """Builds and runs the updater."""

    def __init__(self, settings: OtaSettings) -> None:
        from edgeagent.client import AgentClient  # noqa: PLC0415 - after malloc tuning
        from ota.download import Downloader, S3Access  # noqa: PLC0415
        from ota.install import Installer  # noqa: PLC0415
        from ota.jobs import IotJobs  # noqa: PLC0415
        from ota.store import Store  # noqa: PLC0415
        from ota.updater import Updater  # noqa: PLC0415

        self.settings = settings
        self.wakeups: queue.Queue[str] = queue.Queue()
        self.stopping = threading.Event()
        self.notifier = Notifier()
        self.store = Store(settings.state_dir, history_size=settings.history_size)
        self.jobs = IotJobs(settings, self.wakeups)
        iot = _iot_credentials(settings)
        self.agent = AgentClient(settings.agent_socket, timeout=settings.agent_timeout_s)
        self.updater = Updater(
            settings=settings,
            store=self.store,
            installer=Installer(
                models_dir=settings.models_dir, trusted_keys_dir=settings.trusted_keys
            ),
            downloader=Downloader(
                s3=S3Access(region=settings.region, endpoint_url=settings.s3_endpoint_url, iot=iot),
                ca_file=settings.download_ca_file,
                timeout=settings.download_timeout_s,
                disk_reserve_bytes=settings.disk_reserve_bytes,
            ),
            agent=self.agent,
            reporter=self.jobs,
        )

    def request_stop(self) -> None:
        self.stopping.set()
        self.wakeups.put("stop")
        if self.updater.current is not None:
            # the record resumes it at the next start, as after a power loss
            log.warning("stopping in the middle of an update; it resumes at next start")
            raise SystemExit(0)

    def request_check(self) -> None:
        # from a signal handler: never take the queue's lock on this thread
        threading.Thread(target=self.wakeups.put, args=("check",), daemon=True).start()

    def run(self) -> int:
        self.store.pid_file.write_text(f"{os.getpid()}\n")
        try:
            self.jobs.start()
            self.notifier.ready("recovering")
            self.updater.recover()
            self.notifier.status("waiting for jobs")
            self._loop()
        finally:
            self.notifier.stopping()
            self.jobs.stop()
            self.agent.close()
            with contextlib.suppress(FileNotFoundError):
                self.store.pid_file.unlink()
        return 0

    def _loop(self) -> None:
        while not self.stopping.is_set():
            try:
                reason = self.wakeups.get(timeout=self.settings.idle_query_s)
            except queue.Empty:
                reason = "idle"
            with contextlib.suppress(queue.Empty):
                while True:  # coalesce: one query answers every wake-up so far
                    self.wakeups.get_nowait()
            if self.stopping.is_set():
                return
            try:
                job = self.jobs.start_next()
            except TransientError as exc:
                log.warning("asking for jobs failed", reason=reason, error=str(exc))
                continue
            if job is None:
                log.info("no pending job", reason=reason)
                continue
            log.info("job received", job_id=job.job_id, execution=job.execution_number)
            self.notifier.status(f"updating: job {job.job_id}")
            self.updater.handle(job)
            self.notifier.status("waiting for jobs")
            self.wakeups.put("after-job")  # another may be queued behind it


def _iot_credentials(settings: OtaSettings) -> IotCredentialsConfig | None:
    if not settings.credentials_endpoint:
        return None
    try:
        return IotCredentialsConfig.parse(
            endpoint=settings.credentials_endpoint,
            role_alias=settings.role_alias,
            thing_name=settings.thing_name,
            cert_file=settings.cert_path,
            key_file=settings.key_path,
            ca_file=settings.ca_path,
            timeout=settings.download_timeout_s,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="edge-ota", description="windedge OTA updater: AWS IoT Jobs in, model versions out."
    )
    parser.add_argument(
        "--config", "-c", type=Path, help="TOML configuration (WINDEDGE_OTA_* variables override)"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"edge-ota: {exc}", file=sys.stderr)  # noqa: T201 - before logging exists
        return 2
    configure_logging(level=settings.log_level)
    tune_malloc()  # before any thread starts: see edgecommon.memory
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    try:
        app = App(settings)
    except (ConfigError, OSError) as exc:
        log.error("cannot start", error=str(exc))
        print(f"edge-ota: {exc}", file=sys.stderr)  # noqa: T201 - the operator's terminal
        return 2

    def on_stop(signum: int, _frame: FrameType | None) -> None:
        log.info("signal received", signal=signal.Signals(signum).name)
        app.request_stop()

    def on_check(_signum: int, _frame: FrameType | None) -> None:
        app.request_check()

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGUSR1, on_check)
    return app.run()


__all__ = ["App", "main"]

if __name__ == "__main__":
    sys.exit(main())
