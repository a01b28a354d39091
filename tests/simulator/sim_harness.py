"""Real processes and a real browser for the simulator's tests.

``Sim`` runs ``windfarm-sim`` as a child process (its own process group,
stopped by whoever started it); ``browser_page`` opens a page in Debian's
headless chromium through Playwright, records console errors, page errors and
any request that leaves loopback (and blocks it), and saves screenshots under
``test-results/dashboard/`` in the repository (git-ignored).
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from playwright.sync_api import Browser, Page, Request, Route

from tests.edgeapp.edgeapp_harness import PYTHON, Proc, free_port
from tests.harness import wait_until

REPO = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO / "test-results" / "dashboard"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
_LOOPBACK = re.compile(r"^(https?|wss?)://(127\.0\.0\.1|localhost|\[::1\])(:\d+)?/")


class Sim:
    """A ``windfarm-sim`` process on a free HTTP port, against a broker on ``mqtt_port``."""

    def __init__(self, base: Path, mqtt_port: int, args: Sequence[str] = ()) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [
            str(Path(PYTHON).with_name("windfarm-sim")),
            "run",
            "--mqtt-port",
            str(mqtt_port),
            "--http-port",
            str(self.port),
            *args,
        ]
        self.proc = Proc(argv, base / f"sim-{self.port}.log")
        wait_until(self._up, 30, what="windfarm-sim's dashboard")

    def _up(self) -> bool:
        if not self.proc.alive():
            raise AssertionError(f"windfarm-sim exited:\n{self.proc.output()[-3000:]}")
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"{self.url}/healthz", timeout=1) as resp,  # noqa: S310 - our http URL
        ):
            return bool(resp.status == 200)
        return False

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=5) as resp:  # noqa: S310
            return json.loads(resp.read())

    def post(self, path: str, body: object) -> tuple[int, Any]:
        data = json.dumps(body).encode() if not isinstance(body, bytes) else body
        req = urllib.request.Request(  # noqa: S310 - self.url is our loopback http URL
            f"{self.url}{path}", data=data, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def stop(self) -> int:
        return self.proc.stop(15) if self.proc.alive() else self.proc.proc.returncode


@dataclass
class PageWatch:
    """What a page did that a user would not want: console errors, page errors, remote fetches."""

    page: Page
    name: str
    errors: list[str] = field(default_factory=list)
    remote: list[str] = field(default_factory=list)
    shots: list[Path] = field(default_factory=list)

    def screenshot(self, label: str) -> Path:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{self.name}-{label}.png"
        self.page.screenshot(path=str(path), full_page=True)
        self.shots.append(path)
        return path


@contextlib.contextmanager
def browser_page(browser: Browser, name: str) -> Iterator[PageWatch]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    watch = PageWatch(page, name)

    def on_request(route: Route, request: Request) -> None:
        if _LOOPBACK.match(request.url) or request.url.startswith("data:"):
            route.continue_()
        else:
            watch.remote.append(request.url)
            route.abort()

    page.route("**/*", on_request)
    page.on("console", lambda m: watch.errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: watch.errors.append(f"page error: {e}"))
    try:
        yield watch
    finally:
        with contextlib.suppress(Exception):
            watch.screenshot("last")
        context.close()


def wait_text(page: Page, selector: str, predicate: Any, timeout: float, what: str) -> str:
    """Poll an element's text until ``predicate(text)``; the text."""
    found: list[str] = []

    def check() -> bool:
        text = page.inner_text(selector) if page.query_selector(selector) else ""
        found[:] = [text]
        return bool(predicate(text))

    deadline = time.monotonic() + timeout
    wait_until(check, max(0.1, deadline - time.monotonic()), what=what, interval=0.1)
    return found[0]
