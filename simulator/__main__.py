"""windfarm-sim: the wind farm simulator, and its composition root.

``windfarm-sim [run]`` publishes every turbine's samples to the broker and
serves the dashboard; ``windfarm-sim record`` writes a run to CSV. Exit codes:
0 after a clean stop, 1 when something failed, 2 for an invalid configuration.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import structlog
import uvicorn

from edgecommon.logging import configure_logging
from simulator.farm import CommandError, Farm
from simulator.generator import FaultError
from simulator.mqtt_link import MqttLink
from simulator.publisher import Publisher
from simulator.record import parse_fault, record_csv
from simulator.settings import SettingsError, SimSettings, load_settings
from simulator.web import create_app

__all__ = ["add_arguments", "build_parser", "dispatch", "main", "run"]

log = structlog.get_logger("simulator")


def add_arguments(
    parser: argparse.ArgumentParser,
) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    """The simulator's subcommands (``run``, ``record``) on ``parser`` (edgectl reuses them)."""
    sub = parser.add_subparsers(dest="sim_command", metavar="SUBCOMMAND")
    run_p = sub.add_parser("run", help="publish the farm's streams and serve the dashboard")
    run_p.add_argument("--turbines", type=int, help="number of turbines (default 5)")
    run_p.add_argument("--ids", help="comma-separated turbine ids (instead of --turbines)")
    run_p.add_argument("--rate", type=float, dest="rate_hz", help="samples/s per turbine (20)")
    run_p.add_argument("--seed", type=int, help="seed of the streams (0)")
    run_p.add_argument("--publish-hz", type=float, help="messages/s per turbine (10)")
    run_p.add_argument("--stopped", action="store_true", default=None, help="start stopped")
    run_p.add_argument("--mqtt-host", help="broker host (127.0.0.1)")
    run_p.add_argument("--mqtt-port", type=int, help="broker port (1883)")
    run_p.add_argument("--http-port", type=int, help="dashboard port on loopback (8080)")
    run_p.add_argument("--duration", type=float, dest="duration_s", help="stop after S seconds")
    run_p.add_argument("--log-level", type=str.upper, help="DEBUG, INFO, WARNING, ERROR")
    run_p.set_defaults(sim_func=run_args)

    rec = sub.add_parser("record", help="write a run of the generator to CSV")
    rec.add_argument("--turbines", type=int, default=5)
    rec.add_argument("--seconds", type=float, default=60.0)
    rec.add_argument("--rate", type=float, dest="rate_hz", default=20.0)
    rec.add_argument("--seed", type=int, default=0)
    rec.add_argument("--start-ms", type=int, default=0, help="epoch ms of the first sample")
    rec.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="SPEC",
        help="TURBINE:KIND[=INTENSITY][,field=F][@START[-END]] (repeatable), "
        "e.g. wt-002:bearing_wear=2@60-120",
    )
    rec.add_argument("--out", type=Path, required=True, help="CSV file to write")
    rec.set_defaults(sim_func=record_args)
    return sub


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="windfarm-sim", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return parser


def run_args(args: argparse.Namespace) -> int:
    ids = tuple(t.strip() for t in args.ids.split(",") if t.strip()) if args.ids else None
    settings = load_settings(
        turbines=args.turbines,
        ids=ids,
        rate_hz=args.rate_hz,
        seed=args.seed,
        publish_hz=args.publish_hz,
        stopped=args.stopped,
        mqtt_host=args.mqtt_host,
        mqtt_port=args.mqtt_port,
        http_port=args.http_port,
        duration_s=args.duration_s,
        log_level=args.log_level,
    )
    return run(settings)


def record_args(args: argparse.Namespace) -> int:
    width = max(3, len(str(args.turbines)))
    if args.turbines < 1:
        raise FaultError("--turbines must be >= 1")
    ids = [f"wt-{i + 1:0{width}d}" for i in range(args.turbines)]
    faults = [parse_fault(spec) for spec in args.fault]
    rows = record_csv(
        args.out,
        ids=ids,
        seconds=args.seconds,
        seed=args.seed,
        rate_hz=args.rate_hz,
        start_ms=args.start_ms,
        faults=faults,
    )
    print(f"wrote {rows} samples of {len(ids)} turbines to {args.out}")  # noqa: T201 - CLI
    return 0


class _Server(uvicorn.Server):
    """uvicorn that also tells the event streams to end when it is asked to stop."""

    def __init__(self, config: uvicorn.Config, stopping: threading.Event) -> None:
        super().__init__(config)
        self._stopping = stopping

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._stopping.set()
        super().handle_exit(sig, frame)

    def request_stop(self) -> None:
        self._stopping.set()
        self.should_exit = True


def run(settings: SimSettings) -> int:
    """Publish, serve the dashboard, until SIGINT/SIGTERM or ``duration_s``."""
    configure_logging(level=settings.log_level)
    farm = Farm(
        settings.turbine_ids(),
        seed=settings.seed,
        rate_hz=settings.rate_hz,
        running=not settings.stopped,
    )
    link = MqttLink(
        farm,
        host=settings.mqtt_host,
        port=settings.mqtt_port,
        topic_prefix=settings.topic_prefix,
        control_prefix=settings.control_prefix,
        client_id=f"windfarm-sim-{settings.http_port}",
    )
    publisher = Publisher(farm, link.publish_samples, publish_hz=settings.publish_hz)
    stopping = threading.Event()
    app = create_app(
        farm,
        events_period_s=settings.events_period_s,
        stopping=stopping,
        health=lambda: {
            "broker_connected": link.connected.is_set(),
            "messages_published": publisher.messages,
            "publisher_busy_s": round(publisher.busy_s, 3),
        },
    )
    config = uvicorn.Config(
        app,
        host=settings.http_host,
        port=settings.http_port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=2,
        lifespan="off",
    )
    server = _Server(config, stopping)
    timer: threading.Timer | None = None
    if settings.duration_s is not None:
        timer = threading.Timer(settings.duration_s, server.request_stop)
        timer.daemon = True
    link.start()
    publisher.start()
    host = f"[{settings.http_host}]" if ":" in settings.http_host else settings.http_host
    url = f"http://{host}:{settings.http_port}/"
    log.info(
        "simulator running",
        turbines=len(farm.ids),
        rate_hz=settings.rate_hz,
        broker=f"{settings.mqtt_host}:{settings.mqtt_port}",
        dashboard=url,
    )
    if timer is not None:
        timer.start()
    # uvicorn handles SIGINT/SIGTERM while it serves and raises them again
    # afterwards to the handlers found at start: these, so the clean-up below runs
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda _s, _f: server.request_stop())
    try:
        server.run()
    finally:
        if timer is not None:
            timer.cancel()
        publisher.stop()
        link.stop()
        log.info("simulator stopped", samples=farm.samples_published, messages=publisher.messages)
    return 0 if server.started else 1


def _dispatch(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    func: Any = getattr(args, "sim_func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        code: int = func(args)
    except (SettingsError, FaultError, CommandError) as exc:
        print(f"windfarm-sim: {exc}", file=sys.stderr)  # noqa: T201 - the operator's terminal
        return 2
    return code


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv.insert(0, "run")  # `windfarm-sim --turbines 10` runs
    parser = build_parser()
    args = parser.parse_args(argv)
    return _dispatch(args, parser)


def dispatch(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run the subcommand ``add_arguments`` parsed (for edgectl's ``sim``)."""
    return _dispatch(args, parser)


if __name__ == "__main__":
    sys.exit(main())
