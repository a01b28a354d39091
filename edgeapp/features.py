"""The detection feature pipeline: raw sensor buffers -> model input, and scoring.

Pure numpy + PyWavelets. The maths is ARCHITECTURE.md, "The detection pipeline":

1. quaternion (qx, qy, qz, qw) -> roll, pitch, yaw (ZYX, asin argument clipped);
   features = roll, pitch, yaw, wind_speed_rps, rps, voltage;
2. wavelet denoising of each feature over the whole buffer of n samples
   (``db6``, level ``min(max_level, floor(log2 n))``, soft threshold
   ``raw_std[i] * sqrt(2 log2 n)`` on every coefficient array, the
   approximation included; reconstruct; keep the first n samples);
3. normalise ``(x - mean) / std``;
4. keep the last ``window + step`` samples, windows ``range(0, keep - window, step)``,
   each window [window, 6] -> [6, window] -> [6, side, side];
5. (the model reconstructs the windows);
6. per feature the mean absolute error over the window's time steps, averaged
   over the windows; anomaly where score > threshold; fault groups.

Everything is vectorised across turbines: ``prepare_windows`` takes one
buffer ``(n, 7)`` or a batch ``(T, n, 7)``.

How the fast path works. Steps 2-4 are linear except for the soft threshold,
which acts on each wavelet coefficient on its own. So for a buffer length n
the pipeline is ``Y = soft(X @ A, thr) @ B`` where ``A`` maps samples to
wavelet coefficients and ``B`` maps coefficients to the reconstructed samples
that end up in a window. Both are built once per (n, wavelet, level, windows)
from PyWavelets itself (the impulse responses of ``wavedec`` and ``waverec``),
so they are the library's exact transform, cut down to the coefficients that
reach a window sample and the samples that reach those coefficients (default
constants: 152 of 553 coefficients, the last 426 of 500 samples; only
samples 390..489 are windowed). A few BLAS matrix products over the whole
(T * 6, n) block then replace T * 6 convolution cascades. ``denoise`` is the
full-length PyWavelets path (one ``wavedec``/``waverec`` over the block), used
for long buffers and by training; the tests check both against a per-sample
reference written from the specification.
"""

from __future__ import annotations

import functools
import json
import math
import types
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Final

import numpy as np
import pywt
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "FEATURES",
    "RAW_FIELDS",
    "DEFAULT_FAULT_GROUPS",
    "PreprocessingError",
    "InputShapeError",
    "PreprocessingParams",
    "Scores",
    "quaternion_to_euler",
    "raw_to_features",
    "sample_to_features",
    "samples_to_features",
    "denoise",
    "prepare_windows",
    "windows_from_features",
    "feature_means",
    "means_of_features",
    "score",
]

FEATURES: Final = ("roll", "pitch", "yaw", "wind_speed_rps", "rps", "voltage")
"""Feature order of the model input, the statistics and the scores."""

RAW_FIELDS: Final = ("qx", "qy", "qz", "qw", "wind_speed_rps", "rps", "voltage")
"""Column order of a raw sample, as the sensors stream it."""

N_FEATURES: Final = len(FEATURES)
N_RAW: Final = len(RAW_FIELDS)

DEFAULT_FAULT_GROUPS: Final[Mapping[str, tuple[int, ...]]] = types.MappingProxyType(
    {"vibration": (0, 1, 2), "rotation": (3, 4), "voltage": (5,)}
)
"""vibration = roll, pitch, yaw; rotation = wind speed, rotor speed; voltage = voltage.

(The original workshop's dashboard swapped rotation and voltage; we do not.)
"""

BLOCK_KEYS: Final = frozenset(
    {
        "features",
        "raw_std",
        "mean",
        "std",
        "thresholds",
        "window",
        "step",
        "buffer",
        "wavelet",
        "max_level",
        "fault_groups",
    }
)
"""The keys of a manifest's ``preprocessing`` block, exactly."""

_SEED_FILE: Final = "seed_statistics.json"
_STAT_KEYS: Final = ("raw_std", "mean", "std", "thresholds")

# Longest buffer for which the matrix plan is built: building it transforms an
# n x n identity (8 MB at this bound); longer buffers take the PyWavelets path.
_MAX_PLAN_SAMPLES: Final = 1024
# Cost, in multiply-adds per row, charged for each extra analysis block when the
# plan decides how to split the analysis matrix (covers one BLAS call's overhead).
_BLOCK_OVERHEAD: Final = 4000
_MAX_BLOCKS: Final = 3
# Turbines per chunk of the fast path: keeps its temporaries (about 25 KB per
# turbine) within a core's caches.
_CHUNK_TURBINES: Final = 64
# Buffer lengths remembered per PreprocessingParams (the daemon uses one).
_MAX_FAST_PATHS: Final = 8


