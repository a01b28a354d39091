"""edgeapp.features against the plain reference of the specification (reference.py)."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import math
import pickle
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from numpy.typing import NDArray

from edgeapp import features
from edgeapp.buffers import TurbineBuffers
from edgeapp.features import (
    BLOCK_KEYS,
    FEATURES,
    InputShapeError,
    PreprocessingError,
    PreprocessingParams,
    feature_means,
    means_of_features,
    prepare_windows,
    quaternion_to_euler,
    sample_to_features,
    score,
    windows_from_features,
)


def _load_reference() -> ModuleType:
    # Loaded by path so the test does not depend on how pytest sets sys.path.
    path = Path(__file__).with_name("reference.py")
    spec = importlib.util.spec_from_file_location("windedge_features_reference", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ref = _load_reference()
DEFAULT = PreprocessingParams.default()
TOL = 1e-4


def ref_windows(raw: NDArray[np.float64], params: PreprocessingParams) -> NDArray[np.float32]:
    """The reference, one turbine at a time, stacked like a batch when raw is (T, n, 7)."""
    kwargs: dict[str, Any] = {
        "raw_std": params.raw_std,
        "mean": params.mean,
        "std": params.std,
        "window": params.window,
        "step": params.step,
        "wavelet": params.wavelet,
        "max_level": params.max_level,
    }
    if raw.ndim == 2:
        return ref.prepare_windows(raw, **kwargs)  # type: ignore[no-any-return]  # reference is loaded by path, untyped
    return np.stack([ref.prepare_windows(one, **kwargs) for one in raw])


def euler_to_quaternion(
    roll: NDArray[np.float64], pitch: NDArray[np.float64], yaw: NDArray[np.float64]
) -> NDArray[np.float64]:
    """ZYX Euler angles -> (..., 4) quaternions qx, qy, qz, qw."""
    cr, sr = np.cos(roll / 2), np.sin(roll / 2)
    cp, sp = np.cos(pitch / 2), np.sin(pitch / 2)
    cy, sy = np.cos(yaw / 2), np.sin(yaw / 2)
    return np.stack(
        [
            sr * cp * cy - cr * sp * sy,
            cr * sp * cy + sr * cp * sy,
            cr * cp * sy - sr * sp * cy,
            cr * cp * cy + sr * sp * sy,
        ],
        axis=-1,
    )


def turbine_buffers(
    rng: np.random.Generator, turbines: int, n: int = 500, params: PreprocessingParams = DEFAULT
) -> NDArray[np.float64]:
    """Turbine-like raw buffers (T, n, 7) calibrated on the seed statistics.

    Small roll/pitch noise around the recorded means, a yaw that drifts (and may
    wrap around +-pi), rotor speed varying slowly, wind speed and voltage
    following it, ~20 Hz sampling.
    """
    mean, raw_std = np.array(params.mean), np.array(params.raw_std)
    t = np.arange(n) * 0.05
    shape = (turbines, n)
    roll = mean[0] + raw_std[0] * rng.standard_normal(shape)
    pitch = mean[1] + raw_std[1] * rng.standard_normal(shape)
    yaw = rng.uniform(-np.pi, np.pi, (turbines, 1)) + np.cumsum(
        0.02 * rng.standard_normal(shape), axis=1
    )
    rps = mean[4] + raw_std[4] * 0.6 * np.sin(
        2 * np.pi * t / rng.uniform(10, 40, (turbines, 1)) + rng.uniform(0, 6, (turbines, 1))
    )
    rps = np.clip(rps + 0.1 * rng.standard_normal(shape), 0.0, None)
    wind = mean[3] + 0.7 * (rps - mean[4]) + 0.15 * rng.standard_normal(shape)
    voltage = mean[5] / mean[4] * rps + 3.0 * rng.standard_normal(shape)
    quats = euler_to_quaternion(roll, pitch, np.angle(np.exp(1j * yaw)))
    return np.concatenate([quats, np.stack([wind, rps, voltage], axis=-1)], axis=-1)


# ----------------------------------------------------------------------------- params


def test_default_is_the_seed_statistics() -> None:
    # The README table of the seed statistics, to its printed precision.
    table = {
        "mean": [-0.00796, 0.00117, -0.10685, 2.15398, 1.61063, 47.79383],
        "raw_std": [0.01642, 0.01633, 1.80995, 0.39059, 0.61985, 26.38172],
        "std": [0.00749, 0.00428, 0.48143, 0.35432, 0.46954, 15.94324],
        "thresholds": [1.0828, 0.7643, 0.9999, 0.8416, 0.8265, 0.9139],
    }
    for key, values in table.items():
        np.testing.assert_allclose(getattr(DEFAULT, key), values, rtol=0, atol=6e-5)
    assert DEFAULT.features == FEATURES
    assert (DEFAULT.window, DEFAULT.step, DEFAULT.buffer) == (100, 10, 500)
    assert (DEFAULT.wavelet, DEFAULT.max_level) == ("db6", 5)
    assert dict(DEFAULT.fault_groups) == {
        "vibration": (0, 1, 2),
        "rotation": (3, 4),
        "voltage": (5,),
    }
    assert DEFAULT.keep == 110
    assert DEFAULT.n_windows == 1
    assert DEFAULT.input_shape == (6, 10, 10)


def test_params_are_immutable() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULT.window = 64  # type: ignore[misc]  # the point: frozen
    with pytest.raises(ValueError, match="read-only"):
        DEFAULT.mean_array[0] = 1.0
    with pytest.raises(TypeError):
        DEFAULT.fault_groups["voltage"] = (4,)  # type: ignore[index]  # the point: read-only


def test_block_round_trip() -> None:
    block = DEFAULT.to_block()
    assert set(block) == BLOCK_KEYS
    assert block["features"] == ["roll", "pitch", "yaw", "wind_speed_rps", "rps", "voltage"]
    assert block["fault_groups"] == {"vibration": [0, 1, 2], "rotation": [3, 4], "voltage": [5]}
    again = PreprocessingParams.from_block(json.loads(json.dumps(block)))
    assert again == DEFAULT
    assert hash(again) == hash(DEFAULT)
    assert again.to_block() == block
    other = PreprocessingParams.from_block({**block, "step": 5})
    assert other != DEFAULT
    assert other.keep == 105


def test_params_pickle_and_copy() -> None:
    prepare_windows(np.zeros((500, 7)), DEFAULT)  # fills the lazy caches
    # ruff S301: the bytes come from pickle.dumps on the line itself, not from outside
    unpickled = pickle.loads(pickle.dumps(DEFAULT))  # noqa: S301
    for again in (unpickled, copy.deepcopy(DEFAULT)):
        assert again == DEFAULT
        assert again.fault_groups == DEFAULT.fault_groups


def _bad(key: str, value: object) -> tuple[dict[str, Any], str]:
    block = DEFAULT.to_block()
    block[key] = value
    return block, key


BAD_BLOCKS = {
    "short raw_std": _bad("raw_std", [0.1] * 5),
    "long mean": _bad("mean", [0.0] * 7),
    "nan mean": _bad("mean", [0.0, math.nan, 0, 0, 0, 0]),
    "inf threshold": _bad("thresholds", [1.0, 1, 1, 1, 1, math.inf]),
    "zero std": _bad("std", [1.0, 1, 0.0, 1, 1, 1]),
    "negative std": _bad("std", [1.0, 1, 1, -2.0, 1, 1]),
    "negative raw_std": _bad("raw_std", [1.0, 1, 1, -2.0, 1, 1]),
    "string in std": _bad("std", [1.0, 1, 1, "1", 1, 1]),
    "huge int in mean": _bad("mean", [10**400, 1, 1, 1, 1, 1]),
    "features not a list": _bad("features", 6),
    "std not a list": _bad("std", "1,1,1,1,1,1"),
    "bool window": _bad("window", True),
    "float window": _bad("window", 100.0),
    "window not square": _bad("window", 99),
    "zero step": _bad("step", 0),
    "buffer below keep": _bad("buffer", 100),
    "unknown wavelet": _bad("wavelet", "db99"),
    "zero max_level": _bad("max_level", 0),
    "renamed feature": _bad("features", ["roll", "pitch", "yaw", "wind", "rps", "voltage"]),
    "feature order": _bad("features", ["pitch", "roll", "yaw", "wind_speed_rps", "rps", "voltage"]),
    "group index out of range": _bad("fault_groups", {"voltage": [6]}),
    "empty group": _bad("fault_groups", {"voltage": []}),
    "group not a mapping": _bad("fault_groups", [[0, 1, 2]]),
}


@pytest.mark.parametrize(("block", "key"), BAD_BLOCKS.values(), ids=BAD_BLOCKS.keys())
def test_bad_blocks_are_rejected_naming_the_key(block: dict[str, Any], key: str) -> None:
    with pytest.raises(PreprocessingError) as caught:
        PreprocessingParams.from_block(block)
    assert isinstance(caught.value, ValueError)
    assert caught.value.key == key
    assert repr(key) in str(caught.value)


@pytest.mark.parametrize("key", sorted(BLOCK_KEYS))
def test_missing_key_is_rejected(key: str) -> None:
    block = DEFAULT.to_block()
    del block[key]
    with pytest.raises(PreprocessingError, match=rf"'{key}'.*missing") as caught:
        PreprocessingParams.from_block(block)
    assert caught.value.key == key


def test_unknown_key_is_rejected() -> None:
    block = {**DEFAULT.to_block(), "keep": 110}
    with pytest.raises(PreprocessingError, match=r"'keep'.*unknown") as caught:
        PreprocessingParams.from_block(block)
    assert caught.value.key == "keep"


def test_construction_validates_too() -> None:
    with pytest.raises(PreprocessingError, match="'std'"):
        dataclasses.replace(DEFAULT, std=(1.0, 1.0, 1.0, 1.0, 1.0, 0.0))
    with pytest.raises(PreprocessingError, match="'buffer'"):
        dataclasses.replace(DEFAULT, window=400, step=200)


# ----------------------------------------------------------------------------- step 1


finite = st.floats(-1.5, 1.5, allow_nan=False, allow_infinity=False)


@settings(max_examples=50, deadline=None)
@given(hnp.arrays(np.float64, st.tuples(st.integers(1, 20), st.just(4)), elements=finite))
def test_quaternion_to_euler_matches_math(quats: NDArray[np.float64]) -> None:
    got = quaternion_to_euler(quats)
    want = np.array([ref.euler_from_quaternion(*q) for q in quats.tolist()])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


@settings(max_examples=50, deadline=None)
@given(hnp.arrays(np.float64, st.tuples(st.integers(1, 20), st.just(7)), elements=finite))
def test_sample_to_features_matches_the_vectorised_conversion(raw: NDArray[np.float64]) -> None:
    got = np.array([sample_to_features(row) for row in raw.tolist()])
    want = np.array([[*ref.euler_from_quaternion(*row[:4]), *row[4:]] for row in raw.tolist()])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    np.testing.assert_allclose(got, features.raw_to_features(raw), rtol=0, atol=1e-12)


def test_asin_argument_is_clipped() -> None:
    # Non-unit quaternions: 2 (qw qy - qz qx) = +-1.62 and +-4.5.
    quats = np.array(
        [[0.0, 0.9, 0.0, 0.9], [0.0, -0.9, 0.0, 0.9], [0.3, 1.5, -0.1, 1.5], [0.0, 1.5, 0.0, -1.5]]
    )
    args = 2 * (quats[:, 3] * quats[:, 1] - quats[:, 2] * quats[:, 0])
    assert np.all(np.abs(args) > 1)
    got = quaternion_to_euler(quats)
    assert np.all(np.isfinite(got))
    np.testing.assert_array_equal(got[:, 1], np.pi / 2 * np.sign(args))
    want = np.array([ref.euler_from_quaternion(*q) for q in quats.tolist()])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_quaternion_to_euler_any_leading_dims() -> None:
    rng = np.random.default_rng(1)
    angles = rng.uniform([-3, -1.5, -3], [3, 1.5, 3], (2, 3, 5, 3))
    quats = euler_to_quaternion(angles[..., 0], angles[..., 1], angles[..., 2])
    got = quaternion_to_euler(quats)
    assert got.shape == (2, 3, 5, 3)
    np.testing.assert_allclose(got, angles, rtol=0, atol=1e-9)
    assert quaternion_to_euler([0.0, 0.0, 0.0, 1.0]).shape == (3,)
    with pytest.raises(InputShapeError):
        quaternion_to_euler(np.zeros((3, 3)))


# ----------------------------------------------------------------------------- steps 1-4


def test_single_turbine_matches_reference() -> None:
    raw = turbine_buffers(np.random.default_rng(7), 1)[0]
    got = prepare_windows(raw, DEFAULT)
    assert got.shape == (1, 6, 10, 10)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, ref_windows(raw, DEFAULT), rtol=0, atol=TOL)


def test_batch_matches_reference_and_single_calls() -> None:
    raw = turbine_buffers(np.random.default_rng(8), 5)
    got = prepare_windows(raw, DEFAULT)
    assert got.shape == (5, 1, 6, 10, 10)
    np.testing.assert_allclose(got, ref_windows(raw, DEFAULT), rtol=0, atol=TOL)
    for i in range(len(raw)):
        np.testing.assert_array_equal(got[i], prepare_windows(raw[i], DEFAULT))


def test_large_batch_spans_chunks() -> None:
    raw = turbine_buffers(np.random.default_rng(9), features._CHUNK_TURBINES + 3)
    got = prepare_windows(raw, DEFAULT)
    picks = [0, features._CHUNK_TURBINES - 1, features._CHUNK_TURBINES, len(raw) - 1]
    np.testing.assert_allclose(got[picks], ref_windows(raw[picks], DEFAULT), rtol=0, atol=TOL)


def test_window_is_feature_major() -> None:
    # [100, 6] -> transpose [6, 100] -> reshape [6, 10, 10]: row r of feature f
    # holds time steps 10 r .. 10 r + 9 of that feature.
    params = dataclasses.replace(DEFAULT, raw_std=(0.0,) * 6, mean=(0.0,) * 6, std=(1.0,) * 6)
    raw = np.zeros((500, 7))
    raw[:, 3] = 1.0  # identity quaternion: angles 0
    raw[:, 4:] = np.arange(500)[:, None] * [1.0, 2.0, 3.0]
    got = prepare_windows(raw, params)
    window = np.arange(390, 490)  # last 110 kept, first window of 100
    np.testing.assert_allclose(got[0, 3], window.reshape(10, 10), atol=1e-3)
    np.testing.assert_allclose(got[0, 5], 3 * window.reshape(10, 10), atol=1e-3)
    np.testing.assert_allclose(got[0, :3], 0.0, atol=1e-6)


@pytest.mark.parametrize("n", [110, 353, 499, 501, 777])
def test_other_buffer_lengths_match_reference(n: int) -> None:
    raw = turbine_buffers(np.random.default_rng(n), 2, n=n)
    np.testing.assert_allclose(
        prepare_windows(raw, DEFAULT), ref_windows(raw, DEFAULT), rtol=0, atol=TOL
    )


def test_long_buffers_take_the_pywavelets_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(features, "_MAX_PLAN_SAMPLES", 300)
    raw = turbine_buffers(np.random.default_rng(3), 2, n=500)
    np.testing.assert_allclose(
        prepare_windows(raw, DEFAULT), ref_windows(raw, DEFAULT), rtol=0, atol=TOL
    )


@pytest.mark.parametrize(
    ("window", "step", "buffer", "wavelet", "max_level", "shape"),
    [
        (100, 5, 500, "db6", 5, (1, 6, 10, 10)),  # keep = 105: still one window
        (100, 20, 500, "db6", 5, (1, 6, 10, 10)),
        (64, 8, 200, "db4", 3, (1, 6, 8, 8)),
        (16, 4, 64, "haar", 5, (1, 6, 4, 4)),
    ],
)
def test_non_default_window_and_step(
    *, window: int, step: int, buffer: int, wavelet: str, max_level: int, shape: tuple[int, ...]
) -> None:
    params = dataclasses.replace(
        DEFAULT, window=window, step=step, buffer=buffer, wavelet=wavelet, max_level=max_level
    )
    assert params.keep == window + step
    assert params.n_windows == len(range(0, params.keep - window, step)) == shape[0]
    raw = turbine_buffers(np.random.default_rng(window + step), 3, n=buffer)
    got = prepare_windows(raw, params)
    assert got.shape == (3, *shape)
    np.testing.assert_allclose(got, ref_windows(raw, params), rtol=0, atol=TOL)


def test_windows_from_features_equal_prepare_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = turbine_buffers(np.random.default_rng(10), 3)
    feats = features.raw_to_features(raw)
    want = prepare_windows(raw, DEFAULT)
    np.testing.assert_allclose(features.windows_from_features(feats, DEFAULT), want, atol=1e-6)
    np.testing.assert_allclose(
        features.windows_from_features(feats[0], DEFAULT), want[0], atol=1e-6
    )
    monkeypatch.setattr(features, "_MAX_PLAN_SAMPLES", 300)
    np.testing.assert_allclose(features.windows_from_features(feats, DEFAULT), want, atol=TOL)
    with pytest.raises(InputShapeError, match="columns"):
        features.windows_from_features(raw, DEFAULT)


def test_denoise_matches_reference() -> None:
    raw = turbine_buffers(np.random.default_rng(11), 2, n=333)
    feats = features.raw_to_features(raw)
    got = features.denoise(feats, DEFAULT)
    assert got.shape == feats.shape
    for t in range(2):
        for i in range(6):
            want = ref.wavelet_denoise(feats[t, :, i], "db6", DEFAULT.raw_std[i], 5)
            np.testing.assert_allclose(got[t, :, i], want, rtol=0, atol=1e-9)


def test_bad_inputs() -> None:
    with pytest.raises(InputShapeError, match="at least 110"):
        prepare_windows(np.zeros((109, 7)), DEFAULT)
    with pytest.raises(InputShapeError, match="columns"):
        prepare_windows(np.zeros((500, 6)), DEFAULT)
    with pytest.raises(InputShapeError):
        prepare_windows(np.zeros((2, 2, 500, 7)), DEFAULT)
    assert prepare_windows(np.zeros((0, 500, 7)), DEFAULT).shape == (0, 1, 6, 10, 10)


def test_float32_input_and_turbine_isolation() -> None:
    raw = turbine_buffers(np.random.default_rng(12), 3)
    poisoned = raw.copy()
    poisoned[1, 250, 6] = np.nan
    got = prepare_windows(poisoned.astype(np.float32), DEFAULT)
    want = ref_windows(raw.astype(np.float32).astype(np.float64), DEFAULT)
    np.testing.assert_allclose(got[[0, 2]], want[[0, 2]], rtol=0, atol=TOL)
    assert np.isnan(got[1]).any()


def _raw_strategy() -> st.SearchStrategy[NDArray[np.float64]]:
    bounds = [(-1.5, 1.5)] * 4 + [(0.0, 10.0), (0.0, 10.0), (0.0, 150.0)]

    @st.composite
    def build(draw: st.DrawFn) -> NDArray[np.float64]:
        turbines = draw(st.integers(1, 3))
        n = draw(st.integers(DEFAULT.keep, 520))
        columns = [
            draw(hnp.arrays(np.float64, (turbines, n), elements=st.floats(lo, hi, allow_nan=False)))
            for lo, hi in bounds
        ]
        return np.stack(columns, axis=-1)

    return build()


@settings(max_examples=20, deadline=None)
@given(_raw_strategy())
def test_hypothesis_inputs_match_reference(raw: NDArray[np.float64]) -> None:
    np.testing.assert_allclose(
        prepare_windows(raw, DEFAULT), ref_windows(raw, DEFAULT), rtol=0, atol=TOL
    )


def test_feature_means() -> None:
    raw = turbine_buffers(np.random.default_rng(13), 2)
    got = feature_means(raw, DEFAULT)
    assert got.shape == (2, 6)
    for t in range(2):
        want = ref.raw_to_features(raw[t][-DEFAULT.window :]).mean(axis=0)
        np.testing.assert_allclose(got[t], want, rtol=0, atol=1e-12)
    np.testing.assert_allclose(
        feature_means(raw[0], DEFAULT, samples=1),
        ref.raw_to_features(raw[0][-1:])[0],
        rtol=0,
        atol=1e-12,
    )
    assert feature_means(raw[0], DEFAULT).shape == (6,)


def test_means_of_features_matches_feature_means() -> None:
    raw = turbine_buffers(np.random.default_rng(15), 2)
    feats = features.raw_to_features(raw)
    np.testing.assert_allclose(
        means_of_features(feats, DEFAULT), feature_means(raw, DEFAULT), rtol=0, atol=1e-12
    )
    stored = means_of_features(feats.astype(np.float32), DEFAULT, samples=7)
    np.testing.assert_allclose(stored, feature_means(raw, DEFAULT, samples=7), rtol=1e-6)
    assert means_of_features(feats[0], DEFAULT).shape == (6,)
    with pytest.raises(InputShapeError):
        means_of_features(raw, DEFAULT)


# ------------------------------------------------------------------ what the buffers store


def _through_buffers(raw: NDArray[np.float64], *, one_by_one: bool) -> NDArray[np.float32]:
    """Raw buffers (T, n, 7) -> TurbineBuffers (float32 features) -> model input."""
    turbines, n, _ = raw.shape
    buffers = TurbineBuffers(max_turbines=turbines, capacity=n, gap_reset_s=1e9)
    for t in range(turbines):
        slot = buffers.add(f"t{t}")
        assert slot is not None
        if one_by_one:
            for row in raw[t].tolist():
                buffers.append(slot, row, arrival=1.0)
        else:
            buffers.extend(slot, raw[t].tolist(), arrival=1.0)
    gathered = buffers.gather(np.arange(turbines), n)
    assert gathered.features.dtype == np.float32
    return windows_from_features(gathered.features, DEFAULT)


def test_stored_samples_keep_the_reference_accuracy() -> None:
    raw = turbine_buffers(np.random.default_rng(16), 4)
    want = ref_windows(raw, DEFAULT)
    for one_by_one in (False, True):
        got = _through_buffers(raw, one_by_one=one_by_one)
        np.testing.assert_allclose(got, want, rtol=0, atol=TOL)


def test_stored_samples_keep_the_accuracy_where_pitch_is_ill_conditioned() -> None:
    # Orientations near +-90 degrees of pitch (asin argument near +-1): rounding the
    # quaternion to float32 before the conversion would move the windows by more
    # than TOL; the buffers convert in float64 and round the angles.
    rng = np.random.default_rng(17)
    raw = turbine_buffers(rng, 3)
    n = raw.shape[1]
    pitch = np.pi / 2 - np.array([1e-4, 3e-3, 2e-2])[:, None] * rng.random((3, n))
    roll = 0.3 + 1e-3 * rng.standard_normal((3, n))
    yaw = 1.0 + 1e-3 * rng.standard_normal((3, n))
    raw[..., :4] = euler_to_quaternion(roll, pitch, yaw)
    got = _through_buffers(raw, one_by_one=False)
    np.testing.assert_allclose(got, ref_windows(raw, DEFAULT), rtol=0, atol=TOL)


@settings(max_examples=20, deadline=None)
@given(_raw_strategy())
def test_hypothesis_stored_samples_match_reference(raw: NDArray[np.float64]) -> None:
    got = _through_buffers(raw, one_by_one=False)
    np.testing.assert_allclose(got, ref_windows(raw, DEFAULT), rtol=0, atol=TOL)


# ----------------------------------------------------------------------------- step 6


def test_scores_match_reference_single_and_batch() -> None:
    rng = np.random.default_rng(14)
    windows = rng.standard_normal((4, 3, 6, 10, 10)).astype(np.float32)
    recon = windows + rng.normal(0, 1.2, windows.shape).astype(np.float32)
    batch = score(windows, recon, DEFAULT)
    assert batch.scores.shape == batch.flags.shape == (4, 6)
    for t in range(4):
        want_scores, want_flags = ref.score(windows[t], recon[t], DEFAULT.thresholds)
        np.testing.assert_allclose(batch.scores[t], want_scores, rtol=0, atol=1e-9)
        assert batch.flags[t].tolist() == want_flags
        assert batch.anomalies(t) == ref.fault_groups(want_flags)
        single = score(windows[t], recon[t], DEFAULT)
        np.testing.assert_allclose(single.scores, want_scores, rtol=0, atol=1e-9)
        assert single.anomalies() == ref.fault_groups(want_flags)
    assert set(batch.groups) == {"vibration", "rotation", "voltage"}
    assert batch.groups["rotation"].shape == (4,)


def test_pipeline_scores_match_reference() -> None:
    raw = turbine_buffers(np.random.default_rng(15), 3)
    windows = prepare_windows(raw, DEFAULT)
    recon = (windows * 0.5).astype(np.float32)
    got = score(windows, recon, DEFAULT)
    for t in range(3):
        want_windows = ref_windows(raw[t], DEFAULT)
        want, _ = ref.score(
            want_windows, (want_windows * 0.5).astype(np.float32), DEFAULT.thresholds
        )
        np.testing.assert_allclose(got.scores[t], want, rtol=0, atol=TOL)


@pytest.mark.parametrize(
    ("feature", "group"),
    [
        (0, "vibration"),
        (1, "vibration"),
        (2, "vibration"),
        (3, "rotation"),
        (4, "rotation"),
        (5, "voltage"),
    ],
)
def test_fault_groups(feature: int, group: str) -> None:
    # The original workshop mapped features 3-4 to "voltage" and 5 to "rotation".
    windows = np.zeros((1, 6, 10, 10), dtype=np.float32)
    recon = windows.copy()
    recon[:, feature] = 2.0
    verdict = score(windows, recon, DEFAULT)
    assert verdict.scores[feature] == pytest.approx(2.0)
    assert verdict.flags.tolist() == [i == feature for i in range(6)]
    assert verdict.anomalies() == {
        name: name == group for name in ("vibration", "rotation", "voltage")
    }


def test_score_boundary_is_strict() -> None:
    params = dataclasses.replace(DEFAULT, thresholds=(0.5,) * 6)  # exact in binary
    windows = np.zeros((2, 6, 10, 10))
    assert not score(windows, windows + 0.5, params).flags.any()
    assert score(windows, windows + np.nextafter(0.5, 1.0), params).flags.all()


def test_score_shape_errors() -> None:
    windows = np.zeros((1, 6, 10, 10))
    with pytest.raises(InputShapeError, match="same shape"):
        score(windows, np.zeros((2, 6, 10, 10)), DEFAULT)
    with pytest.raises(InputShapeError):
        score(np.zeros((1, 5, 10, 10)), np.zeros((1, 5, 10, 10)), DEFAULT)
    with pytest.raises(InputShapeError):
        score(np.zeros((0, 6, 10, 10)), np.zeros((0, 6, 10, 10)), DEFAULT)
    batch = score(np.zeros((2, 1, 6, 10, 10)), np.zeros((2, 1, 6, 10, 10)), DEFAULT)
    with pytest.raises(ValueError, match="turbine index"):
        batch.anomalies()
