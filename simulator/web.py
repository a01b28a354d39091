"""The dashboard's web server: Starlette on uvicorn, live updates over Server-Sent Events.

Routes (JSON unless said otherwise):

- ``GET /`` the dashboard page; ``/static/...`` its script, style and the
  vendored chart library (no build step, nothing fetched from elsewhere);
- ``GET /api/farm``: ids, rate, fault kinds;
- ``GET /api/overview``: every turbine in flat arrays (running, faults,
  anomaly bits, rotor speed, labels);
- ``GET /api/turbines/{id}``: one turbine's state, recent samples, verdicts;
- ``POST /api/turbines/{id}/command`` (id may be ``all``): a ``Command``
  (``{"action": "start"|"stop"|"fault"|"clear", ...}``); 400 for a bad
  command, 404 for an unknown turbine;
- ``GET /api/events?turbine=ID``: ``text/event-stream``; every
  ``events_period_s`` an ``overview`` event, and a ``turbine`` event with the
  selected turbine's new samples and verdicts.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Final

import structlog
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from simulator.farm import Command, CommandError, Farm, UnknownTurbineError

__all__ = ["STATIC", "create_app"]

log = structlog.get_logger("simulator.web")

STATIC: Final = Path(__file__).resolve().parent / "static"
_MAX_BODY: Final = 4096


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class _OverviewCache:
    """The overview is the same for every client: serialise it once per period."""

    def __init__(self, farm: Farm, period: float) -> None:
        self._farm, self._period = farm, period
        self._at = -1.0
        self._text = ""
        self._lock = threading.Lock()

    def text(self) -> str:
        now = time.monotonic()
        with self._lock:
            if now - self._at >= self._period * 0.9:
                self._text = json.dumps(self._farm.overview(), separators=(",", ":"))
                self._at = now
            return self._text


def create_app(
    farm: Farm,
    *,
    events_period_s: float = 0.5,
    stopping: threading.Event,
    health: Callable[[], dict[str, Any]] | None = None,
) -> Starlette:
    """The dashboard application over ``farm``; SSE streams end when ``stopping`` is set."""
    overview = _OverviewCache(farm, events_period_s)

    async def index(_request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    async def describe(_request: Request) -> Response:
        return JSONResponse(farm.describe())

    async def get_overview(_request: Request) -> Response:
        return Response(overview.text(), media_type="application/json")

    async def turbine(request: Request) -> Response:
        try:
            return JSONResponse(farm.detail(request.path_params["turbine"]))
        except CommandError as exc:
            return _error(404, str(exc))

    async def command(request: Request) -> Response:
        turbine_id = request.path_params["turbine"]
        body = await request.body()
        if len(body) > _MAX_BODY:
            return _error(413, "command too large")
        try:
            cmd = Command.parse(body)
        except CommandError as exc:
            return _error(400, str(exc))
        try:
            farm.apply(turbine_id, cmd)
        except UnknownTurbineError as exc:
            return _error(404, str(exc))
        except CommandError as exc:
            return _error(400, str(exc))
        log.info("command", via="http", turbine=turbine_id, action=cmd.action, kind=cmd.kind)
        return JSONResponse({"ok": True, "turbine": turbine_id, "action": cmd.action})

    async def events(request: Request) -> Response:
        selected = request.query_params.get("turbine") or None
        if selected is not None and selected not in farm.index:
            return _error(404, f"unknown turbine {selected!r}")

        async def stream() -> AsyncIterator[str]:
            since, after = 0.0, 0
            yield f"event: farm\ndata: {json.dumps(farm.describe())}\n\n"
            while not stopping.is_set():
                yield f"event: overview\ndata: {overview.text()}\n\n"
                if selected is not None:
                    detail: dict[str, Any] = farm.detail(selected, since, after)
                    if detail["t"]:
                        since = detail["t"][-1]
                    if detail["verdicts"]:
                        after = detail["verdicts"][-1]["seq"]
                    yield f"event: turbine\ndata: {json.dumps(detail, separators=(',', ':'))}\n\n"
                await asyncio.sleep(events_period_s)

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def healthz(_request: Request) -> Response:
        extra = health() if health is not None else {}
        return JSONResponse({"ok": True, "turbines": len(farm.ids), **extra})

    return Starlette(
        routes=[
            Route("/", index),
            Route("/healthz", healthz),
            Route("/api/farm", describe),
            Route("/api/overview", get_overview),
            Route("/api/turbines/{turbine}", turbine),
            Route("/api/turbines/{turbine}/command", command, methods=["POST"]),
            Route("/api/events", events),
            Mount("/static", app=StaticFiles(directory=STATIC), name="static"),
        ]
    )
