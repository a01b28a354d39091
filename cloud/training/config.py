"""Training hyperparameters, and where a run reads and writes (local or SageMaker script mode).

One pydantic model holds every hyperparameter with its default. The values
come, lowest precedence first, from the defaults, SageMaker's
``/opt/ml/input/config/hyperparameters.json`` (or ``SM_HPS``, which
SageMaker sets to the same JSON; SageMaker gives every value as a string,
pydantic converts them), then command-line flags (``--epochs 3``, as
SageMaker also passes them). Unknown hyperparameters are an error, so a typo
does not silently train the default.

Folders: ``SM_CHANNEL_TRAIN`` holds recorded CSVs to train on (else the
simulator generates the data), ``SM_CHANNEL_SIGNING`` the package-signing key
(``*.key``), ``SM_MODEL_DIR`` receives the package and its training record.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgecommon.settings import validation_problems

__all__ = ["TrainConfig", "RunPaths", "load_hyperparameters", "ConfigError"]

HYPERPARAMETERS_FILE = Path("/opt/ml/input/config/hyperparameters.json")


class ConfigError(ValueError):
    """Hyperparameters or folders that cannot make a run."""


class TrainConfig(BaseModel):
    """Every knob of a training run; the defaults build ``wind-turbine`` 1.0."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "wind-turbine"
    """Model name in the package."""
    version: str = "1.0"
    """Package version."""
    variant: Literal["original", "compact", "relational"] = "original"
    """Topology: the original workshop's autoencoder (17.3M multiply-adds a window), the
    compact autoencoder, or the relational model (each feature from the ones that determine it)."""
    seed: int = 0
    """Seeds the simulated data, the split, the initial weights and the batch order."""
    turbines: int = Field(default=24, ge=3)
    """Simulated turbines (ignored when a train channel holds recordings)."""
    minutes: float = Field(default=30.0, gt=0)
    """Simulated minutes of normal operation per turbine."""
    validation_fraction: float = Field(default=0.15, gt=0, lt=0.5)
    """Turbines held out for early stopping."""
    threshold_fraction: float = Field(default=0.15, gt=0, lt=0.5)
    """Turbines held out (never trained or validated on) to derive the thresholds."""
    step: int = Field(default=10, ge=1, le=10)
    """The manifest's window step: the window is the oldest 100 of the newest ``100 + step``
    samples. 10 (the original's) leaves the newest tick's samples out of the window; 1 brings
    all but the newest sample in, so a fault shows a tick earlier."""
    stride_ticks: int = Field(default=4, ge=1)
    """Ticks between training windows (a tick is one window step, 0.5 s)."""
    epochs: int = Field(default=8, ge=1)
    batch_size: int = Field(default=64, ge=1)
    learning_rate: float = Field(default=1e-3, gt=0)
    patience: int = Field(default=2, ge=1)
    """Epochs without a better validation loss before training stops."""
    threshold_quantile: float = Field(default=0.9999, gt=0.5, le=1.0)
    """Quantile of each feature's held-out normal scores that the threshold starts from."""
    threshold_margin: float = Field(default=1.25, ge=1.0)
    """Factor applied to that quantile: headroom for turbines the held-out ones did not show."""
    threads: int = Field(default=2, ge=1)
    """torch CPU threads (part of reproducibility: same seed and threads, same weights)."""
    progress: bool = True
    """Show a progress bar on stderr."""


@dataclass(frozen=True)
class RunPaths:
    """Where a run reads data and a key and writes its output."""

    out: Path
    train: Path | None
    signing_key: Path | None

    @classmethod
    def resolve(
        cls,
        *,
        out: Path | None,
        train: Path | None,
        signing_key: Path | None,
        environ: Mapping[str, str] | None = None,
    ) -> RunPaths:
        """Flags first, then SageMaker's variables; ``out`` is required one way or the other."""
        env = os.environ if environ is None else environ
        out = out or _env_path(env, "SM_MODEL_DIR")
        if out is None:
            raise ConfigError("no output folder: pass --out (or set SM_MODEL_DIR)")
        train = train or _env_path(env, "SM_CHANNEL_TRAIN")
        if signing_key is None and (channel := _env_path(env, "SM_CHANNEL_SIGNING")):
            keys = sorted(channel.glob("*.key"))
            if len(keys) != 1:
                raise ConfigError(f"{channel}: expected exactly one *.key, found {len(keys)}")
            signing_key = keys[0]
        return cls(out=out, train=train, signing_key=signing_key)


def _env_path(env: Mapping[str, str], name: str) -> Path | None:
    value = env.get(name)
    return Path(value) if value else None


def load_hyperparameters(
    overrides: Mapping[str, Any],
    *,
    environ: Mapping[str, str] | None = None,
    hyperparameters_file: Path = HYPERPARAMETERS_FILE,
) -> TrainConfig:
    """Defaults < SageMaker's hyperparameters (``SM_HPS`` or the JSON file) < ``overrides``."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    source = "SM_HPS"
    text = env.get("SM_HPS")
    if text is None and hyperparameters_file.is_file():
        source, text = str(hyperparameters_file), hyperparameters_file.read_text(encoding="utf-8")
    if text:
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{source}: not JSON ({exc})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{source}: expected a JSON object of hyperparameters")
        # SageMaker's own entries (sagemaker_program, sagemaker_region, ...) are not ours
        values.update(
            {k.replace("-", "_"): v for k, v in loaded.items() if not k.startswith("sagemaker_")}
        )
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return TrainConfig(**values)
    except ValidationError as exc:
        problems = validation_problems(exc, "hyperparameters")
        raise ConfigError(f"invalid hyperparameters: {problems}") from None
