"""The Jobs engine without a broker: any request gets exactly one reply and breaks nothing."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloud.local.jobs import JobsEngine
from cloud.local.store import Store

Sent = list[tuple[str, dict[str, Any]]]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3)
    ),
    max_leaves=10,
)
request_fields = st.fixed_dictionaries(
    {},
    optional={
        "clientToken": json_values,
        "status": st.sampled_from(
            ["IN_PROGRESS", "SUCCEEDED", "FAILED", "REJECTED", "QUEUED", "CANCELED", "x"]
        )
        | json_values,
        "statusDetails": json_values
        | st.dictionaries(st.text(max_size=12), st.text(max_size=12), max_size=3),
        "expectedVersion": st.integers(-2, 5) | json_values,
        "executionNumber": st.integers(0, 2) | json_values,
        "stepTimeoutInMinutes": st.integers(-2, 20_000) | json_values,
        "includeJobDocument": json_values,
        "includeJobExecutionState": json_values,
    },
)


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[tuple[JobsEngine, Sent]]:
    sent: Sent = []
    store = Store(tmp_path / "jobs.sqlite")
    eng = JobsEngine(store, sink=lambda topic, body: sent.append((topic, body)))
    eng.register_thing("t")
    eng.create_job("j1", targets=["t"], document={"a": 1})
    eng.create_job("j2", targets=["t"], document={"b": 2})
    try:
        yield eng, sent
    finally:
        store.close()


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    op=st.sampled_from(
        [
            ("get", None),
            ("start-next", None),
            ("get", "j1"),
            ("get", "$next"),
            ("update", "j1"),
            ("update", "j2"),
            ("update", "nope"),
        ]
    ),
    body=request_fields,
    raw=st.booleans(),
)
def test_every_request_gets_one_reply(
    engine: tuple[JobsEngine, Sent], op: tuple[str, str | None], body: dict[str, Any], raw: bool
) -> None:
    eng, sent = engine
    sent.clear()
    operation, job_id = op
    payload = json.dumps(body).encode() if not raw else json.dumps(body).encode()[:-1]
    eng.handle("t", operation, job_id, payload)
    replies = [t for t, _ in sent if t.endswith(("/accepted", "/rejected"))]
    assert len(replies) == 1
    topic, reply = next((t, b) for t, b in sent if t in replies)
    prefix = "$aws/things/t/jobs/" + (f"{job_id}/" if job_id else "") + operation
    assert topic in (prefix + "/accepted", prefix + "/rejected")
    assert isinstance(reply["timestamp"], int)
    if topic.endswith("/rejected"):
        assert reply["code"] in {
            "InvalidJson",
            "InvalidRequest",
            "InvalidStateTransition",
            "ResourceNotFound",
            "VersionMismatch",
            "TerminalStateReached",
        }
    token = body.get("clientToken")
    if not raw and isinstance(token, str) and 0 < len(token) <= 64:
        assert reply["clientToken"] == token
    # the state stays coherent: versions only grow, statuses are known ones
    for execution in eng.list_executions("j1") + eng.list_executions("j2"):
        assert execution["versionNumber"] >= 1
        assert execution["status"] in {"QUEUED", "IN_PROGRESS", "SUCCEEDED", "FAILED", "REJECTED"}


def test_exponential_rollout_grows_with_notified_things(tmp_path: Path) -> None:
    store = Store(tmp_path / "jobs.sqlite")
    eng = JobsEngine(store, sink=lambda topic, body: None, minute_seconds=10.0)
    things = [f"t{i}" for i in range(20)]
    for t in things:
        eng.register_thing(t)
    eng.create_job(
        "exp",
        targets=things,
        document={},
        rollout_config={
            "exponentialRate": {
                "baseRatePerMinute": 2,
                "incrementFactor": 2,
                "rateIncreaseCriteria": {"numberOfNotifiedThings": 2},
            }
        },
    )
    assert len(eng.list_executions("exp")) == 2  # the base rate
    eng.tick(now=1e12)  # a much later "minute": 2 notified -> rate 4
    assert len(eng.list_executions("exp")) == 6
    store.close()
    # reopened: the same state
    again = JobsEngine(Store(tmp_path / "jobs.sqlite"), sink=lambda topic, body: None)
    assert len(again.list_executions("exp")) == 6
    assert again.describe_job("exp")["jobProcessDetails"]["numberOfNotYetNotifiedThings"] == 14
