"""The Jobs emulator's admin API: HTTP on loopback, and its Python client ``JobsAdmin``.

The fleet side of AWS IoT Jobs (CreateJob, DescribeJob, ListJobs, CancelJob,
DeleteJob, DescribeJobExecution, ListJobExecutionsForJob, CancelJobExecution)
and a thing registry, as JSON over HTTP (field names as in the AWS API):

=======  ====================================  ==========================================
method   path                                  body / answer
=======  ====================================  ==========================================
GET      /health                               ``{"ready": bool, "stand_in": "local"}``
PUT      /things/<name>                        ``{"groups": [...]}`` -> the thing
GET      /things                               ``{"things": [...]}``
POST     /jobs                                 ``{"jobId", "targets", "document", "description",
                                               "jobExecutionsRolloutConfig", "abortConfig",
                                               "timeoutConfig", "presignedUrlConfig"}`` -> job
GET      /jobs[?status=S]                      ``{"jobs": [summary...]}``
GET      /jobs/<id>                            the job, with ``jobProcessDetails`` counts
POST     /jobs/<id>/cancel                     ``{"force": bool, "comment": str}`` -> job
DELETE   /jobs/<id>[?force=true]               204
GET      /jobs/<id>/things                     ``{"executions": [...]}``
GET      /jobs/<id>/things/<thing>             the execution
POST     /jobs/<id>/things/<thing>/cancel      ``{"force": bool}`` -> 204
=======  ====================================  ==========================================

Errors answer ``{"code": "<AWS exception name>", "message": ...}`` with 400,
404 or 409; the client raises them as ``AdminError``.
"""

from __future__ import annotations

import contextlib
import json
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, quote, urlparse

import structlog

from cloud.local.httpd import JsonHandler, LoopbackServer, ServerThread
from cloud.local.jobs import AdminError, JobsEngine

__all__ = ["AdminServer", "JobsAdmin"]

log = structlog.get_logger("cloud.local.admin")

_MAX_BODY = 1024 * 1024


