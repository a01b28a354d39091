"""The noise check: each turbine's step level is learned, then scattered readings flagged."""

from __future__ import annotations

import numpy as np
import pytest
from edgeapp_harness import check_update
from numpy.typing import NDArray

from edgeapp.features import FEATURES, raw_to_features
from edgeapp.noise import NoisySensors
from edgeapp.settings import AppSettings
from simulator.generator import FarmGenerator, Fault, FaultKind

N = 120  # the samples each look sees (the detector's window is longer)
STEP = 10  # samples between looks: a tick
LEARN = 1200
RPS, VOLTAGE, WIND = (FEATURES.index(f) for f in ("rps", "voltage", "wind_speed_rps"))


class Farm:
    """The simulator's farm, looked at by the check every tick as the detector does."""

    def __init__(self, turbines: int, seed: int, check: NoisySensors) -> None:
        self.gen = FarmGenerator(n_turbines=turbines, seed=seed)
        self.check = check
        self.ids = [f"t{i}" for i in range(turbines)]
        self.slots = np.arange(turbines, dtype=np.intp)
        self.features = raw_to_features(self.gen.step(N).raw()).astype(np.float32)

    def look(self) -> NDArray[np.bool_]:
        new = raw_to_features(self.gen.step(STEP).raw()).astype(np.float32)
        self.features = np.concatenate([self.features[:, STEP:], new], axis=1)
        counts = np.full(len(self.ids), int(self.gen.t * 20 + 0.5), dtype=np.int64)
        return check_update(self.check, self.slots, self.ids, counts, self.features)

    def run(self, seconds: float) -> NDArray[np.bool_]:
        """``(T, looks, 6)`` over ``seconds``."""
        return np.stack([self.look() for _ in range(round(seconds * 2))], axis=1)


def test_rotors_braking_and_starting_pass_and_scatter_is_flagged_at_the_first_look() -> None:
    check = NoisySensors(20, learn=LEARN, limit=12.0)
    farm = Farm(20, seed=31, check=check)
    learning = farm.run(LEARN / 20)
    assert not learning.any()
    assert check.learned(farm.slots).all()
    normal = [farm.run(30)]
    farm.gen.set_running(range(10, 20), False)  # brake to a stop, then start again
    normal.append(farm.run(30))
    farm.gen.set_running(range(10, 20), True)
    normal.append(farm.run(30))
    assert not np.concatenate(normal, axis=1).any()

    farm.gen.set_fault(range(0, 5), Fault(FaultKind.VOLTAGE))
    farm.gen.set_fault(range(5, 10), Fault(FaultKind.ROTATION))
    first = farm.look()  # the tick holding the fault's first 10 samples
    assert first[0:5, VOLTAGE].all() and first[5:10, RPS].all()
    expected = np.zeros_like(first)
    expected[0:5, VOLTAGE] = expected[5:10, RPS] = True
    np.testing.assert_array_equal(first, expected)  # the faulty reading only
    later = farm.run(5)
    assert later[0:5, :, VOLTAGE].all() and later[5:10, :, RPS].all()
    assert not later[10:].any()

    farm.gen.clear_fault(range(10))  # repaired: quiet again
    farm.run(1)
    assert not farm.run(10).any()


def stream(length: int, noise: float, seed: int) -> NDArray[np.float32]:
    rng = np.random.default_rng(seed)
    f = np.zeros((length, len(FEATURES)), dtype=np.float32)
    f[:, [WIND, RPS, VOLTAGE]] = (10.0, 1.6, 50.0) + noise * rng.standard_normal((length, 3))
    return f


def look_along(
    check: NoisySensors, data: NDArray[np.float32], turbine: str, start: int, end: int
) -> NDArray[np.bool_]:
    slots = np.zeros(1, dtype=np.intp)
    flags = [
        check_update(
            check, slots, [turbine], np.array([count], np.int64), data[None, count - N : count]
        )
        for count in range(start, end + 1, STEP)
    ]
    return np.stack(flags, axis=1)[0]  # (looks, 6)


def test_a_reading_at_rest_is_no_level_to_exceed() -> None:
    data = stream(6000, 0.01, 1)
    data[:3000, [WIND, RPS, VOLTAGE]] = 0.0  # a parked machine reads exactly 0 for minutes
    data[4500:, VOLTAGE] += np.random.default_rng(2).uniform(0, 300, 1500).astype(np.float32)
    check = NoisySensors(1, learn=LEARN, limit=12.0)
    flags = look_along(check, data, "a", N, 3000)
    assert not flags.any()
    assert not check.learned(np.zeros(1, dtype=np.intp)).any()  # zeros teach no level
    # it starts: its sensor noise is normal, not infinitely more than the zeros
    flags = look_along(check, data, "a", 3000 + STEP, 4500)
    assert not flags.any()
    assert check.learned(np.zeros(1, dtype=np.intp)).all()  # from the moving looks
    flags = look_along(check, data, "a", 4500 + STEP, 6000)
    assert flags[:, VOLTAGE].all() and not flags[:, [WIND, RPS]].any()


def test_a_slot_given_to_another_turbine_learns_again() -> None:
    quiet, rough = stream(4000, 0.01, 3), stream(4000, 0.6, 4)  # 60x the steps
    check = NoisySensors(1, learn=LEARN, limit=12.0)
    assert not look_along(check, quiet, "a", N, 4000).any()
    assert check.learned(np.zeros(1, dtype=np.intp)).all()
    assert not look_along(check, rough, "b", N, 4000).any()  # its own level, not a's
    # the same turbine growing 60x rougher is flagged, from its first look on
    check = NoisySensors(1, learn=LEARN, limit=12.0)
    look_along(check, quiet, "a", N, 2000)
    assert look_along(check, rough, "a", N + STEP, 4000)[:, [WIND, RPS, VOLTAGE]].all()


@pytest.mark.parametrize("limit", [0.5, 1.0, -1.0])
def test_a_limit_at_or_below_the_learned_level_is_refused(limit: float) -> None:
    with pytest.raises(ValueError, match="noise_limit"):
        AppSettings(noise_limit=limit)
    with pytest.raises(ValueError, match="limit"):
        NoisySensors(1, learn=LEARN, limit=max(limit, 0.0))


def test_the_check_is_on_by_default_and_can_be_turned_off() -> None:
    assert AppSettings().noise_limit == 12.0
    assert AppSettings(noise_limit=0).noise_limit == 0  # off
    with pytest.raises(ValueError, match="noise_learn_samples"):
        AppSettings(noise_learn_samples=0)
