"""Evaluation through the device path, the report, and offline batch prediction.

The evaluation starts a real edge-agent with the released package and runs
edge-app's detector against it; the sizes are tiny so the test stays short,
the full report is ``docs/model-report.md``.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from cloud.training.evaluate import CASES, SWEEPS, EvalConfig, below_half, evaluate_package
from cloud.training.report import ModelCost, write_report
from edgeagent.package import Manifest, extract_package, load_trusted_keys
from edgeapp.features import FEATURES, RAW_FIELDS, PreprocessingParams, prepare_windows, score
from edgectl.__main__ import main as edgectl
from simulator.generator import FarmGenerator, Fault, FaultKind

REPO = Path(__file__).resolve().parents[2]
KEYS = REPO / "models" / "dev-keys"
RELEASED = REPO / "models" / "wind-turbine-1.0.tar.gz"


def test_evaluation_through_the_device_path_writes_the_report(tmp_path: Path) -> None:
    config = EvalConfig(
        normal_turbines=3,
        normal_minutes=1.0,
        turbines_per_case=2,
        turbines_per_sweep_step=1,
        warmup_s=61.0,  # past the noise check's learning (1 min)
        observe_s=31.0,
    )
    result = evaluate_package(RELEASED, trusted_keys=KEYS, config=config, progress=False)
    assert result.version == "1.0"
    assert result.normal_ticks == 3 * len(range(500, 1200 + 1, 10))
    assert result.false_positive_rate <= 0.01
    by_label = {r.case.label: r for r in result.cases}
    assert sorted(by_label) == sorted(c.label for c in CASES)
    vibration = by_label["vibration (gross)"]
    assert vibration.rate == 1.0  # both turbines, correct group, within 2 ticks
    assert np.all(vibration.seconds <= 1.0)
    assert vibration.confusion[0] > 0.9  # the vibration group raised on post-onset ticks
    # gross rotation and voltage: the scattered reading is flagged by edge-app's noise
    # check within the deadline (the model alone catches only some gross voltage faults)
    assert result.noise_limit == 12.0
    for label in ("rotation (gross)", "voltage (gross)"):
        assert by_label[label].rate == 1.0, label
    assert set(result.sweeps) == set(SWEEPS)
    # stuck sensors: edge-app's flat-line check raises the group 200 samples (10 s)
    # after the reading froze; the model's own verdicts are kept beside
    assert result.stuck_after_samples == 200
    for label in ("stuck rps", "stuck wind", "stuck voltage", "stuck IMU"):
        stuck = by_label[label]
        assert stuck.rate == 1.0, label
        assert np.all(stuck.seconds <= 10.0), (label, stuck.seconds)
        assert stuck.model_detected.shape == stuck.detected.shape
    assert result.model_false_positive_rate == result.false_positive_rate
    out = write_report(
        [result],
        [ModelCost(multiply_adds=17_290_752, us_batch1=300.0, us_batch256=250.0)],
        out=tmp_path / "docs" / "model-report.md",
        config=config,
        command="edgectl evaluate models/wind-turbine-1.0.tar.gz",
    )
    text = out.read_text()
    for case in CASES:
        assert case.label in text
    assert "17.29 M" in text and "false positives" in text
    assert "flat-line check" in text and "`stuck_after_samples` = 200" in text
    assert "noise check" in text and "beyond 12 times" in text
    for name in ("detection", "time-to-detection", "intensity-sweeps", "confusion",
                 "scores-wind-turbine-1.0"):  # fmt: skip
        png = tmp_path / "docs" / "model-report" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"model-report/{name}.png" in text


def test_below_half_interpolates_and_says_when_it_never_crosses() -> None:
    assert below_half([(1.0, 0.0), (2.0, 0.4), (3.0, 0.8), (4.0, 1.0)]) == (
        "~2.25 (between 2 and 3)"
    )
    assert below_half([(1.0, 0.9), (2.0, 1.0)]).startswith("< 1")
    assert below_half([(1.0, 0.0), (2.0, 0.1)]).startswith(">= 2")


def test_evaluate_refuses_a_missing_package(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = edgectl(["evaluate", str(tmp_path / "nope.tar.gz"), "--out", str(tmp_path / "r.md")])
    assert code == 1
    assert "nope.tar.gz" in capsys.readouterr().err
    assert not (tmp_path / "r.md").exists()


# --- predict-batch ---------------------------------------------------------------------


def recording_with_a_fault(path: Path) -> np.ndarray:
    """Two turbines, 60 s; turbine wt-1 gets the gross voltage fault after 40 s."""
    generator = FarmGenerator(2, seed=77)
    first = generator.step(800)
    generator.set_fault(1, Fault(FaultKind.VOLTAGE))
    second = generator.step(400)
    raw = np.concatenate([first.raw(), second.raw()], axis=1)
    ts = np.concatenate([first.ts_ms, second.ts_ms])
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ts", "turbine", *RAW_FIELDS, "extra"])
        for t in range(2):
            for i in range(raw.shape[1]):
                writer.writerow([int(ts[i]), f"wt-{t}", *(repr(float(v)) for v in raw[t, i]), "x"])
    return raw


def test_predict_batch_scores_every_window_like_the_device(tmp_path: Path) -> None:
    raw = recording_with_a_fault(tmp_path / "rec.csv")
    out = tmp_path / "scores" / "out.csv"
    assert edgectl(["predict-batch", str(tmp_path / "rec.csv"), "--package", str(RELEASED),
                    "--out", str(out)]) == 0  # fmt: skip
    with out.open() as handle:
        rows = list(csv.DictReader(handle))
    ends = list(range(500, 1200 + 1, 10))
    assert len(rows) == 2 * len(ends)
    assert [int(r["end_sample"]) for r in rows if r["turbine"] == "wt-0"] == ends
    # one row recomputed by hand: the device pipeline, the model, the scoring
    dest = tmp_path / "pkg"
    manifest = extract_package(RELEASED, dest, trusted_keys=load_trusted_keys(KEYS))
    assert isinstance(manifest, Manifest)
    params = PreprocessingParams.from_block(manifest.preprocessing)
    session = ort.InferenceSession(str(dest / "model.onnx"), providers=["CPUExecutionProvider"])
    windows = prepare_windows(raw[1, 700:1200], params)
    expected = score(windows, session.run(None, {"input": windows})[0], params)
    last = rows[-1]
    assert last["turbine"] == "wt-1" and int(last["end_sample"]) == 1200
    got = [float(last[f"score_{f}"]) for f in FEATURES]
    np.testing.assert_allclose(got, expected.scores, rtol=1e-4, atol=1e-6)
    assert last["voltage"] == "1"
    normal = [r for r in rows if r["turbine"] == "wt-0"]
    assert sum(r["voltage"] == "1" or r["rotation"] == "1" for r in normal) == 0
    faulty_late = [r for r in rows if r["turbine"] == "wt-1" and int(r["end_sample"]) >= 830]
    assert all(r["voltage"] == "1" for r in faulty_late)


def test_predict_batch_refuses_a_bad_recording_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("qx,qy,qz,qw,wind_speed_rps,rps,voltage\n0,0,0,1,2,1.5,oops\n")
    out = tmp_path / "out.csv"
    code = edgectl(["predict-batch", str(bad), "--package", str(RELEASED), "--out", str(out)])
    assert code == 1
    assert "bad.csv:2: not a complete row of numbers" in capsys.readouterr().err
    assert not out.exists()


def test_sigterm_during_an_evaluation_ends_its_agent_too(tmp_path: Path) -> None:
    """The agent runs in a session of its own; a SIGTERM to the evaluating process
    (a CI timeout, systemd, ``kill``) must not leave it running."""
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from cloud.training.device import device_path\n"
        f"with device_path(Path({str(RELEASED)!r}), trusted_keys=Path({str(KEYS)!r})) as d:\n"
        "    print(d.agent_pid, flush=True)\n"
        "    time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    agent = 0
    try:
        assert proc.stdout is not None
        agent = int(proc.stdout.readline())
        os.kill(agent, 0)  # running
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 10
        while _alive(agent) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(agent), "the agent outlived the evaluation"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        if agent and _alive(agent):
            os.kill(agent, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
