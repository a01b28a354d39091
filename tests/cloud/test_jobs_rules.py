"""The emulator's service-side rules, seen through awsiotsdk: notifications, timers, cancel,
rollout, abort, persistence across a restart, and a device re-querying after a reconnect."""

from __future__ import annotations

import json
import queue
import time
from typing import Any

import paho.mqtt.client as paho
import pytest
from awsiot import V2ServiceException, iotjobs
from paho.mqtt.enums import CallbackAPIVersion

from cloud.local import AdminError, LocalCloud
from tests.cloud.sdk_clients import V2Device
from tests.cloud.test_jobs_sdk import DOC, _drain, _next, _rejected
from tests.harness import wait_until
from tests.localcloud import FAST_MINUTE, NewThing, StartLocalCloud


def test_notification_sequence(local_cloud: LocalCloud, new_thing: NewThing) -> None:
    """Two creates -> two notify + one notify-next; start-next -> no events; the head ends ->
    notify + notify-next naming the second; a non-head going IN_PROGRESS overtakes the head."""
    thing = new_thing()
    a, b, c = (f"{x}-{thing}" for x in "abc")
    with V2Device(local_cloud, thing) as dev:
        local_cloud.jobs.create_job(a, targets=[thing], document=DOC)
        local_cloud.jobs.create_job(b, targets=[thing], document={**DOC, "n": 2})
        notes = [_next(dev.notify), _next(dev.notify), *_drain(dev.notify)]
        assert [[j.job_id for j in n.jobs["QUEUED"]] for n in notes] == [[a], [a, b]]
        nexts = [_next(dev.notify_next), *_drain(dev.notify_next, 0.1)]
        assert [n.execution.job_id for n in nexts] == [a]

        assert dev.start_next().execution.job_id == a
        assert _drain(dev.notify) == [] and _drain(dev.notify_next, 0.1) == []

        dev.update(a, "SUCCEEDED")
        note = _next(dev.notify)
        assert [j.job_id for j in note.jobs["QUEUED"]] == [b] and "IN_PROGRESS" not in note.jobs
        nxt = _next(dev.notify_next)
        assert nxt.execution.job_id == b and nxt.execution.job_document == {**DOC, "n": 2}

        # a job added behind the head: notify, no notify-next
        local_cloud.jobs.create_job(c, targets=[thing], document=DOC)
        assert [j.job_id for j in _next(dev.notify).jobs["QUEUED"]] == [b, c]
        assert _drain(dev.notify_next) == []
        # c goes IN_PROGRESS: it overtakes b as the head (set unchanged: no notify)
        dev.update(c, "IN_PROGRESS")
        assert _next(dev.notify_next).execution.job_id == c
        assert _drain(dev.notify, 0.2) == []
        pending = dev.get_pending()
        assert [j.job_id for j in pending.in_progress_jobs] == [c]
        assert [j.job_id for j in pending.queued_jobs] == [b]
        # the head's own details change: nothing
        dev.update(c, "IN_PROGRESS", status_details={"stage": "x"})
        assert _drain(dev.notify_next) == [] and _drain(dev.notify, 0.1) == []
        dev.update(c, "FAILED")
        assert _next(dev.notify_next).execution.job_id == b
        dev.update(b, "IN_PROGRESS")
        dev.update(b, "SUCCEEDED")
        assert _drain(dev.notify_next)[-1].execution is None


