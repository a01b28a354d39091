"""The flat-line check: a reading repeated exactly for N samples is a stuck sensor."""

from __future__ import annotations

import numpy as np
import pytest
from edgeapp_harness import check_update
from numpy.typing import NDArray

from edgeapp.features import FEATURES
from edgeapp.settings import AppSettings
from edgeapp.stuck import StuckSensors

N = 110  # the detector's window: the newest 110 samples
STEP = 10  # samples between looks (a tick at 2 Hz, 20 Hz sensors)
VOLTAGE = FEATURES.index("voltage")
ROLL = FEATURES.index("roll")
RPS = FEATURES.index("rps")


def stream(length: int, seed: int) -> NDArray[np.float32]:
    """Live readings: every feature moves from sample to sample."""
    rng = np.random.default_rng(seed)
    return (1.0 + rng.standard_normal((length, len(FEATURES)))).astype(np.float32)


def looks(
    check: StuckSensors, streams: list[NDArray[np.float32]], start: int, end: int
) -> list[NDArray[np.bool_]]:
    """Look every STEP samples from ``start`` to ``end`` (counts), as the detector does."""
    slots = np.arange(len(streams), dtype=np.intp)
    out = []
    for count in range(start, end + 1, STEP):
        features = np.stack([s[count - N : count] for s in streams])
        counts = np.full(len(streams), count, dtype=np.int64)
        ids = [f"t{i}" for i in range(len(streams))]
        out.append(check_update(check, slots, ids, counts, features))
    return out


def test_a_reading_held_for_the_limit_is_flagged_then_and_not_before() -> None:
    live, frozen = stream(1000, 1), stream(1000, 2)
    frozen[400:, VOLTAGE] = frozen[400, VOLTAGE]  # held from sample 400 on
    check = StuckSensors(max_turbines=2, after=200)
    seen = looks(check, [live, frozen], start=N, end=1000)
    counts = list(range(N, 1001, STEP))
    flagged = [c for c, s in zip(counts, seen, strict=True) if s[1, VOLTAGE]]
    # samples 400..count-1 equal: 200 of them at count 600 (followed across looks:
    # the window holds only 110)
    assert flagged == [c for c in counts if c >= 600]
    assert not any(s[0].any() for s in seen)  # the live turbine: nothing
    assert not any(s[1, [f for f in range(len(FEATURES)) if f != VOLTAGE]].any() for s in seen)


def test_a_change_in_the_last_bit_is_a_live_sensor() -> None:
    almost = stream(700, 3)
    held = np.float32(48.25)
    almost[100:, VOLTAGE] = held
    almost[450, VOLTAGE] = np.nextafter(held, np.float32(np.inf))  # one ulp, once
    check = StuckSensors(max_turbines=1, after=200)
    seen = looks(check, [almost], start=N, end=700)
    counts = list(range(N, 701, STEP))
    flagged = [c for c, s in zip(counts, seen, strict=True) if s[0, VOLTAGE]]
    # held 100..449 (flagged from 300 on), then the run starts again at 451
    assert flagged == [c for c in counts if 300 <= c <= 450 or c >= 651]


def test_zero_at_rest_is_not_stuck_but_a_zero_angle_is() -> None:
    parked = stream(600, 4)
    parked[:, [FEATURES.index("wind_speed_rps"), RPS, VOLTAGE]] = 0.0  # calm, parked, idle
    parked[:, ROLL] = 0.0  # an IMU does not read exactly 0 for 10 s
    check = StuckSensors(max_turbines=1, after=200)
    last = looks(check, [parked], start=N, end=600)[-1][0]
    assert [FEATURES[f] for f in np.flatnonzero(last)] == ["roll"]


def test_a_restarted_buffer_or_a_long_gap_starts_the_count_again() -> None:
    held = stream(2000, 5)
    held[:, RPS] = 1.5
    check = StuckSensors(max_turbines=1, after=200)
    slot = np.zeros(1, dtype=np.intp)

    def look(count: int) -> bool:
        features = held[None, count - N : count]
        return bool(check_update(check, slot, ["t"], np.array([count], np.int64), features)[0, RPS])

    assert not look(110) and not look(190)  # 110, then 190 held
    assert look(200)
    # the buffer started over (count lower than last time): only the window counts
    assert not look(150)
    # more samples than the window arrived since the last look: unseen ones do not count
    assert not look(150 + N + 50)
    for count in range(150 + N + 60, 150 + N + 50 + 90, STEP):
        assert not look(count)
    assert look(150 + N + 50 + 90)  # 110 + 90 = 200 held since the gap


@pytest.mark.parametrize("after", [0, 1])
def test_the_setting_refuses_a_one_sample_line(after: int) -> None:
    if after == 0:
        assert AppSettings(stuck_after_samples=0).stuck_after_samples == 0  # off
        with pytest.raises(ValueError, match="at least 2"):
            StuckSensors(max_turbines=1, after=0)
    else:
        with pytest.raises(ValueError, match="at least 2 samples"):
            AppSettings(stuck_after_samples=after)


def test_a_slot_given_to_another_turbine_starts_the_count_again() -> None:
    frozen = stream(1000, 6)
    frozen[:, RPS] = 1.5
    check = StuckSensors(max_turbines=1, after=200)
    slot = np.zeros(1, dtype=np.intp)

    def look(turbine: str, count: int) -> bool:
        features = frozen[None, count - N : count]
        return bool(
            check_update(check, slot, [turbine], np.array([count], np.int64), features)[0, RPS]
        )

    assert not look("a", 110) and not look("a", 190)  # 190 held by turbine a
    # the slot goes to turbine b, 10 samples on: b's run starts with its window (110),
    # not at a's 190 + 10 = 200
    flagged = [c for c in range(200, 400, 10) if look("b", c)]
    assert flagged[0] == 290  # 110 at 200, 200 at 290
