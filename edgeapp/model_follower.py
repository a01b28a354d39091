"""Which model the agent serves, and the preprocessing that goes with it.

The daemon never loads models: it asks the agent ``DescribeModel(name)`` and
reads the preprocessing block (statistics, thresholds, window constants) from
``<url>/manifest.json`` of the package the agent loaded. When the url changes
(a hot swap by the OTA updater) the manifest is read again. The detector asks
again after every Predict, so a tick whose inputs were prepared for one
package and scored by another is discarded, never published.

No model, or no agent: the follower reports it ("Model not loaded", "Agent
unavailable") and asks again after a delay that doubles up to a maximum; the
buffers keep filling meanwhile, and the first successful answer resumes
detection. The log says why at once (the first failure too, at start), then at
most once per ``log_interval_s`` while the failure lasts, with the count of
failed attempts since. A fresh gRPC channel is opened after the agent was unreachable, so
gRPC's own reconnect backoff (up to two minutes) never delays the recovery.
"""

from __future__ import annotations

import enum
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import structlog
from numpy.typing import NDArray

from edgeagent.capture import AuxEncoding
from edgeagent.errors import AgentError, NotFoundError, UnavailableError
from edgeagent.package import Manifest, PackageError
from edgeagent.tensors import ModelInfo
from edgeapp.errors import ModelInvalidError
from edgeapp.features import PreprocessingError, PreprocessingParams

__all__ = [
    "LoadedModel",
    "ModelClient",
    "ModelFollower",
    "ModelState",
    "ModelStatus",
    "read_model",
]

log = structlog.get_logger("edgeapp.model")

MANIFEST = "manifest.json"


class ModelClient(Protocol):
    """What the daemon needs of the agent (``edgeagent.client.AgentClient`` fits)."""

    def describe_model(self, name: str) -> ModelInfo: ...

    def predict(self, name: str, array: NDArray[np.generic]) -> NDArray[np.generic]: ...

    def capture_data(
        self,
        *,
        model_name: str,
        capture_id: str,
        inputs: Sequence[NDArray[np.generic]],
        outputs: Sequence[NDArray[np.generic]],
        aux_inputs: Sequence[tuple[str, AuxEncoding, bytes]] = (),
    ) -> None: ...

    def close(self) -> None: ...


class ModelStatus(enum.Enum):
    LOADED = "loaded"
    NOT_LOADED = "not_loaded"
    UNAVAILABLE = "unavailable"
    INVALID = "invalid"


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A model the agent serves, with the preprocessing of its package."""

    name: str
    version: str
    url: str
    params: PreprocessingParams


@dataclass(frozen=True)
class ModelState:
    """What the follower knows; ``label`` is the dashboard's ``model_label_status``."""

    status: ModelStatus
    label: str
    model: LoadedModel | None = None


def _manifest_path(url: str) -> Path:
    return Path(url.removeprefix("file://")) / MANIFEST


def read_model(info: ModelInfo) -> LoadedModel:
    """The preprocessing of the package at ``info.url``; ModelInvalidError says why not."""
    path = _manifest_path(info.url)
    try:
        manifest = Manifest.from_json_bytes(path.read_bytes())
        params = PreprocessingParams.from_block(manifest.preprocessing)
    except OSError as exc:
        raise ModelInvalidError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except (PackageError, PreprocessingError) as exc:
        raise ModelInvalidError(f"{path}: {exc}") from exc
    if info.inputs:
        spec = info.inputs[0]
        expected = params.input_shape
        if spec.dtype != "float32" or tuple(spec.shape[1:]) != expected:
            raise ModelInvalidError(
                f"model input {spec.dtype} {list(spec.shape)} does not fit the preprocessing "
                f"(float32 [-1, {', '.join(map(str, expected))}])"
            )
    return LoadedModel(name=info.name, version=manifest.version, url=info.url, params=params)