def test_in_progress_and_step_timeouts(local_cloud: LocalCloud, new_thing: NewThing) -> None:
    thing = new_thing()
    step_job, total_job = f"step-{thing}", f"total-{thing}"
    with V2Device(local_cloud, thing) as dev:
        local_cloud.jobs.create_job(step_job, targets=[thing], document=DOC)
        local_cloud.jobs.create_job(
            total_job,
            targets=[thing],
            document=DOC,
            timeout_config={"inProgressTimeoutInMinutes": 3},
        )
        dev.start_next(step_timeout_in_minutes=1)
        t0 = time.monotonic()
        wait_until(
            lambda: local_cloud.jobs.describe_execution(step_job, thing)["status"] == "TIMED_OUT",
            10,
            "the step timer",
        )
        assert 0.8 * FAST_MINUTE <= time.monotonic() - t0 < 3 * FAST_MINUTE
        with pytest.raises(V2ServiceException) as exc:
            dev.update(step_job, "SUCCEEDED")
        assert _rejected(exc).code == "InvalidStateTransition"
        assert _rejected(exc).execution_state.status == "TIMED_OUT"

        # -1 clears a step timer; the in-progress timer still ends it
        started = dev.start_next(step_timeout_in_minutes=1).execution
        assert started.job_id == total_job
        dev.update(total_job, "IN_PROGRESS", step_timeout_in_minutes=-1)
        t0 = time.monotonic()
        wait_until(
            lambda: local_cloud.jobs.describe_execution(total_job, thing)["status"] == "TIMED_OUT",
            10,
            "the in-progress timer",
        )
        assert time.monotonic() - t0 >= 1.5 * FAST_MINUTE  # not the cleared 1-minute step
        assert local_cloud.jobs.describe_job(total_job)["status"] == "COMPLETED"


def test_cancel_job_and_force(local_cloud: LocalCloud, new_thing: NewThing) -> None:
    one, two = new_thing(), new_thing()
    job = f"cancel-{one}"
    with V2Device(local_cloud, one) as dev1, V2Device(local_cloud, two) as dev2:
        local_cloud.jobs.create_job(job, targets=[one, two], document=DOC)
        dev1.start_next()
        _drain(dev2.notify_next, 0.3)
        view = local_cloud.jobs.cancel_job(job, comment="wrong model")
        assert view["status"] == "CANCELED" and view["comment"] == "wrong model"
        # the QUEUED one is canceled (its queue empties), the IN_PROGRESS one keeps running
        assert _next(dev2.notify_next).execution is None
        assert local_cloud.jobs.describe_execution(job, two)["status"] == "CANCELED"
        assert local_cloud.jobs.describe_execution(job, one)["status"] == "IN_PROGRESS"
        dev1.update(job, "IN_PROGRESS", status_details={"stage": "downloading"})
        # force: the IN_PROGRESS one too; the device's next update is refused
        local_cloud.jobs.cancel_job(job, force=True)
        with pytest.raises(V2ServiceException) as exc:
            dev1.update(job, "SUCCEEDED")
        assert _rejected(exc).code == "InvalidStateTransition"
        with pytest.raises(V2ServiceException) as exc:
            dev1.describe(job)
        assert _rejected(exc).code == "TerminalStateReached"
        assert local_cloud.jobs.describe_execution(job, one)["forceCanceled"] is True


def test_rollout_rate_limits_new_executions(start_local_cloud: StartLocalCloud) -> None:
    things = [f"r{i}" for i in range(5)]
    cloud = start_local_cloud(things=things, minute_seconds=2.0)
    cloud.jobs.create_job(
        "rollout", targets=things, document=DOC, rollout_config={"maximumPerMinute": 2}
    )
    counts = []
    t0 = time.monotonic()
    while time.monotonic() - t0 < 5.2:
        counts.append((time.monotonic() - t0, len(cloud.jobs.list_executions("rollout"))))
        time.sleep(0.1)
    first = [n for t, n in counts if t < 1.5]
    assert set(first) == {2}  # two at once, then nothing for a "minute"
    assert max(n for t, n in counts if t < 3.5) == 4
    assert counts[-1][1] == 5
    details = cloud.jobs.describe_job("rollout")["jobProcessDetails"]
    assert details["numberOfQueuedThings"] == 5 and details["numberOfNotYetNotifiedThings"] == 0


