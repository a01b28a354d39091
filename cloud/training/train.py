"""One training run: data -> statistics -> autoencoder -> ONNX -> thresholds -> signed package.

1. Normal-operation data: recorded CSVs from the train channel, else the
   simulator's generator (``turbines`` x ``minutes``, seeded).
2. Turbines are split (seeded) into training, validation (early stopping) and
   threshold sets, so the thresholds come from turbines the model never saw.
3. Preprocessing constants from the training turbines (``data.fit_statistics``),
   windows prepared by the device's own pipeline.
4. The network (``variant``: an autoencoder's layer table, or the relational
   heads) trained with Adam on the MSE of the normalised windows; the weights
   of the best validation epoch are kept;
   training stops after ``patience`` epochs without improvement.
5. The weights go into the ONNX graph of ``cloud.autoencoder`` (dynamic batch,
   opset 17); ONNX Runtime scores the threshold turbines at every tick exactly
   as the device does (``edgeapp.features.score``), and each feature's
   threshold is ``threshold_margin`` x its ``threshold_quantile``.
6. ``edgeagent.package.build_package`` writes and signs
   ``<name>-<version>.tar.gz`` (golden input: 8 held-out windows), and the
   run's record goes beside it as ``<name>-<version>.training.json``.

Reproducible: the same config, data and thread count on the same machine
give the same weights and the same package bytes (torch runs with
deterministic algorithms; the batch order comes from the seed).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
from numpy.typing import NDArray
from tqdm import tqdm

from cloud.autoencoder import (
    RELATIONAL_HEADS,
    VARIANTS,
    build_autoencoder_model,
    build_relational_model,
    variant_layout,
)
from cloud.training.batch import multiply_adds_of, score_windows
from cloud.training.config import ConfigError, RunPaths, TrainConfig
from cloud.training.data import (
    features_of,
    fit_statistics,
    recordings_in,
    simulate_normal,
    tick_windows,
    with_thresholds,
)
from cloud.training.nets import Autoencoder, RelationalNet
from edgeagent.package import build_package, load_private_key
from edgeapp.features import PreprocessingParams

__all__ = ["TrainResult", "train"]

log = structlog.get_logger("cloud.training")

GOLDEN_WINDOWS = 8
GOLDEN_RTOL = 1e-4
GOLDEN_ATOL = 1e-4  # trained weights: leave room for another CPU's float kernels


@dataclass
class TrainResult:
    """What a run produced (also written as the training record)."""

    package: Path
    record: Path
    summary: dict[str, Any] = field(default_factory=dict)


def train(config: TrainConfig, paths: RunPaths) -> TrainResult:
    """Run the whole pipeline; return where the package and its record are."""
    if paths.signing_key is None:
        raise ConfigError("no signing key: pass --signing-key (or a 'signing' channel)")
    key = load_private_key(paths.signing_key)  # fail before hours of training, not after
    started = time.monotonic()
    torch.manual_seed(config.seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(config.threads)

    series, source = _normal_data(config, paths)
    split = _split(len(series), config)
    base = dataclasses.replace(PreprocessingParams.default(), step=config.step)
    train_series = [series[i] for i in split["train"]]
    params = fit_statistics(train_series, base, stride_ticks=config.stride_ticks)
    windows = {
        part: tick_windows(
            [series[i] for i in split[part]],
            params,
            stride_ticks=1 if part == "threshold" else config.stride_ticks,
        )
        for part in ("train", "validation", "threshold")
    }
    prepared_s = time.monotonic() - started
    log.info(
        "data prepared",
        source=source,
        turbines={k: len(v) for k, v in split.items()},
        windows={k: len(v) for k, v in windows.items()},
        seconds=round(prepared_s, 1),
    )

    net, layout = _network(config)
    history = _fit(net, windows["train"], windows["validation"], config)
    weights = net.export_weights()
    if isinstance(net, RelationalNet):
        model = build_relational_model(
            weights=weights, doc="wind turbine relational model, trained by windedge"
        )
    else:
        model = build_autoencoder_model(
            layers=VARIANTS[config.variant],
            weights=weights,
            doc=f"wind turbine convolutional autoencoder ({config.variant}), trained by windedge",
        )
    trained_s = time.monotonic() - started - prepared_s

    paths.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="windedge-train-") as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        onnx_path.write_bytes(model.SerializeToString())
        held_out = score_windows(onnx_path, windows["threshold"], params)
        thresholds = np.quantile(held_out, config.threshold_quantile, axis=0)
        thresholds = thresholds * config.threshold_margin
        params = with_thresholds(params, [float(t) for t in thresholds])
        golden = _golden(windows["threshold"])
        cost = multiply_adds_of(onnx_path)
        package = build_package(
            model_path=onnx_path,
            name=config.name,
            version=config.version,
            preprocessing=params.to_block(),
            golden_input=golden,
            signing_key=key,
            out_path=paths.out,
            rtol=GOLDEN_RTOL,
            atol=GOLDEN_ATOL,
        )
    flagged = held_out > params.thresholds_array
    summary = {
        "config": config.model_dump(exclude={"progress"}),
        "data": {
            "source": source,
            "turbines": {k: len(v) for k, v in split.items()},
            "windows": {k: len(v) for k, v in windows.items()},
            "samples": int(sum(len(s) for s in series)),
            "simulated_hours": (
                round(config.turbines * config.minutes / 60, 2) if source == "simulated" else None
            ),
        },
        "variant": {
            "layers": layout,
            "multiply_adds_per_window": cost,
            "parameters": int(sum(p.numel() for p in net.parameters())),
        },
        "history": history,
        "preprocessing": params.to_block(),
        "threshold_set": {
            "ticks": len(held_out),
            "flagged_ticks_fraction": float(flagged.any(axis=1).mean()),
        },
        "seconds": {
            "prepare": round(prepared_s, 1),
            "train": round(trained_s, 1),
            "total": round(time.monotonic() - started, 1),
        },
        "package": {"file": package.name, "sha256": _sha256(package)},
        "versions": {"torch": torch.__version__, "numpy": np.__version__},
    }
    record = package.with_name(package.name.removesuffix(".tar.gz") + ".training.json")
    record.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    log.info(
        "package built",
        package=str(package),
        epochs=len(history["validation_loss"]),
        best_epoch=history["best_epoch"],
        validation_loss=history["validation_loss"][history["best_epoch"] - 1],
        thresholds=[round(t, 4) for t in params.thresholds],
        seconds=summary["seconds"],
    )
    return TrainResult(package=package, record=record, summary=summary)


# --------------------------------------------------------------------------- steps


def _normal_data(config: TrainConfig, paths: RunPaths) -> tuple[list[NDArray[np.float32]], str]:
    """Each turbine's features ``(N_i, 6)`` as stored on a device, and where they came from."""
    if paths.train is not None:
        if not paths.train.is_dir():
            raise ConfigError(f"train channel {paths.train} is not a folder")
        recordings = recordings_in(paths.train)
        if len(recordings) < 3:
            raise ConfigError(
                f"{paths.train}: {len(recordings)} turbine(s) recorded; training, validation "
                "and thresholds need at least 3"
            )
        return [features_of(r.raw) for r in recordings], "recorded"
    raw = simulate_normal(turbines=config.turbines, seconds=config.minutes * 60, seed=config.seed)
    return list(features_of(raw)), "simulated"


