"""edge-app: the detection daemon's entry point.

Parses settings once, configures logging, builds ``edgeapp.app.App`` and runs
it until SIGTERM/SIGINT. Exit codes: 0 after a clean stop (or a finished
replay), 1 when a replay failed, 2 for an invalid configuration.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

import structlog

from edgeapp import __doc__ as package_doc
from edgeapp.errors import AppError
from edgeapp.settings import load_settings
from edgecommon.logging import configure_logging
from edgecommon.memory import tune_malloc

log = structlog.get_logger("edgeapp")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="edge-app", description=(package_doc or "").strip())
    parser.add_argument(
        "--config", "-c", type=Path, help="TOML configuration (WINDEDGE_APP_* variables override)"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = load_settings(args.config)
    except AppError as exc:
        print(f"edge-app: {exc}", file=sys.stderr)  # noqa: T201 - before logging exists
        return 2
    configure_logging(level=settings.log_level)
    tune_malloc()  # before any thread starts: see edgecommon.memory
    # One BLAS thread: the pipeline's matrix products are small, and OpenBLAS's
    # spinning helper threads took the core the agent's inference needs (app CPU
    # 1.27 -> 0.85 cores at 750 turbines). Read once, when numpy loads: so here,
    # before the daemon's modules are imported.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from edgeapp.app import App  # noqa: PLC0415 - numpy must load after the line above

    try:
        app = App(settings)
    except AppError as exc:
        log.error("cannot start", error=str(exc))
        print(f"edge-app: {exc}", file=sys.stderr)  # noqa: T201 - the operator's terminal
        return 2

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal received", signal=signal.Signals(signum).name)
        app.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return app.run()


__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
