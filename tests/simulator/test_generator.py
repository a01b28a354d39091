"""The farm generator: calibration against the seed statistics, determinism, faults.

Fault effects are measured against a twin generator with the same seed and no
fault: both draw exactly the same random numbers, so the difference between
their streams is the fault's effect and nothing else.
"""

from __future__ import annotations

import numpy as np
import pytest

from edgeapp.features import PreprocessingParams, raw_to_features
from simulator.generator import (
    AMP_1P,
    NOMINAL_RPS,
    RAW_FIELDS,
    VIB_NOISE,
    FarmGenerator,
    Fault,
    FaultError,
    FaultKind,
)

RATE = 20


def features(gen: FarmGenerator, seconds: float) -> np.ndarray:
    """``(N, n, 6)`` features (the app's own quaternion conversion)."""
    return raw_to_features(gen.step(int(seconds * RATE)).raw())


def twins(n: int = 6, seed: int = 11, warm_s: float = 30.0) -> tuple[FarmGenerator, FarmGenerator]:
    a, b = FarmGenerator(n, seed=seed), FarmGenerator(n, seed=seed)
    a.step(int(warm_s * RATE))
    b.step(int(warm_s * RATE))
    return a, b


# ---- item 1: calibration ---------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 5])
def test_a_long_normal_run_matches_the_seed_statistics(seed: int) -> None:
    seed_stats = PreprocessingParams.default()
    feats = features(FarmGenerator(40, seed=seed), 600).reshape(-1, 6)  # 40 turbines x 10 min
    mean, std = feats.mean(axis=0), feats.std(axis=0)
    for i, name in enumerate(seed_stats.features):
        if name == "yaw":
            assert abs(mean[i] - seed_stats.mean[i]) <= 0.25, (name, mean[i])
        else:
            assert abs(mean[i] / seed_stats.mean[i] - 1) <= 0.25, (name, mean[i])
        assert abs(std[i] / seed_stats.raw_std[i] - 1) <= 0.25, (name, std[i])
    assert np.corrcoef(feats[:, 4], feats[:, 5])[0, 1] > 0.9


def test_quaternions_are_unit_and_yaw_never_wraps() -> None:
    batch = FarmGenerator(30, seed=2).step(20 * 120)
    norm = np.sqrt(batch.qx**2 + batch.qy**2 + batch.qz**2 + batch.qw**2)
    np.testing.assert_allclose(norm, 1.0, atol=1e-12)
    yaw = raw_to_features(batch.raw())[..., 2]
    assert np.abs(yaw).max() < np.pi - 0.02
    assert np.abs(np.diff(yaw, axis=1)).max() < 0.1  # no jump from +pi to -pi


def test_rotor_follows_wind_through_the_power_curve() -> None:
    gen = FarmGenerator(3, seed=4)
    gen.regime.mean_wind[:] = [0.6, 2.2, 6.0]  # below cut-in, operating, above cut-out
    gen.step(20 * 60)
    feats = features(gen, 60)
    rps = feats[..., 4].mean(axis=1)
    volts = feats[..., 5].mean(axis=1)
    assert rps[0] < 0.1 and volts[0] < 5  # below cut-in: still
    assert 1.0 < rps[1] < 2.5 and volts[1] > 20
    assert rps[2] < 0.1 and volts[2] < 5  # above cut-out: braked and parked
    wind = features(FarmGenerator(1, seed=4), 300)[0, :, 3]
    rotor = features(FarmGenerator(1, seed=4), 300)[0, :, 4]
    assert np.corrcoef(wind, rotor)[0, 1] > 0.8