class PreprocessingError(ValueError):
    """A preprocessing block or parameter is invalid; ``key`` names the culprit."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"preprocessing {key!r}: {problem}")
        self.key = key


class InputShapeError(ValueError):
    """An array handed to the pipeline does not have the expected shape."""


# --------------------------------------------------------------------------- params


def _as_floats(key: str, value: object) -> tuple[float, ...]:
    if isinstance(value, str | bytes | Mapping) or not isinstance(value, Sequence | np.ndarray):
        raise PreprocessingError(key, f"expected a list of {N_FEATURES} numbers, got {value!r}")
    items = list(value)
    if len(items) != N_FEATURES:
        raise PreprocessingError(key, f"expected {N_FEATURES} numbers, got {len(items)}")
    out = []
    for item in items:
        if isinstance(item, bool | np.bool_) or not isinstance(item, int | float | np.number):
            raise PreprocessingError(key, f"expected numbers, got {item!r}")
        try:
            number = float(item)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise PreprocessingError(key, f"values must be finite, got {number!r}")
        out.append(number)
    return tuple(out)


def _as_int(key: str, value: object, minimum: int) -> int:
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | np.integer):
        raise PreprocessingError(key, f"expected an integer, got {value!r}")
    number = int(value)
    if number < minimum:
        raise PreprocessingError(key, f"must be at least {minimum}, got {number}")
    return number


def _as_groups(value: object) -> Mapping[str, tuple[int, ...]]:
    key = "fault_groups"
    if not isinstance(value, Mapping) or not value:
        raise PreprocessingError(key, f"expected a non-empty mapping of lists, got {value!r}")
    groups: dict[str, tuple[int, ...]] = {}
    for name, indices in value.items():
        if not isinstance(name, str) or not name:
            raise PreprocessingError(key, f"group names must be non-empty strings, got {name!r}")
        if isinstance(indices, str | bytes) or not isinstance(indices, Sequence) or not indices:
            raise PreprocessingError(key, f"group {name!r}: expected a non-empty list of indices")
        members = tuple(_as_int(key, i, 0) for i in indices)
        if max(members) >= N_FEATURES or len(set(members)) != len(members):
            raise PreprocessingError(
                key,
                f"group {name!r}: indices must be distinct and below {N_FEATURES}, "
                f"got {list(members)}",
            )
        groups[name] = members
    return types.MappingProxyType(groups)


def _readonly(values: Sequence[float]) -> NDArray[np.float64]:
    array = np.array(values, dtype=np.float64)
    array.setflags(write=False)
    return array


@functools.cache
def _discrete_wavelets() -> frozenset[str]:
    names: list[str] = pywt.wavelist(kind="discrete")
    return frozenset(names)


@dataclass(frozen=True, kw_only=True)
class PreprocessingParams:
    """The preprocessing constants a model was trained with (the manifest block).

    Validated at construction; the per-feature values are in ``FEATURES`` order.
    ``default()`` gives the seed statistics of model version 1.
    """

    raw_std: tuple[float, ...]
    """Standard deviation of each raw feature: the wavelet noise level."""
    mean: tuple[float, ...]
    """Mean of each denoised feature, for normalisation."""
    std: tuple[float, ...]
    """Standard deviation of each denoised feature, for normalisation (> 0)."""
    thresholds: tuple[float, ...]
    """Anomaly threshold on each feature's mean absolute reconstruction error."""
    features: tuple[str, ...] = FEATURES
    """Feature names; must be ``FEATURES`` (the pipeline computes exactly these)."""
    window: int = 100
    """Samples per window; a perfect square (the model sees [6, side, side])."""
    step: int = 10
    """Window step; the pipeline keeps the last ``window + step`` samples."""
    buffer: int = 500
    """Samples buffered per turbine before the pipeline runs."""
    wavelet: str = "db6"
    """Discrete wavelet of the denoising (a PyWavelets name)."""
    max_level: int = 5
    """Upper bound of the decomposition level, ``min(max_level, floor(log2 n))``."""
    fault_groups: Mapping[str, tuple[int, ...]] = field(
        default_factory=lambda: DEFAULT_FAULT_GROUPS
    )
    """Fault group name -> indices of the features whose anomaly raises it."""

    def __post_init__(self) -> None:
        names: object = self.features  # runtime values need not match the annotation
        if isinstance(names, str) or not isinstance(names, Sequence) or tuple(names) != FEATURES:
            raise PreprocessingError(
                "features", f"must be {list(FEATURES)} in that order, got {self.features!r}"
            )
        object.__setattr__(self, "features", FEATURES)
        for key in _STAT_KEYS:
            object.__setattr__(self, key, _as_floats(key, getattr(self, key)))
        if any(v <= 0.0 for v in self.std):
            raise PreprocessingError("std", f"values must be > 0, got {list(self.std)}")
        if any(v < 0.0 for v in self.raw_std):
            raise PreprocessingError("raw_std", f"values must be >= 0, got {list(self.raw_std)}")
        if any(v < 0.0 for v in self.thresholds):
            raise PreprocessingError(
                "thresholds", f"values must be >= 0, got {list(self.thresholds)}"
            )
        window = _as_int("window", self.window, 1)
        if math.isqrt(window) ** 2 != window:
            raise PreprocessingError("window", f"must be a perfect square, got {window}")
        step = _as_int("step", self.step, 1)
        buffer = _as_int("buffer", self.buffer, window + step)
        max_level = _as_int("max_level", self.max_level, 1)
        if not isinstance(self.wavelet, str) or self.wavelet not in _discrete_wavelets():
            raise PreprocessingError(
                "wavelet", f"must be a PyWavelets discrete wavelet, got {self.wavelet!r}"
            )
        for key, number in (
            ("window", window),
            ("step", step),
            ("buffer", buffer),
            ("max_level", max_level),
        ):
            object.__setattr__(self, key, number)
        object.__setattr__(self, "fault_groups", _as_groups(self.fault_groups))

    def __hash__(self) -> int:
        return hash(
            (
                self.raw_std,
                self.mean,
                self.std,
                self.thresholds,
                self.window,
                self.step,
                self.buffer,
                self.wavelet,
                self.max_level,
                frozenset(self.fault_groups.items()),
            )
        )

    def __reduce__(self) -> tuple[Any, tuple[dict[str, Any]]]:
        # Through the block: mapping proxies do not pickle, and the lazily built
        # fast paths are better rebuilt than shipped.
        return (PreprocessingParams.from_block, (self.to_block(),))

    # ---- manifest block

    @classmethod
    def default(cls) -> PreprocessingParams:
        """The seed statistics (model version 1) with the default constants."""
        return _default_params()

    @classmethod
    def from_block(cls, block: Mapping[str, Any]) -> PreprocessingParams:
        """Parse a manifest ``preprocessing`` block; its keys must be exactly ``BLOCK_KEYS``."""
        if not isinstance(block, Mapping):
            raise PreprocessingError("preprocessing", f"expected a mapping, got {block!r}")
        for key in sorted(BLOCK_KEYS - block.keys()):
            raise PreprocessingError(key, "missing from the preprocessing block")
        for key in sorted(str(k) for k in block.keys() - BLOCK_KEYS):
            raise PreprocessingError(key, "unknown key in the preprocessing block")
        features = block["features"]
        if isinstance(features, str) or not isinstance(features, Sequence):
            raise PreprocessingError("features", f"expected a list of names, got {features!r}")
        wavelet = block["wavelet"]
        if not isinstance(wavelet, str):
            raise PreprocessingError("wavelet", f"expected a string, got {wavelet!r}")
        return cls(
            features=tuple(features),
            raw_std=_as_floats("raw_std", block["raw_std"]),
            mean=_as_floats("mean", block["mean"]),
            std=_as_floats("std", block["std"]),
            thresholds=_as_floats("thresholds", block["thresholds"]),
            window=_as_int("window", block["window"], 1),
            step=_as_int("step", block["step"], 1),
            buffer=_as_int("buffer", block["buffer"], 1),
            wavelet=wavelet,
            max_level=_as_int("max_level", block["max_level"], 1),
            fault_groups=_as_groups(block["fault_groups"]),
        )

    def to_block(self) -> dict[str, Any]:
        """The manifest ``preprocessing`` block (plain JSON types)."""
        return {
            "features": list(self.features),
            "raw_std": list(self.raw_std),
            "mean": list(self.mean),
            "std": list(self.std),
            "thresholds": list(self.thresholds),
            "window": self.window,
            "step": self.step,
            "buffer": self.buffer,
            "wavelet": self.wavelet,
            "max_level": self.max_level,
            "fault_groups": {name: list(idx) for name, idx in self.fault_groups.items()},
        }

    # ---- derived values

    @property
    def keep(self) -> int:
        """Samples kept after normalisation: ``window + step``."""
        return self.window + self.step

    @property
    def n_windows(self) -> int:
        """Windows per buffer: ``len(range(0, keep - window, step))``.

        With ``keep = window + step`` this is always 1, as in the original
        application; scoring accepts any number of windows.
        """
        return len(range(0, self.keep - self.window, self.step))

    @property
    def side(self) -> int:
        """Side of a window's square: ``sqrt(window)`` (10 by default)."""
        return math.isqrt(self.window)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """One window as the model sees it: ``(6, side, side)``."""
        return (N_FEATURES, self.side, self.side)

    @functools.cached_property
    def raw_std_array(self) -> NDArray[np.float64]:
        """``raw_std`` as a read-only float64 array."""
        return _readonly(self.raw_std)

    @functools.cached_property
    def mean_array(self) -> NDArray[np.float64]:
        """``mean`` as a read-only float64 array."""
        return _readonly(self.mean)

    @functools.cached_property
    def std_array(self) -> NDArray[np.float64]:
        """``std`` as a read-only float64 array."""
        return _readonly(self.std)

    @functools.cached_property
    def thresholds_array(self) -> NDArray[np.float64]:
        """``thresholds`` as a read-only float64 array."""
        return _readonly(self.thresholds)

    def level(self, n: int) -> int:
        """Decomposition level for a buffer of n samples: ``min(max_level, floor(log2 n))``."""
        return min(self.max_level, n.bit_length() - 1)

    def denoise_thresholds(self, n: int) -> NDArray[np.float64]:
        """Soft thresholds for a buffer of n samples: ``raw_std * sqrt(2 log2 n)``."""
        return self.raw_std_array * math.sqrt(2.0 * math.log2(n))

    @functools.cached_property
    def _fast_paths(self) -> dict[int, _FastPath]:
        """Buffer length -> what ``prepare_windows`` precomputes for it (filled lazily)."""
        return {}


