"""``ModelRegistry`` in-process, with a fake loader: interleavings a socket cannot force."""

from __future__ import annotations

import threading
import time
import types
from pathlib import Path
from typing import Any

import pytest

from edgeagent.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
)
from edgeagent.registry import LoadedModel, ModelRegistry, StateStore, validate_alias
from edgeagent.tensors import ModelInfo


def fake_loader(*, fail: frozenset[str] = frozenset()) -> Any:
    """Loads 'packages' that are plain directories; urls in ``fail`` fail to load."""

    def load(name: str, url: str) -> LoadedModel:
        if url in fail:
            raise FailedPreconditionError(f"{url} does not load")
        return LoadedModel(
            info=ModelInfo(name=name, url=url, inputs=(), outputs=()),
            manifest=types.SimpleNamespace(version="1.0"),  # type: ignore[arg-type]  # a stand-in
            runtime=None,  # type: ignore[arg-type]  # never run
            package_dir=Path(url).resolve(),
            loaded_at=time.time(),
        )

    return load


class SlowFirstWrite(StateStore):
    """The first write waits (up to 0.5 s) for another write to happen meanwhile."""

    def __init__(self, state_dir: Path) -> None:
        super().__init__(state_dir)
        self.writes: list[dict[str, str]] = []
        self._other_wrote = threading.Event()
        self._first = True
        self._guard = threading.Lock()

    def write(self, models: dict[str, str]) -> None:
        with self._guard:
            first, self._first = self._first, False
        if first:
            self._other_wrote.wait(0.5)
        else:
            self._other_wrote.set()
        self.writes.append(dict(models))
        super().write(models)


def test_a_stale_snapshot_is_never_written_last(tmp_path: Path) -> None:
    """Two aliases loaded at once: the record ends with both, whatever the timing."""
    store = SlowFirstWrite(tmp_path)
    registry = ModelRegistry(loader=fake_loader(), store=store, max_models=8)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = threading.Thread(target=registry.load, args=("a", str(tmp_path / "a")))
    first.start()
    time.sleep(0.1)  # "a" is in the registry and its write has begun
    registry.load("b", str(tmp_path / "b"))
    first.join(10)
    assert store.read() == {"a": str(tmp_path / "a"), "b": str(tmp_path / "b")}
    assert store.writes[-1] == store.read()


def test_restore_reloads_and_forgets_what_fails(tmp_path: Path) -> None:
    for name in ("ok", "broken"):
        (tmp_path / name).mkdir()
    store = StateStore(tmp_path)
    store.write({"ok": str(tmp_path / "ok"), "broken": str(tmp_path / "broken")})
    registry = ModelRegistry(
        loader=fake_loader(fail=frozenset({str(tmp_path / "broken")})), store=store, max_models=8
    )
    assert registry.restore() == ["broken"]
    assert [m.info.name for m in registry.loaded()] == ["ok"]
    assert store.read() == {"ok": str(tmp_path / "ok")}


def test_registry_rules(tmp_path: Path) -> None:
    for name in ("p1", "p2", "p3"):
        (tmp_path / name).mkdir()
    registry = ModelRegistry(loader=fake_loader(), store=None, max_models=2)
    registry.load("a", str(tmp_path / "p1"))
    with pytest.raises(AlreadyExistsError):
        registry.load("a", str(tmp_path / "p1" / "."))
    registry.load("b", str(tmp_path / "p2"))
    with pytest.raises(ResourceExhaustedError):
        registry.load("c", str(tmp_path / "p3"))
    new, old = registry.load("a", str(tmp_path / "p3"))  # a swap needs no free slot
    assert old is not None
    assert (old.info.url, new.info.url) == (str(tmp_path / "p1"), str(tmp_path / "p3"))
    registry.unload("a")
    with pytest.raises(NotFoundError):
        registry.unload("a")
    with pytest.raises(NotFoundError):
        registry.get("a")


@pytest.mark.parametrize("alias", ["a", "Z9", "a-b", "a--b", "1-2-3", "x" * 256])
def test_alias_pattern_accepts(alias: str) -> None:
    validate_alias(alias)


@pytest.mark.parametrize("alias", ["", "-", "a-", "-a", "a_b", "a.b", "a b", "x" * 257, "é"])
def test_alias_pattern_refuses(alias: str) -> None:
    with pytest.raises(InvalidArgumentError):
        validate_alias(alias)