# ---- determinism and the API -----------------------------------------------------------
def test_the_same_seed_gives_the_same_streams_whatever_the_batch_sizes() -> None:
    one = FarmGenerator(5, seed=9).step(3000)
    gen = FarmGenerator(5, seed=9)
    parts = [gen.step(n) for n in (1, 999, 7, 1993)]
    for name in RAW_FIELDS:
        joined = np.concatenate([p.field(name) for p in parts], axis=1)
        np.testing.assert_allclose(joined, one.field(name), rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(np.concatenate([p.ts_ms for p in parts]), one.ts_ms)
    other = FarmGenerator(5, seed=10).step(3000)
    assert not np.allclose(other.rps, one.rps)


def test_batches_have_the_documented_shapes_and_times() -> None:
    gen = FarmGenerator(4, seed=1, rate_hz=10.0, start_ms=1_700_000_000_000)
    gen.step(5)
    batch = gen.step(3)
    assert batch.n_turbines == 4 and batch.n_samples == 3
    for name in RAW_FIELDS:
        assert batch.field(name).shape == (4, 3)
    assert batch.raw().shape == (4, 3, 7)
    np.testing.assert_array_equal(batch.raw()[..., 5], batch.rps)
    np.testing.assert_allclose(batch.t, [0.5, 0.6, 0.7])
    assert batch.ts_ms.tolist() == [1_700_000_000_500, 1_700_000_000_600, 1_700_000_000_700]
    assert gen.t == pytest.approx(0.8)


def test_sites_differ_from_turbine_to_turbine() -> None:
    gen = FarmGenerator(50, seed=3)
    assert np.ptp(gen.regime.mean_wind) > 0.3
    assert np.ptp(gen.regime.prevailing_dir) > 4.0
    again = FarmGenerator(50, seed=3)
    np.testing.assert_array_equal(gen.regime.mean_wind, again.regime.mean_wind)


# ---- item 2: faults --------------------------------------------------------------------
def test_rotor_imbalance_multiplies_the_1p_vibration() -> None:
    normal, faulty = twins()
    faulty.set_fault(2, Fault(FaultKind.ROTOR_IMBALANCE, intensity=3.0))
    a, b = features(normal, 30), features(faulty, 30)
    # the extra 1P component: (3 - 1) x normal, in roll (sin) and pitch (cos)
    extra = np.hypot(b[2, :, 0] - a[2, :, 0], b[2, :, 1] - a[2, :, 1]) / 2.0
    expected = normal.regime.amp_1p[2] * a[2, :, 4] / NOMINAL_RPS
    moving = a[2, :, 4] > 0.5
    ratio = np.median(extra[moving] / expected[moving])
    assert ratio == pytest.approx(1.0, abs=0.05)
    np.testing.assert_array_equal(np.delete(a, 2, axis=0), np.delete(b, 2, axis=0))
    assert 0.5 * AMP_1P < normal.regime.amp_1p[2] < 1.5 * AMP_1P


@pytest.mark.parametrize("intensity", [2.0, 4.0])
def test_bearing_wear_multiplies_the_broadband_noise(intensity: float) -> None:
    normal, faulty = twins()
    faulty.set_fault(0, Fault(FaultKind.BEARING_WEAR, intensity=intensity))
    a, b = features(normal, 60), features(faulty, 60)
    for axis in (0, 1):
        extra = np.std(b[0, :, axis] - a[0, :, axis])
        assert extra == pytest.approx(VIB_NOISE * (intensity - 1), rel=0.05)


def test_bearing_wear_can_rise_over_a_ramp() -> None:
    normal, faulty = twins()
    faulty.set_fault(0, Fault(FaultKind.BEARING_WEAR, intensity=3.0, ramp_s=20.0))
    diff = features(faulty, 40)[0, :, 0] - features(normal, 40)[0, :, 0]
    early, late = np.std(diff[: 5 * RATE]), np.std(diff[-10 * RATE :])
    assert early < 0.4 * VIB_NOISE
    assert late == pytest.approx(2.0 * VIB_NOISE, rel=0.1)


def test_generator_degradation_lowers_voltage_by_the_fraction() -> None:
    normal, faulty = twins()
    faulty.set_fault([1, 3], Fault(FaultKind.GENERATOR_DEGRADATION, intensity=0.15))
    a, b = features(normal, 30), features(faulty, 30)
    for i in (1, 3):
        ok = a[i, :, 5] > 20
        assert np.median(1 - b[i, ok, 5] / a[i, ok, 5]) == pytest.approx(0.15, abs=0.01)
        np.testing.assert_array_equal(a[i, :, 4], b[i, :, 4])  # rotor speed unchanged


def test_brake_drag_slows_the_rotor_below_what_the_wind_implies() -> None:
    normal, faulty = twins()
    faulty.set_fault(4, Fault(FaultKind.BRAKE_DRAG, intensity=0.2))
    a, b = features(normal, 40), features(faulty, 40)
    settled = slice(10 * RATE, None)  # the rotor's inertia takes a few seconds
    ok = a[4, settled, 4] > 0.5
    ratio = b[4, settled, 4][ok] / a[4, settled, 4][ok]
    assert np.median(ratio) == pytest.approx(0.8, abs=0.02)
    np.testing.assert_array_equal(a[4, :, 3], b[4, :, 3])  # same wind


@pytest.mark.parametrize("field", ["voltage", "rps", "wind_speed_rps", "quaternion"])
def test_a_stuck_sensor_flat_lines_one_field_until_cleared(field: str) -> None:
    normal, faulty = twins()
    faulty.set_fault(5, Fault(FaultKind.STUCK_SENSOR, field=field))
    a, b = normal.step(200), faulty.step(200)
    names = ("qx", "qy", "qz", "qw") if field == "quaternion" else (field,)
    for name in RAW_FIELDS:
        if name in names:
            assert np.ptp(b.field(name)[5]) == 0
            assert b.field(name)[5, 0] == a.field(name)[5, 0]  # held at its value at onset
        else:
            np.testing.assert_array_equal(a.field(name)[5], b.field(name)[5])
    faulty.clear_fault(5, FaultKind.STUCK_SENSOR)
    normal.step(1)
    assert np.ptp(faulty.step(200).field(names[0])[5]) > 0


def test_gross_faults_push_values_far_outside_their_range() -> None:
    normal, faulty = twins()
    faulty.set_fault(0, Fault(FaultKind.VIBRATION))
    faulty.set_fault(1, Fault(FaultKind.ROTATION))
    faulty.set_fault(2, Fault(FaultKind.VOLTAGE))
    a, b = features(normal, 10), features(faulty, 10)
    stats = PreprocessingParams.default()
    assert np.mean(np.abs(b[0, :, 0] - stats.mean[0]) > 10 * stats.raw_std[0]) > 0.5
    assert np.mean(np.abs(b[1, :, 4] - a[1, :, 4]) > 2.0) > 0.5
    assert b[1, :, 4].min() >= 0 and b[1, :, 4].max() <= 10.0
    assert np.mean(np.abs(b[2, :, 5] - a[2, :, 5]) > 60) > 0.5
    np.testing.assert_array_equal(a[3:], b[3:])


def test_clearing_a_fault_restores_the_normal_stream_and_bits_mark_it() -> None:
    normal, faulty = twins()
    faulty.set_fault(0, Fault(FaultKind.VOLTAGE, intensity=2.0))
    faulty.set_fault(0, Fault(FaultKind.GENERATOR_DEGRADATION))
    during = faulty.step(40)
    normal.step(40)
    bits = during.fault_bits[0]
    assert np.all(bits == (1 << FaultKind.VOLTAGE.bit) | (1 << FaultKind.GENERATOR_DEGRADATION.bit))
    assert np.all(during.fault_bits[1:] == 0)
    assert {f.kind for f in faulty.faults(0)} == {
        FaultKind.VOLTAGE,
        FaultKind.GENERATOR_DEGRADATION,
    }
    faulty.clear_fault(0)
    assert faulty.faults(0) == []
    after_a, after_b = normal.step(40), faulty.step(40)
    np.testing.assert_array_equal(after_a.raw(), after_b.raw())
    assert np.all(after_b.fault_bits == 0)


def test_a_stopped_turbine_brakes_to_a_standstill_and_restarts() -> None:
    gen = FarmGenerator(2, seed=8)
    gen.regime.mean_wind[:] = 2.3
    gen.step(20 * 20)
    gen.set_running(0, False)
    assert gen.running.tolist() == [False, True]
    feats = features(gen, 10)
    assert feats[0, -RATE:, 4].max() < 0.05 and feats[0, -RATE:, 5].max() < 5
    assert feats[1, -RATE:, 4].mean() > 1.0
    gen.set_running(0, True)
    assert features(gen, 10)[0, -RATE:, 4].mean() > 1.0


def test_default_intensities_are_the_evaluation_intensities() -> None:
    assert Fault(FaultKind.ROTOR_IMBALANCE).intensity == 3.0
    assert Fault(FaultKind.BEARING_WEAR).intensity == 2.0
    assert Fault(FaultKind.GENERATOR_DEGRADATION).intensity == 0.15
    assert Fault(FaultKind.BRAKE_DRAG).intensity == 0.20


@pytest.mark.parametrize(
    "make",
    [
        lambda: Fault(FaultKind.BEARING_WEAR, intensity=-1.0),
        lambda: Fault(FaultKind.BEARING_WEAR, intensity=float("inf")),
        lambda: Fault(FaultKind.BRAKE_DRAG, intensity=1.5),
        lambda: Fault(FaultKind.STUCK_SENSOR, field="temperature"),
        lambda: Fault(FaultKind.ROTATION, ramp_s=-2.0),
        lambda: FarmGenerator(0),
        lambda: FarmGenerator(3, rate_hz=0.0),
        lambda: FarmGenerator(3).step(0),
        lambda: FarmGenerator(3).set_fault(3, Fault(FaultKind.VOLTAGE)),
        lambda: FarmGenerator(3).clear_fault(-1),
    ],
)
def test_bad_arguments_are_clear_errors(make: object) -> None:
    with pytest.raises(FaultError):
        make()  # type: ignore[operator]