@functools.cache
def _default_params() -> PreprocessingParams:
    text = resources.files("edgeapp").joinpath(_SEED_FILE).read_text(encoding="utf-8")
    seed = json.loads(text)
    return PreprocessingParams(
        features=tuple(seed["features"]),
        raw_std=_as_floats("raw_std", seed["raw_std"]),
        mean=_as_floats("mean", seed["mean"]),
        std=_as_floats("std", seed["std"]),
        thresholds=_as_floats("thresholds", seed["thresholds"]),
    )


# --------------------------------------------------------------------------- step 1


def _euler_into(
    quats: NDArray[np.float64], roll_yaw: NDArray[np.float64], pitch: NDArray[np.float64]
) -> None:
    """ZYX Euler angles of quaternions ``(4, ...)`` (x, y, z, w rows, each contiguous).

    Writes roll and yaw into ``roll_yaw`` ``(2, ...)`` and pitch into ``pitch``.
    Roll and yaw share one atan2 call over stacked arguments (numpy's SIMD
    atan2 and asin want contiguous rows; per-call overhead dominates small
    batches). atan2 only sees the ratio and signs of its arguments and
    doubling is exact in binary floating point, so atan2(2a, 1 - 2b) ==
    atan2(a, 0.5 - b): the textbook's factors of 2 are left out there.
    """
    x, y, z, w = quats[0], quats[1], quats[2], quats[3]
    # numerators: w * (x, z) + y * (z, x)
    num = np.multiply(w, quats[0:3:2])
    num += y * quats[2::-2]
    # denominators: 0.5 - (x^2 + y^2, y^2 + z^2)
    squares = np.square(quats[:3])
    den = np.add(squares[:2], squares[1:])
    np.subtract(0.5, den, out=den)
    np.arctan2(num, den, out=roll_yaw)
    # pitch: asin(clip(2 (w y - z x), -1, 1))
    arg = np.multiply(w, y, out=num[0])
    arg -= z * x
    arg *= 2.0
    np.minimum(arg, 1.0, out=arg)
    np.maximum(arg, -1.0, out=arg)
    np.arcsin(arg, out=pitch)


