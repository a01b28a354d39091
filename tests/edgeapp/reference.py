"""The slow reference of the detection pipeline, written from ARCHITECTURE.md.

This module is deliberately plain: one turbine at a time, a Python loop over
samples with ``math.atan2``/``math.asin`` for the quaternion conversion, one
``pywt.wavedec``/``pywt.threshold``/``pywt.waverec`` per feature, loops for the
windows and the scores. It shares no code with ``edgeapp.features`` (only plain
numbers are passed in), so a test that compares the two checks the fast
pipeline against the text of the specification, not against itself.

It is also the baseline of ``bench/features_pipeline.py``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import pywt
from numpy.typing import NDArray

N_FEATURES = 6


def euler_from_quaternion(x: float, y: float, z: float, w: float) -> tuple[float, float, float]:
    """One quaternion (qx, qy, qz, qw) -> (roll, pitch, yaw), standard ZYX formula."""
    t0 = 2.0 * (w * x + y * z)
    t1 = 1.0 - 2.0 * (x * x + y * y)
    roll = math.atan2(t0, t1)

    t2 = 2.0 * (w * y - z * x)
    t2 = min(1.0, max(-1.0, t2))
    pitch = math.asin(t2)

    t3 = 2.0 * (w * z + x * y)
    t4 = 1.0 - 2.0 * (y * y + z * z)
    yaw = math.atan2(t3, t4)
    return roll, pitch, yaw


def raw_to_features(raw: NDArray[np.float64]) -> NDArray[np.float64]:
    """(n, 7) qx, qy, qz, qw, wind_speed_rps, rps, voltage -> (n, 6) features."""
    rows = []
    for sample in raw.tolist():
        qx, qy, qz, qw, wind, rps, voltage = sample
        roll, pitch, yaw = euler_from_quaternion(qx, qy, qz, qw)
        rows.append([roll, pitch, yaw, wind, rps, voltage])
    return np.array(rows, dtype=np.float64)


def wavelet_denoise(
    signal: NDArray[np.float64], wavelet: str, noise_sigma: float, max_level: int
) -> NDArray[np.float64]:
    """Denoise one feature over the whole buffer (step 2 of the pipeline)."""
    n = signal.shape[0]
    level = min(max_level, math.floor(math.log2(n)))
    threshold = noise_sigma * math.sqrt(2.0 * math.log2(n))
    with warnings.catch_warnings():
        # short buffers: the specified level may exceed pywt's recommended one
        warnings.simplefilter("ignore", UserWarning)
        coeffs = pywt.wavedec(signal, wavelet, level=level)
    with np.errstate(over="ignore"):
        # pywt.threshold computes 1 - threshold / |c|, which overflows (harmlessly:
        # the coefficient becomes 0) for coefficients near the smallest float.
        coeffs = [pywt.threshold(c, threshold, mode="soft") for c in coeffs]
    rebuilt: NDArray[np.float64] = pywt.waverec(coeffs, wavelet)
    return rebuilt[:n]


def prepare_windows(
    raw: NDArray[np.float64],
    *,
    raw_std: Sequence[float],
    mean: Sequence[float],
    std: Sequence[float],
    window: int = 100,
    step: int = 10,
    wavelet: str = "db6",
    max_level: int = 5,
) -> NDArray[np.float32]:
    """One turbine's raw buffer (n, 7) -> model input (W, 6, side, side)."""
    features = raw_to_features(np.asarray(raw, dtype=np.float64))
    denoised = np.empty_like(features)
    for i in range(N_FEATURES):
        denoised[:, i] = wavelet_denoise(features[:, i], wavelet, raw_std[i], max_level)
    normalised = np.empty_like(denoised)
    for i in range(N_FEATURES):
        normalised[:, i] = (denoised[:, i] - mean[i]) / std[i]
    keep = window + step
    tail = normalised[-keep:]
    side = math.isqrt(window)
    windows = []
    for start in range(0, len(tail) - window, step):
        win = tail[start : start + window]  # [window, 6]
        windows.append(win.T.reshape(N_FEATURES, side, side))
    return np.array(windows, dtype=np.float32).reshape(-1, N_FEATURES, side, side)


def score(
    windows: NDArray[np.floating], reconstruction: NDArray[np.floating], thresholds: Sequence[float]
) -> tuple[list[float], list[bool]]:
    """One turbine's windows and reconstruction (W, 6, side, side) -> scores, flags."""
    n_windows = windows.shape[0]
    scores = []
    for i in range(N_FEATURES):
        per_window = []
        for w in range(n_windows):
            a = windows[w, i].reshape(-1).astype(np.float64)
            b = reconstruction[w, i].reshape(-1).astype(np.float64)
            per_window.append(
                sum(abs(float(p) - float(q)) for p, q in zip(a, b, strict=True)) / len(a)
            )
        scores.append(sum(per_window) / n_windows)
    flags = [s > t for s, t in zip(scores, thresholds, strict=True)]
    return scores, flags


FAULT_GROUPS = {"vibration": (0, 1, 2), "rotation": (3, 4), "voltage": (5,)}


def fault_groups(flags: Sequence[bool]) -> dict[str, bool]:
    """Feature flags -> the three fault groups of the anomalies topic."""
    return {name: any(flags[i] for i in idx) for name, idx in FAULT_GROUPS.items()}