def _network(config: TrainConfig) -> tuple[Autoencoder | RelationalNet, list[Any]]:
    """The variant's torch network, and its layout for the training record."""
    layout = variant_layout(config.variant)
    if config.variant == "relational":
        return RelationalNet(RELATIONAL_HEADS), layout
    return Autoencoder(VARIANTS[config.variant]), layout


def _split(count: int, config: TrainConfig) -> dict[str, list[int]]:
    """Turbine indices of the training, validation and threshold sets (seeded, disjoint)."""
    order = np.random.default_rng(config.seed).permutation(count)
    n_val = max(1, round(count * config.validation_fraction))
    n_thr = max(1, round(count * config.threshold_fraction))
    if count - n_val - n_thr < 1:
        raise ConfigError(f"{count} turbines cannot be split into three non-empty sets")
    return {
        "validation": sorted(int(i) for i in order[:n_val]),
        "threshold": sorted(int(i) for i in order[n_val : n_val + n_thr]),
        "train": sorted(int(i) for i in order[n_val + n_thr :]),
    }


def _flat(windows: NDArray[np.float32]) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(windows.reshape(-1, *windows.shape[-3:])))


def _fit(
    net: Autoencoder | RelationalNet,
    train_windows: NDArray[np.float32],
    validation_windows: NDArray[np.float32],
    config: TrainConfig,
) -> dict[str, Any]:
    """Adam on the MSE, early stopping on the validation MSE; ``net`` ends at its best epoch."""
    x, v = _flat(train_windows), _flat(validation_windows)
    if not len(x) or not len(v):
        raise ConfigError("not enough data for a full buffer in the training or validation set")
    optimiser = torch.optim.Adam(net.parameters(), lr=config.learning_rate)
    order = torch.Generator().manual_seed(config.seed)
    best = math.inf
    best_state: dict[str, torch.Tensor] = {}
    history: dict[str, Any] = {"train_loss": [], "validation_loss": [], "best_epoch": 0}
    batches = math.ceil(len(x) / config.batch_size)
    with tqdm(
        total=config.epochs * batches,
        disable=not config.progress,
        unit="batch",
        desc=f"training {config.variant}",
        dynamic_ncols=True,
    ) as bar:
        for epoch in range(1, config.epochs + 1):
            net.train()
            permutation = torch.randperm(len(x), generator=order)
            total = 0.0
            for begin in range(0, len(x), config.batch_size):
                batch = x[permutation[begin : begin + config.batch_size]]
                optimiser.zero_grad()
                loss = torch.nn.functional.mse_loss(net(batch), batch)
                loss.backward()  # type: ignore[no-untyped-call]  # torch's backward is untyped
                optimiser.step()
                total += float(loss.detach()) * len(batch)
                bar.update()
            validation = _loss(net, v)
            history["train_loss"].append(total / len(x))
            history["validation_loss"].append(validation)
            bar.set_postfix(epoch=epoch, val=f"{validation:.4f}")
            if validation < best:
                best, history["best_epoch"] = validation, epoch
                best_state = {k: t.clone() for k, t in net.state_dict().items()}
            elif epoch - history["best_epoch"] >= config.patience:
                log.info("early stop", epoch=epoch, best_epoch=history["best_epoch"])
                bar.total = epoch * batches
                bar.refresh()
                break
    net.load_state_dict(best_state)
    net.eval()
    return history


def _loss(net: Autoencoder | RelationalNet, windows: torch.Tensor) -> float:
    net.eval()
    total = 0.0
    with torch.no_grad():
        for begin in range(0, len(windows), 1024):
            batch = windows[begin : begin + 1024]
            total += float(torch.nn.functional.mse_loss(net(batch), batch)) * len(batch)
    return total / len(windows)


def _golden(windows: NDArray[np.float32]) -> NDArray[np.float32]:
    """``GOLDEN_WINDOWS`` held-out windows spread over the set (real inputs, not noise)."""
    flat = windows.reshape(-1, *windows.shape[-3:])
    picks = np.linspace(0, len(flat) - 1, GOLDEN_WINDOWS).round().astype(int)
    return np.ascontiguousarray(flat[picks])


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