def _features_into(batch: NDArray[np.float64], out: NDArray[np.float64]) -> None:
    """Raw ``(T, m, 7)`` -> feature-major ``out`` ``(T, 6, m)``."""
    quats = np.ascontiguousarray(batch[..., :4].transpose(2, 0, 1))  # (4, T, m)
    _euler_into(quats, out[:, 0:3:2].transpose(1, 0, 2), out[:, 1])
    out[:, 3:] = batch[..., 4:].transpose(0, 2, 1)


def quaternion_to_euler(q: ArrayLike) -> NDArray[np.float64]:
    """``(..., 4)`` quaternions (qx, qy, qz, qw) -> ``(..., 3)`` roll, pitch, yaw in radians.

    Standard ZYX formula; the asin argument is clipped to [-1, 1], so
    non-unit quaternions give finite angles.
    """
    quats = np.asarray(q, dtype=np.float64)
    if quats.ndim < 1 or quats.shape[-1] != 4:
        raise InputShapeError(f"quaternions must have shape (..., 4), got {quats.shape}")
    lead = quats.shape[:-1]
    columns = np.ascontiguousarray(quats.reshape(-1, 4).T)  # (4, N)
    roll_yaw = np.empty((2, columns.shape[1]), dtype=np.float64)
    pitch = np.empty(columns.shape[1], dtype=np.float64)
    _euler_into(columns, roll_yaw, pitch)
    return np.stack([roll_yaw[0], pitch, roll_yaw[1]], axis=-1).reshape(*lead, 3)


def _as_raw(raw: ArrayLike) -> NDArray[np.float64]:
    array = np.asarray(raw, dtype=np.float64)
    if array.ndim not in (2, 3) or array.shape[-1] != N_RAW:
        raise InputShapeError(
            f"raw samples must have shape (n, {N_RAW}) or (T, n, {N_RAW}) with columns "
            f"{', '.join(RAW_FIELDS)}; got {array.shape}"
        )
    return array


def raw_to_features(raw: ArrayLike) -> NDArray[np.float64]:
    """``(..., n, 7)`` raw samples -> ``(..., n, 6)`` features in ``FEATURES`` order."""
    array = np.asarray(raw, dtype=np.float64)
    if array.ndim < 1 or array.shape[-1] != N_RAW:
        raise InputShapeError(f"raw samples must have shape (..., {N_RAW}), got {array.shape}")
    out = np.empty((*array.shape[:-1], N_FEATURES), dtype=np.float64)
    out[..., :3] = quaternion_to_euler(array[..., :4])
    out[..., 3:] = array[..., 4:]
    return out


_atan2: Final = math.atan2
_asin: Final = math.asin


