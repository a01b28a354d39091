"""The training pipeline: a short real run, SageMaker script mode, reproducibility, bad input.

Every run here trains the real topology with torch on tiny simulated data
(a few turbines, a couple of minutes, one epoch) and builds a real signed
package, which the package format then verifies and the golden check runs.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch

from cloud.autoencoder import (
    COMPACT_LAYERS,
    LAYERS,
    RELATIONAL_HEADS,
    Head,
    build_relational_model,
    multiply_adds,
)
from cloud.training.batch import multiply_adds_of
from cloud.training.config import ConfigError, RunPaths, TrainConfig, load_hyperparameters
from cloud.training.data import (
    features_of,
    fit_statistics,
    simulate_normal,
    tick_ends,
    tick_windows,
)
from cloud.training.nets import Autoencoder, RelationalNet
from cloud.training.train import train
from edgeagent.package import check_golden, extract_package, load_trusted_keys
from edgeapp.features import FEATURES, RAW_FIELDS, PreprocessingParams, prepare_windows

REPO = Path(__file__).resolve().parents[2]
KEYS = REPO / "models" / "dev-keys"
KEY = KEYS / "windedge-dev.key"
TINY: dict[str, Any] = {"turbines": 5, "minutes": 2.0, "epochs": 1, "progress": False}


def tiny_run(out: Path, **changes: Any) -> tuple[Path, dict[str, Any]]:
    config = TrainConfig(**{**TINY, **changes})
    result = train(config, RunPaths(out=out, train=None, signing_key=KEY))
    return result.package, json.loads(result.record.read_text())


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("train")
    package, record = tiny_run(out / "a")
    dest = out / "unpacked"
    extract_package(package, dest, trusted_keys=load_trusted_keys(KEYS))
    return package, record, dest


def test_a_short_run_builds_a_signed_package_that_passes_its_golden_check(
    trained: tuple[Path, dict[str, Any], Path],
) -> None:
    package, record, dest = trained
    assert package.name == "wind-turbine-1.0.tar.gz"
    manifest = json.loads((dest / "manifest.json").read_text())
    check_golden(dest, _manifest(dest))
    assert manifest["inputs"][0]["shape"] == [-1, 6, 10, 10]  # dynamic batch
    golden = np.load(dest / "golden" / "input.npy")
    assert golden.shape == (8, 6, 10, 10)
    assert abs(float(golden.mean())) < 3 and float(golden.std()) > 0.1  # real windows
    params = PreprocessingParams.from_block(manifest["preprocessing"])
    seed = PreprocessingParams.default()
    # recomputed from the training data, not copied from the seed statistics
    assert params.raw_std != seed.raw_std and params.mean != seed.mean and params.std != seed.std
    assert all(t > 0 for t in params.thresholds)
    assert record["data"]["source"] == "simulated"
    assert sum(record["data"]["turbines"].values()) == 5
    assert record["variant"]["multiply_adds_per_window"] == 17_290_752
    assert record["package"]["sha256"]
    # the thresholds hold on their own held-out set: few ticks flagged
    assert record["threshold_set"]["flagged_ticks_fraction"] < 0.01


def _manifest(dest: Path) -> Any:
    from edgeagent.package import Manifest

    return Manifest.from_json_bytes((dest / "manifest.json").read_bytes())


def test_onnx_export_equals_the_trained_torch_model(
    trained: tuple[Path, dict[str, Any], Path],
) -> None:
    """The ONNX graph built from the weights computes what torch computed."""
    _, _, dest = trained
    session = ort.InferenceSession(str(dest / "model.onnx"), providers=["CPUExecutionProvider"])
    from onnx import load, numpy_helper

    graph = load(str(dest / "model.onnx")).graph
    weights = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    net = Autoencoder(LAYERS)
    for name, layer in zip(net.names, net.layers, strict=True):
        layer.weight.data = torch.from_numpy(weights[f"{name}.weight"].copy())
        layer.bias.data = torch.from_numpy(weights[f"{name}.bias"].copy())
    x = np.random.default_rng(1).standard_normal((5, 6, 10, 10), dtype=np.float32)
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy()
    got = session.run(None, {"input": x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert not np.allclose(got, 0.0)


def test_seeded_runs_are_reproducible_to_the_byte(
    tmp_path: Path, trained: tuple[Path, dict[str, Any], Path]
) -> None:
    package, _, _ = trained
    again, _ = tiny_run(tmp_path / "b")
    assert again.read_bytes() == package.read_bytes()
    other, _ = tiny_run(tmp_path / "c", seed=1)
    assert other.read_bytes() != package.read_bytes()


def test_training_windows_are_the_device_windows() -> None:
    """tick_windows prepares each tick's buffer as edge-app does (prepare_windows)."""
    raw = simulate_normal(turbines=1, seconds=40, seed=3)[0]
    params = PreprocessingParams.default()
    windows = tick_windows([features_of(raw)], params, stride_ticks=7)
    ends = range(500, len(raw) + 1, 70)
    assert len(windows) == len(ends)
    for i, end in enumerate(ends):
        reference = prepare_windows(raw[end - 500 : end], params)
        np.testing.assert_allclose(windows[i], reference, atol=1e-4)


