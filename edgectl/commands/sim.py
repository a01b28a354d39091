"""``edgectl sim``: the wind farm simulator (``run``, ``record``) and ``plot`` of a recording.

``run`` and ``record`` are ``windfarm-sim``'s own subcommands; ``plot`` draws
a recorded run's raw and prepared features (``cloud.visualize``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cloud.visualize import PlotError, plot_recording
from edgectl.errors import CommandError
from simulator.__main__ import add_arguments, dispatch


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "sim", help="the wind farm simulator: run it, record a run to CSV, plot a recording"
    )
    sub = add_arguments(parser)
    plot = sub.add_parser("plot", help="PNG plots of a recorded run's raw and prepared features")
    plot.add_argument("csv", type=Path, help="a recording (windfarm-sim record)")
    plot.add_argument("--out", type=Path, required=True, help="folder for the PNG files")
    plot.add_argument("--turbine", help="which turbine (default: the first in the file)")
    plot.add_argument(
        "--manifest",
        type=Path,
        help="a package's manifest.json whose preprocessing constants to use "
        "(default: the seed statistics)",
    )
    plot.set_defaults(sim_func=_plot)
    parser.set_defaults(func=lambda args: dispatch(args, parser))


def _plot(args: argparse.Namespace) -> int:
    try:
        paths = plot_recording(args.csv, args.out, turbine=args.turbine, manifest=args.manifest)
    except PlotError as exc:
        raise CommandError(str(exc)) from None
    for path in paths:
        print(path)
    return 0