def sample_to_features(row: Sequence[float]) -> tuple[float, ...]:
    """One raw sample (7 values, ``RAW_FIELDS``) -> its 6 features (``FEATURES``).

    Step 1 for a single sample, in Python floats (float64): the same formula as
    ``quaternion_to_euler``, cheaper than numpy for one sample (~0.35 us).
    """
    x, y, z, w, wind, rps, voltage = row
    arg = 2.0 * (w * y - z * x)
    arg = 1.0 if arg > 1.0 else -1.0 if arg < -1.0 else arg
    return (
        _atan2(w * x + y * z, 0.5 - (x * x + y * y)),
        _asin(arg),
        _atan2(w * z + x * y, 0.5 - (y * y + z * z)),
        wind,
        rps,
        voltage,
    )


def samples_to_features(rows: NDArray[np.float64]) -> NDArray[np.float64]:
    """``sample_to_features`` for ``(N, 7)`` raw samples at once -> ``(N, 6)`` float64.

    Bit for bit what ``sample_to_features`` gives each row: the arithmetic is
    the same IEEE operations in numpy, and the angles come from the C library's
    ``atan2``/``asin`` (``math``), not numpy's SIMD versions, which differ in
    the last bit of about one value in four. About 0.1 us a sample.
    """
    count = len(rows)
    x, y, z, w = rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3]
    out = np.empty((count, N_FEATURES), dtype=np.float64)
    roll = map(_atan2, (w * x + y * z).tolist(), (0.5 - (x * x + y * y)).tolist())
    out[:, 0] = np.fromiter(roll, np.float64, count)
    arg = 2.0 * (w * y - z * x)
    np.clip(arg, -1.0, 1.0, out=arg)
    out[:, 1] = np.fromiter(map(_asin, arg.tolist()), np.float64, count)
    yaw = map(_atan2, (w * z + x * y).tolist(), (0.5 - (y * y + z * z)).tolist())
    out[:, 2] = np.fromiter(yaw, np.float64, count)
    out[:, 3:] = rows[:, 4:]
    return out


def feature_means(
    raw: ArrayLike, params: PreprocessingParams, *, samples: int | None = None
) -> NDArray[np.float64]:
    """Recent per-feature means, in physical units, for the dashboard topic.

    ``raw`` is ``(n, 7)`` or ``(T, n, 7)``; the result ``(6,)`` or ``(T, 6)`` is the
    mean of the raw (not denoised) features over the last ``samples`` samples
    (default ``params.window``, or all of them if fewer).
    """
    array = _as_raw(raw)
    count = params.window if samples is None else samples
    if count < 1:
        raise ValueError(f"samples must be at least 1, got {count}")
    if array.shape[-2] == 0:
        raise InputShapeError("raw samples are empty")
    features = raw_to_features(array[..., -count:, :])
    means: NDArray[np.float64] = features.mean(axis=-2)
    return means


def means_of_features(
    features: ArrayLike, params: PreprocessingParams, *, samples: int | None = None
) -> NDArray[np.float64]:
    """``feature_means`` from features ``(n, 6)`` or ``(T, n, 6)`` (any float dtype).

    Accumulates in float64.
    """
    array = np.asarray(features)
    if array.ndim not in (2, 3) or array.shape[-1] != N_FEATURES:
        raise InputShapeError(
            f"features must have shape (n, {N_FEATURES}) or (T, n, {N_FEATURES}); got {array.shape}"
        )
    count = params.window if samples is None else samples
    if count < 1:
        raise ValueError(f"samples must be at least 1, got {count}")
    if array.shape[-2] == 0:
        raise InputShapeError("features are empty")
    means: NDArray[np.float64] = array[..., -count:, :].mean(axis=-2, dtype=np.float64)
    return means


# --------------------------------------------------------------------------- step 2


def _wavedec_rows(rows: NDArray[np.float64], wavelet: str, level: int) -> list[NDArray[np.float64]]:
    """``pywt.wavedec`` along the last axis (typed wrapper)."""
    coeffs: list[NDArray[np.float64]]
    if level <= pywt.dwt_max_level(rows.shape[-1], wavelet):
        coeffs = pywt.wavedec(rows, wavelet, level=level, axis=-1)
        return coeffs
    # The specification fixes the level; for short signals PyWavelets warns that
    # boundary effects reach every coefficient. Expected, so silenced (only
    # here: catch_warnings swaps process-wide state).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        coeffs = pywt.wavedec(rows, wavelet, level=level, axis=-1)
    return coeffs


def _waverec_rows(coeffs: Sequence[NDArray[np.float64]], wavelet: str) -> NDArray[np.float64]:
    """``pywt.waverec`` along the last axis (typed wrapper)."""
    rebuilt: NDArray[np.float64] = pywt.waverec(list(coeffs), wavelet, axis=-1)
    return rebuilt


def _soft(
    values: NDArray[np.float64],
    thresholds: NDArray[np.float64],
    negated: NDArray[np.float64] | None = None,
) -> NDArray[np.float64]:
    """Soft threshold in place: ``sign(c) * max(|c| - t, 0) == c - clip(c, -t, t)``.

    ``negated`` is ``-thresholds`` when the caller has it at hand.
    """
    clipped = np.maximum(values, -thresholds if negated is None else negated)
    np.minimum(clipped, thresholds, out=clipped)
    values -= clipped
    return values


