"""edgectl: the operator CLI (composition root of the command line).

Thin subcommands over the public APIs of windedge's packages. Every failure
ends with one clear line on stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from edgeagent.errors import AgentError
from edgectl.commands import (
    capture,
    cloud,
    config,
    demo,
    deploy,
    models,
    ota,
    package,
    sim,
    training,
)
from edgectl.errors import CommandError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgectl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    models.add_parser(sub)
    package.add_parser(sub)
    capture.add_parser(sub)
    config.add_parser(sub)
    cloud.add_parser(sub)
    deploy.add_parser(sub)
    ota.add_parser(sub)
    sim.add_parser(sub)
    demo.add_parser(sub)
    training.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except (CommandError, AgentError) as exc:
        kind = type(exc).__name__.removesuffix("Error") or "Error"
        print(f"edgectl: {kind}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        # the file system said no (permissions, a full disk, I/O): its own
        # words, never a traceback
        where = f" {exc.filename}" if exc.filename else ""
        print(f"edgectl: {type(exc).__name__}:{where}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
