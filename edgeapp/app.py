"""The detection daemon, built in one place: what ``edge-app`` runs.

``App`` constructs every collaborator from the settings and passes them in
by constructor, then runs the tick loop on the calling thread until
``request_stop`` (SIGTERM/SIGINT, wired in ``edgeapp.__main__``) or, for a
replay without ``replay_loop``, until the file is done.

Threads, each owned and joined here: the source's (its MQTT client's reader, or
the replay thread), the publisher's MQTT client reader, the detector's
inference workers, and the writer of the learned baselines
(``learned_file``). The tick loop pings the systemd watchdog after each
completed tick while the source's thread is alive.

Before each tick, learned turbines silent for ``turbine_evict_s`` give their
slot back. Each tick is logged at DEBUG; one INFO ``summary`` line per
``log_summary_interval_s`` carries the interval's counts and latencies.

Shutdown order: STOPPING=1; stop the source (no new samples); close the agent
connection (an in-flight call ends at once) and join the workers; write the
checks' learned baselines (``learned_file``, also every
``learned_save_period_s`` while running); disconnect
the publisher after its last write, so every message handed to it reaches the
broker whole. A call to a hung agent is cancelled ``STOP_GRACE_S`` after the
stop request, whichever thread waits for it, so SIGTERM ends the daemon in
about a second whatever ``agent_timeout_s`` is.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import structlog

from edgeagent.client import AgentClient
from edgeapp.buffers import TurbineBuffers
from edgeapp.detector import Detector, TickReport
from edgeapp.errors import ConfigError
from edgeapp.ingest import DropCounter, DropReason, Ingestor
from edgeapp.learned import LearnedFile
from edgeapp.model_follower import ModelClient, ModelFollower
from edgeapp.mqtt import BrokerConfig, MqttClient, tls_context
from edgeapp.mqtt_source import MqttSource
from edgeapp.publisher import MqttPublisher, Topics
from edgeapp.replay import ReplaySource
from edgeapp.settings import AppSettings
from edgeapp.sources import Source, TopicPattern
from edgecommon.sdnotify import Notifier

__all__ = ["App"]

log = structlog.get_logger("edgeapp")

SOURCE_STOP_TIMEOUT_S = 1.0
# After a stop request, how long a call to the agent may still take before it is
# cancelled (a hung agent must not hold the daemon for agent_timeout_s).
STOP_GRACE_S = 0.7


class App:
    """Everything one detection daemon runs, built in one place."""

    def __init__(self, settings: AppSettings, *, notifier: Notifier | None = None) -> None:
        self.settings = settings
        self.notifier = notifier or Notifier()
        self.stop_event = threading.Event()
        self._finish_error: str | None = None
        self._finishing = False
        self._stop_timer: threading.Timer | None = None
        self.buffers = TurbineBuffers(
            max_turbines=settings.max_turbines,
            capacity=settings.buffer_length,
            gap_reset_s=settings.gap_reset_s,
            fixed_ids=settings.turbines,
        )
        self.drops = DropCounter(interval_s=settings.drop_log_interval_s)
        self.ingestor = Ingestor(
            buffers=self.buffers,
            topics=TopicPattern(settings.mqtt_topic),
            drops=self.drops,
            max_payload_bytes=settings.max_payload_bytes,
            max_samples_per_message=settings.max_samples_per_message,
            max_abs_quaternion=settings.max_abs_quaternion,
            max_abs_value=settings.max_abs_value,
        )
        broker = _broker_config(settings)
        self.publisher_client = MqttClient(
            broker=broker,
            client_id=f"{settings.mqtt_client_id}-pub",
            status_topic=settings.mqtt_status_topic or None,
            max_queued=settings.mqtt_max_queued,
        )
        self.publisher = MqttPublisher(
            client=self.publisher_client,
            topics=Topics(settings.topic_prefix),
            dashboard_samples=settings.dashboard_samples,
            verdict_qos=settings.mqtt_verdict_qos,
        )
        self.publisher_client.on_connected(self.publisher.on_connected)
        self.source: Source
        if settings.source == "replay" and settings.replay_file is not None:
            self.source = ReplaySource(
                path=settings.replay_file,
                ingestor=self.ingestor,
                speed=settings.replay_speed,
                rate_hz=settings.replay_rate_hz,
                loop=settings.replay_loop,
                on_finished=self._source_finished,
            )
        else:
            self.source = MqttSource(
                broker=broker,
                client_id=f"{settings.mqtt_client_id}-src",
                topic=settings.mqtt_topic,
                ingestor=self.ingestor,
            )
        self.follower = ModelFollower(
            client_factory=self._agent_client,
            model_name=settings.model_name,
            retry_min_s=settings.agent_retry_min_s,
            retry_max_s=settings.agent_retry_max_s,
            buffer_length=settings.buffer_length,
            log_interval_s=settings.agent_log_interval_s,
        )
        self.detector = Detector(
            buffers=self.buffers,
            follower=self.follower,
            sink=self.publisher,
            max_batch=settings.max_batch,
            max_inflight=settings.max_inflight,
            capture_fraction=settings.capture_fraction,
            dashboard_period_s=settings.dashboard_period_s,
            dashboard_samples=settings.dashboard_samples,
            stuck_after_samples=settings.stuck_after_samples,
            relation_learn_samples=settings.relation_learn_samples,
            relation_tolerances=(settings.generator_tolerance, settings.power_curve_tolerance),
            noise_limit=settings.noise_limit,
            noise_learn_samples=settings.noise_learn_samples,
        )
        self.learned: LearnedFile | None = None
        self._learned_writer = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="edgeapp-learned"
        )
        self._learned_writing: Future[None] | None = None
        if settings.learned_file is not None and self.detector.learning_checks:
            self.learned = LearnedFile(settings.learned_file, self.detector.learning_checks)
            self.learned.load()
        self.tick_errors = 0
        self.overruns = 0

    def _agent_client(self) -> ModelClient:
        return AgentClient(self.settings.agent_socket, timeout=self.settings.agent_timeout_s)

    def _source_finished(self, error: str | None) -> None:
        self._finish_error = error
        self._finishing = True

    def request_stop(self) -> None:
        """Ask the loop to stop (signal handlers call it); a call to the agent still
        running ``STOP_GRACE_S`` later is cancelled, whatever thread it is on."""
        if self.stop_event.is_set():
            return
        self.stop_event.set()
        timer = threading.Timer(STOP_GRACE_S, self.follower.cancel)
        timer.daemon = True
        timer.start()
        self._stop_timer = timer

    # ---- running

    def run(self) -> int:
        """Start, tick until stopped, shut down; returns the exit code."""
        settings = self.settings
        self.publisher_client.start()
        self.source.start()
        log.info(
            "edge-app started",
            source=self.source.name,
            model=settings.model_name,
            agent_socket=str(settings.agent_socket),
            broker=f"{settings.mqtt_host}:{settings.mqtt_port}",
            tls=settings.mqtt_tls,
            mqtt_user=settings.mqtt_username,
            verdict_qos=settings.mqtt_verdict_qos,
            topic=settings.mqtt_topic if settings.source == "mqtt" else None,
            replay_file=str(settings.replay_file) if settings.source == "replay" else None,
            max_turbines=settings.max_turbines,
            tick_period_s=settings.tick_period_s,
            max_batch=settings.max_batch,
        )
        try:
            self._loop()
        finally:
            self.shutdown()
        return 1 if self._finish_error else 0

    def _loop(self) -> None:
        period = self.settings.tick_period_s
        ready_sent = False
        next_status = 0.0
        deadline = time.monotonic()
        last = _Counters.of(self)
        summary = _Summary(self, time.monotonic())
        next_save = time.monotonic() + self.settings.learned_save_period_s
        while not self.stop_event.is_set():
            finishing = self._finishing  # read before the tick: the last data gets scored
            report = self._tick()
            now = time.monotonic()
            counters = _Counters.of(self)
            self._log_tick(report, counters, last)
            last = counters
            summary.add(report)
            if now - summary.started >= self.settings.log_summary_interval_s:
                summary.log(self, report, now)
                summary = _Summary(self, now)
            if not ready_sent:
                self.notifier.ready(report.label)
                ready_sent = True
            if self.source.alive():
                self.notifier.watchdog()
            if now >= next_status:
                next_status = now + self.settings.status_period_s
                self.notifier.status(self._status_text(report))
            if now >= next_save:
                next_save = now + self.settings.learned_save_period_s
                self._save_learned()
            if finishing:
                break
            deadline += period
            if deadline <= now:
                self.overruns += 1
                deadline = now
            self.stop_event.wait(max(0.0, deadline - time.monotonic()))

    def _tick(self) -> TickReport:
        self._evict_silent()
        try:
            return self.detector.tick(self.stop_event)
        except Exception as exc:  # a bug in a tick must not end the daemon: log it, go on
            self.tick_errors += 1
            log.exception("tick failed", errors=self.tick_errors)
            state = self.follower.state
            return TickReport(
                status=state.status.value, label=state.label, error=f"{type(exc).__name__}: {exc}"
            )

    def _save_learned(self, *, wait: bool = False) -> None:
        """Write the learned baselines if they changed, on the writer thread.

        The copy is taken here, between ticks (the checks belong to this
        thread); encoding and the atomic write, with its fsync, happen on
        the writer so a slow disk does not hold a tick. A write still running
        skips this round; ``wait`` (shutdown) writes and waits. A failed
        write is logged, not fatal, and retried next time.
        """
        learned = self.learned
        if learned is None:
            return
        writing = self._learned_writing
        if writing is not None and not writing.done():
            if not wait:
                return
            writing.result()
        content = learned.snapshot()
        if content is None:
            return

        def write() -> None:
            try:
                learned.write(content)
            except (OSError, ValueError) as exc:
                learned.invalidate()
                log.error("learned baselines not written", path=str(learned.path), error=str(exc))
            else:
                log.debug("learned baselines written", path=str(learned.path))

        self._learned_writing = self._learned_writer.submit(write)
        if wait:
            self._learned_writing.result()

    def _evict_silent(self) -> None:
        """Free the slots of learned turbines silent for ``turbine_evict_s``."""
        evicted = self.buffers.evict_idle(time.monotonic(), self.settings.turbine_evict_s)
        if evicted:
            self.publisher.forget(evicted)
            log.info(
                "turbines evicted",
                count=len(evicted),
                examples=evicted[:5],
                silent_s=self.settings.turbine_evict_s,
                turbines=len(self.buffers),
            )

    def _log_tick(self, report: TickReport, now: _Counters, last: _Counters) -> None:
        if not _debug_enabled():
            return
        log.debug(
            "tick",
            status=report.status,
            turbines=report.turbines,
            ready=report.ready,
            verdicts=report.verdicts,
            chunks=report.chunks,
            discarded=report.discarded or None,
            error=report.error,
            messages=now.messages - last.messages,
            samples=now.samples - last.samples,
            dropped=now.dropped - last.dropped,
            published=now.published - last.published,
            unpublished=(now.unpublished - last.unpublished) or None,
            **{f"{stage}_ms": round(ms, 2) for stage, ms in report.ms.items()},
        )

    def _status_text(self, report: TickReport) -> str:
        return (
            f"{report.label}; {report.turbines} turbines; {self.detector.verdicts} verdicts; "
            f"{self.drops.total} inputs dropped"
        )

    def shutdown(self) -> None:
        """Stop everything in order (idempotent)."""
        self.notifier.stopping()
        if self._stop_timer is not None:
            self._stop_timer.cancel()
        self.source.stop(SOURCE_STOP_TIMEOUT_S)
        self.follower.close()
        self.detector.close()
        self.follower.close()  # a capture call may have opened a new channel
        self._save_learned(wait=True)
        self._learned_writer.shutdown(wait=True)
        self.publisher_client.stop()
        log.info(
            "edge-app stopped",
            ticks=self.detector.ticks,
            verdicts=self.detector.verdicts,
            messages=self.ingestor.messages,
            samples=self.ingestor.samples,
            dropped=self.drops.snapshot(),
            published=self.publisher.published,
            unpublished=self.publisher.unpublished,
            unacknowledged=self.publisher.queued,
            evicted=self.buffers.evicted,
            overruns=self.overruns,
            tick_errors=self.tick_errors,
        )
        self.notifier.close()


def _broker_config(settings: AppSettings) -> BrokerConfig:
    """The broker's address, TLS and credentials; ConfigError when a TLS file is unusable."""
    tls = None
    if settings.mqtt_tls:
        try:
            tls = tls_context(
                settings.mqtt_ca_file, settings.mqtt_cert_file, settings.mqtt_key_file
            )
        except ValueError as exc:
            raise ConfigError(f"invalid app configuration: {exc}") from exc
    password = settings.mqtt_password
    return BrokerConfig(
        host=settings.mqtt_host,
        port=settings.mqtt_port,
        keepalive_s=settings.mqtt_keepalive_s,
        reconnect_min_s=settings.mqtt_reconnect_min_s,
        reconnect_max_s=settings.mqtt_reconnect_max_s,
        tls=tls,
        username=settings.mqtt_username,
        password=password.get_secret_value() if password is not None else None,
    )


