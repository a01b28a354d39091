"""The IoT Jobs emulator driven by awsiotsdk: IotJobsClientV2 on MQTT5, IotJobsClient on MQTT 3.1.1.

Every test talks to the real broker of the local stand-in (plain and mutual TLS
listeners) with AWS's own device SDK, as a device on AWS IoT Core would.
"""

from __future__ import annotations

import datetime as dt
import queue
import time
from typing import Any

import pytest
from awsiot import V2ServiceException, iotjobs

from cloud.local import LocalCloud
from tests.cloud.sdk_clients import V1Device, V2Device
from tests.localcloud import NewThing

DOC = {"type": "new_model", "model_name": "wind-turbine", "model_version": "2.0"}
QUIET = 0.6  # how long "no notification" is watched for


def _drain(q: queue.Queue[Any], wait: float = QUIET) -> list[Any]:
    out = []
    deadline = time.monotonic() + wait
    while True:
        try:
            out.append(q.get(timeout=max(0.0, deadline - time.monotonic())))
        except queue.Empty:
            return out


def _next(q: queue.Queue[Any], timeout: float = 5.0) -> Any:
    return q.get(timeout=timeout)


def _rejected(excinfo: pytest.ExceptionInfo[V2ServiceException]) -> iotjobs.V2ErrorResponse:
    error = excinfo.value.modeled_error
    assert isinstance(error, iotjobs.V2ErrorResponse), excinfo.value
    return error


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "mtls"])
def test_v2_full_job_cycle(local_cloud: LocalCloud, new_thing: NewThing, tls: bool) -> None:
    thing = new_thing()
    with V2Device(local_cloud, thing, tls=tls) as dev:
        assert dev.get_pending().queued_jobs == []
        local_cloud.jobs.create_job("cycle-" + thing, targets=[thing], document=DOC)
        event = _next(dev.notify_next)
        assert event.execution.job_id == "cycle-" + thing
        assert event.execution.job_document == DOC  # an object, not a string
        assert _next(dev.notify).jobs["QUEUED"][0].job_id == "cycle-" + thing

        pending = dev.get_pending()
        assert [j.job_id for j in pending.queued_jobs] == ["cycle-" + thing]
        assert pending.in_progress_jobs == []
        # epoch seconds: the SDK turns them into datetimes of today
        assert abs(pending.timestamp - dt.datetime.now()) < dt.timedelta(minutes=1)

        started = dev.start_next(status_details={"stage": "received"}, step_timeout_in_minutes=5)
        ex = started.execution
        assert (ex.job_id, ex.status, ex.version_number, ex.execution_number) == (
            "cycle-" + thing,
            "IN_PROGRESS",
            2,
            1,
        )
        assert ex.status_details == {"stage": "received"}
        assert ex.job_document == DOC
        assert _drain(dev.notify) == [] and _drain(dev.notify_next, 0.1) == []

        described = dev.describe("cycle-" + thing, include_job_document=False)
        assert described.execution.status == "IN_PROGRESS"
        assert described.execution.job_document is None

        updated = dev.update(
            "cycle-" + thing,
            "IN_PROGRESS",
            status_details={"stage": "downloading", "progressPct": "50"},
            expected_version=2,
            include_job_execution_state=True,
            include_job_document=True,
        )
        assert updated.execution_state.version_number == 3
        assert updated.execution_state.status_details["progressPct"] == "50"
        assert updated.job_document == DOC

        done = dev.update("cycle-" + thing, "SUCCEEDED", expected_version=3)
        assert done.execution_state is None  # not asked for
        assert _next(dev.notify).jobs == {}
        assert _next(dev.notify_next).execution is None  # the queue emptied: timestamp only
        assert dev.start_next().execution is None
        assert dev.describe("$next").execution is None

    execution = local_cloud.jobs.describe_execution("cycle-" + thing, thing)
    assert execution["status"] == "SUCCEEDED"
    assert local_cloud.jobs.describe_job("cycle-" + thing)["status"] == "COMPLETED"


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "mtls"])
def test_v1_client_on_mqtt311(local_cloud: LocalCloud, new_thing: NewThing, tls: bool) -> None:
    thing = new_thing()
    with V1Device(local_cloud, thing, tls=tls) as dev:
        local_cloud.jobs.create_job("v1-" + thing, targets=[thing], document=DOC)
        assert _next(dev.notify_next).execution.job_id == "v1-" + thing
        kind, pending = dev.get_pending()
        assert kind == "accepted" and [j.job_id for j in pending.queued_jobs] == ["v1-" + thing]
        kind, started = dev.start_next()
        assert kind == "accepted" and started.execution.status == "IN_PROGRESS"
        kind, rej = dev.update("v1-" + thing, "SUCCEEDED", expected_version=1)
        assert kind == "rejected" and rej.code == "VersionMismatch"
        assert rej.execution_state.version_number == 2
        kind, _ = dev.update("v1-" + thing, "SUCCEEDED", expected_version=2)
        assert kind == "accepted"
        kind, rej = dev.describe("v1-" + thing)
        assert kind == "rejected" and rej.code == "TerminalStateReached"
        assert _next(dev.notify_next).execution is None


def test_rejection_codes_v2(local_cloud: LocalCloud, new_thing: NewThing) -> None:
    thing = new_thing()
    job = "rej-" + thing
    local_cloud.jobs.create_job(job, targets=[thing], document=DOC)
    with V2Device(local_cloud, thing) as dev:
        with pytest.raises(V2ServiceException) as exc:
            dev.describe("no-such-job")
        assert _rejected(exc).code == "ResourceNotFound"
        with pytest.raises(V2ServiceException) as exc:
            dev.update(job, "IN_PROGRESS", status_details={"bad key!": "x"})
        assert _rejected(exc).code == "InvalidRequest"
        with pytest.raises(V2ServiceException) as exc:
            dev.update(job, "IN_PROGRESS", status_details={"k": "x" * 1025})
        assert _rejected(exc).code == "InvalidRequest"
        with pytest.raises(V2ServiceException) as exc:
            dev.update(job, "BOGUS")
        assert _rejected(exc).code == "InvalidRequest"
        with pytest.raises(V2ServiceException) as exc:
            dev.update(job, "TIMED_OUT")
        err = _rejected(exc)
        assert err.code == "InvalidStateTransition" and err.execution_state.status == "QUEUED"
        with pytest.raises(V2ServiceException) as exc:
            dev.update(job, "IN_PROGRESS", expected_version=7)
        err = _rejected(exc)
        assert err.code == "VersionMismatch" and err.execution_state.version_number == 1
        dev.update(job, "REJECTED", status_details={"reason": "incompatible"})
        with pytest.raises(V2ServiceException) as exc:
            dev.update(job, "IN_PROGRESS")
        err = _rejected(exc)
        assert err.code == "InvalidStateTransition" and err.execution_state.status == "REJECTED"
        with pytest.raises(V2ServiceException) as exc:
            dev.describe(job)
        assert _rejected(exc).code == "TerminalStateReached"
    assert local_cloud.jobs.describe_execution(job, thing)["statusDetails"] == {
        "reason": "incompatible"
    }