def _denoise_rows(
    rows: NDArray[np.float64], thresholds: NDArray[np.float64], wavelet: str, level: int
) -> NDArray[np.float64]:
    """Denoise each row of ``(R, n)`` with its threshold ``(R, 1)``: one wavedec, one waverec."""
    coeffs = [_soft(c, thresholds) for c in _wavedec_rows(rows, wavelet, level)]
    return _waverec_rows(coeffs, wavelet)[:, : rows.shape[-1]]


def denoise(features: ArrayLike, params: PreprocessingParams) -> NDArray[np.float64]:
    """Wavelet-denoise ``(..., n, 6)`` features over their whole length (step 2).

    One ``pywt.wavedec``/``waverec`` over all series at once. Returns float64 of
    the same shape, not normalised.
    """
    array = np.asarray(features, dtype=np.float64)
    if array.ndim < 2 or array.shape[-1] != N_FEATURES or array.shape[-2] < 1:
        raise InputShapeError(f"features must have shape (..., n, {N_FEATURES}), got {array.shape}")
    n = array.shape[-2]
    lead = array.shape[:-2]
    rows = np.ascontiguousarray(np.moveaxis(array, -1, -2)).reshape(-1, n)
    thresholds = np.tile(params.denoise_thresholds(n), rows.shape[0] // N_FEATURES)[:, None]
    denoised = _denoise_rows(rows, thresholds, params.wavelet, params.level(n))
    return np.moveaxis(denoised.reshape(*lead, N_FEATURES, n), -2, -1)


@dataclass(frozen=True, eq=False)
class _Block:
    first: int  # first input sample this block reads
    matrix: NDArray[np.float64]  # (n - first, k): samples -> k coefficients


@dataclass(frozen=True, eq=False)
class _Plan:
    """Steps 2 and 4 for one (n, wavelet, level, window positions), as matrices."""

    first: int  # samples before this one never reach a window
    analysis: tuple[_Block, ...]
    synthesis: NDArray[np.float64]  # (K, W * window): coefficients -> window samples


def _split_blocks(starts: NDArray[np.intp], n: int) -> list[tuple[int, int]]:
    """Split coefficients sorted by first input sample into at most _MAX_BLOCKS runs.

    Minimises multiply-adds per row (each run reads from its first coefficient's
    start to n) plus a fixed charge per run. Returns (begin, end) index pairs.
    """
    k = len(starts)
    best: dict[tuple[int, int], tuple[int, list[tuple[int, int]]]] = {}

    def solve(begin: int, blocks_left: int) -> tuple[int, list[tuple[int, int]]]:
        if (begin, blocks_left) in best:
            return best[begin, blocks_left]
        width = n - int(starts[begin])
        result = (width * (k - begin), [(begin, k)])
        if blocks_left > 1:
            for end in range(begin + 1, k):
                cost, rest = solve(end, blocks_left - 1)
                total = width * (end - begin) + _BLOCK_OVERHEAD + cost
                if total < result[0]:
                    result = (total, [(begin, end), *rest])
        best[begin, blocks_left] = result
        return result

    return solve(0, _MAX_BLOCKS)[1]


@functools.lru_cache(maxsize=32)
def _plan(
    *, n: int, wavelet: str, level: int, tail: int, window: int, step: int, n_windows: int
) -> _Plan:
    positions = np.concatenate(
        [np.arange(n - tail + w * step, n - tail + w * step + window) for w in range(n_windows)]
    )
    # Impulse responses: row i of `analysis` holds the coefficients of sample i,
    # row j of `synthesis` the reconstruction of coefficient j alone.
    coeffs = _wavedec_rows(np.eye(n), wavelet, level)
    analysis = np.concatenate(coeffs, axis=1)  # (n, K_all)
    unit = np.eye(analysis.shape[1])
    bounds = np.cumsum([c.shape[1] for c in coeffs])[:-1]
    synthesis = _waverec_rows(np.split(unit, bounds, axis=1), wavelet)[:, :n][:, positions]
    # Exact zeros: a coefficient whose reconstruction misses every window sample
    # is never needed, and a sample that feeds no needed coefficient never read.
    needed = np.flatnonzero(np.any(synthesis != 0.0, axis=1))
    analysis = analysis[:, needed]
    synthesis = synthesis[needed]
    nonzero = analysis != 0.0
    starts = np.where(nonzero.any(axis=0), nonzero.argmax(axis=0), n)
    order = np.argsort(starts, kind="stable")
    starts, analysis, synthesis = starts[order], analysis[:, order], synthesis[order]
    blocks = tuple(
        _Block(int(starts[b]), np.ascontiguousarray(analysis[int(starts[b]) :, b:e]))
        for b, e in _split_blocks(starts, n)
    )
    for block in blocks:
        block.matrix.setflags(write=False)
    synthesis = np.ascontiguousarray(synthesis)
    synthesis.setflags(write=False)
    return _Plan(first=blocks[0].first, analysis=blocks, synthesis=synthesis)


# --------------------------------------------------------------------------- steps 1-4


def prepare_windows(raw: ArrayLike, params: PreprocessingParams) -> NDArray[np.float32]:
    """Raw buffers -> model input (steps 1-4).

    ``raw`` is one turbine's buffer ``(n, 7)`` (columns ``RAW_FIELDS``) -> ``(W, 6, side,
    side)``, or a batch ``(T, n, 7)`` -> ``(T, W, 6, side, side)``; n >= ``params.keep``
    (normally ``params.buffer``). The denoising runs over all n samples. Maths in
    float64, output float32. Non-finite samples only spoil their own turbine's output.
    """
    return _prepare(_as_raw(raw), params, from_raw=True)


def windows_from_features(features: ArrayLike, params: PreprocessingParams) -> NDArray[np.float32]:
    """Like ``prepare_windows``, from features ``(n, 6)`` or ``(T, n, 6)`` (steps 2-4).

    For buffers that keep converted samples (``raw_to_features`` once per sample
    on arrival) instead of converting the whole buffer at every tick. float32
    features are read as they are (no float64 copy of the whole buffer): the
    maths casts the samples it uses to float64.
    """
    array: NDArray[np.floating[Any]] = np.asarray(features)
    if array.dtype not in (np.float32, np.float64):
        array = array.astype(np.float64)
    if array.ndim not in (2, 3) or array.shape[-1] != N_FEATURES:
        raise InputShapeError(
            f"features must have shape (n, {N_FEATURES}) or (T, n, {N_FEATURES}) with columns "
            f"{', '.join(FEATURES)}; got {array.shape}"
        )
    return _prepare(array, params, from_raw=False)


def _prepare(
    array: NDArray[np.floating[Any]], params: PreprocessingParams, *, from_raw: bool
) -> NDArray[np.float32]:
    single = array.ndim == 2
    batch = array[None] if single else array
    n_turbines, n, _ = batch.shape
    if n < params.keep:
        raise InputShapeError(f"need at least {params.keep} samples per buffer, got {n}")
    if n > _MAX_PLAN_SAMPLES or n_turbines == 0:
        out = np.empty((n_turbines, params.n_windows, N_FEATURES, params.window), np.float32)
        if n_turbines:
            _windows_by_pywt(raw_to_features(batch) if from_raw else batch, params, out)
        shape = (n_turbines, params.n_windows, *params.input_shape)
    else:
        fast = _fast_path(params, n)
        out = np.empty((n_turbines, *fast.out_shape), dtype=np.float32)
        if n_turbines <= _CHUNK_TURBINES:
            _windows_by_plan(batch, fast, out, from_raw=from_raw)
        else:  # chunks of turbines keep the temporaries in cache for large fleets
            for begin in range(0, n_turbines, _CHUNK_TURBINES):
                chunk = slice(begin, begin + _CHUNK_TURBINES)
                _windows_by_plan(batch[chunk], fast, out[chunk], from_raw=from_raw)
        shape = (n_turbines, *fast.model_shape)
    shaped = out.reshape(shape)
    return shaped[0] if single else shaped


@dataclass(frozen=True, eq=False)
class _FastPath:
    """Everything constant about ``prepare_windows`` for one params and buffer length."""

    plan: _Plan
    upper: NDArray[np.float64]  # (6, 1) soft thresholds
    lower: NDArray[np.float64]  # (6, 1) their negatives
    mean: NDArray[np.float64]  # (6, 1, 1)
    std: NDArray[np.float64]  # (6, 1)
    n_windows: int
    window: int
    out_shape: tuple[int, int, int]  # (W, 6, window)
    model_shape: tuple[int, int, int, int]  # (W, 6, side, side)


def _fast_path(params: PreprocessingParams, n: int) -> _FastPath:
    cache = params._fast_paths
    fast = cache.get(n)
    if fast is None:
        upper = params.denoise_thresholds(n)[:, None]
        fast = _FastPath(
            plan=_plan(
                n=n,
                wavelet=params.wavelet,
                level=params.level(n),
                tail=params.keep,
                window=params.window,
                step=params.step,
                n_windows=params.n_windows,
            ),
            upper=upper,
            lower=-upper,
            mean=params.mean_array[:, None, None],
            std=params.std_array[:, None],
            n_windows=params.n_windows,
            window=params.window,
            out_shape=(params.n_windows, N_FEATURES, params.window),
            model_shape=(params.n_windows, *params.input_shape),
        )
        if len(cache) >= _MAX_FAST_PATHS:  # callers varying n: stay bounded
            cache.clear()
        cache[n] = fast
    return fast


def _windows_by_plan(
    batch: NDArray[np.floating[Any]], fast: _FastPath, out: NDArray[np.float32], *, from_raw: bool
) -> None:
    """Steps 1-4 for ``(T, n, 7)`` raw buffers (or 2-4 for ``(T, n, 6)`` features) into
    ``out`` ``(T, W, 6, window)``, with a plan."""
    n_turbines, n, _ = batch.shape
    plan = fast.plan
    # Step 1, only for the samples that reach a window, in feature-major rows.
    rows = np.empty((n_turbines, N_FEATURES, n - plan.first), dtype=np.float64)
    if from_raw:
        _features_into(np.asarray(batch[:, plan.first :, :], dtype=np.float64), rows)
    else:
        rows[...] = batch[:, plan.first :, :].transpose(0, 2, 1)  # float32 -> float64 here
    flat = rows.reshape(n_turbines * N_FEATURES, -1)
    # Step 2: analysis, soft threshold, synthesis of the window samples only.
    parts = [flat[:, block.first - plan.first :] @ block.matrix for block in plan.analysis]
    coeffs = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1)
    _soft(coeffs.reshape(n_turbines, N_FEATURES, -1), fast.upper, fast.lower)
    series = (coeffs @ plan.synthesis).reshape(n_turbines, N_FEATURES, fast.n_windows, fast.window)
    _normalise_into(series, fast.mean, fast.std, out)


