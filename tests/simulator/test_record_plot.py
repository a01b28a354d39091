"""``windfarm-sim record`` (CSV) and ``edgectl sim plot`` (PNG), through their command lines."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from edgectl.__main__ import main as edgectl
from simulator.__main__ import main as windfarm_sim
from simulator.generator import RAW_FIELDS, FarmGenerator, Fault, FaultKind
from simulator.record import parse_fault

PNG = b"\x89PNG\r\n\x1a\n"


def read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_record_writes_every_turbine_sample_with_its_faults(tmp_path: Path) -> None:
    out = tmp_path / "runs" / "run.csv"
    args = ["record", "--turbines", "3", "--seconds", "20", "--seed", "4", "--start-ms", "1000"]
    code = windfarm_sim(
        [*args, "--fault", "wt-002:generator_degradation=0.3@5-10", "--out", str(out)]
    )
    assert code == 0
    rows = read(out)
    assert list(rows[0]) == ["ts", "turbine", *RAW_FIELDS, "faults"]
    assert len(rows) == 3 * 400
    assert [r["turbine"] for r in rows[:6]] == ["wt-001", "wt-002", "wt-003"] * 2
    assert rows[0]["ts"] == rows[2]["ts"] == "1000" and rows[3]["ts"] == "1050"
    faulty = [r for r in rows if r["faults"]]
    assert {r["turbine"] for r in faulty} == {"wt-002"}
    assert {r["faults"] for r in faulty} == {"generator_degradation"}
    assert len(faulty) == 100  # 5 s at 20 Hz
    assert min(int(r["ts"]) for r in faulty) == 1000 + 5000
    # the CSV holds exactly the generator's stream
    gen = FarmGenerator(3, seed=4)
    first = gen.step(100)
    wt1 = np.array([[float(r[f]) for f in RAW_FIELDS] for r in rows if r["turbine"] == "wt-001"])
    np.testing.assert_allclose(wt1[:100], first.raw()[0], rtol=1e-8, atol=1e-12)
    assert not list(out.parent.glob(".run.csv.*"))  # no temporary file left


def test_a_fault_spec_is_parsed_or_refused_clearly() -> None:
    spec = parse_fault("wt-003:stuck_sensor,field=voltage@10-25")
    assert spec.turbine == "wt-003" and spec.start_s == 10 and spec.end_s == 25
    assert spec.fault == Fault(FaultKind.STUCK_SENSOR, field="voltage")
    assert parse_fault("2:rotor_imbalance=4").fault.intensity == 4.0
    for bad in ("wt-1", "wt-1:melting", "wt-1:brake_drag=2", "wt-1:vibration@9-3"):
        with pytest.raises(ValueError):
            parse_fault(bad)


def test_record_refuses_bad_arguments_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bad.csv"
    assert windfarm_sim(["record", "--fault", "wt-009:vibration", "--out", str(out)]) == 2
    assert "unknown turbine" in capsys.readouterr().err
    assert windfarm_sim(["record", "--fault", "wt-001:melting", "--out", str(out)]) == 2
    assert windfarm_sim(["record", "--seconds", "0", "--out", str(out)]) == 2
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_plot_draws_raw_and_prepared_features_of_a_recording(tmp_path: Path) -> None:
    run = tmp_path / "run.csv"
    assert (
        windfarm_sim(
            [
                "record",
                "--turbines",
                "2",
                "--seconds",
                "40",
                "--out",
                str(run),
                "--fault",
                "wt-002:vibration@20-25",
            ]
        )
        == 0
    )
    assert (
        edgectl(["sim", "plot", str(run), "--out", str(tmp_path / "plots"), "--turbine", "wt-002"])
        == 0
    )
    names = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert names == ["wt-002-histograms.png", "wt-002-prepared.png", "wt-002-raw.png"]
    for name in names:
        data = (tmp_path / "plots" / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 20_000


def test_plot_explains_what_it_cannot_plot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("ts,turbine,qx,qy\n0,a,1,2\n")
    assert edgectl(["sim", "plot", str(bad), "--out", str(tmp_path / "p")]) == 1
    assert "missing columns" in capsys.readouterr().err
    run = tmp_path / "run.csv"
    assert windfarm_sim(["record", "--turbines", "1", "--seconds", "10", "--out", str(run)]) == 0
    assert edgectl(["sim", "plot", str(run), "--out", str(tmp_path / "p"), "--turbine", "x"]) == 1
    assert "no samples of turbine 'x'" in capsys.readouterr().err
    assert edgectl(["sim", "plot", str(tmp_path / "none.csv"), "--out", str(tmp_path / "p")]) == 1
    assert not (tmp_path / "p").exists() or not list((tmp_path / "p").iterdir())
