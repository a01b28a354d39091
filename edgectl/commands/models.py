"""``edgectl models``: list, load, unload, describe and predict against an agent."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from edgeagent.client import AgentClient
from edgeagent.errors import UnavailableError
from edgeagent.tensors import ModelInfo, TensorSpec
from edgectl.errors import CommandError

DEFAULT_SOCKET = Path("/run/windedge/agent.sock")


def default_socket() -> Path:
    """The socket from WINDEDGE_AGENT_SOCKET, else the device default."""
    env = os.environ.get("WINDEDGE_AGENT_SOCKET")
    return Path(env) if env else DEFAULT_SOCKET


def add_socket_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--socket",
        type=Path,
        default=None,
        help=f"agent socket (default: $WINDEDGE_AGENT_SOCKET or {DEFAULT_SOCKET})",
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per call (30)")


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("models", help="manage and query the models an agent serves")
    sub = parser.add_subparsers(dest="models_command", required=True, metavar="ACTION")

    p = sub.add_parser("list", help="list loaded models")
    add_socket_option(p)
    p.set_defaults(func=_list)

    p = sub.add_parser("load", help="load (or hot-swap) a package directory under a name")
    p.add_argument("name")
    p.add_argument("url", help="directory of an unpacked model package")
    add_socket_option(p)
    p.set_defaults(func=_load)

    p = sub.add_parser("unload", help="unload a model")
    p.add_argument("name")
    add_socket_option(p)
    p.set_defaults(func=_unload)

    p = sub.add_parser("describe", help="show a model's package and tensors")
    p.add_argument("name")
    add_socket_option(p)
    p.set_defaults(func=_describe)

    p = sub.add_parser("predict", help="run an .npy input through a model")
    p.add_argument("name")
    p.add_argument("input", type=Path, help=".npy file (float32 [N,6,10,10] for wind-turbine)")
    p.add_argument("--shared-memory", action="store_true", help="send the input via SysV shm")
    p.add_argument("--output", type=Path, help="write the output to this .npy file")
    add_socket_option(p)
    p.set_defaults(func=_predict)


def _client(args: argparse.Namespace) -> AgentClient:
    socket_path: Path = args.socket or default_socket()
    if not socket_path.exists():
        raise UnavailableError(f"no agent socket at {socket_path} (is edge-agent running?)")
    return AgentClient(socket_path, timeout=args.timeout)


def _shape(spec: TensorSpec) -> str:
    return f"{spec.name}: {spec.dtype.upper()} [{', '.join(str(d) for d in spec.shape)}]"


def _print_model(info: ModelInfo) -> None:
    print(f"{info.name}")
    print(f"  url:     {info.url}")
    for spec in info.inputs:
        print(f"  input    {_shape(spec)}")
    for spec in info.outputs:
        print(f"  output   {_shape(spec)}")


def _list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        models = client.list_models()
    if not models:
        print("no models loaded")
    for info in models:
        _print_model(info)
    return 0


def _load(args: argparse.Namespace) -> int:
    url = Path(args.url)
    if not url.is_absolute():
        url = url.resolve()  # the agent resolves relative urls against its own cwd
    with _client(args) as client:
        info = client.load_model(args.name, url)
    print(f"loaded {info.name} from {info.url}")
    return 0


def _unload(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.unload_model(args.name)
    print(f"unloaded {args.name}")
    return 0


def _describe(args: argparse.Namespace) -> int:
    with _client(args) as client:
        info = client.describe_model(args.name)
    _print_model(info)
    return 0


def _predict(args: argparse.Namespace) -> int:
    try:
        array = np.load(args.input, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise CommandError(f"cannot read {args.input} as a .npy array: {exc}") from None
    with _client(args) as client:
        out = client.predict(args.name, array, shared_memory=args.shared_memory)
    print(f"output shape: [{', '.join(str(d) for d in out.shape)}] {out.dtype}")
    if out.size:
        as64 = out.astype(np.float64)
        print(
            f"min {as64.min():.6g}  max {as64.max():.6g}  mean {as64.mean():.6g}  "
            f"std {as64.std():.6g}"
        )
        if array.shape == out.shape and np.issubdtype(out.dtype, np.floating):
            err = np.abs(as64 - array.astype(np.float64)).mean()
            print(f"mean absolute reconstruction error: {err:.6g}")
    if args.output is not None:
        np.save(args.output, out, allow_pickle=False)
        print(f"wrote {args.output}")
    sys.stdout.flush()
    return 0
