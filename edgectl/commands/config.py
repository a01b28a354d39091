"""``edgectl config check [FILE...]``: validate the processes' configuration files.

Each file is read the way its process reads it (TOML, flat or under the
process's table; the agent also takes a SageMaker Edge Agent JSON config) and
validated by that process's own settings class, without the environment: the
operator's shell is not the service's. Problems are reported in the file's
terms: ``agent.toml:23: max_batch: expected int (Input should be ...)``.
Exit code 1 when any file has an error.

Which process a file configures: its table (``[agent]``, ``[app]``, ``[ota]``),
else its name (``agent.toml``...), else ``--kind``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from edgectl.errors import CommandError

CONFIG_DIR = Path("/etc/windedge")


@dataclass(frozen=True)
class Process:
    """A process whose configuration edgectl can check."""

    kind: str
    settings: str  # "module:Class", imported only when a file of this kind is checked

    @property
    def default_file(self) -> Path:
        return CONFIG_DIR / f"{self.kind}.toml"


# kind -> settings class. Registering a process is one line here.
PROCESSES: dict[str, Process] = {
    p.kind: p
    for p in (
        Process("agent", "edgeagent.settings:AgentSettings"),
        Process("app", "edgeapp.settings:AppSettings"),
        Process("ota", "ota.settings:OtaSettings"),
    )
}


@dataclass(frozen=True)
class Problem:
    """One thing wrong in a file, located by line (when known) and key."""

    file: Path
    line: int | None
    key: str | None
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else str(self.file)
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("config", help="configuration files of the device's processes")
    sub = parser.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    p = sub.add_parser(
        "check",
        help="validate configuration files (default: the ones in /etc/windedge)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "files",
        nargs="*",
        type=Path,
        metavar="FILE",
        help=f"files to check (default: {CONFIG_DIR}/<process>.toml of every process)",
    )
    p.add_argument("--kind", choices=sorted(PROCESSES), help="the process every FILE configures")
    p.set_defaults(func=_check)


def _check(args: argparse.Namespace) -> int:
    files: list[Path] = args.files or [p.default_file for p in PROCESSES.values()]
    failed = False
    for path in files:
        problems = check_file(path, kind=args.kind)
        if problems:
            failed = True
            for problem in problems:
                print(problem)
        else:
            print(f"{path}: ok")
    return 1 if failed else 0


def check_file(path: Path, *, kind: str | None = None) -> list[Problem]:
    """Every problem of one configuration file; empty when the process would accept it."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        return [Problem(path, None, None, f"cannot read: {exc.strerror or exc}")]
    is_json = path.suffix == ".json" or text.lstrip().startswith("{")
    try:
        data = _parse(path, text, is_json=is_json)
    except _ParseError as exc:
        return [Problem(path, exc.line, None, exc.message)]
    try:
        process = _which(path, data, kind)
    except CommandError as exc:
        return [Problem(path, None, None, str(exc))]
    table = process.kind if isinstance(data.get(process.kind), dict) else None
    values = data[table] if table else data
    lines = _json_key_lines(text) if is_json else _key_lines(text, table)
    file_keys: dict[str, str] = {}  # field -> the file's name for it, where they differ
    if is_json and process.kind == "agent" and any(k.startswith("sagemaker_edge_") for k in values):
        from edgeagent.settings import SAGEMAKER_KEYS, ConfigError, map_sagemaker_config  # noqa: PLC0415

        try:
            values = map_sagemaker_config(values)
        except ConfigError as exc:
            return [Problem(path, None, None, str(exc))]
        file_keys = {field: key for key, field in SAGEMAKER_KEYS.items()}
    try:
        cls = _settings_class(process)
    except CommandError as exc:
        return [Problem(path, None, None, str(exc))]
    try:
        _file_only(cls)(**values)
    except ValidationError as exc:
        problems = [_problem(path, cls, err, lines, file_keys) for err in exc.errors()]
        return sorted(problems, key=lambda p: p.line or 0)
    return []


