"""``python -m cloud.training``: the composition root of a training run.

Flags: ``--out``, ``--train``, ``--signing-key`` (else SageMaker's
``SM_MODEL_DIR``, ``SM_CHANNEL_TRAIN``, ``SM_CHANNEL_SIGNING``) and one flag
per hyperparameter (``--epochs 3``), which is also how SageMaker passes them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cloud.training.config import ConfigError, RunPaths, TrainConfig, load_hyperparameters
from edgecommon.logging import configure_logging

__all__ = ["add_arguments", "main", "run_from_args"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The run's folders and one optional flag per hyperparameter."""
    parser.add_argument("--out", type=Path, metavar="DIR", help="package output ($SM_MODEL_DIR)")
    parser.add_argument(
        "--train", type=Path, metavar="DIR", help="recorded CSVs to train on ($SM_CHANNEL_TRAIN)"
    )
    parser.add_argument(
        "--signing-key", type=Path, metavar="KEY", help="Ed25519 key ($SM_CHANNEL_SIGNING/*.key)"
    )
    hps = parser.add_argument_group("hyperparameters (defaults build wind-turbine 1.0)")
    for name, info in TrainConfig.model_fields.items():
        flag = "--" + name.replace("_", "-")
        kind: Any = info.annotation if info.annotation in (int, float) else str
        if name == "progress":  # SageMaker passes "--progress False"; people type --no-progress
            hps.add_argument(flag, dest=name, type=_boolean, metavar="BOOL", help="progress bar")
            hps.add_argument("--no-progress", dest=name, action="store_const", const=False)
            continue
        hps.add_argument(flag, dest=name, type=kind, default=None, metavar="V",
                         help=f"(default {info.default!r})")  # fmt: skip


def _boolean(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def run_from_args(args: argparse.Namespace) -> int:
    """Resolve config and folders from parsed flags and the environment; train."""
    from cloud.training.train import train  # noqa: PLC0415 - torch loads only for a run

    overrides = {name: getattr(args, name, None) for name in TrainConfig.model_fields}
    config = load_hyperparameters(overrides)
    paths = RunPaths.resolve(out=args.out, train=args.train, signing_key=args.signing_key)
    result = train(config, paths)
    sys.stdout.write(f"{result.package}\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cloud.training", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    configure_logging(level="INFO")
    try:
        return run_from_args(args)
    except (ConfigError, ValueError) as exc:
        sys.stderr.write(f"training: {exc}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
