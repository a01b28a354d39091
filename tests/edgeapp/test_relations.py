"""The relation check: each turbine's own line is learned, then a departure from it flagged."""

from __future__ import annotations

import numpy as np
import pytest
from edgeapp_harness import check_update
from numpy.typing import NDArray

from edgeapp.checks import SlotOwners
from edgeapp.features import FEATURES
from edgeapp.relations import PERSIST, Relations
from edgeapp.settings import AppSettings

N = 500  # the detector's window
STEP = 10  # samples between looks
LEARN = 2000
RPS, VOLTAGE, WIND = (FEATURES.index(f) for f in ("rps", "voltage", "wind_speed_rps"))


def turbine(length: int, gain: float, seed: int) -> NDArray[np.float32]:
    """Rotor speed wandering over minutes, voltage ``gain`` mV per rps above 0.5, wind behind."""
    rng = np.random.default_rng(seed)
    t = np.arange(length) / 20.0
    f = np.zeros((length, len(FEATURES)))
    f[:, RPS] = 1.6 + 0.5 * np.sin(2 * np.pi * t / 60.0 + seed) + 0.02 * rng.standard_normal(length)
    f[:, VOLTAGE] = gain * (f[:, RPS] - 0.5) + 1.5 * rng.standard_normal(length)
    f[:, WIND] = 1.14 + f[:, RPS] / 1.62 + 0.03 * rng.standard_normal(length)
    f[:, :3] = 0.01 * rng.standard_normal((length, 3))
    return f.astype(np.float32)


def look_all(
    check: Relations, streams: list[NDArray[np.float32]], ids: list[str], start: int, end: int
) -> tuple[list[int], NDArray[np.bool_]]:
    slots = np.arange(len(streams), dtype=np.intp)
    counts, flags = [], []
    for count in range(start, end + 1, STEP):
        window = np.stack([s[count - N : count] for s in streams])
        flags.append(
            check_update(check, slots, ids, np.full(len(streams), count, np.int64), window)
        )
        counts.append(count)
    return counts, np.stack(flags, axis=1)  # (T, looks, 6)


def test_each_turbine_is_held_to_its_own_line() -> None:
    # two healthy generators 15% apart: a fleet-wide line would flag one of them
    weak_from = 8000
    streams = [turbine(10_000, 40.0, 1), turbine(10_000, 46.0, 2), turbine(10_000, 46.0, 3)]
    streams[2][weak_from:, VOLTAGE] *= 0.85  # the third one's generator weakens by 15%
    check = Relations(3, learn=LEARN, tolerances=(0.05, 0.08))
    counts, flags = look_all(check, streams, ["a", "b", "c"], N, 10_000)
    assert not flags[:2].any()  # healthy, different constants: never flagged
    assert not flags[2, :, [f for f in range(len(FEATURES)) if f != VOLTAGE]].any()
    voltage = flags[2, :, VOLTAGE]
    first = counts[int(np.argmax(voltage))]
    assert voltage.any() and weak_from < first <= weak_from + 400 + PERSIST * STEP
    assert voltage[counts.index(first) :].all()  # and it stays flagged
    assert check.learned(np.arange(3, dtype=np.intp)).all()


def test_nothing_is_said_while_learning_or_outside_the_learned_range() -> None:
    stream = turbine(6000, 42.0, 4)
    stream[:, RPS] = 1.6 + 0.01 * np.sin(np.arange(6000) / 50.0)  # a narrow range to learn
    stream[:, VOLTAGE] = 42.0 * (stream[:, RPS] - 0.5)
    stream[4000:, RPS] = 2.5  # far outside it, voltage way off the line
    stream[4000:, VOLTAGE] = 5.0
    check = Relations(1, learn=LEARN, tolerances=(0.05, 0.08))
    counts, flags = look_all(check, [stream], ["a"], N, 6000)
    learning = np.array(counts) < N + LEARN - STEP
    assert not flags[0, learning].any()
    assert not flags[0, :, VOLTAGE].any()  # 2.5 rps was never learned: no verdict


def test_a_slot_given_to_another_turbine_learns_again() -> None:
    first, second = turbine(4000, 40.0, 5), turbine(4000, 30.0, 6)
    check = Relations(1, learn=LEARN, tolerances=(0.05, 0.08))
    look_all(check, [first], ["a"], N, 4000)
    assert check.learned(np.zeros(1, dtype=np.intp)).all()
    # another turbine, 25% weaker by the first one's line, takes the slot: it learns its own
    _, flags = look_all(check, [second], ["b"], N, 4000)
    assert not flags.any()
    assert check.learned(np.zeros(1, dtype=np.intp)).all()


@pytest.mark.parametrize("tolerance", [0.0, 1.0])
def test_settings_refuse_a_meaningless_tolerance(tolerance: float) -> None:
    with pytest.raises(ValueError, match="generator_tolerance"):
        AppSettings(generator_tolerance=tolerance)
    with pytest.raises(ValueError, match="power_curve_tolerance"):
        AppSettings(power_curve_tolerance=tolerance)
    assert AppSettings(relation_learn_samples=0).relation_learn_samples == 0  # off


def test_slid_window_sums_equal_the_window_summed_in_full() -> None:
    # turbines arriving at their own pace: a tick's 10, none, a burst, a gap beyond the
    # gathered samples, a buffer that started over, a slot given to another turbine
    rng = np.random.default_rng(11)
    turbines, length = 6, 30_000
    data = (50.0 + 5.0 * rng.standard_normal((turbines, length, len(FEATURES)))).astype(np.float32)
    check = Relations(turbines, learn=LEARN, tolerances=(0.05, 0.08))
    slots = np.arange(turbines, dtype=np.intp)
    ids = [f"t{i}" for i in range(turbines)]
    owners = SlotOwners(turbines)
    counts = np.full(turbines, N, dtype=np.int64)
    for look in range(1500):
        window = np.stack([data[t, c - N : c] for t, c in enumerate(counts)])
        # as Relations.update does
        before = check._baselines.look(slots, owners.handovers(slots, ids), counts)
        sums, squares = check._window_sums(slots, counts - before, before >= 0, window)
        full = window[:, -400:].astype(np.float64)
        np.testing.assert_allclose(sums, full.sum(axis=1) * used_mask(), rtol=1e-12)
        np.testing.assert_allclose(squares, (full * full).sum(axis=1) * used_mask(), rtol=1e-12)
        step = rng.choice([0, 10, 10, 10, 37, 150], size=turbines)
        counts = np.minimum(counts + step, length)
        if look % 97 == 0:
            counts[look % turbines] = N + rng.integers(0, 50)  # its buffer started over
        if look % 131 == 0:
            ids[look % turbines] = f"new{look}"  # another turbine took the slot
        if counts.min() >= length:
            break


def used_mask() -> NDArray[np.float64]:
    mask = np.zeros(len(FEATURES))
    mask[[RPS, VOLTAGE, WIND]] = 1.0
    return mask