class _Counters:
    """Cumulative counters, for per-tick differences in the tick log line."""

    __slots__ = ("dropped", "messages", "published", "samples", "unpublished")

    def __init__(
        self, messages: int, samples: int, dropped: int, published: int, unpublished: int
    ) -> None:
        self.messages = messages
        self.samples = samples
        self.dropped = dropped
        self.published = published
        self.unpublished = unpublished

    @classmethod
    def of(cls, app: App) -> _Counters:
        return cls(
            app.ingestor.messages,
            app.ingestor.samples,
            app.drops.total,
            app.publisher.published,
            app.publisher.unpublished,
        )


# drop reasons that refuse a turbine (rather than a message's content)
_REFUSALS = frozenset(
    (DropReason.BAD_TOPIC, DropReason.UNKNOWN_TURBINE, DropReason.TOO_MANY_TURBINES)
)


def _debug_enabled() -> bool:
    return logging.getLogger().isEnabledFor(logging.DEBUG)


class _Summary:
    """The ticks of one ``log_summary_interval_s``: one INFO line of counts and latencies."""

    def __init__(self, app: App, started: float) -> None:
        self.started = started
        self.counters = _Counters.of(app)
        self.drops = app.drops.snapshot()
        self.overruns = app.overruns
        self.tick_errors = app.tick_errors
        self.evicted = app.buffers.evicted
        self.ticks = 0
        self.ready = 0
        self.verdicts = 0
        self.chunks = 0
        self.discarded = 0
        self.failed = 0
        self.tick_ms: list[float] = []
        self.predict_ms: list[float] = []
        app.publisher.take_latency()  # the next interval's verdicts only

    def add(self, report: TickReport) -> None:
        self.ticks += 1
        self.ready += report.ready
        self.verdicts += report.verdicts
        self.chunks += report.chunks
        self.discarded += report.discarded
        self.failed += report.error is not None
        self.tick_ms.append(report.ms.get("total", 0.0))
        if "infer" in report.ms:
            self.predict_ms.append(report.ms["infer"])

    def log(self, app: App, report: TickReport, now: float) -> None:
        counters = _Counters.of(app)
        drops = app.drops.snapshot()
        dropped = {
            k: n - self.drops.get(k, 0) for k, n in drops.items() if n > self.drops.get(k, 0)
        }
        latencies, latency_mean, latency_max = app.publisher.take_latency()
        log.info(
            "summary",
            interval_s=round(now - self.started, 3),
            status=report.status,
            label=report.label,
            reason=app.follower.reason,
            turbines=report.turbines,
            ticks=self.ticks,
            overruns=app.overruns - self.overruns,
            tick_errors=app.tick_errors - self.tick_errors,
            failed_ticks=self.failed,
            ready=self.ready,
            chunks=self.chunks,
            verdicts=self.verdicts,
            discarded=self.discarded,
            messages=counters.messages - self.counters.messages,
            samples=counters.samples - self.counters.samples,
            dropped=counters.dropped - self.counters.dropped,
            dropped_by_reason=dropped or None,
            refused={k: n for k, n in dropped.items() if k in _REFUSALS} or None,
            evicted=app.buffers.evicted - self.evicted,
            published=counters.published - self.counters.published,
            unpublished=counters.unpublished - self.counters.unpublished,
            queued=app.publisher.queued or None,
            **_stats("tick_ms", self.tick_ms),
            **_stats("predict_ms", self.predict_ms),
            verdict_latency_ms_mean=round(latency_mean, 2) if latencies else None,
            verdict_latency_ms_max=round(latency_max, 2) if latencies else None,
        )


def _stats(name: str, values: list[float]) -> dict[str, float | None]:
    """p50, p95 and max of ``values`` (None when there are none), rounded to 0.01."""
    if not values:
        return {f"{name}_p50": None, f"{name}_p95": None, f"{name}_max": None}
    p50, p95, top = np.percentile(np.asarray(values), [50, 95, 100]).tolist()
    return {
        f"{name}_p50": round(p50, 2),
        f"{name}_p95": round(p95, 2),
        f"{name}_max": round(top, 2),
    }