def test_ticks_are_half_a_second_whatever_the_window_step() -> None:
    """A tick is edge-app's 0.5 s (10 samples at 20 Hz); the step only places the window."""
    one = dataclasses.replace(PreprocessingParams.default(), step=1)
    assert list(tick_ends(530, one)) == list(tick_ends(530, PreprocessingParams.default()))
    assert list(tick_ends(530, one)) == [500, 510, 520, 530]
    raw = simulate_normal(turbines=1, seconds=30, seed=5)[0]
    windows = tick_windows([features_of(raw)], one)
    for i, end in enumerate(tick_ends(len(raw), one)):
        expected = prepare_windows(raw[end - 500 : end], one)
        np.testing.assert_allclose(windows[i], expected, atol=1e-4)


def test_fit_statistics_recomputes_from_the_data() -> None:
    raw = simulate_normal(turbines=3, seconds=60, seed=4)
    series = list(features_of(raw))
    params = fit_statistics(series, PreprocessingParams.default(), stride_ticks=1)
    np.testing.assert_allclose(params.raw_std, np.concatenate(series).std(axis=0), rtol=1e-5)
    normalised = tick_windows(series, params)
    per_feature = np.moveaxis(normalised, -3, 0).reshape(6, -1)
    np.testing.assert_allclose(per_feature.mean(axis=1), 0.0, atol=1e-3)
    np.testing.assert_allclose(per_feature.std(axis=1), 1.0, atol=1e-3)


def test_cost_of_both_variants() -> None:
    assert multiply_adds(LAYERS) == 17_290_752
    assert multiply_adds(LAYERS) / multiply_adds(COMPACT_LAYERS) > 3


def test_multiply_adds_read_from_the_onnx_graph(trained: tuple[Path, dict[str, Any], Path]) -> None:
    assert multiply_adds_of(trained[2] / "model.onnx") == multiply_adds(LAYERS)


# --- the relational variant ------------------------------------------------------------


