"""Training data: simulated (or recorded) normal operation, prepared as the device prepares it.

A turbine's stream becomes the model's windows exactly as on a device: the
raw samples are turned into features in float64 and stored as float32 (the
detection daemon's buffers), and at each tick position the newest
``buffer`` samples go through ``edgeapp.features.windows_from_features``
(denoising over the whole buffer, normalisation, the last window). So the
model is trained on the very windows it will be asked to reconstruct, edge
effects of the wavelet included.

Windows are taken every ``stride_ticks`` ticks (a tick is ``TICK_SAMPLES``
samples, edge-app's 0.5 s tick at the sensors' 20 Hz): neighbouring ticks
share 90% of their samples, so training on every tick costs ten times the
time for little new information.
Thresholds and the false-positive check use every tick.

The preprocessing constants are recomputed from the training turbines:
``raw_std`` from the raw features, ``mean``/``std`` from the denoised samples
that reach a window.
"""

from __future__ import annotations

import csv
import gzip
import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TextIO

import numpy as np
from numpy.typing import NDArray

from edgeapp.features import (
    N_FEATURES,
    RAW_FIELDS,
    PreprocessingParams,
    raw_to_features,
    windows_from_features,
)

__all__ = [
    "Recording",
    "read_csv_recording",
    "recordings_in",
    "simulate_normal",
    "features_of",
    "fit_statistics",
    "tick_windows",
    "tick_ends",
    "with_thresholds",
    "TICK_SAMPLES",
]

TICK_SAMPLES: Final = 10
"""Samples between two ticks: edge-app's ``tick_period_s`` (0.5 s) at the sensors' 20 Hz.

Not the manifest's ``step``, which only places the window in the buffer (a
model may use step 1 to bring the newest samples into its window)."""

_CHUNK = 256  # buffers prepared at once
_ALIASES = {"wind speed rps": "wind_speed_rps"}
_TURBINE_COLUMNS = ("turbine", "turbine_id", "turbineId")


@dataclass(frozen=True, eq=False)
class Recording:
    """Raw samples of one turbine, ``(n, 7)`` in ``RAW_FIELDS`` order, evenly sampled."""

    turbine: str
    raw: NDArray[np.float64]
    ts: NDArray[np.float64] | None = None
    """Epoch ms of each sample when the recording had them."""


def simulate_normal(
    *, turbines: int, seconds: float, seed: int, rate_hz: float = 20.0
) -> NDArray[np.float64]:
    """``(turbines, n, 7)`` raw samples of normal operation from the simulator's generator.

    Every turbine has its own site regime drawn from the seed (mean wind,
    gustiness, prevailing direction, power curve, generator constant,
    vibration), so a farm covers varied wind regimes.
    """
    from simulator.generator import FarmGenerator  # noqa: PLC0415 - off-device data only

    n = round(seconds * rate_hz)
    generator = FarmGenerator(turbines, seed=seed, rate_hz=rate_hz)
    out = np.empty((turbines, n, len(RAW_FIELDS)), dtype=np.float64)
    for begin in range(0, n, 4096):
        out[:, begin : begin + 4096] = generator.step(min(4096, n - begin)).raw()
    return out


def features_of(raw: NDArray[np.float64]) -> NDArray[np.float32]:
    """``(..., n, 7)`` raw -> ``(..., n, 6)`` features stored as the device stores them."""
    return raw_to_features(raw).astype(np.float32)


def tick_ends(n: int, params: PreprocessingParams, stride_ticks: int = 1) -> NDArray[np.intp]:
    """Sample indices (exclusive ends) of the buffers scored at every ``stride_ticks`` tick."""
    return np.arange(params.buffer, n + 1, TICK_SAMPLES * stride_ticks, dtype=np.intp)


def _buffers(features: NDArray[np.float32], ends: NDArray[np.intp], n: int) -> Iterator[Any]:
    """Chunks of ``(k, n, 6)`` buffers ending at ``ends`` of one turbine's ``(N, 6)`` features."""
    view = np.lib.stride_tricks.sliding_window_view(features, n, axis=0)  # (N-n+1, 6, n)
    for begin in range(0, len(ends), _CHUNK):
        starts = ends[begin : begin + _CHUNK] - n
        yield np.ascontiguousarray(view[starts].transpose(0, 2, 1))