def test_abort_after_failure_threshold(local_cloud: LocalCloud, new_thing: NewThing) -> None:
    things = [new_thing() for _ in range(5)]
    job = f"abort-{things[0]}"
    local_cloud.jobs.create_job(
        job,
        targets=things,
        document=DOC,
        abort_config={
            "criteriaList": [
                {
                    "failureType": "FAILED",
                    "action": "CANCEL",
                    "thresholdPercentage": 50,
                    "minNumberOfExecutedThings": 2,
                }
            ]
        },
    )
    devices = [V2Device(local_cloud, t) for t in things[:3]]
    try:
        devices[2].start_next()  # IN_PROGRESS: keeps running after the abort
        devices[0].start_next()
        devices[0].update(job, "FAILED")
        assert local_cloud.jobs.describe_job(job)["status"] == "IN_PROGRESS"  # 1 executed < 2
        devices[1].start_next()
        devices[1].update(job, "FAILED")
        view = local_cloud.jobs.describe_job(job)
        assert view["status"] == "CANCELED" and view["reasonCode"] == "AbortThresholdExceeded"
        statuses = {e["thingName"]: e["status"] for e in local_cloud.jobs.list_executions(job)}
        assert statuses == {
            things[0]: "FAILED",
            things[1]: "FAILED",
            things[2]: "IN_PROGRESS",
            things[3]: "CANCELED",
            things[4]: "CANCELED",
        }
        devices[2].update(job, "SUCCEEDED")
    finally:
        for d in devices:
            d.close()


def test_jobs_survive_an_emulator_restart(start_local_cloud: StartLocalCloud) -> None:
    cloud = start_local_cloud(things=["p1", "p2"])
    cloud.jobs.create_job("persist-1", targets=["p1", "p2"], document=DOC)
    cloud.jobs.create_job("persist-2", targets=["p1"], document=DOC)
    with V2Device(cloud, "p1") as dev:
        dev.start_next(status_details={"stage": "received"})
        dev.update("persist-1", "IN_PROGRESS", status_details={"stage": "verifying"})
        cloud.restart_emulator()
        got = dev.describe("persist-1").execution
        assert (got.status, got.version_number) == ("IN_PROGRESS", 3)
        assert got.status_details == {"stage": "verifying"}
        dev.update("persist-1", "SUCCEEDED", expected_version=3)
        assert dev.start_next().execution.job_id == "persist-2"
    assert [j["jobId"] for j in cloud.jobs.list_jobs()] == ["persist-1", "persist-2"]
    assert cloud.jobs.describe_execution("persist-1", "p2")["status"] == "QUEUED"
    with pytest.raises(AdminError) as err:
        cloud.jobs.create_job("persist-1", targets=["p1"], document=DOC)
    assert err.value.code == "ResourceAlreadyExistsException"
    # the whole stand-in stopped and started again in the same place: same jobs, same CA
    cert = cloud.provision_thing("p2").cert_path.read_bytes()
    cloud.stop()
    cloud.start()
    assert cloud.provision_thing("p2").cert_path.read_bytes() == cert
    with V2Device(cloud, "p2", tls=True) as dev:
        assert [j.job_id for j in dev.get_pending().queued_jobs] == ["persist-1"]


def test_reconnect_then_requery_finds_what_was_missed(
    start_local_cloud: StartLocalCloud,
) -> None:
    """A job created while the broker was down: its notify is gone, the re-query finds it."""
    cloud = start_local_cloud(things=["rq"])
    with V2Device(cloud, "rq") as dev:
        cloud.stop_broker()
        wait_until(lambda: not dev.connected.is_set(), 10, "the device to notice")
        cloud.jobs.create_job("missed", targets=["rq"], document=DOC)
        cloud.start_broker()
        wait_until(lambda: dev.connections >= 2, 15, "the device to reconnect")
        wait_until(lambda: _get_ok(dev), 15, "the emulator to resubscribe")
        assert [j.job_id for j in dev.get_pending().queued_jobs] == ["missed"]
        assert dev.start_next().execution.job_id == "missed"


def _get_ok(dev: V2Device) -> bool:
    try:
        dev.get_pending()
    except V2ServiceException:
        return False
    return True