class ModelFollower:
    """Follows the model the agent serves under one name; owned by the tick's thread."""

    def __init__(
        self,
        *,
        client_factory: Callable[[], ModelClient],
        model_name: str,
        retry_min_s: float,
        retry_max_s: float,
        buffer_length: int,
        log_interval_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._factory = client_factory
        self._client: ModelClient | None = None
        self._client_lock = threading.Lock()  # cancel() comes from another thread
        self._cancelled = False
        self.model_name = model_name
        self.retry_min_s = retry_min_s
        self.retry_max_s = retry_max_s
        self.buffer_length = buffer_length
        self._clock = clock
        self._delay = 0.0
        self._next_attempt = 0.0
        self.state = ModelState(ModelStatus.UNAVAILABLE, "Agent unavailable")
        self._reported = False  # the initial state was never logged: the first outcome is
        self.log_interval_s = log_interval_s
        self._logged_at = -math.inf
        self._failures = 0  # failed attempts since the last line about them
        self.reason: str | None = None
        """Why the last attempt failed (None once a model is loaded)."""
        self.swaps = 0

    @property
    def client(self) -> ModelClient:
        with self._client_lock:
            if self._client is None:
                self._client = self._factory()
                if self._cancelled:
                    self._client.close()  # every call on it fails at once
            return self._client

    def close(self) -> None:
        """Close the connection (in-flight calls end with an error)."""
        with self._client_lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    def cancel(self) -> None:
        """Any thread, when stopping: end the calls in flight and fail the later ones at once."""
        with self._client_lock:
            self._cancelled = True
            client = self._client
        if client is not None:
            client.close()

    def refresh(self) -> ModelState:
        """Ask the agent which package it serves (unless a retry delay is running)."""
        loaded = self.state.status is ModelStatus.LOADED
        if not loaded and self._clock() < self._next_attempt:
            return self.state
        try:
            info = self.client.describe_model(self.model_name)
        except AgentError as exc:
            return self.failed(exc)
        current = self.state.model
        if current is not None and current.url == info.url:
            return self.state
        try:
            model = read_model(info)
        except ModelInvalidError as exc:
            return self._set(ModelState(ModelStatus.INVALID, "Model invalid"), retry=True, why=exc)
        if model.params.buffer > self.buffer_length:
            why = ModelInvalidError(
                f"the model needs {model.params.buffer} samples per turbine; "
                f"buffer_length is {self.buffer_length}"
            )
            return self._set(ModelState(ModelStatus.INVALID, "Model invalid"), retry=True, why=why)
        if current is not None:
            self.swaps += 1
        return self._set(ModelState(ModelStatus.LOADED, f"Model loaded: {model.version}", model))

    def confirm(self, model: LoadedModel) -> bool:
        """Whether the agent still serves ``model``'s package (asked after a Predict)."""
        try:
            info = self.client.describe_model(self.model_name)
        except AgentError as exc:
            self.failed(exc)
            return False
        return info.url == model.url

    def failed(self, exc: BaseException) -> ModelState:
        """Record a failed call to the agent; returns the new state."""
        if isinstance(exc, NotFoundError):
            return self._set(ModelState(ModelStatus.NOT_LOADED, "Model not loaded"), retry=True)
        if isinstance(exc, UnavailableError):
            self.close()  # a fresh channel next time: no gRPC reconnect backoff
            state = ModelState(ModelStatus.UNAVAILABLE, "Agent unavailable")
            return self._set(state, retry=True, why=exc)
        state = ModelState(ModelStatus.UNAVAILABLE, "Agent unavailable")
        return self._set(state, retry=True, why=exc)

    def _set(
        self, state: ModelState, *, retry: bool = False, why: BaseException | None = None
    ) -> ModelState:
        if retry:
            self._delay = min(self.retry_max_s, max(self.retry_min_s, self._delay * 2))
            self._next_attempt = self._clock() + self._delay
        else:
            self._delay = 0.0
        if state != self.state or not self._reported:
            self._reported = True
            self._failures = 0
            self._logged_at = self._clock()
            event = log.info if state.status is ModelStatus.LOADED else log.warning
            model = state.model
            event(
                _EVENTS[state.status],
                status=state.status.value,
                label=state.label,
                model=self.model_name,
                version=model.version if model else None,
                url=model.url if model else None,
                reason=str(why) if why is not None else None,
                retry_in_s=round(self._delay, 3) if retry else None,
            )
        elif state.status is not ModelStatus.LOADED:
            self._failures += 1
            now = self._clock()
            if now - self._logged_at >= self.log_interval_s:
                log.warning(
                    _EVENTS[state.status],
                    status=state.status.value,
                    label=state.label,
                    model=self.model_name,
                    reason=str(why) if why is not None else None,
                    failures=self._failures,
                    since_s=round(now - self._logged_at, 1),
                    retry_in_s=round(self._delay, 3),
                )
                self._logged_at = now
                self._failures = 0
        self.reason = str(why) if why is not None else None
        self.state = state
        return state


_EVENTS = {
    ModelStatus.LOADED: "model state",
    ModelStatus.NOT_LOADED: "model not loaded",
    ModelStatus.UNAVAILABLE: "agent unavailable",
    ModelStatus.INVALID: "model invalid",
}
