"""The simulator's core (commands, payloads, verdicts, views) and its settings."""

from __future__ import annotations

import json

import pytest

from simulator.farm import Command, CommandError, Farm
from simulator.generator import FaultKind
from simulator.settings import SettingsError, load_settings


def farm(n: int = 3, running: bool = True) -> Farm:
    return Farm([f"t{i}" for i in range(n)], seed=2, running=running, clock=lambda: 1000.0)


def test_payloads_are_what_the_app_accepts() -> None:
    f = farm()
    one = f.tick(1)
    assert [tid for tid, _ in one] == ["t0", "t1", "t2"]
    sample = json.loads(one[0][1])
    assert set(sample) == {"ts", "qx", "qy", "qz", "qw", "wind_speed_rps", "rps", "voltage"}
    assert sample["ts"] == 1_000_000
    batch = json.loads(f.tick(3)[1][1])
    assert [s["ts"] for s in batch["samples"]] == [1_000_050, 1_000_100, 1_000_150]
    assert f.samples_published == 3 + 9


def test_a_long_tick_sends_only_the_recent_samples() -> None:
    f = farm()
    out = f.tick(100, keep=20)
    samples = json.loads(out[0][1])["samples"]
    assert len(samples) == 20
    assert samples[-1]["ts"] == 1_000_000 + 99 * 50
    assert f.samples_published == 3 * 20
    assert len(f.detail("t0")["t"]) == 100  # the dashboard's history has them all


def test_commands_start_stop_and_faults_by_turbine_or_all() -> None:
    f = farm(running=False)
    assert f.tick(2) == []
    f.apply("t1", Command.parse(b'{"action": "start"}'))
    assert [tid for tid, _ in f.tick(2)] == ["t1"]
    f.apply("all", Command.parse({"action": "start"}))
    assert len(f.tick(1)) == 3
    f.apply("t2", Command.parse({"action": "fault", "kind": "stuck_sensor", "field": "voltage"}))
    f.apply("t2", Command.parse({"action": "fault", "kind": "brake_drag", "intensity": 0.3}))
    faults = f.detail("t2")["faults"]
    assert {x["kind"] for x in faults} == {"stuck_sensor", "brake_drag"}
    bits = f.overview()["faults"][2]
    assert bits == (1 << FaultKind.STUCK_SENSOR.bit) | (1 << FaultKind.BRAKE_DRAG.bit)
    f.apply("t2", Command.parse({"action": "clear", "kind": "brake_drag"}))
    assert f.overview()["faults"][2] == 1 << FaultKind.STUCK_SENSOR.bit
    f.apply("all", Command.parse({"action": "clear"}))
    assert f.overview()["faults"] == [0, 0, 0]


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b'{"action": "fault"}',
        b'{"action": "fault", "kind": "melting"}',
        b'{"action": "fault", "kind": "brake_drag", "intensity": 1.5}',
        b'{"action": "fault", "kind": "bearing_wear", "intensity": NaN}',
        b'{"action": "start", "extra": 1}',
        b"[]",
    ],
)
def test_bad_commands_are_refused_with_a_reason(raw: bytes) -> None:
    f = farm()
    with pytest.raises(CommandError):
        f.apply("t0", Command.parse(raw))
    assert f.overview()["faults"] == [0, 0, 0]


def test_an_unknown_turbine_is_refused() -> None:
    with pytest.raises(CommandError, match="unknown turbine"):
        farm().apply("t9", Command(action="stop"))


def test_verdicts_and_labels_from_the_app_are_kept_and_bad_ones_ignored() -> None:
    f = farm()
    verdict = {
        "ts": 5,
        "model": "wind-turbine",
        "version": "1.0",
        "scores": [0.1] * 6,
        "thresholds": [1.0] * 6,
        "anomalies": {"vibration": True, "rotation": False, "voltage": False},
    }
    assert f.on_anomalies("t1", json.dumps(verdict).encode())
    assert f.on_label("t1", b'{"model_label_status": "Model loaded: 1.0"}')
    for bad in (b"{", b"[]", b'{"anomalies": 3}', b'{"scores": [1]}'):
        assert not f.on_anomalies("t1", bad)
    assert not f.on_anomalies("nope", json.dumps(verdict).encode())
    assert not f.on_label("t1", b'{"model_label_status": 7}')
    view = f.overview()
    assert view["anomaly"] == [-1, 1, -1]
    assert view["labels"] == ["", "Model loaded: 1.0", ""]
    detail = f.detail("t1")
    assert detail["anomalies"]["vibration"] is True
    assert [v["seq"] for v in detail["verdicts"]] == [1]
    assert f.detail("t1", after_seq=1)["verdicts"] == []


def test_detail_returns_only_new_samples_of_a_running_turbine() -> None:
    f = farm()
    f.tick(10)
    first = f.detail("t0")
    assert len(first["t"]) == 10 and len(first["samples"]["rps"]) == 10
    f.tick(4)
    assert len(f.detail("t0", since=first["t"][-1])["t"]) == 4
    f.apply("t0", Command(action="stop"))
    f.tick(5)
    assert len(f.detail("t0", since=first["t"][-1])["t"]) == 4  # a stopped turbine sends nothing


def test_settings_validate_once_with_clear_messages(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings(turbines=3).turbine_ids() == ["wt-001", "wt-002", "wt-003"]
    assert load_settings(ids=("a", "b")).turbine_ids() == ["a", "b"]
    for bad in (
        {"http_host": "0.0.0.0"},
        {"ids": ("a", "a")},
        {"ids": ("a/b",)},
        {"topic_prefix": "wind/+/x"},
        {"publish_hz": 50.0},
        {"turbines": 0},
    ):
        with pytest.raises(SettingsError):
            load_settings(**bad)
    monkeypatch.setenv("WINDEDGE_SIM_SEED", "42")
    assert load_settings().seed == 42
    assert load_settings(seed=1).seed == 1  # a flag beats the environment
