"""The updater's pure parts: job documents, the two tables, the record, settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from ota.document import check_applicable, check_signed_manifest, parse_document
from ota.errors import ConfigError, RejectError
from ota.machine import RESUME, TRANSITIONS, Event, Outcome, State, next_move, resume_state
from ota.settings import OtaSettings, load_settings
from ota.store import Record, Store

WORKSHOP = {
    "type": "new_model",
    "model_name": "wind-turbine",
    "model_version": "2.0",
    "model_package_bucket": "sagemaker-wind-turbine-farm-123",
    "model_package_key": "models/wind-turbine-2.0.tar.gz",
}


def test_the_workshop_document_is_accepted_as_it_is() -> None:
    doc = parse_document(WORKSHOP)
    assert doc.model_version == "2.0" and doc.sha256 is None and not doc.allow_downgrade
    assert doc.source == "s3://sagemaker-wind-turbine-farm-123/models/wind-turbine-2.0.tar.gz"
    assert parse_document({**WORKSHOP, "something_new": 1}).model_name == "wind-turbine"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"type": "reboot"}, "type"),
        ({"model_version": "2.0-beta"}, "invalid version"),
        ({"model_package_key": None}, "names no package"),
        ({"sha256": "xyz"}, "64 hexadecimal"),
        ({"size": -1}, "size"),
        ({"model_package_url": "ftp://x/y"}, "https://"),
        ({"model_name": "../etc"}, "model name"),
    ],
)
def test_invalid_documents_are_rejected_with_the_reason(
    change: dict[str, object], message: str
) -> None:
    raw = {k: v for k, v in {**WORKSHOP, **change}.items() if v is not None}
    with pytest.raises(RejectError, match=message):
        parse_document(raw)
    with pytest.raises(RejectError, match="JSON object"):
        parse_document(["not", "an", "object"])


@pytest.mark.parametrize(
    ("version", "installed", "downgrade", "ok"),
    [
        ("1.10", "1.9", False, True),  # versions, not floats
        ("1.9", "1.10", False, False),
        ("1.9", "1.10", True, True),
        ("2", "2.0", False, False),  # the same version spelled longer
        ("2.0.1", "2.0", False, True),
        ("3.0", None, False, True),
    ],
)
def test_versions_compare_as_versions(
    version: str, installed: str | None, downgrade: bool, ok: bool
) -> None:
    doc = parse_document({**WORKSHOP, "model_version": version, "allow_downgrade": downgrade})
    if ok:
        check_applicable(doc, device_model="wind-turbine", installed=installed)
    else:
        with pytest.raises(RejectError):
            check_applicable(doc, device_model="wind-turbine", installed=installed)


def test_other_model_and_http_urls_and_signed_versions() -> None:
    doc = parse_document(WORKSHOP)
    with pytest.raises(RejectError, match="this device runs 'pump'"):
        check_applicable(doc, device_model="pump", installed=None)
    http = parse_document({**WORKSHOP, "model_package_url": "http://127.0.0.1:9/x"})
    with pytest.raises(RejectError, match="http://"):
        check_applicable(http, device_model="wind-turbine", installed=None)
    check_applicable(http, device_model="wind-turbine", installed=None, allow_http=True)
    check_signed_manifest(doc, name="wind-turbine", version="2.0.0")
    with pytest.raises(RejectError, match=r"signed package is version 0\.9"):
        check_signed_manifest(doc, name="wind-turbine", version="0.9")


def test_the_tables() -> None:
    # every state but DONE can move on OK; every move lands on a state
    for state in State:
        if state is not State.DONE:
            assert (state, Event.OK) in TRANSITIONS, state
    # failures after activation always pass through a rollback
    assert next_move(State.ACTIVATING, Event.FAIL).to is State.ROLLING_BACK
    assert next_move(State.CHECKING, Event.FAIL).to is State.ROLLING_BACK
    assert next_move(State.COMMITTING, Event.OK).outcome is Outcome.SUCCEEDED
    # every state resumes somewhere; the unproven ones as a rollback
    assert set(RESUME) == set(State)
    assert resume_state("activating", resumes=1, max_resumes=5) is State.ROLLING_BACK
    assert resume_state("downloading", resumes=1, max_resumes=5) is State.DOWNLOADING
    assert resume_state("flashing", resumes=1, max_resumes=5) is State.ROLLING_BACK
    assert resume_state("downloading", resumes=6, max_resumes=5) is State.ROLLING_BACK
    assert resume_state("reporting", resumes=99, max_resumes=5) is State.REPORTING


def test_record_round_trip_and_a_foreign_schema(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.save_record(Record(job_id="j", execution_number=2, state="installing"))
    assert store.load_record() == Record.model_validate(
        {**store.load_record().model_dump(), "state": "installing"}  # type: ignore[union-attr]
    )
    (tmp_path / "update.json").write_text('{"schema_version": 9, "job_id": "j", "state": "x"}')
    record = store.load_record()
    assert record is not None and record.state == "unknown:x" and record.schema_version == 1
    (tmp_path / "update.json").write_text("{truncated")
    assert store.load_record(quiet=True) is None
    assert (tmp_path / "update.json").exists()  # a reader leaves it alone
    assert store.load_record() is None
    assert not (tmp_path / "update.json").exists()


def test_settings_file_then_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "ota.toml"
    conf.write_text('[ota]\nthing_name = "t-1"\ntls = false\nkeep_versions = 4\n')
    monkeypatch.setenv("WINDEDGE_OTA_KEEP_VERSIONS", "5")
    settings = load_settings(conf)
    assert settings.thing_name == "t-1" and settings.keep_versions == 5
    assert isinstance(settings, OtaSettings)
    monkeypatch.delenv("WINDEDGE_OTA_KEEP_VERSIONS")
    conf.write_text("[ota]\ntls = true\n")
    with pytest.raises(ConfigError, match="cert_path"):
        load_settings(conf)
    conf.write_text('[ota]\ntls = false\nthing_name = "a/b"\n')
    with pytest.raises(ConfigError, match="thing name"):
        load_settings(conf)
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "absent.toml")


def test_bundled_example_config_parses() -> None:
    repo = Path(__file__).resolve().parents[2]
    settings = load_settings(repo / "config" / "ota.toml")
    assert settings == OtaSettings(**{**settings.model_dump()})
    documented = {
        line.split("=")[0].strip().lstrip("# ")
        for line in (repo / "config" / "ota.toml").read_text().splitlines()
        if "=" in line and not line.startswith("# (")
    }
    assert set(OtaSettings.model_fields) <= documented
