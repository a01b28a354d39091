"""The updater's core: one job at a time through the persisted state machine.

It knows neither MQTT nor protobuf: IoT Jobs is a :class:`JobReporter`, the
agent is :class:`~edgeagent.client.AgentClient` (plain values in and out).
Each state's step runs its side effects and returns an event; the table in
:mod:`ota.machine` picks the next state; the record is written before the
next step starts. Errors decide events: transient ones are retried inside
the step (with backoff, within a budget), fatal ones fail it, a job that does
not apply is rejected, a job cancelled in the cloud is dropped.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import structlog
from tenacity import (
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
)

from edgeagent.client import AgentClient
from edgeagent.errors import AgentError, NotFoundError, UnavailableError
from edgeagent.package import MANIFEST_NAME, Manifest, PackageError, load_golden
from ota.crash import crash_point
from ota.document import (
    JobDocument,
    check_applicable,
    check_signed_manifest,
    parse_document,
)
from ota.download import Downloader
from ota.errors import CanceledError, FatalError, JobGoneError, RejectError, TransientError
from ota.install import Installer
from ota.machine import Event, Outcome, State, next_move, resume_state
from ota.settings import OtaSettings
from ota.store import Finished, Installed, Record, Store

log = structlog.get_logger(__name__)

MAX_TRANSITIONS = 64  # far more than any update needs: a loop, not a slow update
MAX_REASON = 900  # statusDetails values are at most 1,024 characters

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class JobExecution:
    """A job execution as the cloud handed it to us (transport-free)."""

    job_id: str
    execution_number: int | None
    version_number: int | None
    status: str | None
    document: Any = field(default=None)


class JobReporter(Protocol):
    """Status updates of one job execution (IoT Jobs ``UpdateJobExecution``)."""

    def update(self, record: Record, status: str, details: dict[str, str]) -> None:
        """Send ``status`` with ``details``; may update ``record.version_number``.

        Raises TransientError (retry later) or JobGoneError (the execution is
        terminal in the cloud, with the status it holds).
        """


@dataclass(frozen=True, slots=True)
class Served:
    """What the agent serves under the device's model name."""

    version: str | None
    url: str | None


