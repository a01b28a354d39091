"""The import directions of ARCHITECTURE.md, checked by parsing every first-party module.

Every ``import``/``from ... import`` counts, wherever it is (inside functions,
under ``if TYPE_CHECKING:``), and so does a string literal given to
``importlib.import_module`` or ``__import__``. Relative imports are resolved.

Rules:
- ``edgecommon`` imports no first-party package.
- ``edgeagent`` imports no first-party package but ``edgecommon``.
- ``edgeapp`` and ``ota`` import from ``edgeagent`` only its client, its package
  format, its errors, its tensor types and ``edgeagent.capture`` itself (enum
  types the client returns; not its spool, uploader or reader submodules);
  besides that only ``edgecommon``; ``ota`` never imports ``edgeapp``.
- ``simulator`` imports nothing that runs on a device (``edgeagent``,
  ``edgeapp``, ``ota``) except ``edgeagent.client``.
- nothing imports ``edgectl``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FIRST_PARTY = ("edgeagent", "edgecommon", "edgeapp", "ota", "edgectl", "simulator", "cloud")
DEVICE_SIDE = ("edgeagent", "edgeapp", "ota")
AGENT_PUBLIC = (
    "edgeagent.client",
    "edgeagent.package",
    "edgeagent.errors",
    "edgeagent.tensors",
)
# public as a module only: its submodules (spool, upload, ...) are the agent's own
AGENT_PUBLIC_EXACT = ("edgeagent.capture",)


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name
    target: str  # dotted module name imported
    where: str  # file:line


def within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def top(module: str) -> str:
    return module.split(".", maxsplit=1)[0]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_module(dotted: str, root: Path) -> bool:
    base = root.joinpath(*dotted.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imports_of(
    source: str, importer: str, *, is_package: bool, root: Path, label: str
) -> Iterator[Import]:
    """Every first-party module ``source`` imports."""
    tree = ast.parse(source, filename=label)
    package_parts = importer.split(".") if is_package else importer.split(".")[:-1]
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package_parts[: len(package_parts) - (node.level - 1)]
                base = ".".join([*base_parts, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            # "from pkg import mod" imports the module pkg.mod when there is one
            targets = []
            for alias in node.names:
                dotted = f"{base}.{alias.name}" if base else alias.name
                targets.append(dotted if not base or is_module(dotted, root) else base)
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and (
                (isinstance(node.func, ast.Name) and node.func.id == "__import__")
                or (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
            )
        ):
            targets = [node.args[0].value]
        for target in targets:
            if top(target) in FIRST_PARTY:
                yield Import(importer, target, f"{label}:{getattr(node, 'lineno', '?')}")


def violation(imp: Import) -> str | None:
    """Why this import breaks a rule, or None."""
    src, dst = top(imp.importer), imp.target
    if src == top(dst):
        return None
    if top(dst) == "edgectl":
        return "nothing imports edgectl"
    if src == "edgecommon":
        return "edgecommon imports no first-party package"
    if src == "edgeagent":
        return None if within(dst, "edgecommon") else "edgeagent imports only edgecommon"
    if src in ("edgeapp", "ota"):
        if within(dst, "edgecommon"):
            return None
        if top(dst) == "edgeagent" and (
            any(within(dst, p) for p in AGENT_PUBLIC) or dst in AGENT_PUBLIC_EXACT
        ):
            return None
        if top(dst) == "edgeagent":
            public = ", ".join((*AGENT_PUBLIC, *AGENT_PUBLIC_EXACT))
            return f"{src} may use only {public} of edgeagent"
        return f"{src} imports only edgeagent's public modules and edgecommon"
    if src == "simulator" and top(dst) in DEVICE_SIDE and not within(dst, "edgeagent.client"):
        return "simulator talks to the device only through MQTT and edgeagent.client"
    return None


def first_party_imports(root: Path) -> Iterator[Import]:
    for package in FIRST_PARTY:
        folder = root / package
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*.py")):
            if "_proto" in path.parts:
                continue  # generated stubs
            yield from imports_of(
                path.read_text(encoding="utf-8"),
                module_name(path, root),
                is_package=path.name == "__init__.py",
                root=root,
                label=str(path.relative_to(root)),
            )


def test_first_party_packages_follow_the_import_rules() -> None:
    found = list(first_party_imports(REPO))
    assert any(top(i.importer) == "edgectl" for i in found)  # the walk does see imports
    broken = [
        f"{i.where}: {i.importer} imports {i.target}: {why}" for i in found if (why := violation(i))
    ]
    assert not broken, "\n".join(broken)


# -- the checker itself ----------------------------------------------------------------
def check(source: str, importer: str, *, is_package: bool = False) -> list[str]:
    return [
        why
        for imp in imports_of(source, importer, is_package=is_package, root=REPO, label="x.py")
        if (why := violation(imp))
    ]


@pytest.mark.parametrize(
    ("importer", "source"),
    [
        ("edgeagent.service", "import edgeapp.features"),
        ("edgeagent.service", "def f():\n    from ota import jobs\n"),
        ("edgeagent.service", "import importlib\nimportlib.import_module('edgectl.errors')"),
        ("edgecommon.fsutil", "from edgeagent import errors"),
        ("edgeapp.daemon", "from edgeagent.registry import ModelRegistry"),
        ("edgeapp.daemon", "from edgeagent import service"),
        ("edgeapp.daemon", "import edgeagent._proto.agent_pb2"),
        ("edgeapp.daemon", "from edgeagent.capture.spool import CaptureSpool"),
        ("edgeapp.daemon", "from ota.state import State"),
        ("ota.installer", "from edgeapp import features"),
        (
            "ota.installer",
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import edgeapp\n",
        ),
        ("simulator.farm", "from edgeapp.features import prepare_windows"),
        ("simulator.farm", "from edgeagent.package import Manifest"),
        ("cloud.deploy", "from edgectl.commands import models"),
        ("edgeagent.package.build", "from ... import edgeapp"),
    ],
)
def test_checker_catches(importer: str, source: str) -> None:
    assert check(source, importer)


@pytest.mark.parametrize(
    ("importer", "source"),
    [
        ("edgeagent.service", "from edgecommon.fsutil import atomic_write_json"),
        ("edgeagent.package.build", "from ..errors import AgentError"),
        ("edgeagent.package", "from .build import build_package"),
        ("edgeapp.daemon", "from edgeagent.client import AgentClient"),
        ("edgeapp.daemon", "from edgeagent import client, errors, tensors, capture"),
        ("edgeapp.daemon", "from edgeagent.package.manifest import Manifest"),
        ("ota.installer", "from edgeagent.package import extract_package"),
        ("simulator.farm", "from edgeagent.client import AgentClient\nimport edgecommon"),
        ("edgectl.commands.models", "import edgeagent.registry, edgeapp, ota"),
        ("cloud.autoencoder", "from edgeapp.features import FEATURES"),
    ],
)
def test_checker_allows(importer: str, source: str) -> None:
    assert check(source, importer, is_package=importer == "edgeagent.package") == []