def _windows_by_pywt(
    batch: NDArray[np.floating[Any]], params: PreprocessingParams, out: NDArray[np.float32]
) -> None:
    """Steps 2-4 for ``(T, n, 6)`` features through the full-length PyWavelets path."""
    n = batch.shape[1]
    denoised = denoise(batch, params)[:, n - params.keep :, :]
    tail = np.moveaxis(denoised, -1, -2)  # (T, 6, keep)
    starts = range(0, params.keep - params.window, params.step)
    series = np.stack([tail[:, :, s : s + params.window] for s in starts], axis=2)
    _normalise_into(series, params.mean_array[:, None, None], params.std_array[:, None], out)


def _normalise_into(
    series: NDArray[np.float64],
    mean: NDArray[np.float64],
    std: NDArray[np.float64],
    out: NDArray[np.float32],
) -> None:
    """Step 3 and the end of 4: ``(T, 6, W, window)`` -> ``(T, W, 6, window)`` float32.

    ``mean`` is shaped ``(6, 1, 1)`` and ``std`` ``(6, 1)``.
    """
    series -= mean
    np.divide(series.transpose(0, 2, 1, 3), std, out=out)


# --------------------------------------------------------------------------- step 6


@dataclass(frozen=True, kw_only=True, eq=False)
class Scores:
    """Verdicts of one tick: per turbine and feature, and per fault group.

    For one turbine the arrays have shape ``(6,)`` and the groups shape ``()``;
    for a batch, ``(T, 6)`` and ``(T,)``.
    """

    scores: NDArray[np.float64]
    """Mean absolute reconstruction error per feature, averaged over the windows."""
    thresholds: NDArray[np.float64]
    """The thresholds the scores were compared with, ``(6,)``."""
    flags: NDArray[np.bool_]
    """``scores > thresholds``."""
    groups: Mapping[str, NDArray[np.bool_]]
    """Fault group name -> any of its features flagged."""

    def anomalies(self, turbine: int | None = None) -> dict[str, bool]:
        """``{"vibration": ..., "rotation": ..., "voltage": ...}`` for one turbine.

        ``turbine`` indexes a batch; leave it out for a single turbine's scores.
        """
        if (turbine is None) != (self.scores.ndim == 1):
            raise ValueError("pass a turbine index for batched scores, and only for them")
        return {
            name: bool(flags if turbine is None else flags[turbine])
            for name, flags in self.groups.items()
        }