def tick_windows(
    series: Sequence[NDArray[np.float32]],
    params: PreprocessingParams,
    *,
    stride_ticks: int = 1,
) -> NDArray[np.float32]:
    """Model inputs of every scored tick of each turbine's ``(N_i, 6)`` features, turbine
    after turbine: ``(ticks, W, 6, side, side)``. A turbine shorter than a buffer has none."""
    parts = []
    for features in series:
        ends = tick_ends(len(features), params, stride_ticks)
        out = np.empty((len(ends), params.n_windows, *params.input_shape), np.float32)
        at = 0
        for chunk in _buffers(features, ends, params.buffer):
            out[at : at + len(chunk)] = windows_from_features(chunk, params)
            at += len(chunk)
        parts.append(out)
    if not parts:
        return np.empty((0, params.n_windows, *params.input_shape), np.float32)
    return np.concatenate(parts)


def fit_statistics(
    series: Sequence[NDArray[np.float32]], base: PreprocessingParams, *, stride_ticks: int
) -> PreprocessingParams:
    """``base`` with ``raw_std``, ``mean`` and ``std`` recomputed from each turbine's features.

    ``raw_std``: standard deviation of each raw feature over every sample.
    ``mean``/``std``: of the denoised samples that reach a window, i.e.
    ``windows_from_features`` with the new ``raw_std`` and no normalisation.
    """
    flat = np.concatenate([np.asarray(f, dtype=np.float64) for f in series])
    raw_std = flat.std(axis=0)
    unnormalised = PreprocessingParams(
        **{
            **_fields(base),
            "raw_std": tuple(raw_std),
            "mean": (0.0,) * N_FEATURES,
            "std": (1.0,) * N_FEATURES,
        }
    )
    denoised = tick_windows(series, unnormalised, stride_ticks=stride_ticks)
    if not len(denoised):
        raise ValueError(f"no turbine has a full buffer of {base.buffer} samples")
    per_feature = np.moveaxis(denoised, -3, 0).reshape(N_FEATURES, -1).astype(np.float64)
    std = per_feature.std(axis=1)
    if np.any(std <= 0.0):
        raise ValueError(f"a feature is constant over the training data (std {list(std)})")
    return PreprocessingParams(
        **{
            **_fields(base),
            "raw_std": tuple(raw_std),
            "mean": tuple(per_feature.mean(axis=1)),
            "std": tuple(std),
        }
    )


def _fields(params: PreprocessingParams) -> dict[str, Any]:
    return {
        "raw_std": params.raw_std,
        "mean": params.mean,
        "std": params.std,
        "thresholds": params.thresholds,
        "window": params.window,
        "step": params.step,
        "buffer": params.buffer,
        "wavelet": params.wavelet,
        "max_level": params.max_level,
        "fault_groups": params.fault_groups,
    }


def with_thresholds(
    params: PreprocessingParams, thresholds: Sequence[float]
) -> PreprocessingParams:
    """``params`` with other thresholds."""
    return PreprocessingParams(**{**_fields(params), "thresholds": tuple(thresholds)})


# --------------------------------------------------------------------------- recordings


def _open_text(path: Path) -> TextIO:
    if path.name.lower().endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return path.open(encoding="utf-8", newline="")


def read_csv_recording(path: Path) -> list[Recording]:
    """The turbines of a recorded CSV (the replay format: a header naming ``RAW_FIELDS``,
    optional ``ts`` and turbine columns; rows of one turbine in time order).

    Raises ValueError naming the file and line for a missing column or a value
    that is not a finite number.
    """
    rows: dict[str, list[list[float]]] = {}
    stamps: dict[str, list[float]] = {}
    with _open_text(path) as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: empty file, expected a header row")
        at = {_ALIASES.get(h.strip(), h.strip()): i for i, h in enumerate(header)}
        missing = [f for f in RAW_FIELDS if f not in at]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)}")
        columns = [at[f] for f in RAW_FIELDS]
        turbine_col = next((at[c] for c in _TURBINE_COLUMNS if c in at), None)
        ts_col = at.get("ts")
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            try:
                values = [float(row[c]) for c in columns]
                stamp = float(row[ts_col]) if ts_col is not None else None
            except (ValueError, IndexError):
                raise ValueError(f"{path}:{line}: not a complete row of numbers") from None
            if not np.all(np.isfinite(values)):
                raise ValueError(f"{path}:{line}: values must be finite")
            turbine = row[turbine_col] if turbine_col is not None else "recording"
            rows.setdefault(turbine, []).append(values)
            if stamp is not None:
                stamps.setdefault(turbine, []).append(stamp)
    return [
        Recording(
            turbine=turbine,
            raw=np.asarray(values, dtype=np.float64),
            ts=np.asarray(stamps[turbine]) if turbine in stamps else None,
        )
        for turbine, values in rows.items()
    ]


def recordings_in(folder: Path) -> list[Recording]:
    """Every turbine of every ``*.csv``/``*.csv.gz`` in ``folder`` (sorted by file name)."""
    files = sorted([*folder.glob("*.csv"), *folder.glob("*.csv.gz")])
    return [rec for path in files for rec in read_csv_recording(path)]