class Updater:
    """Runs updates; call :meth:`recover` once at start, then :meth:`handle` per job."""

    def __init__(
        self,
        *,
        settings: OtaSettings,
        store: Store,
        installer: Installer,
        downloader: Downloader,
        agent: AgentClient,
        reporter: JobReporter,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.settings = settings
        self.store = store
        self.installer = installer
        self.downloader = downloader
        self.agent = agent
        self.reporter = reporter
        self._sleep = sleep
        self._last_progress = 0.0
        self.current: Record | None = None

    # -- entry points --------------------------------------------------------------------
    def recover(self) -> None:
        """Finish or roll back the recorded update, then reconcile with the agent."""
        record = self.store.load_record()
        if record is not None:
            record.resumes += 1
            target = resume_state(
                record.state, resumes=record.resumes, max_resumes=self.settings.max_resumes
            )
            log.info(
                "resuming update",
                job_id=record.job_id,
                persisted=record.state,
                resume=str(target),
                resumes=record.resumes,
            )
            if target is State.ROLLING_BACK and record.state != State.ROLLING_BACK:
                record.outcome = record.outcome or Outcome.FAILED
                record.failed_step = record.failed_step or record.state
                record.reason = record.reason or (
                    f"interrupted while {record.state} (restart {record.resumes}); rolled back"
                )
            record.state = target
            self._run(record)
        self.reconcile()

    def handle(self, job: JobExecution) -> None:
        """Run one job execution to its end (or ignore it as a duplicate)."""
        done = self.store.finished(job.job_id, job.execution_number)
        if done is not None:
            self._resend(job, done)
            return
        record = Record(
            job_id=job.job_id,
            execution_number=job.execution_number,
            version_number=job.version_number,
            document=job.document if isinstance(job.document, dict) else {"_raw": job.document},
            state=State.RECEIVED,
        )
        self._run(record)

    def reconcile(self) -> None:
        """If the agent serves nothing but a version is committed, load that version."""
        name = self.settings.model_name
        installed = self.store.installed(name)
        try:
            served = self.served()
        except TransientError as exc:
            log.warning("agent unavailable at reconcile", error=str(exc))
            return
        if served.url is None and installed is not None:
            if not self.installer.is_sound(Path(installed.url)):
                log.error("committed version is not sound; not loaded", url=installed.url)
                return
            log.info(
                "agent serves nothing: loading the committed version", **installed.model_dump()
            )
            try:
                self.agent.load_model(name, installed.url)
            except AgentError as exc:
                log.error("loading the committed version failed", error=str(exc))
        elif served.version is not None:
            log.info("agent serves", model=name, version=served.version, url=served.url)

    # -- the loop ------------------------------------------------------------------------
    def _run(self, record: Record) -> None:
        self.current = record
        structlog.contextvars.bind_contextvars(job_id=record.job_id)
        try:
            while record.state != State.DONE:
                unsaved = self._persist(record)
                crash_point(f"state:{record.state}")
                state = State(record.state)
                if unsaved is None:
                    event = self._step(state, record)
                else:  # never go forward with a step a restart could not resume
                    event = self._failed(record, state, unsaved, Event.FAIL)
                move = next_move(state, event)
                if move.outcome is not None:
                    record.outcome = move.outcome
                log.info("transition", state=str(state), on=str(event), to=str(move.to))
                record.state = move.to
            self._finish(record)
        finally:
            structlog.contextvars.unbind_contextvars("job_id")
            self.current = None

    def _persist(self, record: Record) -> OSError | None:
        """Save the record before its step; the error when it cannot be saved (a full disk).

        Unwinding (rollback, cleaning, reporting) goes on without a saved record: the
        final status reaches the cloud even when the disk stays full.
        """
        record.transitions += 1
        if record.transitions > MAX_TRANSITIONS and record.state not in (
            State.ROLLING_BACK,
            State.CLEANING,
            State.REPORTING,
        ):
            log.error("too many state transitions: rolling back", transitions=record.transitions)
            record.outcome = Outcome.FAILED
            record.reason = f"state machine loop ({record.transitions} transitions)"
            record.state = State.ROLLING_BACK
        try:
            self.store.save_record(record)
        except OSError as exc:
            log.error("cannot save the update record", state=str(record.state), error=str(exc))
            if record.state in (State.ROLLING_BACK, State.CLEANING, State.REPORTING):
                return None
            return exc
        return None

    def _finish(self, record: Record) -> None:
        if self.store.finished(record.job_id, record.execution_number) is None:
            self._add_outcome(
                Finished(
                    job_id=record.job_id,
                    execution_number=record.execution_number,
                    outcome=record.outcome or Outcome.FAILED,
                    reason=record.reason,
                    failed_step=record.failed_step,
                    from_version=record.from_version,
                    to_version=record.to_version,
                    acknowledged=record.acknowledged,
                )
            )
        self.store.clear_record()
        log.info(
            "update finished",
            outcome=record.outcome,
            from_version=record.from_version,
            to_version=record.to_version,
            reason=record.reason,
        )

    def _add_outcome(self, outcome: Finished) -> None:
        try:
            self.store.add_outcome(outcome)
        except OSError as exc:  # reported to the cloud already; only the local history misses it
            log.error("cannot save the outcome history", error=str(exc))

    def _step(self, state: State, record: Record) -> Event:
        steps: dict[State, Callable[[Record], None]] = {
            State.RECEIVED: self._received,
            State.DOWNLOADING: self._download,
            State.VERIFYING: self._verify,
            State.INSTALLING: self._install,
            State.ACTIVATING: self._activate,
            State.CHECKING: self._check,
            State.COMMITTING: self._commit,
            State.ROLLING_BACK: self._rollback,
            State.CLEANING: self._clean,
            State.REPORTING: self._report,
        }
        try:
            steps[state](record)
        except RejectError as exc:
            return self._failed(record, state, exc, Event.REJECT)
        except CanceledError as exc:
            log.info("job cancelled in the cloud", reason=str(exc))
            record.reason = str(exc)[:MAX_REASON]
            return Event.CANCEL
        except (FatalError, TransientError, AgentError, PackageError, OSError) as exc:
            return self._failed(record, state, exc, Event.FAIL)
        return Event.OK

    def _failed(self, record: Record, state: State, exc: Exception, event: Event) -> Event:
        log.warning("step failed", state=str(state), on=str(event), error=str(exc))
        if record.reason is None or state not in (State.ROLLING_BACK, State.CLEANING):
            record.reason = f"{state}: {exc}"[:MAX_REASON]
            record.failed_step = str(state)
        else:  # keep the first cause; say the rollback failed too
            record.reason = f"{record.reason}; {state} failed: {exc}"[:MAX_REASON]
        return event

    # -- steps ---------------------------------------------------------------------------
    def _document(self, record: Record) -> JobDocument:
        return parse_document(record.document)

    def _received(self, record: Record) -> None:
        doc = self._document(record)
        record.model_name = doc.model_name
        record.to_version = doc.model_version
        served = self._agent_call(self.served, self.settings.agent_wait_s)
        committed = self.store.installed(self.settings.model_name)
        record.from_version = served.version
        record.from_url = served.url
        installed = served.version or (committed.version if committed else None)
        check_applicable(
            doc,
            device_model=self.settings.model_name,
            installed=installed,
            allow_http=self.settings.allow_http_urls,
        )
        self._progress(record, force=True)

    def _download(self, record: Record) -> None:
        doc = self._document(record)
        dest = self.store.download_path(record)
        crashed = False

        def progress(done: int, total: int | None) -> None:
            nonlocal crashed
            record.downloaded_bytes = done
            if not crashed and done >= min(total or done, 64 * 1024):
                crashed = True
                crash_point("download:partial")
            self._progress(record, done=done, total=total)

        retrying = Retrying(
            retry=retry_if_exception_type(TransientError),
            stop=stop_after_attempt(self.settings.download_attempts),
            wait=wait_exponential(
                multiplier=self.settings.retry_min_s, max=self.settings.retry_max_s
            ),
            sleep=self._sleep,
            reraise=True,
        )
        for attempt in retrying:
            with attempt:
                try:
                    got = self.downloader.fetch(doc, dest, progress)
                except TransientError as exc:
                    log.warning("download interrupted", error=str(exc))
                    self._progress(record, force=True)  # also notices a cancellation
                    raise
        log.info("downloaded", source=doc.source, bytes=got.size, sha256=got.sha256)
        crash_point("download:complete")

    def _verify(self, record: Record) -> None:
        doc = self._document(record)
        manifest = self.installer.verify(self.store.download_path(record))
        check_signed_manifest(doc, name=manifest.name, version=manifest.version)
        # decided before INSTALLING is persisted: a failed update removes only what it added
        record.installs_new = not self.installer.version_dir(
            doc.model_name, doc.model_version
        ).exists()
        self._progress(record, force=True)

    def _install(self, record: Record) -> None:
        doc = self._document(record)
        crash_point("install:start")
        path = self.installer.install(
            self.store.download_path(record), doc.model_name, doc.model_version
        )
        record.to_url = str(path)
        crash_point("install:extracted")
        self._progress(record, force=True)

    def _activate(self, record: Record) -> None:
        if record.to_url is None:
            raise FatalError("no installed package to activate")
        crash_point("activate:start")
        name = self.settings.model_name
        self._agent_call(lambda: self.agent.load_model(name, record.to_url or ""), self._wait())
        crash_point("activate:loaded")

    def _check(self, record: Record) -> None:
        name = self.settings.model_name
        url = record.to_url or ""

        def check() -> None:
            info = self.agent.describe_model(name)
            if info.url != url:
                raise FatalError(f"the agent serves {info.url}, not the new version {url}")
            golden, _ = load_golden(url, _manifest_of(Path(url)))
            for _ in range(self.settings.check_predictions):
                out = self.agent.predict(name, golden)
                if not np.all(np.isfinite(np.asarray(out, dtype=np.float64))):
                    raise FatalError("the new version returned non-finite outputs")

        self._agent_call(check, self._wait())
        crash_point("check:passed")

    def _commit(self, record: Record) -> None:
        name = self.settings.model_name
        if record.to_version is None or record.to_url is None:
            raise FatalError("nothing to commit")
        self.store.set_installed(
            name,
            Installed(
                version=record.to_version,
                url=record.to_url,
                previous_version=record.from_version,
                previous_url=record.from_url,
            ),
        )
        crash_point("commit:recorded")
        removed = self.installer.prune(
            name,
            keep=self.settings.keep_versions,
            protect=[record.to_version, record.from_version],
        )
        if removed:
            log.info("pruned installed versions", removed=removed)
        self.downloader.discard(self.store.download_path(record))

    def _rollback(self, record: Record) -> None:
        name = self.settings.model_name
        budget = 10 * self.settings.agent_wait_s
        served = self._agent_call(self.served, budget)
        if served.url is not None and served.url == record.from_url:
            log.info("rollback: the previous version serves", version=served.version)
            return
        if record.from_url is None:
            if served.url is not None and served.url == record.to_url:
                self._agent_call(lambda: self.agent.unload_model(name), budget)
                log.info("rollback: the new version unloaded (nothing served before)")
            return
        from_url = record.from_url
        self._agent_call(lambda: self.agent.load_model(name, from_url), budget)
        crash_point("rollback:loaded")
        log.info("rolled back", version=record.from_version)

    def _clean(self, record: Record) -> None:
        self.downloader.discard(self.store.download_path(record))
        version = record.to_version
        name = self.settings.model_name
        if record.outcome == Outcome.SUCCEEDED or version is None or not record.installs_new:
            return
        committed = self.store.installed(name)
        if committed is not None and version in (committed.version, committed.previous_version):
            return
        try:
            served = self.served()
        except TransientError:
            return  # cannot tell what serves: keep the directory
        if version in (served.version, record.from_version):
            return
        with contextlib.suppress(ValueError):  # a version name that is no directory name
            self.installer.remove(name, version)

    def _report(self, record: Record) -> None:
        outcome = Outcome(record.outcome or Outcome.FAILED)
        if outcome is Outcome.CANCELED:
            return
        details = {"state": "done", "outcome": str(outcome)}
        if record.from_version:
            details["from_version"] = record.from_version
        if record.to_version:
            details["to_version"] = record.to_version
        if record.reason and outcome is not Outcome.SUCCEEDED:
            details["reason"] = record.reason[:MAX_REASON]
        if record.failed_step and outcome is not Outcome.SUCCEEDED:
            details["step"] = record.failed_step
        delay = self.settings.retry_min_s
        while True:
            try:
                self.reporter.update(record, str(outcome), details)
            except TransientError as exc:
                log.warning("final status not acknowledged; retrying", error=str(exc))
                self._sleep(delay)
                delay = min(delay * 2, self.settings.retry_max_s)
                continue
            except JobGoneError as exc:
                if exc.status != str(outcome):
                    log.warning("the cloud holds another final status", cloud=exc.status)
                    record.acknowledged = False
            break
        crash_point("report:sent")

    # -- helpers -------------------------------------------------------------------------
    def served(self) -> Served:
        """What the agent serves under the model name (TransientError when unreachable)."""
        name = self.settings.model_name
        try:
            info = self.agent.describe_model(name)
        except NotFoundError:
            return Served(version=None, url=None)
        except UnavailableError as exc:
            raise TransientError(f"agent unavailable: {exc}") from exc
        try:
            version: str | None = _manifest_of(Path(info.url)).version
        except (PackageError, OSError):
            version = None
        return Served(version=version, url=info.url)

    def _wait(self) -> float:
        return self.settings.agent_wait_s

    def _agent_call(self, fn: Callable[[], T], budget: float) -> T:
        """``fn()``, retried while the agent is unavailable, for ``budget`` seconds."""
        retrying = Retrying(
            retry=retry_if_exception_type((UnavailableError, TransientError)),
            stop=stop_after_delay(budget),
            wait=wait_exponential(multiplier=0.2, max=min(5.0, self.settings.retry_max_s)),
            sleep=self._sleep,
            reraise=True,
        )
        for attempt in retrying:
            with attempt:
                return fn()
        raise AssertionError("unreachable")  # pragma: no cover - reraise=True

    def _progress(
        self,
        record: Record,
        *,
        done: int | None = None,
        total: int | None = None,
        force: bool = False,
    ) -> None:
        """An IN_PROGRESS update (rate-limited); it also tells us of a cancellation."""
        now = time.monotonic()
        if not force and now - self._last_progress < self.settings.progress_interval_s:
            return
        self._last_progress = now
        details = {"state": str(record.state)}
        if record.to_version:
            details["to_version"] = record.to_version
        if record.from_version:
            details["from_version"] = record.from_version
        if done is not None:
            details["bytes"] = str(done)
            if total:
                details["progress"] = str(math.floor(100 * done / total))
        try:
            self.reporter.update(record, "IN_PROGRESS", details)
        except JobGoneError as exc:
            raise CanceledError(f"job execution is {exc.status or 'gone'} in the cloud") from exc
        except TransientError as exc:
            log.warning("progress update failed", error=str(exc))  # the next one may pass

    def _resend(self, job: JobExecution, done: Finished) -> None:
        """A finished execution came back pending: our final report was lost; send it again."""
        if job.status not in ("IN_PROGRESS", "QUEUED") or done.outcome == Outcome.CANCELED:
            log.info("duplicate job notification ignored", job_id=job.job_id)
            return
        log.info("re-sending the final status of a finished job", job_id=job.job_id)
        record = Record(
            job_id=job.job_id,
            execution_number=job.execution_number,
            version_number=job.version_number,
            state=State.REPORTING,
            outcome=done.outcome,
            reason=done.reason,
            failed_step=done.failed_step,
            from_version=done.from_version,
            to_version=done.to_version,
        )
        with contextlib.suppress(TransientError, JobGoneError):
            self.reporter.update(record, done.outcome, {"state": "done", "outcome": done.outcome})


def _manifest_of(package_dir: Path) -> Manifest:
    return Manifest.from_json_bytes((package_dir / MANIFEST_NAME).read_bytes())
