"""``edgectl train``, ``edgectl evaluate`` and ``edgectl predict-batch``.

Thin handlers over :mod:`cloud.training` (off-device; ``train`` and
``evaluate`` need the ``train`` extra). ``train`` takes exactly the flags of
``python -m cloud.training``, the SageMaker entry point.
"""

from __future__ import annotations

import argparse
import shlex
import tempfile
from pathlib import Path

from edgeagent.package import PackageError
from edgectl.errors import CommandError

DEFAULT_KEYS = Path("models/dev-keys")


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from cloud.training.__main__ import add_arguments  # noqa: PLC0415 - flags only, no torch

    train = subparsers.add_parser(
        "train", help="train the autoencoder and build a signed package (needs torch)"
    )
    add_arguments(train)
    train.set_defaults(func=_train)

    evaluate = subparsers.add_parser(
        "evaluate", help="measure packages through an agent and the detector; write the report"
    )
    evaluate.add_argument("packages", nargs="+", type=Path, metavar="PACKAGE.tar.gz")
    evaluate.add_argument("--trusted-keys", type=Path, default=DEFAULT_KEYS, metavar="DIR")
    evaluate.add_argument("--out", type=Path, default=Path("docs/model-report.md"))
    evaluate.add_argument("--seed", type=int, default=None, help="first seed of the streams")
    evaluate.add_argument("--normal-turbines", type=int, default=None)
    evaluate.add_argument("--normal-minutes", type=float, default=None)
    evaluate.add_argument("--turbines-per-case", type=int, default=None)
    evaluate.add_argument("--turbines-per-sweep-step", type=int, default=None)
    evaluate.add_argument("--note", type=Path, default=None, help="markdown appended as notes")
    evaluate.set_defaults(func=_evaluate)

    batch = subparsers.add_parser(
        "predict-batch", help="score a recorded CSV offline; one row per window"
    )
    batch.add_argument("recording", type=Path, metavar="RECORDING.csv")
    batch.add_argument("--package", type=Path, required=True, metavar="PACKAGE.tar.gz")
    batch.add_argument("--trusted-keys", type=Path, default=DEFAULT_KEYS, metavar="DIR")
    batch.add_argument("--out", type=Path, required=True, metavar="SCORES.csv")
    batch.set_defaults(func=_predict_batch)


def _train(args: argparse.Namespace) -> int:
    from cloud.training.__main__ import run_from_args  # noqa: PLC0415 - loads torch
    from cloud.training.config import ConfigError  # noqa: PLC0415

    try:
        return run_from_args(args)
    except ModuleNotFoundError as exc:
        raise CommandError(f"{exc.name} is missing: pip install 'windedge[train]'") from None
    except (ConfigError, PackageError, ValueError, OSError) as exc:
        raise CommandError(str(exc)) from None


def _evaluate(args: argparse.Namespace) -> int:
    try:
        from cloud.training.batch import multiply_adds_of, package_model, time_model  # noqa: PLC0415
        from cloud.training.evaluate import EvalConfig, evaluate_package  # noqa: PLC0415
        from cloud.training.report import ModelCost, write_report  # noqa: PLC0415
    except ModuleNotFoundError as exc:
        raise CommandError(f"{exc.name} is missing: pip install 'windedge[train]'") from None

    overrides = {
        k: getattr(args, k)
        for k in (
            "seed",
            "normal_turbines",
            "normal_minutes",
            "turbines_per_case",
            "turbines_per_sweep_step",
        )
        if getattr(args, k) is not None
    }
    config = EvalConfig(**overrides)
    note = args.note.read_text(encoding="utf-8") if args.note else ""
    evaluations, costs = [], []
    try:
        for package in args.packages:
            with tempfile.TemporaryDirectory(prefix="windedge-cost-") as tmp:
                model, params = package_model(package, args.trusted_keys, Path(tmp) / "p")
                shape = (len(params.features), params.side, params.side)
                costs.append(
                    ModelCost(
                        multiply_adds=multiply_adds_of(model),
                        us_batch1=time_model(model, shape, batch=1, repeats=400),
                        us_batch256=time_model(model, shape, batch=256, repeats=15),
                    )
                )
            evaluations.append(
                evaluate_package(package, trusted_keys=args.trusted_keys, config=config)
            )
    except (PackageError, OSError, RuntimeError) as exc:
        raise CommandError(str(exc)) from None
    command = _command_line(args, overrides)
    out = write_report(evaluations, costs, out=args.out, config=config, command=command, note=note)
    print(out)
    return 0


def _command_line(args: argparse.Namespace, overrides: dict[str, object]) -> str:
    """The command that reproduces this report (for its header)."""
    parts = ["edgectl", "evaluate", *(str(p) for p in args.packages)]
    if args.trusted_keys != DEFAULT_KEYS:
        parts += ["--trusted-keys", str(args.trusted_keys)]
    parts += ["--out", str(args.out)]
    for key, value in overrides.items():
        parts += ["--" + key.replace("_", "-"), str(value)]
    if args.note:
        parts += ["--note", str(args.note)]
    return shlex.join(parts)


def _predict_batch(args: argparse.Namespace) -> int:
    from cloud.training.batch import predict_batch  # noqa: PLC0415

    try:
        summary = predict_batch(
            args.recording, args.package, trusted_keys=args.trusted_keys, out=args.out
        )
    except (PackageError, OSError, ValueError) as exc:
        raise CommandError(str(exc)) from None
    print(
        f"{args.out}: {summary.rows} windows of {summary.turbines} turbine(s)"
        + (f"; {summary.too_short} shorter than one buffer" if summary.too_short else "")
    )
    return 0
