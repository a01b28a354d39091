"""The IoT Jobs engine of the local stand-in: the device-side API's semantics, no transport.

It answers the device requests of AWS IoT Jobs (``get``, ``start-next``,
``<jobId>/get`` including ``$next``, ``<jobId>/update``) and the fleet side's
admin calls (create, describe, list, cancel, delete), and emits the replies
and notifications AWS IoT would send, as ``(topic, JSON object)`` pairs given
to a ``sink``. The MQTT adapter (``cloud.local.jobs_mqtt``) and the admin HTTP
server (``cloud.local.admin``) are thin layers over it.

What it follows (the protocol facts in IOT_JOBS.md, checked with awsiotsdk):

- every reply echoes ``clientToken`` and carries ``timestamp`` in epoch
  *seconds*; ``jobDocument`` is a JSON object; ``start-next`` and ``$next``
  answer without ``execution`` when nothing is pending;
- ``versionNumber`` grows with every change of an execution, ``executionNumber``
  is 1 (the stand-in has no retry configuration);
- device statuses: ``IN_PROGRESS``, ``SUCCEEDED``, ``FAILED``, ``REJECTED`` from
  QUEUED or IN_PROGRESS; anything out of a terminal state, or to a status only
  the service sets, is ``InvalidStateTransition`` (with ``executionState``);
- ``notify`` when the set of pending executions of a thing changes,
  ``notify-next`` when the head of its queue (what ``$next`` returns) changes, a
  timestamp-only ``notify-next`` when the queue empties;
- timers: ``timeoutConfig.inProgressTimeoutInMinutes`` from the start of an
  execution, ``stepTimeoutInMinutes`` per start-next/update (``-1`` clears it,
  never beyond the in-progress timer) -> ``TIMED_OUT``;
- ``jobExecutionsRolloutConfig`` (``maximumPerMinute``, or ``exponentialRate``):
  executions are created no faster than the rate; ``abortConfig``: once at least
  ``minNumberOfExecutedThings`` ended and the failure percentage reaches the
  threshold, the job is canceled (QUEUED executions and not yet created ones;
  IN_PROGRESS ones keep running, as in AWS IoT);
- ``presignedUrlConfig``: ``${aws:iot:s3-presigned-url:<s3 url>}`` placeholders
  are replaced with a fresh presigned URL of the stand-in's S3 every time a
  document is handed to a device.

``minute_seconds`` is how long a "minute" of the timeout and rollout settings
lasts in real seconds: 60 normally, less in tests and demos that want to see a
timeout fire.
"""

from __future__ import annotations

import copy
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar
from urllib.parse import unquote, urlparse

import structlog

from cloud.local.store import Store

__all__ = [
    "ACCOUNT",
    "DEVICE_STATUSES",
    "DEVICE_TRANSITIONS",
    "REGION",
    "TERMINAL",
    "AdminError",
    "Execution",
    "Job",
    "JobsEngine",
    "Presigner",
    "Sink",
    "job_arn",
    "thing_arn",
    "validate_thing_name",
]

log = structlog.get_logger("cloud.local.jobs")

REGION = "us-east-1"
ACCOUNT = "123456789012"

Sink = Callable[[str, dict[str, Any]], None]
"""``(topic, payload)``: a message to publish at QoS 1."""
Presigner = Callable[[str, str, int], str]
"""``(bucket, key, expires_in_sec) -> url``."""

JOB_ID_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
THING_RE = re.compile(r"^[a-zA-Z0-9:_-]{1,128}$")
DETAIL_KEY_RE = re.compile(r"^[a-zA-Z0-9:_-]{1,128}$")
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
PLACEHOLDER_RE = re.compile(r"\$\{aws:iot:s3-presigned-url:([^}]+)\}")

MAX_DOCUMENT_CHARS = 32_768
MAX_PENDING_LISTED = 10
MAX_CLIENT_TOKEN = 64
MAX_DETAIL_VALUE = 1024
MAX_STEP_MINUTES = 10_080

STATUSES = frozenset(
    {"QUEUED", "IN_PROGRESS", "SUCCEEDED", "FAILED", "TIMED_OUT", "REJECTED", "REMOVED", "CANCELED"}
)
TERMINAL = frozenset({"SUCCEEDED", "FAILED", "TIMED_OUT", "REJECTED", "REMOVED", "CANCELED"})
DEVICE_STATUSES = frozenset({"IN_PROGRESS", "SUCCEEDED", "FAILED", "REJECTED"})
# What a device's update may do, by the execution's current status (the one table).
# The service's own moves (QUEUED on creation, TIMED_OUT, CANCELED) are not device moves.
DEVICE_TRANSITIONS: dict[str, frozenset[str]] = {
    "QUEUED": DEVICE_STATUSES,
    "IN_PROGRESS": DEVICE_STATUSES,
    **{terminal: frozenset() for terminal in TERMINAL},
}
FAILURE_TYPES = {
    "FAILED": {"FAILED"},
    "REJECTED": {"REJECTED"},
    "TIMED_OUT": {"TIMED_OUT"},
    "ALL": {"FAILED", "REJECTED", "TIMED_OUT"},
}
EXECUTED = frozenset({"SUCCEEDED", "FAILED", "REJECTED", "TIMED_OUT"})


