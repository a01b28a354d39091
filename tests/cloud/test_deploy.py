"""``edgectl cloud`` and ``edgectl deploy`` through edgectl's real entry point.

``--local`` against the stand-in's emulator and S3; ``--aws`` with boto3
against moto's server (``AWS_ENDPOINT_URL``), the same server the stand-in runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from cloud.local import LocalCloud
from edgectl.__main__ import main
from tests.cloud.sdk_clients import V2Device
from tests.harness import short_dir
from tests.localcloud import StartLocalCloud

REPO = Path(__file__).resolve().parents[2]
BUNDLED = REPO / "models" / "wind-turbine-1.0.tar.gz"
DEV_KEYS = REPO / "models" / "dev-keys"


@pytest.fixture(scope="module")
def cloud() -> Iterator[LocalCloud]:
    base = short_dir("lc-")
    stand_in = LocalCloud(state_dir=base / "cloud", things=["t1", "t2", "t3"])
    try:
        stand_in.start()
        stand_in.add_to_group("t3", "farm-b")
        yield stand_in
    finally:
        stand_in.stop()
        shutil.rmtree(base, ignore_errors=True)


def _objects(cloud: LocalCloud) -> list[str]:
    listing = cloud.s3_client().list_objects_v2(Bucket=cloud.endpoints.bucket)
    return [o["Key"] for o in listing.get("Contents", [])]


def _local(cloud: LocalCloud, *argv: str) -> int:
    return main(["deploy", *argv, "--local", "--state-dir", str(cloud.state_dir)])


def test_local_deploy_reaches_the_device_status_and_cleanup(
    cloud: LocalCloud, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "deploy",
            "--package",
            str(BUNDLED),
            "--things",
            "t1,t2",
            "--trusted-keys",
            str(DEV_KEYS),
            "--job-id",
            "deploy-1",
            "--max-per-minute",
            "100",
            "--abort-threshold",
            "50",
            "--abort-min-executed",
            "2",
            "--timeout-minutes",
            "30",
            "--state-dir",
            str(cloud.state_dir),
        ]
    )
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "created job deploy-1 on the local stand-in (not AWS)" in out.out
    digest = hashlib.sha256(BUNDLED.read_bytes()).hexdigest()
    with V2Device(cloud, "t1", tls=True) as dev:
        ex = dev.start_next().execution
        assert ex.job_id == "deploy-1"
        assert ex.job_document == {
            "type": "new_model",
            "model_name": "wind-turbine",
            "model_version": "1.0",
            "model_package_bucket": cloud.endpoints.bucket,
            "model_package_key": "models/wind-turbine/1.0/wind-turbine-1.0.tar.gz",
            "sha256": digest,
            "size": BUNDLED.stat().st_size,
        }
        body = cloud.s3_client().get_object(
            Bucket=cloud.endpoints.bucket, Key=ex.job_document["model_package_key"]
        )["Body"]
        assert hashlib.sha256(body.read()).hexdigest() == digest
        dev.update("deploy-1", "IN_PROGRESS", status_details={"stage": "downloading"})
    job = cloud.jobs.describe_job("deploy-1")
    assert job["jobExecutionsRolloutConfig"] == {"maximumPerMinute": 100}
    assert job["abortConfig"]["criteriaList"][0]["thresholdPercentage"] == 50
    assert job["timeoutConfig"] == {"inProgressTimeoutInMinutes": 30}

    assert _local(cloud, "status", "deploy-1") == 0
    table = capsys.readouterr().out
    assert "job deploy-1: IN_PROGRESS" in table
    assert [ln.split()[:2] for ln in table.splitlines()[2:]] == [
        ["t1", "IN_PROGRESS"],
        ["t2", "QUEUED"],
    ]
    assert "stage=downloading" in table
    assert _local(cloud, "status", "deploy-1", "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert {e["thing"]: e["status"] for e in data["executions"]} == {
        "t1": "IN_PROGRESS",
        "t2": "QUEUED",
    }

    assert _local(cloud, "cleanup") == 0
    assert "removed job deploy-1 and s3://" in capsys.readouterr().out
    assert [j["jobId"] for j in cloud.jobs.list_jobs()] == []
    assert _objects(cloud) == []


def test_thing_group_presigned_and_multipart_upload(
    cloud: LocalCloud, capsys: pytest.CaptureFixture[str]
) -> None:
    code = _local(
        cloud,
        "--package",
        str(BUNDLED),
        "--thing-group",
        "farm-b",
        "--job-id",
        "deploy-2",
        "--presigned-url",
        "--multipart-threshold",
        "65536",
        "--json",
    )
    out = capsys.readouterr()
    assert code == 0, out.err
    result = json.loads(out.out)
    assert "upload wind-turbine-1.0.tar.gz [" in out.err and "100.0%" in out.err
    head = cloud.s3_client().head_object(Bucket=result["bucket"], Key=result["key"])
    assert head["ETag"].strip('"').endswith("-1")  # a multipart upload
    with V2Device(cloud, "t3") as dev:
        doc = dev.describe("$next").execution.job_document
    assert doc["model_package_url"].startswith(cloud.endpoints.s3_endpoint_url)
    assert main(["deploy", "cleanup", "deploy-2", "--state-dir", str(cloud.state_dir)]) == 0
    assert _objects(cloud) == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--things", "t1"], "failed verification"),  # the tampered package
        (["--things", "nobody"], "unknown thing nobody"),
        (["--thing-group", "nowhere"], "unknown thing group nowhere"),
        (["--things", "t1", "--bucket", "no-such-bucket"], "bucket no-such-bucket does not exist"),
        (["--things", "t1", "--max-per-minute", "0"], "--max-per-minute"),
        ([], "no targets"),
    ],
)
def test_bad_input_creates_nothing(
    cloud: LocalCloud,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    message: str,
) -> None:
    package = BUNDLED
    if message == "failed verification":
        data = bytearray(BUNDLED.read_bytes())
        data[len(data) // 2] ^= 0xFF
        package = tmp_path / BUNDLED.name
        package.write_bytes(bytes(data))
    code = _local(cloud, "--package", str(package), "--trusted-keys", str(DEV_KEYS), *argv)
    err = capsys.readouterr().err
    assert code == 1
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert _objects(cloud) == []
    assert cloud.jobs.list_jobs() == []


def test_untrusted_signature_is_refused(
    cloud: LocalCloud, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = tmp_path / "other-keys"
    assert main(["package", "keygen", "--out", str(keys), "--name", "other"]) == 0
    (keys / "other.key").unlink()
    capsys.readouterr()
    code = _local(cloud, "--package", str(BUNDLED), "--things", "t1", "--trusted-keys", str(keys))
    assert code == 1 and "failed verification" in capsys.readouterr().err
    assert _objects(cloud) == []


def test_no_stand_in_running_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["deploy", "status", "x", "--state-dir", str(tmp_path / "none")])
    assert code == 1
    assert "no local stand-in running" in capsys.readouterr().err


def test_aws_deploy_with_boto3_against_moto(
    cloud: LocalCloud, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    endpoint = cloud.endpoints.s3_endpoint_url  # moto's server serves IoT too
    for key, value in {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "eu-west-1",
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    iot = boto3.client("iot")
    s3 = boto3.client("s3")
    s3.create_bucket(
        Bucket="fleet-models", CreateBucketConfiguration={"LocationConstraint": "eu-west-1"}
    )
    arn = iot.create_thing(thingName="aws-turbine-1")["thingArn"]
    base = ["deploy", "--aws", "--bucket", "fleet-models"]
    code = main(
        [
            *base,
            "--package",
            str(BUNDLED),
            "--things",
            "aws-turbine-1",
            "--job-id",
            "aws-1",
            "--max-per-minute",
            "10",
            "--abort-threshold",
            "20",
            "--abort-on",
            "ALL",
            "--timeout-minutes",
            "60",
            "--presigned-url",
            "--presign-role-arn",
            "arn:aws:iam::123456789012:role/iot-presign",
            "--presign-expires",
            "600",
        ]
    )
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "created job aws-1 on AWS" in out.out
    job = iot.describe_job(jobId="aws-1")["job"]
    assert job["targets"] == [arn]
    assert job["jobExecutionsRolloutConfig"]["maximumPerMinute"] == 10
    assert job["abortConfig"]["criteriaList"][0]["failureType"] == "ALL"
    assert job["timeoutConfig"]["inProgressTimeoutInMinutes"] == 60
    assert job["presignedUrlConfig"]["expiresInSec"] == 600
    doc = json.loads(iot.get_job_document(jobId="aws-1")["document"])
    assert doc["model_package_bucket"] == "fleet-models"
    assert doc["model_package_url"] == (
        "${aws:iot:s3-presigned-url:https://s3.eu-west-1.amazonaws.com/fleet-models/"
        "models/wind-turbine/1.0/wind-turbine-1.0.tar.gz}"
    )
    assert s3.head_object(Bucket="fleet-models", Key=doc["model_package_key"])[
        "ContentLength"
    ] == os.path.getsize(BUNDLED)

    assert main(["deploy", "status", "aws-1", "--aws", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert [e["thing"] for e in status["executions"]] == ["aws-turbine-1"]

    # an unknown thing on AWS: refused before anything is uploaded
    assert main([*base, "--package", str(BUNDLED), "--things", "ghost", "--job-id", "aws-2"]) == 1
    assert "unknown thing ghost" in capsys.readouterr().err
    # presigned URLs on AWS need the role IoT assumes
    code = main([*base, "--package", str(BUNDLED), "--things", "aws-turbine-1", "--presigned-url"])
    assert code == 1 and "--presign-role-arn" in capsys.readouterr().err

    assert main(["deploy", "cleanup", "--aws"]) == 0
    assert "removed job aws-1" in capsys.readouterr().out
    assert iot.list_jobs()["jobs"] == []
    assert s3.list_objects_v2(Bucket="fleet-models").get("Contents", []) == []


def test_cloud_up_status_down(capsys: pytest.CaptureFixture[str]) -> None:
    base = short_dir("lc-")
    state = base / "cloud"
    try:
        assert main(["cloud", "up", "--state-dir", str(state), "--things", "u1"]) == 0
        out = capsys.readouterr().out
        assert "local AWS stand-in (not AWS) is up" in out
        assert "export WINDEDGE_OTA_THING_NAME=u1" in out
        assert main(["cloud", "status", "--state-dir", str(state), "--json"]) == 0
        status = json.loads(capsys.readouterr().out)
        assert status["stand_in"].startswith("local AWS stand-in")
        assert all(p["running"] for p in status["processes"].values())
        assert set(status["processes"]) == {"mosquitto", "moto", "emulator"}
        pids = [p["pid"] for p in status["processes"].values()]
        # a second `up` in the same place is refused, the first keeps running
        assert main(["cloud", "up", "--state-dir", str(state)]) == 1
        assert "already running" in capsys.readouterr().err
        assert main(["cloud", "down", "--state-dir", str(state)]) == 0
        assert "stopped" in capsys.readouterr().out
        for pid in pids:
            assert not Path(f"/proc/{pid}").exists() or _zombie(pid)
        assert main(["cloud", "status", "--state-dir", str(state)]) == 1
        assert main(["cloud", "up", "--state-dir", str(state), "--things", "bad name!"]) == 1
        assert "invalid thing name" in capsys.readouterr().err
    finally:
        LocalCloud.stop_detached(state)
        shutil.rmtree(base, ignore_errors=True)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def test_fixture_start_local_cloud_is_usable(start_local_cloud: StartLocalCloud) -> None:
    cloud = start_local_cloud(things=["f1"])
    env = cloud.env_for("f1")
    assert Path(env["WINDEDGE_OTA_CERT_PATH"]).is_file()
    assert env["WINDEDGE_OTA_IOT_PORT"] == str(cloud.endpoints.mqtt_tls_port)