class _ParseError(Exception):
    def __init__(self, message: str, line: int | None) -> None:
        super().__init__(message)
        self.message = message
        self.line = line


def _parse(path: Path, text: str, *, is_json: bool) -> dict[str, Any]:
    if is_json:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise _ParseError(f"invalid JSON: {exc.msg}", exc.lineno) from exc
        if not isinstance(raw, dict):
            raise _ParseError("expected a JSON object", None)
        return raw
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        found = re.search(r"\(at line (\d+)", str(exc))
        raise _ParseError(f"invalid TOML: {exc}", int(found[1]) if found else None) from exc


def _which(path: Path, data: dict[str, Any], kind: str | None) -> Process:
    if kind is not None:
        return PROCESSES[kind]
    tables = [k for k in PROCESSES if isinstance(data.get(k), dict)]
    if len(tables) == 1:
        return PROCESSES[tables[0]]
    if len(tables) > 1:
        raise CommandError(f"tables of several processes ({', '.join(tables)}): one per file")
    if path.stem in PROCESSES:
        return PROCESSES[path.stem]
    if any(k.startswith("sagemaker_edge_") for k in data):
        return PROCESSES["agent"]
    names = ", ".join(f"[{k}]" for k in PROCESSES)
    raise CommandError(
        f"cannot tell which process this file configures: give it a table ({names}), "
        "name it after the process (agent.toml, ...) or pass --kind"
    )


def _settings_class(process: Process) -> type[BaseSettings]:
    module_name, _, class_name = process.settings.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise CommandError(f"{process.kind}: {module_name} is not installed ({exc})") from exc
    cls = getattr(module, class_name)
    if not (isinstance(cls, type) and issubclass(cls, BaseSettings)):
        raise CommandError(f"{process.settings} is not a settings class")
    return cls


def _file_only(cls: type[BaseSettings]) -> type[BaseSettings]:
    """``cls`` reading its constructor's arguments only: no environment, no dotenv."""

    def sources(
        _cls: type[BaseSettings],
        /,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        **_others: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)

    return type(cls.__name__, (cls,), {"settings_customise_sources": classmethod(sources)})


def _problem(
    path: Path,
    cls: type[BaseModel],
    err: Any,
    lines: dict[str, int],
    file_keys: dict[str, str],
) -> Problem:
    loc = [str(p) for p in err["loc"]]
    field = loc[0] if loc else None
    name = file_keys.get(field, field) if field else None
    dotted = ".".join([name, *loc[1:]]) if name else None
    line = lines.get(name) if name else None
    if err["type"] == "extra_forbidden":
        return Problem(path, line, dotted, "unknown key")
    message = str(err["msg"])
    if field is not None and field in cls.model_fields:
        expected = _type_name(cls.model_fields[field].annotation)
        message = f"expected {expected} ({message})"
    return Problem(path, line, dotted, message)


def _type_name(annotation: Any) -> str:
    """``int``, ``float``, ``path or none``, ``one of 'Disk', 'Cloud'``..."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(annotation) if a is not Ellipsis)
        return f"{getattr(origin, '__name__', str(origin))} of {args}"
    if annotation is type(None):
        return "none"
    if annotation is Path:
        return "path (string)"
    return getattr(annotation, "__name__", str(annotation))


_TABLE = re.compile(r"^\s*\[\s*([A-Za-z0-9_.-]+)\s*\]")
_KEY = re.compile(r"""^\s*["']?([A-Za-z0-9_-]+)["']?\s*=""")


def _key_lines(text: str, table: str | None) -> dict[str, int]:
    """Line number of each key in ``table`` (None: the top level) of a TOML text."""
    lines: dict[str, int] = {}
    current: str | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        header = _TABLE.match(line)
        if header:
            current = header[1]
            continue
        key = _KEY.match(line)
        if key and current == table:
            lines.setdefault(key[1], number)
    return lines


def _json_key_lines(text: str) -> dict[str, int]:
    lines: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        for key in re.findall(r'"([A-Za-z0-9_]+)"\s*:', line):
            lines.setdefault(key, number)
    return lines