def test_a_short_relational_run_builds_a_package_whose_onnx_equals_torch(tmp_path: Path) -> None:
    package, record = tiny_run(
        tmp_path / "r", name="wind-turbine-relational", variant="relational", step=1
    )
    dest = tmp_path / "unpacked"
    manifest = extract_package(package, dest, trusted_keys=load_trusted_keys(KEYS))
    check_golden(dest, manifest)
    # the window ends one sample before the newest (step 1), the device pipeline's parameter
    assert PreprocessingParams.from_block(manifest.preprocessing).step == 1
    cost = multiply_adds_of(dest / "model.onnx")
    assert record["variant"]["multiply_adds_per_window"] == cost
    assert multiply_adds(LAYERS) / cost >= 3  # item 6: at least 3x cheaper
    assert [h["name"] for h in record["variant"]["layers"]] == [h.name for h in RELATIONAL_HEADS]
    # the graph holds the trained weights: torch with them computes what ONNX Runtime does
    from onnx import load, numpy_helper

    weights = {
        t.name: numpy_helper.to_array(t) for t in load(str(dest / "model.onnx")).graph.initializer
    }
    net = RelationalNet(RELATIONAL_HEADS)
    for names, part in zip(net.names, net.convs, strict=True):
        for name, layer in zip(names, part, strict=True):
            assert isinstance(layer, torch.nn.Conv1d | torch.nn.Conv2d | torch.nn.ConvTranspose2d)
            layer.weight.data = torch.from_numpy(weights[f"{name}.weight"].copy())
            assert layer.bias is not None
            layer.bias.data = torch.from_numpy(weights[f"{name}.bias"].copy())
    x = np.random.default_rng(2).standard_normal((4, 6, 10, 10), dtype=np.float32)
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy()
    session = ort.InferenceSession(str(dest / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_the_relational_model_never_copies_a_related_sensor_through() -> None:
    """A voltage that disagrees with the rotor speed cannot reconstruct itself: the voltage
    output depends on the rotor speed only, the rotor speed's on wind and voltage, the
    wind's on rotor speed and voltage; the vibration features on themselves and rotor speed."""
    session = ort.InferenceSession(
        build_relational_model(seed=3).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 6, 10, 10), dtype=np.float32)
    base = session.run(None, {"input": x})[0]
    seen_by: dict[int, set[int]] = {
        c: set() for c in range(6)
    }  # output feature -> input features it reacts to
    for feature in range(6):
        changed = x.copy()
        changed[:, feature] += rng.standard_normal((2, 10, 10), dtype=np.float32)
        out = session.run(None, {"input": changed})[0]
        for c in range(6):
            if not np.allclose(out[:, c], base[:, c], atol=1e-6):
                seen_by[c].add(feature)
    assert seen_by == {
        0: {0, 1, 2, 4},
        1: {0, 1, 2, 4},
        2: {0, 1, 2, 4},
        3: {4, 5},
        4: {3, 5},
        5: {4},
    }


@pytest.mark.parametrize(
    ("heads", "message"),
    [
        (RELATIONAL_HEADS[:-1], "exactly once"),
        (
            (*RELATIONAL_HEADS[:-1], Head("voltage", (4, 3), (5,), RELATIONAL_HEADS[-1].sequence)),
            "layers map 1 -> 1",
        ),
    ],
)
def test_relational_heads_that_do_not_fit_are_refused(
    heads: tuple[Head, ...], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        build_relational_model(heads=heads)


# --- SageMaker script mode -------------------------------------------------------------


def write_recording(path: Path, turbines: int, seconds: float, seed: int) -> None:
    raw = simulate_normal(turbines=turbines, seconds=seconds, seed=seed)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["turbine", "ts", *RAW_FIELDS])
        for t in range(turbines):
            for i, row in enumerate(raw[t]):
                writer.writerow([f"wt-{t}", 1_700_000_000_000 + 50 * i, *(f"{v:.9g}" for v in row)])


def test_sagemaker_script_mode_reads_its_channels_and_hyperparameters(tmp_path: Path) -> None:
    train_dir, signing, model_dir = tmp_path / "train", tmp_path / "signing", tmp_path / "model"
    train_dir.mkdir()
    signing.mkdir()
    write_recording(train_dir / "farm.csv", turbines=4, seconds=90, seed=8)
    (signing / "release.key").write_bytes(KEY.read_bytes())
    env = {
        **os.environ,
        "SM_MODEL_DIR": str(model_dir),
        "SM_CHANNEL_TRAIN": str(train_dir),
        "SM_CHANNEL_SIGNING": str(signing),
        # SageMaker hands every value over as a string
        "SM_HPS": json.dumps({"epochs": "1", "version": "2.5", "progress": "false"}),
    }
    proc = subprocess.run(
        # as SageMaker calls it: every hyperparameter also a flag, values as strings
        [sys.executable, str(REPO / "cloud" / "training" / "entry.py"), "--seed", "3",
         "--progress", "False"],
        check=False, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    package = model_dir / "wind-turbine-2.5.tar.gz"
    assert proc.stdout.strip().endswith(str(package))
    record = json.loads((model_dir / "wind-turbine-2.5.training.json").read_text())
    assert record["data"]["source"] == "recorded"
    assert sum(record["data"]["turbines"].values()) == 4
    assert record["config"]["seed"] == 3 and record["config"]["epochs"] == 1
    extract_package(package, tmp_path / "x", trusted_keys=load_trusted_keys(KEYS))


def test_hyperparameters_file_then_flags(tmp_path: Path) -> None:
    file = tmp_path / "hyperparameters.json"
    file.write_text(
        json.dumps(
            {
                "epochs": "4",
                "learning_rate": "0.01",
                "variant": "compact",
                "sagemaker_program": "cloud/training/entry.py",  # SageMaker's own, skipped
            }
        )
    )
    config = load_hyperparameters({"epochs": 2}, environ={}, hyperparameters_file=file)
    assert (config.epochs, config.learning_rate, config.variant) == (2, 0.01, "compact")


@pytest.mark.parametrize(
    ("hps", "problem"),
    [
        ({"epoch": "3"}, "epoch"),
        ({"variant": "huge"}, "variant"),
        ({"epochs": "0"}, "epochs"),
        ({"threshold_quantile": "2"}, "threshold_quantile"),
    ],
)
def test_bad_hyperparameters_are_refused_clearly(hps: dict[str, str], problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        load_hyperparameters({}, environ={"SM_HPS": json.dumps(hps)})


def test_a_bad_run_exits_with_a_message_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    train_dir = tmp_path / "train"
    train_dir.mkdir()
    (train_dir / "broken.csv").write_text("turbine,qx,qy\nwt-1,0.1,0.2\n")
    proc = subprocess.run(
        [sys.executable, "-m", "cloud.training", "--out", str(out), "--train", str(train_dir),
         "--signing-key", str(KEY), "--no-progress"],
        check=False, capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "missing column(s) qz, qw, wind_speed_rps, rps, voltage" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() or not any(out.iterdir())
    proc = subprocess.run(
        [sys.executable, "-m", "cloud.training", "--out", str(out), "--no-progress"],
        check=False, capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 2 and "no signing key" in proc.stderr


def test_feature_names_in_the_record(trained: tuple[Path, dict[str, Any], Path]) -> None:
    assert trained[1]["preprocessing"]["features"] == list(FEATURES)