class _Handler(JsonHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 - the stdlib handler names
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802 - the stdlib handler names
        self._dispatch("POST")

    def do_PUT(self) -> None:  # noqa: N802 - the stdlib handler names
        self._dispatch("PUT")

    def do_DELETE(self) -> None:  # noqa: N802 - the stdlib handler names
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        url = urlparse(self.path)
        parts = [p for p in url.path.split("/") if p]
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        try:
            body = self._body()
            status, answer = self._route(method, parts, query, body)
        except AdminError as exc:
            self.send_json(exc.http_status, {"code": exc.code, "message": exc.message})
            return
        except (ValueError, TypeError, KeyError) as exc:
            self.send_json(400, {"code": "InvalidRequestException", "message": str(exc)})
            return
        self.send_json(status, answer)

    def _body(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        if length > _MAX_BODY:
            raise AdminError("InvalidRequestException", "request body too large")
        if length == 0:
            return {}
        try:
            value = json.loads(self.rfile.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise AdminError("InvalidRequestException", f"body is not JSON: {exc}") from None
        if not isinstance(value, dict):
            raise AdminError("InvalidRequestException", "body must be a JSON object")
        return value

    def _route(
        self, method: str, parts: list[str], query: dict[str, str], body: dict[str, Any]
    ) -> tuple[int, Any]:
        engine = self.server.engine
        match method, parts:
            case "GET", ["health"]:
                return 200, {"ready": self.server.ready(), "stand_in": "local"}
            case "GET", ["things"]:
                return 200, {"things": engine.list_things()}
            case "PUT", ["things", name]:
                return 200, engine.register_thing(name, list(body.get("groups") or []))
            case "GET", ["jobs"]:
                return 200, {"jobs": engine.list_jobs(query.get("status"))}
            case "POST", ["jobs"]:
                document = body.get("document")
                if not isinstance(document, dict):
                    raise AdminError("InvalidRequestException", "document must be a JSON object")
                job = engine.create_job(
                    body.get("jobId", ""),
                    targets=body.get("targets", []),
                    document=document,
                    description=body.get("description"),
                    rollout_config=body.get("jobExecutionsRolloutConfig"),
                    abort_config=body.get("abortConfig"),
                    timeout_config=body.get("timeoutConfig"),
                    presigned_url_config=body.get("presignedUrlConfig"),
                )
                return 201, job
            case "GET", ["jobs", job_id]:
                return 200, engine.describe_job(job_id)
            case "POST", ["jobs", job_id, "cancel"]:
                return 200, engine.cancel_job(
                    job_id, force=bool(body.get("force")), comment=body.get("comment")
                )
            case "DELETE", ["jobs", job_id]:
                engine.delete_job(job_id, force=query.get("force") == "true")
                return 204, None
            case "GET", ["jobs", job_id, "things"]:
                return 200, {"executions": engine.list_executions(job_id)}
            case "GET", ["jobs", job_id, "things", thing]:
                return 200, engine.describe_execution(job_id, thing)
            case "POST", ["jobs", job_id, "things", thing, "cancel"]:
                engine.cancel_job_execution(job_id, thing, force=bool(body.get("force")))
                return 204, None
        raise AdminError("ResourceNotFoundException", f"no such admin call: {method} {self.path}")


class _Server(LoopbackServer):
    engine: JobsEngine
    ready: Callable[[], bool]


class AdminServer(ServerThread):
    """The admin HTTP API on ``127.0.0.1:port`` (a thread)."""

    def __init__(self, engine: JobsEngine, *, port: int, ready: Callable[[], bool]) -> None:
        server = _Server(("127.0.0.1", port), _Handler)
        server.engine = engine
        server.ready = ready
        super().__init__(server, "admin-http")


class JobsAdmin:
    """The admin API from Python (an HTTP client of ``admin_url``)."""

    def __init__(self, admin_url: str, *, timeout: float = 10.0) -> None:
        self.admin_url = admin_url.rstrip("/")
        self._timeout = timeout

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(  # noqa: S310 - a loopback http URL we built
            self.admin_url + path, data=data, method=method
        )
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as resp:  # noqa: S310
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            with exc:  # holds the connection's socket
                raw = exc.read()
            error: dict[str, Any] = {}
            with contextlib.suppress(ValueError):
                error = json.loads(raw)
            raise AdminError(
                str(error.get("code", f"HTTP{exc.code}")),
                str(error.get("message", raw.decode(errors="replace"))),
            ) from None
        return json.loads(raw) if raw else None

    # -- things ------------------------------------------------------------------
    def register_thing(self, name: str, groups: list[str] | None = None) -> dict[str, Any]:
        result: dict[str, Any] = self._call(
            "PUT", f"/things/{quote(name, safe='')}", {"groups": groups or []}
        )
        return result

    def list_things(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", "/things")["things"]
        return result

    # -- jobs --------------------------------------------------------------------
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
        """CreateJob. ``targets``: thing names or thing / thing-group ARNs.

        The configs take the AWS API's shapes, e.g. ``rollout_config={"maximumPerMinute": 10}``,
        ``abort_config={"criteriaList": [{"failureType": "FAILED", "action": "CANCEL",
        "thresholdPercentage": 50, "minNumberOfExecutedThings": 2}]}``,
        ``timeout_config={"inProgressTimeoutInMinutes": 5}``,
        ``presigned_url_config={"expiresInSec": 600}``.
        """
        body: dict[str, Any] = {"jobId": job_id, "targets": targets, "document": document}
        optional = {
            "description": description,
            "jobExecutionsRolloutConfig": rollout_config,
            "abortConfig": abort_config,
            "timeoutConfig": timeout_config,
            "presignedUrlConfig": presigned_url_config,
        }
        body.update({k: v for k, v in optional.items() if v is not None})
        result: dict[str, Any] = self._call("POST", "/jobs", body)
        return result

    def describe_job(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", f"/jobs/{quote(job_id, safe='')}")
        return result

    def list_jobs(self, status: str | None = None) -> list[dict[str, Any]]:
        path = "/jobs" + (f"?status={quote(status)}" if status else "")
        result: list[dict[str, Any]] = self._call("GET", path)["jobs"]
        return result

    def cancel_job(
        self, job_id: str, *, force: bool = False, comment: str | None = None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"force": force}
        if comment is not None:
            body["comment"] = comment
        result: dict[str, Any] = self._call("POST", f"/jobs/{quote(job_id, safe='')}/cancel", body)
        return result

    def delete_job(self, job_id: str, *, force: bool = False) -> None:
        self._call("DELETE", f"/jobs/{quote(job_id, safe='')}" + ("?force=true" if force else ""))

    def describe_execution(self, job_id: str, thing: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call(
            "GET", f"/jobs/{quote(job_id, safe='')}/things/{quote(thing, safe='')}"
        )
        return result

    def list_executions(self, job_id: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", f"/jobs/{quote(job_id, safe='')}/things")[
            "executions"
        ]
        return result

    def cancel_execution(self, job_id: str, thing: str, *, force: bool = False) -> None:
        self._call(
            "POST",
            f"/jobs/{quote(job_id, safe='')}/things/{quote(thing, safe='')}/cancel",
            {"force": force},
        )

    def health(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "/health")
        return result