def test_invalid_json_and_client_token_echo(local_cloud: LocalCloud, new_thing: NewThing) -> None:
    """A raw MQTT peer: a payload that is not JSON is rejected InvalidJson; tokens come back."""
    thing = new_thing()
    replies: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
    client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="raw-" + thing)
    client.on_message = lambda c, u, m: (
        m.topic.endswith(("/accepted", "/rejected"))
        and replies.put((m.topic, json.loads(m.payload)))
    )
    client.connect("127.0.0.1", local_cloud.endpoints.mqtt_port)
    client.loop_start()
    try:
        base = f"$aws/things/{thing}/jobs"
        client.subscribe(f"{base}/#", qos=1)
        time.sleep(0.3)
        client.publish(f"{base}/get", b"\xff not json", qos=1)
        topic, body = replies.get(timeout=5)
        assert topic == f"{base}/get/rejected" and body["code"] == "InvalidJson"
        client.publish(f"{base}/get", b"[1, 2]", qos=1)
        assert replies.get(timeout=5)[1]["code"] == "InvalidJson"
        client.publish(f"{base}/start-next", json.dumps({"clientToken": "tok-1"}), qos=1)
        topic, body = replies.get(timeout=5)
        assert topic == f"{base}/start-next/accepted"
        assert body["clientToken"] == "tok-1" and "execution" not in body
        assert isinstance(body["timestamp"], int) and abs(body["timestamp"] - time.time()) < 60
        client.publish(
            f"{base}/nojob/update", json.dumps({"clientToken": "tok-2", "status": "X"}), qos=1
        )
        topic, body = replies.get(timeout=5)
        assert (topic, body["code"], body["clientToken"]) == (
            f"{base}/nojob/update/rejected",
            "InvalidRequest",
            "tok-2",
        )
        client.publish(
            f"{base}/nojob/update",
            json.dumps({"clientToken": "tok-3", "status": "IN_PROGRESS"}),
            qos=1,
        )
        assert replies.get(timeout=5)[1]["code"] == "ResourceNotFound"
    finally:
        client.loop_stop()
        client.disconnect()


def test_mtls_listener_refuses_clients_without_a_device_certificate(
    local_cloud: LocalCloud, tmp_path: Any
) -> None:
    from awscrt import io, mqtt

    ep = local_cloud.endpoints
    opts = io.TlsContextOptions()
    opts.override_default_trust_store_from_path(None, str(ep.ca_path))
    conn = mqtt.Connection(
        client=mqtt.Client(
            io.ClientBootstrap.get_or_create_static_default(), io.ClientTlsContext(opts)
        ),
        host_name=ep.mqtt_host,
        port=ep.mqtt_tls_port,
        client_id="no-cert",
    )
    with pytest.raises(Exception, match=r"TLS|SOCKET|CLOSED|HANGUP") as err:
        conn.connect().result(10)
    assert "AWS_ERROR" in str(err.value) or "AWS_IO" in str(err.value)

    stranger = local_cloud.pki.issue_unknown("dev-1", tmp_path / "other-ca")
    opts = io.TlsContextOptions.create_client_with_mtls_from_path(
        str(stranger.cert_path), str(stranger.key_path)
    )
    opts.override_default_trust_store_from_path(None, str(ep.ca_path))
    conn = mqtt.Connection(
        client=mqtt.Client(
            io.ClientBootstrap.get_or_create_static_default(), io.ClientTlsContext(opts)
        ),
        host_name=ep.mqtt_host,
        port=ep.mqtt_tls_port,
        client_id="stranger",
    )
    with pytest.raises(Exception, match=r"TLS|SOCKET|CLOSED|HANGUP"):
        conn.connect().result(10)


def test_describe_next_does_not_change_state(local_cloud: LocalCloud, new_thing: NewThing) -> None:
    thing = new_thing()
    job = f"peek-{thing}"
    local_cloud.jobs.create_job(job, targets=[thing], document=DOC)
    with V2Device(local_cloud, thing) as dev:
        peek = dev.describe("$next").execution
        assert (peek.job_id, peek.status, peek.version_number) == (job, "QUEUED", 1)
        assert peek.job_document == DOC
        assert local_cloud.jobs.describe_execution(job, thing)["status"] == "QUEUED"
        with pytest.raises(V2ServiceException) as exc:
            dev.describe(job, execution_number=2)
        assert _rejected(exc).code == "ResourceNotFound"
        assert isinstance(
            dev.describe(job, execution_number=1), iotjobs.DescribeJobExecutionResponse
        )
