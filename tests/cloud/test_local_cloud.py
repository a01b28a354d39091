"""The stand-in around the emulator: credentials provider, S3, presigned URLs, admin API, ports."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import stat
import urllib.request
from pathlib import Path
from typing import Any

import boto3
import pytest

from cloud.local import AdminError, LocalCloud, LocalCloudError, Ports
from cloud.local import launcher as launcher_module
from tests.cloud.sdk_clients import V2Device
from tests.cloud.test_jobs_sdk import DOC
from tests.localcloud import NewThing, StartLocalCloud


def _credentials(
    cloud: LocalCloud,
    cert: tuple[Path, Path] | None,
    *,
    thing_header: str | None = None,
    alias: str | None = None,
) -> tuple[int, dict[str, Any]]:
    host, port = cloud.endpoints.credentials_endpoint.split(":")
    ctx = ssl.create_default_context(cafile=str(cloud.endpoints.ca_path))
    if cert is not None:
        ctx.load_cert_chain(*map(str, cert))
    conn = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=10)
    headers = {} if thing_header is None else {"x-amzn-iot-thingname": thing_header}
    try:
        conn.request(
            "GET",
            f"/role-aliases/{alias or cloud.endpoints.role_alias}/credentials",
            headers=headers,
        )
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_credentials_provider_issues_credentials_s3_accepts(local_cloud: LocalCloud) -> None:
    ident = local_cloud.provision_thing("dev-1")
    status, body = _credentials(
        local_cloud, (ident.cert_path, ident.key_path), thing_header="dev-1"
    )
    assert status == 200, body
    creds = body["credentials"]
    assert set(creds) == {"accessKeyId", "secretAccessKey", "sessionToken", "expiration"}
    assert creds["expiration"].endswith("Z") and "T" in creds["expiration"]
    s3 = boto3.client(
        "s3",
        endpoint_url=local_cloud.endpoints.s3_endpoint_url,
        region_name=local_cloud.endpoints.region,
        aws_access_key_id=creds["accessKeyId"],
        aws_secret_access_key=creds["secretAccessKey"],
        aws_session_token=creds["sessionToken"],
    )
    s3.put_object(Bucket=local_cloud.endpoints.bucket, Key="creds-check", Body=b"x")
    assert s3.get_object(Bucket=local_cloud.endpoints.bucket, Key="creds-check")["Body"].read()


def test_credentials_provider_refusals(local_cloud: LocalCloud, tmp_path: Path) -> None:
    ident = local_cloud.provision_thing("dev-2")
    pair = (ident.cert_path, ident.key_path)
    status, _ = _credentials(local_cloud, pair, thing_header="dev-3")
    assert status == 403  # the header names another thing than the certificate
    status, _ = _credentials(local_cloud, pair, alias="no-such-alias")
    assert status == 404
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        _credentials(local_cloud, None)  # no client certificate: the handshake fails
    stranger = local_cloud.pki.issue_unknown("dev-2", tmp_path / "other-ca")
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        _credentials(local_cloud, (stranger.cert_path, stranger.key_path))
    # a certificate from our CA for a thing nobody registered
    orphan = local_cloud.pki.device("never-registered")
    status, _ = _credentials(local_cloud, (orphan.cert_path, orphan.key_path))
    assert status == 403
    # the provider still serves after all that
    assert _credentials(local_cloud, pair)[0] == 200


def test_key_files_are_private(local_cloud: LocalCloud) -> None:
    ident = local_cloud.provision_thing("dev-1")
    assert stat.S_IMODE(ident.key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(local_cloud.pki.ca_key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(local_cloud.pki.directory.stat().st_mode) == 0o700
    assert "BEGIN CERTIFICATE" in ident.cert_path.read_text()


def test_presigned_url_placeholder_is_resolved_per_delivery(
    local_cloud: LocalCloud, new_thing: NewThing
) -> None:
    thing = new_thing()
    bucket = local_cloud.endpoints.bucket
    local_cloud.s3_client().put_object(Bucket=bucket, Key="pkg/m.tar.gz", Body=b"model bytes")
    doc = {
        **DOC,
        "model_package_url": "${aws:iot:s3-presigned-url:"
        f"https://s3.us-east-1.amazonaws.com/{bucket}/pkg/m.tar.gz}}",
    }
    job = f"presign-{thing}"
    local_cloud.jobs.create_job(
        job, targets=[thing], document=doc, presigned_url_config={"expiresInSec": 600}
    )
    with V2Device(local_cloud, thing) as dev:
        url = dev.describe("$next").execution.job_document["model_package_url"]
        assert url.startswith(local_cloud.endpoints.s3_endpoint_url) and "Signature" in url
        with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 - loopback
            assert resp.read() == b"model bytes"
    # the stored document keeps the placeholder
    assert local_cloud.jobs.describe_job(job)["document"] == doc


def test_admin_api_bad_input(local_cloud: LocalCloud) -> None:
    jobs = local_cloud.jobs
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"targets": ["nobody"]}, "ResourceNotFoundException", "unknown thing nobody"),
        ({"targets": []}, "InvalidRequestException", "targets"),
        ({"job_id": "bad id!"}, "InvalidRequestException", "jobId"),
        ({"document": {"x": "y" * 40_000}}, "InvalidRequestException", "32768"),
        ({"rollout_config": {"maximumPerMinute": 0}}, "InvalidRequestException", "1-1000"),
        (
            {"abort_config": {"criteriaList": [{"failureType": "NOPE"}]}},
            "InvalidRequestException",
            "failureType",
        ),
        (
            {"timeout_config": {"inProgressTimeoutInMinutes": 0}},
            "InvalidRequestException",
            "1-10080",
        ),
        ({"targets": ["arn:aws:iot:us-east-1:1:thinggroup/none"]}, "ResourceNotFound", "group"),
    ]
    for changes, code, words in cases:
        kwargs: dict[str, Any] = {"job_id": "bad-input", "targets": ["dev-1"], "document": DOC}
        kwargs.update(changes)
        with pytest.raises(AdminError) as err:
            jobs.create_job(kwargs.pop("job_id"), **kwargs)
        assert err.value.code.startswith(code) and words in err.value.message, changes
    with pytest.raises(AdminError) as err:
        jobs.describe_job("bad-input")
    assert err.value.code == "ResourceNotFoundException"  # nothing half-created
    # raw HTTP: not JSON, not an object
    for body in (b"{not json", b"[1]"):
        request = urllib.request.Request(  # noqa: S310 - loopback
            local_cloud.endpoints.admin_url + "/jobs", data=body, method="POST"
        )
        with pytest.raises(urllib.error.HTTPError) as http_err:
            urllib.request.urlopen(request, timeout=5)  # noqa: S310
        http_err.value.close()
        assert http_err.value.code == 400
    assert jobs.health()["ready"] is True


def test_thing_groups_as_targets(local_cloud: LocalCloud, new_thing: NewThing) -> None:
    one, two, other = new_thing(), new_thing(), new_thing()
    local_cloud.add_to_group(one, "north-farm")
    local_cloud.add_to_group(two, "north-farm")
    local_cloud.add_to_group(other, "south-farm")
    view = local_cloud.jobs.create_job(
        f"group-{one}",
        targets=["arn:aws:iot:us-east-1:123456789012:thinggroup/north-farm"],
        document=DOC,
    )
    assert sorted(view["things"]) == sorted([one, two])


def test_occupied_port_is_a_clear_error(start_local_cloud: StartLocalCloud) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(LocalCloudError, match=f"port {port} on 127.0.0.1 .* in use"):
            start_local_cloud(ports=Ports(mqtt=port))


def test_missing_mosquitto_is_a_clear_error(
    start_local_cloud: StartLocalCloud, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(launcher_module, "_MOSQUITTO_CANDIDATES", ("/nonexistent/mosquitto",))
    with pytest.raises(LocalCloudError, match="mosquitto not found"):
        start_local_cloud()


def test_second_start_in_the_same_state_dir_is_refused(
    start_local_cloud: StartLocalCloud,
) -> None:
    cloud = start_local_cloud(things=["x1"])
    with pytest.raises(LocalCloudError, match="already running"):
        LocalCloud(state_dir=cloud.state_dir).start()
    # the refused one stopped nothing of the running one
    assert cloud.jobs.health()["ready"] is True


def test_free_ports_claimed_together_are_distinct_and_a_taken_one_is_named() -> None:
    """Five "any free port" requests never get the same port (the stand-in once failed
    with "needs five different ports" when the kernel handed a just-closed port back)."""
    for _ in range(200):
        ports = launcher_module._claim_ports([(0, f"service {i}") for i in range(5)])
        assert len(set(ports)) == 5 and all(p > 0 for p in ports)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        with pytest.raises(LocalCloudError, match=f"port {taken} .*S3.* already in use"):
            launcher_module._claim_ports([(0, "MQTT"), (taken, "S3")])
