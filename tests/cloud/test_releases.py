"""The released packages in models/: trained, signed, checked, and what their records say."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from cloud.autoencoder import variant_layout
from cloud.training.batch import multiply_adds_of
from edgeagent.package import check_golden, extract_package, load_trusted_keys
from edgeapp.features import PreprocessingParams

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "models"
RELEASES = {
    "wind-turbine-1.0": "original",
    "wind-turbine-1.1": "original",
    "wind-turbine-compact-1.0": "compact",
    "wind-turbine-relational-1.0": "relational",
}


@pytest.mark.parametrize("release", sorted(RELEASES))
def test_release_verifies_passes_its_golden_check_and_matches_its_record(
    release: str, tmp_path: Path
) -> None:
    archive = MODELS / f"{release}.tar.gz"
    record = json.loads((MODELS / f"{release}.training.json").read_text())
    assert record["package"]["sha256"] == hashlib.sha256(archive.read_bytes()).hexdigest()
    manifest = extract_package(
        archive, tmp_path / "p", trusted_keys=load_trusted_keys(MODELS / "dev-keys")
    )
    check_golden(tmp_path / "p", manifest)
    assert manifest.preprocessing == record["preprocessing"]
    params = PreprocessingParams.from_block(manifest.preprocessing)
    assert params.thresholds != PreprocessingParams.default().thresholds
    assert record["config"]["variant"] == RELEASES[release]
    assert record["variant"]["layers"] == variant_layout(RELEASES[release])
    assert (
        multiply_adds_of(tmp_path / "p" / "model.onnx")
        == record["variant"]["multiply_adds_per_window"]
    )
    # trained: the best validation loss is far below the untrained model's
    history = record["history"]
    best = history["validation_loss"][history["best_epoch"] - 1]
    assert best < 0.5 * history["train_loss"][0] or best < 0.05
    golden = np.load(tmp_path / "p" / "golden" / "input.npy")
    assert golden.shape == (8, 6, 10, 10)


def test_the_update_is_a_newer_version_of_the_same_model() -> None:
    old = json.loads((MODELS / "wind-turbine-1.0.training.json").read_text())
    new = json.loads((MODELS / "wind-turbine-1.1.training.json").read_text())
    assert (old["config"]["name"], new["config"]["name"]) == ("wind-turbine", "wind-turbine")
    assert (old["config"]["version"], new["config"]["version"]) == ("1.0", "1.1")
    more_data = new["data"]["simulated_hours"] > old["data"]["simulated_hours"]
    more_epochs = new["config"]["epochs"] > old["config"]["epochs"]
    assert more_data or more_epochs
    assert new["package"]["sha256"] != old["package"]["sha256"]


@pytest.mark.parametrize("cheaper", ["wind-turbine-compact-1.0", "wind-turbine-relational-1.0"])
def test_the_cheaper_variants_are_at_least_three_times_cheaper(cheaper: str) -> None:
    original = json.loads((MODELS / "wind-turbine-1.1.training.json").read_text())
    other = json.loads((MODELS / f"{cheaper}.training.json").read_text())
    ratio = (
        original["variant"]["multiply_adds_per_window"]
        / other["variant"]["multiply_adds_per_window"]
    )
    assert ratio >= 3


def test_models_stay_small() -> None:
    total = sum(p.stat().st_size for p in MODELS.glob("*.tar.gz"))
    assert total < 1_200_000, f"models/ packages take {total} bytes"