def score(windows: ArrayLike, reconstruction: ArrayLike, params: PreprocessingParams) -> Scores:
    """Score the model's reconstruction of ``prepare_windows`` output (step 6).

    ``windows`` and ``reconstruction`` share a shape ``(W, 6, side, side)`` or
    ``(T, W, 6, side, side)``. Per feature: mean absolute error over the
    window's time steps, averaged over the windows; anomaly where score >
    threshold; a fault group is raised when any of its features is.
    """
    a = np.asarray(windows)
    b = np.asarray(reconstruction)
    if a.shape != b.shape:
        raise InputShapeError(
            f"windows {a.shape} and reconstruction {b.shape} must have the same shape"
        )
    if a.ndim not in (4, 5) or a.shape[-3] != N_FEATURES or a.shape[-4] == 0:
        raise InputShapeError(
            f"expected (W, {N_FEATURES}, h, w) or (T, W, {N_FEATURES}, h, w) with W >= 1, "
            f"got {a.shape}"
        )
    error = np.subtract(b, a, dtype=np.float64)
    np.abs(error, out=error)  # in place: one float64 temporary per chunk, not two
    scores: NDArray[np.float64] = error.mean(axis=(-2, -1)).mean(axis=-2)
    flags: NDArray[np.bool_] = scores > params.thresholds_array
    groups = types.MappingProxyType(
        {
            name: np.asarray(flags[..., list(idx)].any(axis=-1), dtype=np.bool_)
            for name, idx in params.fault_groups.items()
        }
    )
    return Scores(scores=scores, thresholds=params.thresholds_array, flags=flags, groups=groups)
