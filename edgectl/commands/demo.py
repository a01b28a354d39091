"""``edgectl demo``: start the whole local system, print the dashboard URL, stop it on Ctrl-C."""

from __future__ import annotations

import argparse
import signal
from pathlib import Path
from types import FrameType

from edgeagent.errors import AgentError
from edgectl.demo import Demo, DemoError, DemoOptions
from edgectl.errors import CommandError

_REPO_MODELS = Path(__file__).resolve().parents[2] / "models"


def _default_models() -> Path:
    return _REPO_MODELS if _REPO_MODELS.is_dir() else Path("models")


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "demo",
        help="the whole local system: AWS stand-in, agent and app per device, simulator, dashboard",
    )
    p.add_argument("--devices", type=int, default=5, help="simulated edge devices (5)")
    p.add_argument("--turbines-per-device", type=int, default=2, help="turbines each (2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the simulated farm (0)")
    p.add_argument("--http-port", type=int, default=8080, help="dashboard port (8080, or free)")
    p.add_argument("--duration", type=float, help="stop after S seconds (default: Ctrl-C)")
    p.add_argument("--run-dir", type=Path, help="keep state and logs here (default: temporary)")
    p.add_argument("--keep", action="store_true", help="keep the run directory afterwards")
    p.add_argument("--models", type=Path, help="released packages (default: models/)")
    p.add_argument("--trusted-keys", type=Path, help="package-signing keys (models/dev-keys)")
    p.add_argument(
        "--model-version",
        help="which released version the devices serve first (default: the one before the newest)",
    )
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    models = args.models or _default_models()
    options = DemoOptions(
        devices=args.devices,
        turbines_per_device=args.turbines_per_device,
        seed=args.seed,
        http_port=args.http_port,
        duration_s=args.duration,
        run_dir=args.run_dir,
        models_dir=models,
        trusted_keys=args.trusted_keys or models / "dev-keys",
        model_version=args.model_version,
        keep=args.keep,
    )
    try:
        demo = Demo(options, say=lambda line: print(line, flush=True))
        demo.start()
    except (DemoError, AgentError, OSError) as exc:
        raise CommandError(f"the demo did not start: {exc}") from None

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        demo.request_stop()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        demo.run_until_stopped()
    finally:
        print("stopping ...", flush=True)
        demo.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        print("stopped", flush=True)
    return 0
