"""``edgectl models``: list, load, describe, predict, unload against a real agent.

Commands run in-process through edgectl's real entry point (fast); one test
runs the installed command as a subprocess to check its exit status.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgectl.__main__ import main

Run = Callable[..., tuple[int, str, str]]


@pytest.fixture(scope="module")
def agent(module_agent_factory: Any) -> Any:
    return module_agent_factory()


@pytest.fixture
def run(agent: Any, capsys: pytest.CaptureFixture[str]) -> Run:
    """``run(*args, socket=agent socket)`` -> (exit code, stdout, stderr)."""

    def _run(*args: str, sock: Path | None = agent.socket) -> tuple[int, str, str]:
        capsys.readouterr()
        argv: Sequence[str] = [*args, "--socket", str(sock)] if sock is not None else args
        code = main(argv)
        out, err = capsys.readouterr()
        return code, out, err

    return _run


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("edgectl: ")
    assert "Traceback" not in err
    return lines[0]


def test_load_list_describe_unload(run: Run, packages: Any) -> None:
    code, out, _ = run("models", "list")
    assert (code, out.strip()) == (0, "no models loaded")

    code, out, _ = run("models", "load", "wt", str(packages.v1))
    assert code == 0
    assert out.strip() == f"loaded wt from {packages.v1}"

    code, out, _ = run("models", "list")
    assert code == 0
    assert out.splitlines()[0] == "wt"
    assert f"url:     {packages.v1}" in out
    assert "input    input: FLOAT32 [-1, 6, 10, 10]" in out
    assert "output   output: FLOAT32 [-1, 6, 10, 10]" in out

    code, out, _ = run("models", "describe", "wt")
    assert code == 0
    assert out.splitlines()[0] == "wt"
    assert str(packages.v1) in out

    code, out, _ = run("models", "unload", "wt")
    assert (code, out.strip()) == (0, "unloaded wt")
    assert run("models", "list")[1].strip() == "no models loaded"


def test_load_resolves_a_relative_directory(
    run: Run, packages: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = Path(packages.v2)
    monkeypatch.chdir(package.parent)
    code, out, _ = run("models", "load", "rel", package.name)
    try:
        assert code == 0
        assert out.strip() == f"loaded rel from {package}"
    finally:
        run("models", "unload", "rel")


@pytest.mark.parametrize("shared_memory", [False, True], ids=["byte-data", "shared-memory"])
def test_predict_npy(
    run: Run, packages: Any, reference: Any, tmp_path: Path, shared_memory: bool
) -> None:
    assert run("models", "load", "wt", str(packages.v1))[0] == 0
    try:
        x = np.random.default_rng(3).standard_normal((3, 6, 10, 10), dtype=np.float32)
        np.save(tmp_path / "in.npy", x)
        args = ["models", "predict", "wt", str(tmp_path / "in.npy"), "--output"]
        args.append(str(tmp_path / "out.npy"))
        if shared_memory:
            args.append("--shared-memory")
        code, out, err = run(*args)
        assert code == 0, err
        assert "output shape: [3, 6, 10, 10] float32" in out
        assert "mean absolute reconstruction error" in out
        np.testing.assert_allclose(
            np.load(tmp_path / "out.npy"),
            reference(Path(packages.v1) / "model.onnx", x),
            rtol=1e-5,
            atol=1e-5,
        )
    finally:
        run("models", "unload", "wt")


def test_socket_from_environment(run: Run, agent: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WINDEDGE_AGENT_SOCKET", str(agent.socket))
    code, out, _ = run("models", "list", sock=None)
    assert code == 0
    assert out.strip() == "no models loaded"


@pytest.mark.parametrize(
    ("args", "kind", "fragment"),
    [
        (["models", "describe", "ghost"], "NotFound", "ghost"),
        (["models", "unload", "ghost"], "NotFound", "ghost"),
        (["models", "load", "bad_alias", "{v1}"], "InvalidArgument", "pattern"),
        (["models", "load", "t", "{tampered}"], "InvalidArgument", "model.onnx"),
        (["models", "load", "t", "{untrusted}"], "PermissionDenied", "trusted"),
        (["models", "load", "t", "{bad_golden}"], "FailedPrecondition", "golden"),
        (["models", "load", "t", "/nonexistent/package"], "NotFound", "/nonexistent/package"),
    ],
)
def test_errors_print_one_line_and_exit_1(
    run: Run, packages: Any, args: list[str], kind: str, fragment: str
) -> None:
    urls = {f"{{{k}}}": str(getattr(packages, k)) for k in ("v1", "tampered", "untrusted")}
    urls["{bad_golden}"] = str(packages.bad_golden)
    code, _, err = run(*[urls.get(a, a) for a in args])
    assert code == 1
    line = one_error_line(err)
    assert line.startswith(f"edgectl: {kind}: ")
    assert fragment in line


def test_predict_errors(run: Run, packages: Any, tmp_path: Path) -> None:
    np.save(tmp_path / "in.npy", np.zeros((1, 6, 10, 10), dtype=np.float32))
    code, _, err = run("models", "predict", "ghost", str(tmp_path / "in.npy"))
    assert code == 1
    assert one_error_line(err).startswith("edgectl: NotFound: ")

    assert run("models", "load", "wt", str(packages.v1))[0] == 0
    try:
        np.save(tmp_path / "wrong.npy", np.zeros((1, 5, 10, 10), dtype=np.float32))
        code, _, err = run("models", "predict", "wt", str(tmp_path / "wrong.npy"))
        assert code == 1
        assert one_error_line(err).startswith("edgectl: InvalidArgument: ")

        (tmp_path / "junk.npy").write_bytes(b"not numpy")
        code, _, err = run("models", "predict", "wt", str(tmp_path / "junk.npy"))
        assert code == 1
        assert "junk.npy" in one_error_line(err)
    finally:
        run("models", "unload", "wt")


def test_no_agent_socket(run: Run, short_tmp: Path) -> None:
    code, _, err = run("models", "list", sock=short_tmp / "absent.sock")
    assert code == 1
    line = one_error_line(err)
    assert line.startswith("edgectl: Unavailable: ")
    assert "absent.sock" in line


def test_socket_with_no_agent_behind_it(run: Run, short_tmp: Path) -> None:
    path = short_tmp / "dead.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()
    code, _, err = run("models", "list", "--timeout", "5", sock=path)
    assert code == 1
    assert one_error_line(err).startswith("edgectl: Unavailable: ")


def test_installed_command_exit_status(agent: Any, short_tmp: Path) -> None:
    ok = subprocess.run(
        [sys.executable, "-m", "edgectl", "models", "list", "--socket", str(agent.socket)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    failed = subprocess.run(
        [sys.executable, "-m", "edgectl", "models", "describe", "ghost"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"WINDEDGE_AGENT_SOCKET": str(short_tmp / "absent.sock"), "PATH": "/usr/bin:/bin"},
    )
    assert failed.returncode == 1
    one_error_line(failed.stderr)