def thing_arn(name: str) -> str:
    return f"arn:aws:iot:{REGION}:{ACCOUNT}:thing/{name}"


def job_arn(job_id: str) -> str:
    return f"arn:aws:iot:{REGION}:{ACCOUNT}:job/{job_id}"


def validate_thing_name(name: str) -> str:
    if not isinstance(name, str) or not THING_RE.match(name):
        raise AdminError(
            "InvalidRequestException",
            f"invalid thing name {name!r}: 1-128 characters of [a-zA-Z0-9:_-]",
        )
    return name


class AdminError(Exception):
    """A fleet-side call the stand-in refuses; ``code`` is the AWS exception name."""

    STATUS: ClassVar[dict[str, int]] = {
        "ResourceNotFoundException": 404,
        "ResourceAlreadyExistsException": 409,
        "InvalidRequestException": 400,
        "InvalidStateTransitionException": 409,
    }

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def http_status(self) -> int:
        return self.STATUS.get(self.code, 400)


class _RejectedError(Exception):
    def __init__(self, code: str, message: str, execution: Execution | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.execution = execution


@dataclass
class Execution:
    job_id: str
    thing_name: str
    seq: int
    queued_at: int
    last_updated_at: int
    status: str = "QUEUED"
    status_details: dict[str, str] = field(default_factory=dict)
    started_at: int | None = None
    version_number: int = 1
    execution_number: int = 1
    in_progress_deadline: float | None = None
    step_deadline: float | None = None
    force_canceled: bool = False

    @property
    def pending(self) -> bool:
        return self.status in ("QUEUED", "IN_PROGRESS")

    def deadline(self) -> float | None:
        times = [t for t in (self.in_progress_deadline, self.step_deadline) if t is not None]
        return min(times) if times else None

    def state(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "statusDetails": dict(self.status_details),
            "versionNumber": self.version_number,
        }

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "jobId": self.job_id,
            "queuedAt": self.queued_at,
            "lastUpdatedAt": self.last_updated_at,
            "versionNumber": self.version_number,
            "executionNumber": self.execution_number,
        }
        if self.started_at is not None:
            out["startedAt"] = self.started_at
        return out

    def admin_view(self) -> dict[str, Any]:
        return {
            "jobId": self.job_id,
            "thingName": self.thing_name,
            "thingArn": thing_arn(self.thing_name),
            "status": self.status,
            "statusDetails": dict(self.status_details),
            "queuedAt": self.queued_at,
            "startedAt": self.started_at,
            "lastUpdatedAt": self.last_updated_at,
            "versionNumber": self.version_number,
            "executionNumber": self.execution_number,
            "forceCanceled": self.force_canceled,
        }


@dataclass
class Job:
    job_id: str
    seq: int
    document: dict[str, Any]
    targets: list[str]
    things: list[str]
    created_at: int
    last_updated_at: int
    description: str | None = None
    status: str = "IN_PROGRESS"
    completed_at: int | None = None
    rollout: dict[str, Any] | None = None
    abort: dict[str, Any] | None = None
    timeout: dict[str, Any] | None = None
    presigned: dict[str, Any] | None = None
    not_yet_created: list[str] = field(default_factory=list)
    created_times: list[float] = field(default_factory=list)
    reason_code: str | None = None
    comment: str | None = None
    force_canceled: bool = False


def _now() -> int:
    return int(time.time())


