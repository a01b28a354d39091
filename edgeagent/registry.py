"""The registry of loaded models: alias -> the model that serves it now.

It knows nothing of gRPC and nothing of how packages are checked on disk (the
``PackageLoader`` does that). Lookups are one dict read under a short lock;
an in-flight prediction holds a reference to the ``LoadedModel`` it started
on, so a hot swap or an unload never disturbs it: the old session is freed
when the last prediction using it returns.

Control calls (load, unload) on one alias are serialised by a lock per alias
stripe; loads of different aliases proceed in parallel and never block
predictions, because verification, session creation and the golden check all
happen before the registry's lock is taken for the swap itself.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import structlog

from edgeagent.errors import (
    AlreadyExistsError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
)
from edgeagent.package import Manifest
from edgeagent.runtime import ModelRuntime
from edgeagent.tensors import ModelInfo
from edgecommon.fsutil import atomic_write_json

log = structlog.get_logger(__name__)

ALIAS_RE = re.compile(r"[a-zA-Z0-9](-*[a-zA-Z0-9])*")
MAX_ALIAS_LENGTH = 256
STATE_FILE = "models.json"
STATE_SCHEMA = 1
_STRIPES = 64


def validate_alias(name: str) -> None:
    if len(name) > MAX_ALIAS_LENGTH or not ALIAS_RE.fullmatch(name):
        raise InvalidArgumentError(
            f"invalid model name {name[:64]!r}: letters and digits with inner hyphens "
            "only (pattern ^[a-zA-Z0-9](-*[a-zA-Z0-9])*$)"
        )


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """A verified, warmed-up model and where it came from."""

    info: ModelInfo
    manifest: Manifest
    runtime: ModelRuntime
    package_dir: Path  # resolved path: identity of the package
    loaded_at: float


Loader = Callable[[str, str], LoadedModel]


class StateStore:
    """The persisted set of loaded models (alias -> url), written atomically."""

    def __init__(self, state_dir: Path) -> None:
        self._path = state_dir / STATE_FILE
        self._lock = threading.Lock()

    @property
    def path(self) -> Path:
        return self._path

    def read(self) -> dict[str, str]:
        try:
            raw = json.loads(self._path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.error(
                "model state record unreadable; starting empty",
                path=str(self._path),
                error=str(exc),
            )
            return {}
        models = raw.get("models") if isinstance(raw, dict) else None
        if not isinstance(models, dict):
            log.error("model state record malformed; starting empty", path=str(self._path))
            return {}
        return {str(k): str(v) for k, v in models.items()}

    def write(self, models: dict[str, str]) -> None:
        with self._lock:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(
                self._path, {"schema": STATE_SCHEMA, "models": dict(sorted(models.items()))}
            )


class ModelRegistry:
    """Alias -> LoadedModel, with hot swap, serialised control calls and persistence."""

    def __init__(self, *, loader: Loader, store: StateStore | None, max_models: int) -> None:
        self._loader = loader
        self._store = store
        self._max_models = max_models
        self._lock = threading.Lock()
        self._models: dict[str, LoadedModel] = {}
        self._stripes = [threading.Lock() for _ in range(_STRIPES)]
        self._persist_lock = threading.Lock()
        # restored at start and not yet claimed: the first LoadModel of the same name
        # and package adopts it (apps written for the original agent load at their start)
        self._adoptable: set[str] = set()

    @contextmanager
    def _control(self, name: str) -> Iterator[None]:
        with self._stripes[zlib.crc32(name.encode()) % _STRIPES]:
            yield

    def get(self, name: str) -> LoadedModel:
        model = self._models.get(name)  # a dict read is atomic; no lock on the hot path
        if model is None:
            raise NotFoundError(f"no model named {name!r} is loaded")
        return model

    def loaded(self) -> list[LoadedModel]:
        with self._lock:
            return [self._models[k] for k in sorted(self._models)]

    def load(self, name: str, url: str) -> tuple[LoadedModel, LoadedModel | None]:
        """Load ``url`` as ``name``; hot-swaps when ``name`` serves another package.

        Returns the new model and the one it replaced (if any).
        """
        validate_alias(name)
        with self._control(name):
            current = self._models.get(name)
            if current is not None and _same_package(current.package_dir, url):
                with self._lock:
                    adopted = name in self._adoptable
                    self._adoptable.discard(name)
                if adopted:
                    log.info("restored model adopted", model=name, url=url)
                    return current, None
                raise AlreadyExistsError(
                    f"model {name!r} is already loaded from {current.info.url}"
                )
            if current is None:
                with self._lock:
                    if len(self._models) >= self._max_models:
                        raise ResourceExhaustedError(
                            f"{len(self._models)} models loaded: the limit is {self._max_models}"
                        )
            started = time.perf_counter()
            new = self._loader(name, url)  # verify, create session, golden check: no lock held
            with self._lock:
                if name not in self._models and len(self._models) >= self._max_models:
                    raise ResourceExhaustedError(
                        f"{len(self._models)} models loaded: the limit is {self._max_models}"
                    )
                self._models[name] = new
                self._adoptable.discard(name)
            self._persist()
            log.info(
                "model loaded" if current is None else "model hot-swapped",
                model=name,
                url=url,
                version=new.manifest.version,
                previous=None if current is None else current.manifest.version,
                load_ms=round((time.perf_counter() - started) * 1000, 1),
            )
            return new, current

    def unload(self, name: str) -> LoadedModel:
        with self._control(name):
            with self._lock:
                model = self._models.pop(name, None)
                self._adoptable.discard(name)
            if model is None:
                raise NotFoundError(f"no model named {name!r} is loaded")
            self._persist()
            log.info("model unloaded", model=name, url=model.info.url)
            return model

    def restore(self) -> list[str]:
        """Reload what the state record lists; returns the aliases that failed.

        A restored model stays adoptable until its first LoadModel: that call, with the
        same name and package, succeeds as a fresh load would (the original agent forgot
        its models on restart, so its apps load at their start and treat errors as fatal).
        """
        if self._store is None:
            return []
        failed = []
        for name, url in self._store.read().items():
            try:
                self.load(name, url)
                with self._lock:
                    self._adoptable.add(name)
            except Exception as exc:  # noqa: BLE001 - one broken package must not stop the others
                failed.append(name)
                log.error(
                    "could not restore model",
                    model=name,
                    url=url,
                    error=str(exc),
                    error_type=type(exc).__name__,
                )
        if failed:
            self._persist()
        return failed

    def _persist(self) -> None:
        """Write the current set of models.

        The snapshot is taken under the write lock: a control call on another
        alias running at the same time can never write its older snapshot last.
        """
        if self._store is None:
            return
        with self._persist_lock:
            with self._lock:
                snapshot = {k: v.info.url for k, v in self._models.items()}
            self._store.write(snapshot)


def _same_package(current_dir: Path, url: str) -> bool:
    try:
        return current_dir == resolve_package_dir(url)
    except (OSError, InvalidArgumentError):
        return False


def resolve_package_dir(url: str) -> Path:
    """The local package directory a LoadModel url names (never a remote url)."""
    if "://" in url and not url.startswith("file://"):
        raise InvalidArgumentError(f"url must be a local package directory, not {url[:128]!r}")
    # a relative path is taken from the agent's working directory, as the
    # original agent did
    path = Path(url.removeprefix("file://"))
    if "\0" in url:
        raise InvalidArgumentError("url contains a NUL byte")
    return Path(os.path.realpath(path))
