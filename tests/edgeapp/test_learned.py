"""The checks' learned baselines across restarts: the file, and edge-app as a process."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from edgeapp_harness import MODEL, Listener, Received, Sensors, Stack, StartApp, check_update

from edgeapp.checks import LearningCheck
from edgeapp.features import FEATURES
from edgeapp.learned import LearnedFile
from edgeapp.noise import NoisySensors
from edgeapp.relations import Relations

RPS, VOLTAGE, WIND = (FEATURES.index(f) for f in ("rps", "voltage", "wind_speed_rps"))
N = 500


def farm(turbines: int, length: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(length) / 20.0
    f = np.zeros((turbines, length, len(FEATURES)), dtype=np.float32)
    for i in range(turbines):
        rps = 1.6 + 0.5 * np.sin(2 * np.pi * t / 60.0 + i) + 0.02 * rng.standard_normal(length)
        f[i, :, RPS] = rps
        f[i, :, VOLTAGE] = (40.0 + 2 * i) * (rps - 0.5) + 1.5 * rng.standard_normal(length)
        f[i, :, WIND] = 1.14 + rps / 1.62 + 0.03 * rng.standard_normal(length)
    return f


def run(
    checks: list[LearningCheck], data: np.ndarray, ids: list[str], start: int, end: int
) -> None:
    slots = np.arange(len(ids), dtype=np.intp)
    for count in range(start, end + 1, 10):
        counts = np.full(len(ids), count, np.int64)
        for check in checks:
            check_update(check, slots, ids, counts, data[:, count - N : count])


def new_checks(learn: int) -> list[LearningCheck]:
    return [
        Relations(8, learn=learn, tolerances=(0.05, 0.08)),
        NoisySensors(8, learn=learn, limit=12),
    ]


def test_baselines_written_read_back_and_used_at_once(tmp_path: Path) -> None:
    path = tmp_path / "state" / "learned.json"
    data = farm(3, 4000, 1)
    ids = ["wt-a", "wt-b", "wt-c"]
    checks = new_checks(learn=2000)
    stored = LearnedFile(path, checks)
    assert stored.load() == 0  # a first start
    run(checks, data, ids, N, 4000)
    assert stored.save() and not stored.save()  # unchanged: not written again
    document = json.loads(path.read_text())
    assert document["format"] == 1
    assert sorted(document["checks"]["relations"]["turbines"]) == ids
    assert sorted(document["checks"]["noise"]["turbines"]) == ids
    assert path.stat().st_mode & 0o777 == 0o640

    # a restarted daemon: turbines come back in another order, into other slots
    again = new_checks(learn=10**9)  # it would never learn again by itself
    assert LearnedFile(path, again).load() == 6
    later = farm(3, 4000, 2)[[2, 0, 1]]
    later[0, 3000:, VOLTAGE] *= 0.85  # wt-c's generator weakens
    later[1, 3000:, VOLTAGE] += np.random.default_rng(3).uniform(0, 300, 1000).astype(np.float32)
    slots = np.arange(3, dtype=np.intp)
    order = ["wt-c", "wt-a", "wt-b"]
    flagged = np.zeros((3, len(FEATURES)), dtype=bool)
    for count in range(N, 4000 + 1, 10):
        counts = np.full(3, count, np.int64)
        for check in again:
            flagged |= check_update(check, slots, order, counts, later[:, count - N : count])
    assert flagged[0, VOLTAGE] and flagged[1, VOLTAGE] and not flagged[2].any()
    relations, noise = again
    assert isinstance(relations, Relations) and isinstance(noise, NoisySensors)
    assert relations.learned(slots).all() and noise.learned(slots).all()


def test_a_turbine_keeps_its_baseline_when_its_slot_goes_to_another(tmp_path: Path) -> None:
    data = farm(2, 4000, 4)
    checks = new_checks(learn=2000)
    relations = checks[0]
    assert isinstance(relations, Relations)
    run(checks, data[:1], ["wt-a"], N, 4000)
    run(checks, data[1:], ["wt-b"], N, 4000)  # wt-a silent, its slot given to wt-b
    for check in checks:
        assert sorted(check.baselines().rows()) == ["wt-a", "wt-b"]
    first = relations.baselines().rows()["wt-a"]
    run(checks, data[:1], ["wt-a"], N, N)  # wt-a back in the slot: its own line, at once
    assert relations.learned(np.zeros(1, dtype=np.intp)).all()
    assert relations.baselines().rows()["wt-a"] == first


@pytest.mark.parametrize(
    "content",
    [
        b"not json{",
        b"\xff\xfe",
        b'{"format": 2, "checks": {}}',
        b'{"format": 1, "checks": {"noise": {"layout": ["a"], "turbines": {"x": [1, 2]}}}}',
        b'{"format": 1, "checks": {"noise": {"layout": ["a"], "turbines": {"x": ["1"]}}}}',
        b'{"format": 1, "checks": {"noise": {"layout": ["a"], "turbines": {"x": [1e999]}}}}',
        b'{"format": 1, "checks": []}',
    ],
)
def test_an_unusable_file_is_set_aside_and_the_checks_learn_again(
    tmp_path: Path, content: bytes
) -> None:
    path = tmp_path / "learned.json"
    path.write_bytes(content)
    checks = new_checks(learn=2000)
    assert LearnedFile(path, checks).load() == 0
    assert not path.exists()
    assert (tmp_path / "learned.json.bad").read_bytes() == content  # kept for inspection
    assert all(check.baselines().rows() == {} for check in checks)


def test_a_section_of_another_layout_is_left_out(tmp_path: Path) -> None:
    path = tmp_path / "learned.json"
    other = {"layout": ["wind.level", "rps.level"], "turbines": {"wt-a": [1.0, 2.0]}}
    path.write_text(json.dumps({"format": 1, "checks": {"noise": other}}))
    checks = new_checks(learn=2000)
    assert LearnedFile(path, checks).load() == 0
    assert path.exists()  # not unusable, just not this version's
    assert checks[1].baselines().rows() == {}


# ---- edge-app as a process ------------------------------------------------------------


def scattered(message: Received) -> bool:
    return bool(message.json()["anomalies"]["voltage"])


def test_a_restarted_app_watches_with_what_it_learned_before(
    app_stack: Stack,
    package_v2: Path,
    start_app: StartApp,
    listener: Listener,
    sensors: Sensors,
) -> None:
    path = app_stack.base / "state" / "learned.json"
    turbines = ["n0", "n1", "n2"]
    app, _ = start_app(learned_file=str(path), learned_save_period_s=0.5, noise_learn_samples=100)
    sensors.prefill(turbines)
    sensors.stream(turbines)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if path.exists():
            noise = json.loads(path.read_text())["checks"]["noise"]["turbines"]
            if sorted(noise) == turbines and all(None not in row for row in noise.values()):
                break
        time.sleep(0.2)
    else:
        pytest.fail(f"no learned noise levels in {path}")
    sensors.stop_stream()
    app.proc.signal(signal.SIGTERM)
    assert app.proc.proc.wait(10) == 0

    # restarted with learning that would take forever, and a model whose thresholds no
    # score reaches: a voltage anomaly can only come from the file's noise levels
    app_stack.agent.load(MODEL, package_v2)
    try:
        app, _ = start_app(learned_file=str(path), noise_learn_samples=10**9)
        assert app.wait_event("learned baselines restored")["baselines"] >= 3
        sensors.prefill(turbines)
        since = time.monotonic()
        sensors.stream(turbines, scatter={"n1": 300.0})
        (hit,) = listener.wait_for("anomalies", scattered, turbine="n1", since=since)[:1]
        body = hit.json()
        assert body["version"] == "2.0" and body["scores"][5] < body["thresholds"][5]
        listener.wait_for("anomalies", turbine="n2", since=since, count=4)
        others = [m for t in ("n0", "n2") for m in listener.select("anomalies", t, since)]
        assert others and not any(scattered(m) for m in others)
    finally:
        app_stack.agent.load(MODEL, app_stack.v1)


def test_the_file_is_kept_under_the_state_folder_unless_turned_off() -> None:
    from edgeapp.settings import AppSettings

    assert AppSettings().learned_file == Path("/var/lib/windedge/app/learned.json")
    assert AppSettings(learned_file="").learned_file is None  # in memory only


def test_unchanged_baselines_are_not_taken_again(tmp_path: Path) -> None:
    data = farm(2, 4000, 5)
    checks = new_checks(learn=2000)
    stored = LearnedFile(tmp_path / "learned.json", checks)
    run(checks, data, ["wt-a", "wt-b"], N, 1000)  # still learning
    assert stored.save()  # the first write (nothing learned yet)
    run(checks, data, ["wt-a", "wt-b"], 1010, 1500)
    assert stored.snapshot() is None  # learning on, nothing finished: nothing to write
    run(checks, data, ["wt-a", "wt-b"], 1510, 4000)
    assert stored.save()  # learned now
    assert stored.snapshot() is None
    run(checks, data[::-1], ["wt-b", "wt-a"], 4000, 4000)  # they swap slots
    assert stored.save()
    assert sorted(json.loads(stored.path.read_text())["checks"]["noise"]["turbines"]) == [
        "wt-a",
        "wt-b",
    ]
