"""edgeapp.replay: CSV and JSON-lines recordings through the ingestor."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from edgeapp_harness import synthetic_samples, wait_until, write_csv

from edgeapp.buffers import TurbineBuffers
from edgeapp.errors import ReplayError
from edgeapp.features import RAW_FIELDS, raw_to_features
from edgeapp.ingest import DropCounter, DropReason, Ingestor
from edgeapp.replay import ReplaySource
from edgeapp.sources import TopicPattern


def ingestor() -> Ingestor:
    return Ingestor(
        buffers=TurbineBuffers(max_turbines=8, capacity=500, gap_reset_s=1e9),
        topics=TopicPattern("wind-turbine/+/raw-data"),
        drops=DropCounter(interval_s=60.0),
        max_payload_bytes=65536,
        max_samples_per_message=1000,
        max_abs_quaternion=1.5,
        max_abs_value=1e5,
    )


def run(source: ReplaySource, timeout: float = 20.0) -> str | None:
    done = threading.Event()
    outcome: list[str | None] = []

    def finished(error: str | None) -> None:
        outcome.append(error)
        done.set()

    source.on_finished = finished
    source.start()
    try:
        assert done.wait(timeout), "replay did not finish"
    finally:
        source.stop(5)
    return outcome[0]


@pytest.mark.parametrize("name", ["farm.csv", "farm.csv.gz"])
def test_csv_replays_every_row_as_fast_as_possible(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    write_csv(path, ["a", "b"], 600, alias=True)
    ing = ingestor()
    assert run(ReplaySource(path=path, ingestor=ing, speed=0)) is None
    assert ing.samples == 1200 and ing.drops.counts == {}
    assert ing.buffers.ids == ["a", "b"]
    expected = synthetic_samples(600, seed=1, start_ms=1_000_000)[-1]
    gathered = ing.buffers.gather(np.array([1]), 1)
    want = raw_to_features(np.array([expected[f] for f in RAW_FIELDS]))
    np.testing.assert_allclose(gathered.features[0, 0], want, rtol=1e-7, atol=1e-12)
    assert gathered.ts[0] == expected["ts"]


def test_jsonl_with_single_samples_lists_and_bad_lines(tmp_path: Path) -> None:
    path = tmp_path / "farm.jsonl"
    samples = synthetic_samples(30, seed=3, start_ms=5_000)
    lines = [json.dumps({"turbine": "t1", **s}) for s in samples[:10]]
    lines.append(json.dumps({"turbine_id": "t2", "samples": samples[10:30]}))
    lines += ["not json", "[1, 2]", json.dumps({"turbine": 5, **samples[0]}), ""]
    lines.append(json.dumps({"turbine": "t1", **samples[0], "rps": "fast"}))
    path.write_text("\n".join(lines) + "\n")
    ing = ingestor()
    assert run(ReplaySource(path=path, ingestor=ing, speed=0)) is None
    assert ing.samples == 30
    assert ing.drops.counts == {
        DropReason.NOT_JSON: 1,
        DropReason.NOT_OBJECT: 1,
        DropReason.BAD_TOPIC: 1,
        DropReason.WRONG_TYPE: 1,
    }


def test_recorded_timing_is_kept_and_can_be_accelerated(tmp_path: Path) -> None:
    path = tmp_path / "timed.csv"
    write_csv(path, ["a"], 41)  # 41 samples 50 ms apart: 2 s as recorded
    for speed, low, high in ((4.0, 0.45, 1.2), (20.0, 0.08, 0.6)):
        ing = ingestor()
        started = time.monotonic()
        assert run(ReplaySource(path=path, ingestor=ing, speed=speed)) is None
        took = time.monotonic() - started
        assert low < took < high, (speed, took)
        assert ing.samples == 41


def test_rows_without_ts_follow_the_rate_and_loop_until_stopped(tmp_path: Path) -> None:
    path = tmp_path / "nots.csv"
    path.write_text(
        "qx,qy,qz,qw,wind_speed_rps,rps,voltage\n" + "0,0,0,1,2,1.5,48\n" * 10
    )  # turbine "replay", 10 rows at 100 Hz = 0.1 s per pass
    ing = ingestor()
    source = ReplaySource(path=path, ingestor=ing, speed=1.0, rate_hz=100.0, loop=True)
    source.start()
    try:
        wait_until(lambda: source.passes >= 3, 5, what="three passes")
    finally:
        source.stop(5)
    assert ing.buffers.ids == ["replay"] and ing.samples >= 30


def test_unusable_files_fail_at_start(tmp_path: Path) -> None:
    with pytest.raises(ReplayError, match="unknown replay format"):
        ReplaySource(path=tmp_path / "farm.parquet", ingestor=ingestor())
    with pytest.raises(ReplayError, match="cannot read"):
        ReplaySource(path=tmp_path / "absent.csv", ingestor=ingestor())
    header_only = tmp_path / "partial.csv"
    header_only.write_text("turbine,qx,qy,qz,qw,rps\n")
    with pytest.raises(ReplayError, match="wind_speed_rps, voltage"):
        ReplaySource(path=header_only, ingestor=ingestor())