class JobsEngine:
    """The state of every job and execution, with the semantics of AWS IoT Jobs."""

    def __init__(
        self,
        store: Store,
        *,
        sink: Sink,
        minute_seconds: float = 60.0,
        presigner: Presigner | None = None,
    ) -> None:
        self._store = store
        self._sink = sink
        self._minute = float(minute_seconds)
        self._presigner = presigner
        self._lock = threading.RLock()
        self._things: dict[str, dict[str, Any]] = dict(store.things())
        self._jobs: dict[str, Job] = {}
        self._execs: dict[tuple[str, str], Execution] = {}
        self._by_thing: dict[str, dict[str, Execution]] = {}
        self._seq = 0
        for job_id, data in store.jobs():
            self._jobs[job_id] = Job(**data)
            self._seq = max(self._seq, data["seq"])
        for data in store.executions():
            ex = Execution(**data)
            self._add_execution(ex)
            self._seq = max(self._seq, ex.seq)
        self._dirty_jobs: set[str] = set()
        self._dirty_execs: set[tuple[str, str]] = set()
        self._outbox: list[tuple[str, dict[str, Any]]] = []

    # ===================================================================== things
    def register_thing(self, name: str, groups: list[str] | None = None) -> dict[str, Any]:
        validate_thing_name(name)
        with self._lock:
            data = {"thingName": name, "thingArn": thing_arn(name), "groups": sorted(groups or [])}
            self._things[name] = data
            with self._store.transaction():
                self._store.put_thing(name, data)
            return dict(data)

    def has_thing(self, name: str) -> bool:
        with self._lock:
            return name in self._things

    def list_things(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(v) for _, v in sorted(self._things.items())]

    # ================================================================= admin side
    def create_job(
        self,
        job_id: str,
        *,
        targets: list[str],
        document: dict[str, Any],
        description: str | None = None,
        rollout_config: dict[str, Any] | None = None,
        abort_config: dict[str, Any] | None = None,
        timeout_config: dict[str, Any] | None = None,
        presigned_url_config: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        if not isinstance(job_id, str) or not JOB_ID_RE.match(job_id):
            raise AdminError(
                "InvalidRequestException", f"invalid jobId {job_id!r}: 1-64 of [a-zA-Z0-9_-]"
            )
        if not isinstance(document, dict):
            raise AdminError("InvalidRequestException", "document must be a JSON object")
        if len(json.dumps(document)) > MAX_DOCUMENT_CHARS:
            raise AdminError(
                "InvalidRequestException", f"document longer than {MAX_DOCUMENT_CHARS} characters"
            )
        if not isinstance(targets, list) or not targets:
            raise AdminError("InvalidRequestException", "targets must be a non-empty list")
        _check_rollout(rollout_config)
        _check_abort_config(abort_config)
        _check_timeout(timeout_config)
        _check_presigned(presigned_url_config)
        with self._lock:
            if job_id in self._jobs:
                raise AdminError("ResourceAlreadyExistsException", f"job {job_id} already exists")
            things = self._resolve_targets(targets)
            now = _now()
            self._seq += 1
            job = Job(
                job_id=job_id,
                seq=self._seq,
                document=copy.deepcopy(document),
                targets=list(targets),
                things=things,
                created_at=now,
                last_updated_at=now,
                description=description,
                rollout=rollout_config,
                abort=abort_config,
                timeout=timeout_config,
                presigned=presigned_url_config,
                not_yet_created=list(things),
            )
            with self._changes(touched=set(things)):
                self._jobs[job_id] = job
                self._dirty_jobs.add(job_id)
                self._release(job, time.time())
            log.info("local stand-in: job created", job_id=job_id, things=len(things))
            return self._job_view(job)

    def describe_job(self, job_id: str) -> dict[str, Any]:
        with self._lock:
            return self._job_view(self._job(job_id))

    def list_jobs(self, status: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            jobs = sorted(self._jobs.values(), key=lambda j: j.seq)
            return [self._job_summary(j) for j in jobs if status is None or j.status == status]

    def cancel_job(
        self, job_id: str, *, force: bool = False, comment: str | None = None
    ) -> dict[str, Any]:
        with self._lock:
            job = self._job(job_id)
            if job.status == "COMPLETED":
                raise AdminError(
                    "InvalidStateTransitionException", f"job {job_id} is already completed"
                )
            if job.status == "CANCELED" and not force:
                return self._job_view(job)
            with self._changes(touched=set(job.things)):
                self._cancel(job, force=force, reason="USER_CANCELED", comment=comment)
            return self._job_view(job)

    def delete_job(self, job_id: str, *, force: bool = False) -> None:
        with self._lock:
            job = self._job(job_id)
            executions = [e for e in self._execs.values() if e.job_id == job_id]
            if any(e.status == "IN_PROGRESS" for e in executions) and not force:
                raise AdminError(
                    "InvalidStateTransitionException",
                    f"job {job_id} has executions in progress: delete with force",
                )
            with self._changes(touched={e.thing_name for e in executions}):
                for e in executions:
                    del self._execs[(e.job_id, e.thing_name)]
                    del self._by_thing[e.thing_name][e.job_id]
                    self._dirty_execs.discard((e.job_id, e.thing_name))
                del self._jobs[job.job_id]
                self._dirty_jobs.discard(job.job_id)
                with self._store.transaction():
                    self._store.delete_job(job.job_id)

    def cancel_job_execution(self, job_id: str, thing: str, *, force: bool = False) -> None:
        with self._lock:
            ex = self._execs.get((job_id, thing))
            if ex is None:
                raise AdminError(
                    "ResourceNotFoundException", f"no execution of job {job_id} on {thing}"
                )
            if ex.status in TERMINAL:
                raise AdminError(
                    "InvalidStateTransitionException",
                    f"execution of job {job_id} on {thing} is already {ex.status}",
                )
            if ex.status == "IN_PROGRESS" and not force:
                raise AdminError(
                    "InvalidStateTransitionException",
                    f"execution of job {job_id} on {thing} is IN_PROGRESS: cancel with force",
                )
            with self._changes(touched=set(self._jobs[job_id].things)):
                self._finish(ex, "CANCELED", force=force)

    def describe_execution(self, job_id: str, thing: str) -> dict[str, Any]:
        with self._lock:
            ex = self._execs.get((job_id, thing))
            if ex is None:
                self._job(job_id)
                raise AdminError(
                    "ResourceNotFoundException", f"no execution of job {job_id} on {thing}"
                )
            return ex.admin_view()

    def list_executions(self, job_id: str) -> list[dict[str, Any]]:
        with self._lock:
            job = self._job(job_id)
            return [
                self._execs[(job_id, t)].admin_view()
                for t in job.things
                if (job_id, t) in self._execs
            ]

    # ================================================================ device side
    def handle(self, thing: str, operation: str, job_id: str | None, payload: bytes) -> None:
        """One device request; the reply (and any notification) goes to the sink."""
        base = f"$aws/things/{thing}/jobs/"
        reply = base + (f"{job_id}/{operation}" if job_id is not None else operation)
        token: Any = None
        try:
            request = _parse(payload)
            token = request.get("clientToken")
            if token is not None and (
                not isinstance(token, str) or not 0 < len(token) <= MAX_CLIENT_TOKEN
            ):
                token = None
                raise _RejectedError("InvalidRequest", "clientToken must be 1-64 characters")
            with self._lock, self._changes(touched=self._things_of(thing, job_id), defer=True):
                if operation == "get" and job_id is None:
                    body = self._get_pending(thing)
                elif operation == "start-next":
                    body = self._start_next(thing, request)
                elif operation == "get":
                    body = self._describe(thing, job_id or "", request)
                elif operation == "update":
                    body = self._update(thing, job_id or "", request)
                else:
                    raise _RejectedError("InvalidTopic", f"no such jobs API: {reply}")
        except _RejectedError as rej:
            body = {"code": rej.code, "message": rej.message, "timestamp": _now()}
            if rej.execution is not None:
                body["executionState"] = rej.execution.state()
            if token is not None:
                body["clientToken"] = token
            self._sink(reply + "/rejected", body)
            return
        body["timestamp"] = _now()
        if token is not None:
            body["clientToken"] = token
        self._sink(reply + "/accepted", body)
        self._flush_outbox()

    def _get_pending(self, thing: str) -> dict[str, Any]:
        pending = self._pending(thing)[:MAX_PENDING_LISTED]
        return {
            "inProgressJobs": [e.summary() for e in pending if e.status == "IN_PROGRESS"],
            "queuedJobs": [e.summary() for e in pending if e.status == "QUEUED"],
        }

    def _start_next(self, thing: str, request: dict[str, Any]) -> dict[str, Any]:
        details = _details(request.get("statusDetails"))
        step = _step_minutes(request.get("stepTimeoutInMinutes"))
        pending = self._pending(thing)
        if not pending:
            return {}
        ex = pending[0]
        if ex.status == "QUEUED":
            self._begin(ex)
            if details is not None:
                ex.status_details = details
            if step is not None:
                self._set_step(ex, step)
            self._touch(ex)
        return {"execution": self._execution_data(ex, include_document=True)}

    def _describe(self, thing: str, job_id: str, request: dict[str, Any]) -> dict[str, Any]:
        include = _bool(request.get("includeJobDocument"), "includeJobDocument", default=True)
        number = _int_or_none(request.get("executionNumber"), "executionNumber")
        if job_id == "$next":
            pending = self._pending(thing)
            if not pending:
                return {}
            ex = pending[0]
        else:
            found = self._execs.get((job_id, thing))
            if found is None or (number is not None and found.execution_number != number):
                raise _RejectedError(
                    "ResourceNotFound", f"no execution of job {job_id} on thing {thing}"
                )
            ex = found
            if ex.status in TERMINAL:
                raise _RejectedError(
                    "TerminalStateReached",
                    f"the execution of job {job_id} on {thing} is {ex.status}",
                )
        return {"execution": self._execution_data(ex, include_document=include)}

    def _update(self, thing: str, job_id: str, request: dict[str, Any]) -> dict[str, Any]:
        status = request.get("status")
        if not isinstance(status, str):
            raise _RejectedError("InvalidRequest", "status is required")
        if status not in STATUSES:
            raise _RejectedError("InvalidRequest", f"unknown status {status!r}")
        details = _details(request.get("statusDetails"))
        step = _step_minutes(request.get("stepTimeoutInMinutes"))
        expected = _int_or_none(request.get("expectedVersion"), "expectedVersion")
        number = _int_or_none(request.get("executionNumber"), "executionNumber")
        want_state = _bool(
            request.get("includeJobExecutionState"), "includeJobExecutionState", default=False
        )
        want_doc = _bool(request.get("includeJobDocument"), "includeJobDocument", default=False)
        ex = self._execs.get((job_id, thing))
        if ex is None or (number is not None and ex.execution_number != number):
            raise _RejectedError(
                "ResourceNotFound", f"no execution of job {job_id} on thing {thing}"
            )
        if expected is not None and expected != ex.version_number:
            raise _RejectedError(
                "VersionMismatch",
                f"expectedVersion {expected} but the execution is at {ex.version_number}",
                ex,
            )
        if status not in DEVICE_TRANSITIONS[ex.status]:
            reason = (
                "no update can leave a terminal state"
                if ex.status in TERMINAL
                else f"a device cannot set the status {status}"
            )
            raise _RejectedError(
                "InvalidStateTransition", f"the execution is {ex.status}: {reason}", ex
            )
        if ex.status == "QUEUED" and status == "IN_PROGRESS":
            self._begin(ex)
        if details is not None:
            ex.status_details = details
        if status in TERMINAL:
            self._finish(ex, status)
        else:
            if step is not None:
                self._set_step(ex, step)
            self._touch(ex)
        body: dict[str, Any] = {}
        if want_state:
            body["executionState"] = ex.state()
        if want_doc:
            body["jobDocument"] = self._document(self._jobs[job_id])
        return body

    # ==================================================================== timers
    def tick(self, now: float | None = None) -> None:
        """Fire due timeouts and release rollout batches (call about every 100-500 ms)."""
        now = time.time() if now is None else now
        with self._lock:
            due = [
                ex
                for ex in self._execs.values()
                if ex.status == "IN_PROGRESS" and (d := ex.deadline()) is not None and d <= now
            ]
            rolling = [
                j for j in self._jobs.values() if j.status == "IN_PROGRESS" and j.not_yet_created
            ]
            if not due and not rolling:
                return
            touched = {t for j in rolling for t in j.things}
            for ex in due:
                touched.update(self._jobs[ex.job_id].things)
            with self._changes(touched=touched):
                for ex in due:
                    if ex.status == "IN_PROGRESS":
                        self._finish(ex, "TIMED_OUT")
                for job in rolling:
                    if job.status == "IN_PROGRESS":
                        self._release(job, now)

    def next_due(self) -> float | None:
        """The wall-clock time of the next timer or rollout release (None: nothing to do)."""
        with self._lock:
            times = [
                d
                for ex in self._execs.values()
                if ex.status == "IN_PROGRESS" and (d := ex.deadline()) is not None
            ]
            if any(j.status == "IN_PROGRESS" and j.not_yet_created for j in self._jobs.values()):
                times.append(time.time() + min(1.0, self._minute / 10))
            return min(times) if times else None

    # ================================================================== internals
    def _job(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise AdminError("ResourceNotFoundException", f"no job {job_id}")
        return job

    def _resolve_targets(self, targets: list[str]) -> list[str]:
        things: list[str] = []
        for target in targets:
            if not isinstance(target, str):
                raise AdminError("InvalidRequestException", f"invalid target {target!r}")
            kind, name = "thing", target
            if target.startswith("arn:"):
                resource = target.split(":", 5)[-1]
                kind, _, name = resource.partition("/")
            if kind == "thing":
                if name not in self._things:
                    raise AdminError("ResourceNotFoundException", f"unknown thing {name}")
                members = [name]
            elif kind == "thinggroup":
                members = [t for t, d in self._things.items() if name in d.get("groups", [])]
                if not members:
                    raise AdminError(
                        "ResourceNotFoundException", f"unknown or empty thing group {name}"
                    )
            else:
                raise AdminError("InvalidRequestException", f"invalid target {target!r}")
            things.extend(m for m in sorted(members) if m not in things)
        return things

    def _add_execution(self, ex: Execution) -> None:
        self._execs[(ex.job_id, ex.thing_name)] = ex
        self._by_thing.setdefault(ex.thing_name, {})[ex.job_id] = ex

    def _pending(self, thing: str) -> list[Execution]:
        mine = [e for e in self._by_thing.get(thing, {}).values() if e.pending]
        return sorted(mine, key=lambda e: (e.status != "IN_PROGRESS", e.seq))

    def _rate(self, job: Job) -> int:
        rollout = job.rollout or {}
        if "maximumPerMinute" in rollout:
            return int(rollout["maximumPerMinute"])
        exp = rollout.get("exponentialRate")
        if not exp:
            return len(job.things)
        criteria = exp["rateIncreaseCriteria"]
        if "numberOfNotifiedThings" in criteria:
            notified = len(job.things) - len(job.not_yet_created)
            reached = notified // int(criteria["numberOfNotifiedThings"])
        else:
            done = sum(
                1
                for t in job.things
                if (e := self._execs.get((job.job_id, t))) and e.status == "SUCCEEDED"
            )
            reached = done // int(criteria["numberOfSucceededThings"])
        return int(exp["baseRatePerMinute"] * float(exp["incrementFactor"]) ** reached)

    def _release(self, job: Job, now: float) -> None:
        """Create the executions the rollout rate allows now."""
        if not job.rollout:
            allowed = len(job.not_yet_created)
        else:
            window = [t for t in job.created_times if t > now - self._minute]
            allowed = max(0, self._rate(job) - len(window))
            job.created_times = window  # only the last minute matters
        if allowed <= 0:
            return
        batch, job.not_yet_created = (
            job.not_yet_created[:allowed],
            job.not_yet_created[allowed:],
        )
        stamp = _now()
        for thing in batch:
            self._seq += 1
            ex = Execution(
                job_id=job.job_id,
                thing_name=thing,
                seq=self._seq,
                queued_at=stamp,
                last_updated_at=stamp,
            )
            self._add_execution(ex)
            self._dirty_execs.add((job.job_id, thing))
            job.created_times.append(now)
        self._dirty_jobs.add(job.job_id)

    def _begin(self, ex: Execution) -> None:
        ex.status = "IN_PROGRESS"
        ex.started_at = _now()
        minutes = (self._jobs[ex.job_id].timeout or {}).get("inProgressTimeoutInMinutes")
        if minutes:
            ex.in_progress_deadline = time.time() + float(minutes) * self._minute

    def _set_step(self, ex: Execution, minutes: int) -> None:
        if minutes == -1:
            ex.step_deadline = None
            return
        deadline = time.time() + minutes * self._minute
        if ex.in_progress_deadline is not None:
            deadline = min(deadline, ex.in_progress_deadline)
        ex.step_deadline = deadline

    def _touch(self, ex: Execution) -> None:
        ex.version_number += 1
        ex.last_updated_at = _now()
        self._dirty_execs.add((ex.job_id, ex.thing_name))

    def _finish(self, ex: Execution, status: str, *, force: bool = False) -> None:
        log.info(
            "local stand-in: execution ended",
            job_id=ex.job_id,
            thing=ex.thing_name,
            status=status,
            details=ex.status_details,
        )
        ex.status = status
        ex.step_deadline = ex.in_progress_deadline = None
        ex.force_canceled = force and status == "CANCELED"
        self._touch(ex)
        job = self._jobs[ex.job_id]
        self._check_abort(job)
        self._check_completed(job)

    def _cancel(self, job: Job, *, force: bool, reason: str, comment: str | None) -> None:
        log.info("local stand-in: job canceled", job_id=job.job_id, reason=reason, force=force)
        job.status = "CANCELED"
        job.reason_code = reason
        job.comment = comment
        job.force_canceled = job.force_canceled or force
        job.not_yet_created = []
        job.last_updated_at = _now()
        self._dirty_jobs.add(job.job_id)
        for thing in job.things:
            ex = self._execs.get((job.job_id, thing))
            if ex is None or ex.status in TERMINAL:
                continue
            if ex.status == "QUEUED" or force:
                ex.force_canceled = ex.status == "IN_PROGRESS"
                ex.status = "CANCELED"
                ex.step_deadline = ex.in_progress_deadline = None
                self._touch(ex)

    def _check_abort(self, job: Job) -> None:
        if job.status != "IN_PROGRESS" or not job.abort:
            return
        statuses = [
            e.status for t in job.things if (e := self._execs.get((job.job_id, t))) is not None
        ]
        executed = sum(1 for s in statuses if s in EXECUTED)
        for crit in job.abort.get("criteriaList", []):
            if executed < int(crit["minNumberOfExecutedThings"]):
                continue
            failed = sum(1 for s in statuses if s in FAILURE_TYPES[crit["failureType"]])
            if failed * 100.0 / executed >= float(crit["thresholdPercentage"]):
                self._cancel(
                    job,
                    force=False,
                    reason="AbortThresholdExceeded",
                    comment=(
                        f"{failed} of {executed} executed things {crit['failureType']}: "
                        f"threshold {crit['thresholdPercentage']}% reached"
                    ),
                )
                return

    def _check_completed(self, job: Job) -> None:
        if job.status != "IN_PROGRESS" or job.not_yet_created:
            return
        execs = [self._execs.get((job.job_id, t)) for t in job.things]
        if all(e is not None and e.status in TERMINAL for e in execs):
            job.status = "COMPLETED"
            job.completed_at = job.last_updated_at = _now()
            self._dirty_jobs.add(job.job_id)

    def _document(self, job: Job) -> dict[str, Any]:
        doc = copy.deepcopy(job.document)
        if not job.presigned or self._presigner is None:
            return doc
        expires = int(job.presigned.get("expiresInSec", 3600))
        presigner = self._presigner

        def resolve(value: Any) -> Any:
            if isinstance(value, str):
                return PLACEHOLDER_RE.sub(lambda m: _presign(m.group(1), expires, presigner), value)
            if isinstance(value, dict):
                return {k: resolve(v) for k, v in value.items()}
            if isinstance(value, list):
                return [resolve(v) for v in value]
            return value

        resolved: dict[str, Any] = resolve(doc)
        return resolved

    def _execution_data(self, ex: Execution, *, include_document: bool) -> dict[str, Any]:
        out: dict[str, Any] = {
            "jobId": ex.job_id,
            "thingName": ex.thing_name,
            "status": ex.status,
            "statusDetails": dict(ex.status_details),
            "queuedAt": ex.queued_at,
            "lastUpdatedAt": ex.last_updated_at,
            "versionNumber": ex.version_number,
            "executionNumber": ex.execution_number,
        }
        if ex.started_at is not None:
            out["startedAt"] = ex.started_at
        deadline = ex.deadline()
        if deadline is not None:
            out["approximateSecondsBeforeTimedOut"] = max(0, int(deadline - time.time()))
        if include_document:
            out["jobDocument"] = self._document(self._jobs[ex.job_id])
        return out

    def _job_summary(self, job: Job) -> dict[str, Any]:
        return {
            "jobId": job.job_id,
            "jobArn": job_arn(job.job_id),
            "status": job.status,
            "createdAt": job.created_at,
            "lastUpdatedAt": job.last_updated_at,
            "completedAt": job.completed_at,
            "targetSelection": "SNAPSHOT",
        }

    def _job_view(self, job: Job) -> dict[str, Any]:
        counts = dict.fromkeys(sorted(STATUSES), 0)
        for thing in job.things:
            ex = self._execs.get((job.job_id, thing))
            if ex is not None:
                counts[ex.status] += 1
        details = {f"numberOf{_camel(status)}Things": n for status, n in counts.items()}
        details["numberOfNotYetNotifiedThings"] = len(job.not_yet_created)
        out = self._job_summary(job)
        out.update(
            {
                "description": job.description,
                "targets": list(job.targets),
                "things": list(job.things),
                "document": copy.deepcopy(job.document),
                "jobExecutionsRolloutConfig": job.rollout,
                "abortConfig": job.abort,
                "timeoutConfig": job.timeout,
                "presignedUrlConfig": job.presigned,
                "reasonCode": job.reason_code,
                "comment": job.comment,
                "forceCanceled": job.force_canceled,
                "jobProcessDetails": details,
            }
        )
        return out

    # -- change tracking: persistence and notifications ------------------------
    def _things_of(self, thing: str, job_id: str | None) -> set[str]:
        """The things an operation on ``job_id`` may touch (an abort: every thing of the job)."""
        job = self._jobs.get(job_id or "")
        if job is None and job_id == "$next":
            return {thing}
        return {thing} | (set(job.things) if job is not None else set())

    @contextmanager
    def _changes(self, touched: set[str], *, defer: bool = False) -> Iterator[None]:
        """Around one operation: persist what changed, then emit notify / notify-next.

        ``touched``: every thing whose pending executions the operation may
        change. ``defer``: keep the notifications until the caller sent its
        reply (a device request's accepted message comes first).
        """
        things = touched
        before = {t: self._pending_view(t) for t in things}
        yield
        with self._store.transaction():
            for job_id in self._dirty_jobs:
                job = self._jobs[job_id]
                self._store.put_job(job_id, job.seq, asdict(job))
            for key in self._dirty_execs:
                self._store.put_execution(*key, asdict(self._execs[key]))
        self._dirty_jobs.clear()
        self._dirty_execs.clear()
        stamp = _now()
        for thing in sorted(things):
            old_set, old_head = before[thing]
            new_set, new_head = self._pending_view(thing)
            if old_set != new_set:
                pending = self._pending(thing)[:MAX_PENDING_LISTED]
                jobs: dict[str, list[dict[str, Any]]] = {}
                for ex in pending:
                    jobs.setdefault(ex.status, []).append(ex.summary())
                self._outbox.append(
                    (f"$aws/things/{thing}/jobs/notify", {"timestamp": stamp, "jobs": jobs})
                )
            if old_head != new_head:
                body: dict[str, Any] = {"timestamp": stamp}
                head = self._pending(thing)
                if head:
                    body["execution"] = self._execution_data(head[0], include_document=True)
                self._outbox.append((f"$aws/things/{thing}/jobs/notify-next", body))
        if not defer:
            self._flush_outbox()

    def _flush_outbox(self) -> None:
        with self._lock:
            outbox, self._outbox = self._outbox, []
        for topic, body in outbox:
            self._sink(topic, body)

    def flush(self) -> None:
        """Send the notifications the last admin call or tick produced."""
        self._flush_outbox()

    def _pending_view(
        self, thing: str
    ) -> tuple[frozenset[tuple[str, int]], tuple[str, int] | None]:
        pending = self._pending(thing)
        ids = frozenset((e.job_id, e.execution_number) for e in pending)
        head = (pending[0].job_id, pending[0].execution_number) if pending else None
        return ids, head


# ---------------------------------------------------------------- validation
def _parse(payload: bytes) -> dict[str, Any]:
    if not payload:
        return {}
    try:
        value = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _RejectedError("InvalidJson", f"the payload is not UTF-8 JSON: {exc}") from None
    if not isinstance(value, dict):
        raise _RejectedError("InvalidJson", "the payload must be a JSON object")
    return value


def _details(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _RejectedError("InvalidRequest", "statusDetails must be an object of strings")
    for key, item in value.items():
        if not DETAIL_KEY_RE.match(key):
            raise _RejectedError(
                "InvalidRequest", f"statusDetails key {key!r} must match [a-zA-Z0-9:_-]{{1,128}}"
            )
        if not isinstance(item, str):
            raise _RejectedError(
                "InvalidRequest", f"statusDetails value of {key!r} must be a string"
            )
        if not 0 < len(item) <= MAX_DETAIL_VALUE or CONTROL_RE.search(item):
            raise _RejectedError(
                "InvalidRequest",
                f"statusDetails value of {key!r} must be 1-1024 characters without control"
                " characters",
            )
    return dict(value)


def _int_or_none(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _RejectedError("InvalidRequest", f"{name} must be an integer")
    return value


def _bool(value: Any, name: str, *, default: bool) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _RejectedError("InvalidRequest", f"{name} must be a boolean")
    return value


def _step_minutes(value: Any) -> int | None:
    minutes = _int_or_none(value, "stepTimeoutInMinutes")
    if minutes is not None and minutes != -1 and not 1 <= minutes <= MAX_STEP_MINUTES:
        raise _RejectedError("InvalidRequest", "stepTimeoutInMinutes must be -1 or 1-10080")
    return minutes


def _camel(status: str) -> str:
    return "".join(part.capitalize() for part in status.split("_"))


def _check_rollout(config: dict[str, Any] | None) -> None:
    if config is None:
        return
    if not isinstance(config, dict):
        raise AdminError("InvalidRequestException", "jobExecutionsRolloutConfig must be an object")
    if "maximumPerMinute" in config:
        rate = config["maximumPerMinute"]
        if isinstance(rate, bool) or not isinstance(rate, int) or not 1 <= rate <= 1000:
            raise AdminError("InvalidRequestException", "maximumPerMinute must be 1-1000")
    if "exponentialRate" in config:
        exp = config["exponentialRate"]
        try:
            base = int(exp["baseRatePerMinute"])
            factor = float(exp["incrementFactor"])
            crit = exp["rateIncreaseCriteria"]
            ((name, number),) = crit.items()
        except (KeyError, TypeError, ValueError):
            raise AdminError(
                "InvalidRequestException",
                "exponentialRate needs baseRatePerMinute, incrementFactor and one "
                "rateIncreaseCriteria",
            ) from None
        if (
            not (1 <= base <= 1000 and 1.1 <= factor <= 5)
            or name
            not in (
                "numberOfNotifiedThings",
                "numberOfSucceededThings",
            )
            or int(number) < 1
        ):
            raise AdminError("InvalidRequestException", "exponentialRate values out of range")


def _check_abort_config(config: dict[str, Any] | None) -> None:
    if config is None:
        return
    criteria = config.get("criteriaList") if isinstance(config, dict) else None
    if not isinstance(criteria, list) or not criteria:
        raise AdminError("InvalidRequestException", "abortConfig needs a non-empty criteriaList")
    for crit in criteria:
        try:
            ok = (
                crit["failureType"] in FAILURE_TYPES
                and crit.get("action", "CANCEL") == "CANCEL"
                and 0 <= float(crit["thresholdPercentage"]) <= 100
                and int(crit["minNumberOfExecutedThings"]) >= 1
            )
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise AdminError(
                "InvalidRequestException",
                "abort criteria need failureType FAILED|REJECTED|TIMED_OUT|ALL, action CANCEL,"
                " thresholdPercentage 0-100 and minNumberOfExecutedThings >= 1",
            )


def _check_timeout(config: dict[str, Any] | None) -> None:
    if config is None:
        return
    minutes = config.get("inProgressTimeoutInMinutes") if isinstance(config, dict) else None
    if (
        isinstance(minutes, bool)
        or not isinstance(minutes, int | float)
        or not (0 < minutes <= MAX_STEP_MINUTES)
    ):
        raise AdminError(
            "InvalidRequestException", "timeoutConfig.inProgressTimeoutInMinutes must be 1-10080"
        )


def _check_presigned(config: dict[str, Any] | None) -> None:
    if config is None:
        return
    expires = config.get("expiresInSec", 3600) if isinstance(config, dict) else None
    if isinstance(expires, bool) or not isinstance(expires, int) or not 60 <= expires <= 3600:
        raise AdminError(
            "InvalidRequestException", "presignedUrlConfig.expiresInSec must be 60-3600"
        )


def _presign(url: str, expires: int, presigner: Presigner) -> str:
    """``https://s3.<region>.amazonaws.com/<bucket>/<key>`` (or virtual-host form) -> URL."""
    parsed = urlparse(url)
    host = parsed.hostname or ""
    path = unquote(parsed.path.lstrip("/"))
    if host.startswith("s3.") or host == "s3.amazonaws.com":
        bucket, _, key = path.partition("/")
    else:
        bucket, _, _ = host.partition(".s3")
        key = path
    if not bucket or not key:
        return url
    return presigner(bucket, key, expires)
