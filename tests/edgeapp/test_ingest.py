"""edgeapp.ingest and edgeapp.buffers: untrusted messages into the turbine buffers."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from edgeapp.buffers import TurbineBuffers
from edgeapp.features import FEATURES, N_RAW, RAW_FIELDS, raw_to_features, sample_to_features
from edgeapp.ingest import DropCounter, DropReason, Ingestor
from edgeapp.sources import TopicPattern

SAMPLE = {
    "qx": 0.01, "qy": -0.02, "qz": 0.99, "qw": -0.1, "wind_speed_rps": 2.06, "rps": 2.19,
    "voltage": 70.5,
}  # fmt: skip
ROW = tuple(SAMPLE[f] for f in RAW_FIELDS)
# The buffers store each sample's features (step 1 done on arrival) in float32.
FEATURE_ROW = raw_to_features(np.array(ROW)).astype(np.float32)
RPS = FEATURES.index("rps")


def make(
    *, max_turbines: int = 8, capacity: int = 500, fixed: list[str] | None = None, **kw: Any
) -> Ingestor:
    buffers = TurbineBuffers(
        max_turbines=max_turbines, capacity=capacity, gap_reset_s=10.0, fixed_ids=fixed
    )
    options: dict[str, Any] = {
        "max_payload_bytes": 4096,
        "max_samples_per_message": 100,
        "max_abs_quaternion": 1.5,
        "max_abs_value": 1e5,
    }
    options.update(kw)
    return Ingestor(
        buffers=buffers,
        topics=TopicPattern("wind-turbine/+/raw-data"),
        drops=DropCounter(interval_s=10.0),
        **options,
    )


def topic(turbine: str) -> str:
    return f"wind-turbine/{turbine}/raw-data"


def send(ingestor: Ingestor, turbine: str, body: object, at: float = 1.0) -> None:
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    ingestor.on_message(topic(turbine), payload, at)


def newest(ingestor: Ingestor, turbine: str, n: int = 1) -> np.ndarray[Any, Any]:
    """The turbine's newest n samples, as the buffers store them: (n, 6) float32 features."""
    slot = ingestor.buffers.find(turbine)
    assert slot is not None
    return ingestor.buffers.gather(np.array([slot]), n).features[0]


def test_one_sample_lands_in_its_turbines_row() -> None:
    ingestor = make()
    send(ingestor, "t1", {"ts": 1_700_000_000_000, **SAMPLE})
    assert ingestor.samples == 1 and ingestor.drops.counts == {}
    np.testing.assert_array_equal(newest(ingestor, "t1")[0], FEATURE_ROW)
    gathered = ingestor.buffers.gather(np.array([0]), 1)
    assert gathered.ts[0] == 1_700_000_000_000 and gathered.arrival[0] == 1.0


def test_the_workshop_spelling_of_wind_speed_is_accepted() -> None:
    ingestor = make()
    body = {k if k != "wind_speed_rps" else "wind speed rps": v for k, v in SAMPLE.items()}
    send(ingestor, "t1", body)
    np.testing.assert_array_equal(newest(ingestor, "t1")[0], FEATURE_ROW)
    assert math.isnan(ingestor.buffers.gather(np.array([0]), 1).ts[0])  # no ts given


def test_a_samples_list_is_appended_in_order() -> None:
    ingestor = make()
    samples = [dict(SAMPLE, rps=float(i), ts=1000 + i) for i in range(10)]
    send(ingestor, "t1", {"samples": samples})
    assert ingestor.samples == 10
    assert list(newest(ingestor, "t1", 10)[:, RPS]) == [float(i) for i in range(10)]
    assert ingestor.buffers.gather(np.array([0]), 1).ts[0] == 1009


def test_a_bad_sample_in_a_list_drops_only_itself() -> None:
    ingestor = make()
    samples = [dict(SAMPLE, rps=1.0), dict(SAMPLE, rps="x"), dict(SAMPLE, rps=3.0)]
    send(ingestor, "t1", {"samples": samples})
    assert ingestor.samples == 2
    assert ingestor.drops.counts == {DropReason.WRONG_TYPE: 1}
    assert list(newest(ingestor, "t1", 2)[:, RPS]) == [1.0, 3.0]


BAD: list[tuple[str, bytes]] = [
    ("not_json", b"{"),
    ("not_json", b"\xff\xfe\x00"),
    ("not_json", b"[" * 4000),
    ("not_json", b""),
    ("not_object", b"[1]"),
    ("not_object", b"null"),
    ("not_object", json.dumps({"samples": [1]}).encode()),
    ("missing_field", json.dumps({k: v for k, v in SAMPLE.items() if k != "voltage"}).encode()),
    ("extra_field", json.dumps({**SAMPLE, "temp": 1}).encode()),
    ("extra_field", json.dumps({**SAMPLE, "wind speed rps": 1.0}).encode()),
    ("extra_field", json.dumps({"samples": [SAMPLE], "more": 1}).encode()),
    ("wrong_type", json.dumps({**SAMPLE, "rps": "2.0"}).encode()),
    ("wrong_type", json.dumps({**SAMPLE, "rps": True}).encode()),
    ("wrong_type", json.dumps({**SAMPLE, "rps": [1]}).encode()),
    ("wrong_type", json.dumps({**SAMPLE, "ts": "now"}).encode()),
    ("wrong_type", json.dumps({**SAMPLE, "ts": None}).encode()),
    ("non_finite", json.dumps({**SAMPLE, "rps": math.inf}).encode()),
    ("non_finite", json.dumps({**SAMPLE, "qx": math.nan}).encode()),
    ("non_finite", json.dumps({**SAMPLE, "ts": math.nan}).encode()),
    ("out_of_range", json.dumps({**SAMPLE, "voltage": 1e6}).encode()),
    ("out_of_range", json.dumps({**SAMPLE, "qz": -2.0}).encode()),
    ("out_of_range", json.dumps({**SAMPLE, "voltage": 10**400}).encode()),
    ("out_of_range", json.dumps({**SAMPLE, "ts": -5}).encode()),
    ("out_of_range", json.dumps({**SAMPLE, "rps": 1e308, "voltage": 1e308}).encode()),
    ("non_finite", b'{"qx": 1e999, "qy": 0, "qz": 0, "qw": 1, "wind_speed_rps": 1, "rps": 1,'
                   b' "voltage": 1}'),
    ("bad_samples", b'{"samples": {}}'),
    ("bad_samples", b'{"samples": []}'),
    ("bad_samples", json.dumps({"samples": [{}] * 101}).encode()),
    ("oversized", b" " * 4097),
]  # fmt: skip


@pytest.mark.parametrize(("reason", "payload"), BAD)
def test_bad_input_is_dropped_and_counted_by_reason(reason: str, payload: bytes) -> None:
    ingestor = make()
    send(ingestor, "t1", SAMPLE)
    send(ingestor, "t1", payload)
    assert ingestor.drops.counts == {reason: 1}
    assert ingestor.samples == 1
    np.testing.assert_array_equal(newest(ingestor, "t1")[0], FEATURE_ROW)  # good sample untouched


def test_topics_that_name_no_valid_turbine_are_dropped() -> None:
    ingestor = make()
    body = json.dumps(SAMPLE).encode()
    bad_topics = [
        "wind-turbine/a b/raw-data",
        "wind-turbine//raw-data",
        "other/t1/raw-data",
        "wind-turbine/t1/x/raw-data",
        "wind-turbine/" + "x" * 65 + "/raw-data",
    ]
    for bad in bad_topics:
        ingestor.on_message(bad, body, 1.0)
    assert ingestor.drops.counts == {DropReason.BAD_TOPIC: 5}
    assert len(ingestor.buffers) == 0


def test_turbines_beyond_the_maximum_are_dropped_and_invalid_ones_take_no_slot() -> None:
    ingestor = make(max_turbines=2)
    send(ingestor, "bad", {"qx": 1})  # never valid: gets no slot
    send(ingestor, "a", SAMPLE)
    send(ingestor, "b", SAMPLE)
    send(ingestor, "c", SAMPLE)
    send(ingestor, "a", SAMPLE)
    assert ingestor.buffers.ids == ["a", "b"]
    assert ingestor.drops.counts == {DropReason.MISSING_FIELD: 1, DropReason.TOO_MANY_TURBINES: 1}
    assert ingestor.samples == 3


def test_a_fixed_turbine_list_drops_the_others() -> None:
    ingestor = make(fixed=["a", "b"])
    send(ingestor, "b", SAMPLE)
    send(ingestor, "z", SAMPLE)
    assert ingestor.buffers.ids == ["a", "b"]
    assert ingestor.drops.counts == {DropReason.UNKNOWN_TURBINE: 1}


def test_drops_are_logged_once_per_interval_per_reason() -> None:
    ingestor = make()
    with capture_logs() as logs:
        for i in range(100):
            send(ingestor, "t1", b"nope", at=1.0 + i * 0.01)  # within one interval
        send(ingestor, "t1", b"nope", at=20.0)
        send(ingestor, "t1", b"[]", at=20.0)
    dropped = [e for e in logs if e["event"] == "input dropped"]
    assert [(e["reason"], e["dropped"], e["total"]) for e in dropped] == [
        ("not_json", 1, 1),
        ("not_json", 100, 101),
        ("not_object", 1, 1),
    ]


def test_the_ring_keeps_the_newest_samples_oldest_first() -> None:
    ingestor = make(capacity=8)
    for i in range(20):
        send(ingestor, "t1", dict(SAMPLE, rps=float(i)), at=1.0 + i * 0.05)
    assert list(newest(ingestor, "t1", 8)[:, RPS]) == [float(i) for i in range(12, 20)]
    assert list(newest(ingestor, "t1", 3)[:, RPS]) == [17.0, 18.0, 19.0]
    # a list longer than the ring keeps its tail
    send(ingestor, "t1", {"samples": [dict(SAMPLE, rps=float(100 + i)) for i in range(11)]}, 2.0)
    assert list(newest(ingestor, "t1", 8)[:, RPS]) == [float(100 + i) for i in range(3, 11)]
    counts, _arrival = ingestor.buffers.state()
    assert counts[0] == 31


def test_a_silent_turbine_starts_a_new_buffer() -> None:
    ingestor = make()
    send(ingestor, "t1", SAMPLE, at=1.0)
    send(ingestor, "t1", SAMPLE, at=2.0)
    send(ingestor, "t1", SAMPLE, at=20.0)  # 18 s of silence > gap_reset_s
    counts, arrival = ingestor.buffers.state()
    assert counts.tolist() == [1] and arrival.tolist() == [20.0]


def test_malformed_floods_do_not_touch_good_turbines() -> None:
    ingestor = make()
    rng = np.random.default_rng(3)
    for i in range(600):
        send(ingestor, "good", dict(SAMPLE, rps=float(i % 7)), at=1.0 + i * 0.001)
        junk = rng.integers(0, 256, int(rng.integers(0, 200)), dtype=np.uint8).tobytes()
        send(ingestor, "good", junk)
        send(ingestor, f"junk{i}", junk)
    assert ingestor.samples == 600
    assert list(newest(ingestor, "good", 7)[:, RPS]) == [float(i % 7) for i in range(593, 600)]
    assert ingestor.buffers.ids == ["good"]


@settings(max_examples=300, deadline=None)
@given(
    payload=st.one_of(
        st.binary(max_size=300),
        st.recursive(
            st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=5),
            lambda inner: (
                st.lists(inner, max_size=4)
                | st.dictionaries(st.sampled_from([*RAW_FIELDS, "ts", "samples", "x"]), inner)
            ),
            max_leaves=20,
        ).map(lambda v: json.dumps(v).encode()),
    ),
    name=st.text(max_size=12),
)
def test_no_input_raises(payload: bytes, name: str) -> None:
    ingestor = make(max_turbines=2)
    ingestor.on_message(f"wind-turbine/{name}/raw-data", payload, 1.0)
    ingestor.ingest_object(name, payload, 1.0)
    assert ingestor.messages == 2  # and nothing raised


# ---- turbine slots: junk ids must not lock real turbines out until a restart.
# Learned turbines silent for ``turbine_evict_s`` give their slot back; a fixed
# allow-list keeps its slots; every refusal is counted under its reason.


def test_silent_junk_turbines_give_their_slots_back() -> None:
    ingestor = make(max_turbines=8, capacity=20)
    buffers = ingestor.buffers
    for i in range(1000):
        send(ingestor, f"junk{i}", SAMPLE, at=1.0)
    assert len(buffers) == 8
    send(ingestor, "real", SAMPLE, at=2.0)
    assert buffers.find("real") is None
    assert ingestor.drops.counts == {DropReason.TOO_MANY_TURBINES: 993}

    assert buffers.evict_idle(now=30.0, idle_s=60.0) == []  # not silent long enough
    evicted = buffers.evict_idle(now=62.0, idle_s=60.0)
    assert sorted(evicted) == sorted(f"junk{i}" for i in range(8))
    assert len(buffers) == 0 and buffers.evicted == 8

    for k in range(25):
        send(ingestor, "real", SAMPLE, at=62.0 + 0.05 * k)
    slot = buffers.find("real")
    assert slot is not None and buffers.ids == ["real"]
    counts, arrival = buffers.state()
    assert counts[slot] == 25 and arrival[slot] == 62.0 + 0.05 * 24
    # the ring holds only the new turbine's samples
    gathered = buffers.gather(np.array([slot]), 20)
    assert np.allclose(gathered.features[0], gathered.features[0, -1])
    assert buffers.take_added()[-1] == "real"


def test_a_cached_topic_of_an_evicted_turbine_gets_a_new_slot() -> None:
    ingestor = make(max_turbines=2, capacity=20)
    buffers = ingestor.buffers
    send(ingestor, "a", SAMPLE, at=1.0)
    send(ingestor, "a", SAMPLE, at=1.1)  # now cached topic -> slot
    send(ingestor, "b", SAMPLE, at=100.0)
    assert buffers.evict_idle(now=100.0, idle_s=60.0) == ["a"]
    send(ingestor, "c", SAMPLE, at=100.1)  # takes a's old slot
    send(
        ingestor, "a", SAMPLE, at=100.2
    )  # a is back: refused (table full), not written into c's slot
    counts, _arrival = buffers.state()
    slot_c = buffers.find("c")
    assert slot_c is not None and counts[slot_c] == 1
    assert buffers.find("a") is None
    assert ingestor.drops.counts == {DropReason.TOO_MANY_TURBINES: 1}


def test_a_fixed_allow_list_keeps_its_slots_and_refusals_are_counted_by_reason() -> None:
    ingestor = make(max_turbines=4, capacity=20, fixed=["f1", "f2"])
    buffers = ingestor.buffers
    send(ingestor, "f1", SAMPLE, at=1.0)
    send(ingestor, "stranger", SAMPLE, at=1.0)
    ingestor.on_message("wind-turbine/bad id/raw-data", json.dumps(SAMPLE).encode(), 1.0)
    assert buffers.evict_idle(now=1000.0, idle_s=60.0) == []
    assert buffers.ids == ["f1", "f2"]
    send(ingestor, "f1", SAMPLE, at=1000.0)
    assert ingestor.drops.counts == {DropReason.UNKNOWN_TURBINE: 1, DropReason.BAD_TOPIC: 1}


# ---- the batch path (``on_messages``, what the MQTT source calls) against the
# general one (``on_message`` per message): the same samples, values, counters.

FINITE = st.floats(min_value=-2.0, max_value=2.0) | st.floats(allow_nan=False, width=32)


@st.composite
def sample_bodies(draw: st.DrawFn) -> object:
    sample: dict[str, object] = {f: draw(FINITE) for f in RAW_FIELDS}
    change = draw(st.sampled_from(["none", "none", "alias", "both", "missing", "extra", "bad"]))
    if change == "alias":
        sample["wind speed rps"] = sample.pop("wind_speed_rps")
    elif change == "both":
        sample["wind speed rps"] = 1.0
    elif change == "missing":
        del sample[draw(st.sampled_from(RAW_FIELDS))]
    elif change == "extra":
        sample["temp"] = 1
    elif change == "bad":
        sample[draw(st.sampled_from(RAW_FIELDS))] = draw(
            st.sampled_from([True, None, "1", [1], 10**400, 1e308, math.inf, math.nan, 7])
        )
    ts = draw(
        st.sampled_from(["absent", "absent", None, -1, 0, 1.5, 1e14, 1e14 + 1, math.nan, "now"])
        | st.integers(min_value=0, max_value=2**60)
    )
    if ts != "absent":
        sample["ts"] = ts
    return sample


@st.composite
def payloads(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["sample"] * 6 + ["samples", "junk", "spaced", "big"]))
    if kind == "junk":
        return draw(st.binary(max_size=40))
    if kind == "samples":
        return json.dumps({"samples": draw(st.lists(sample_bodies(), max_size=12))}).encode()
    body = json.dumps(draw(sample_bodies()), separators=(",", ":") if kind != "spaced" else None)
    return body.encode() + (b" " * 5000 if kind == "big" else b"")


BATCHES = st.lists(
    st.tuples(
        st.lists(
            st.tuples(st.sampled_from(["a", "b", "c", "d", "bad id"]), payloads()), max_size=25
        ),
        st.sampled_from([0.05, 0.05, 0.05, 20.0]),  # seconds since the last read
        st.booleans(),  # evict silent turbines after it
    ),
    max_size=8,
)


def ingest_both(
    batches: list[tuple[list[tuple[str, bytes]], float, bool]], max_turbines: int = 3
) -> list[Ingestor]:
    one, many = (make(max_turbines=max_turbines, capacity=8) for _ in range(2))
    at = 1.0
    for messages, gap, evict in batches:
        at += gap
        for turbine, payload in messages:
            one.on_message(topic(turbine), payload, at)
        many.on_messages([topic(t).encode() for t, _p in messages], [p for _t, p in messages], at)
        if evict:
            for ingestor in (one, many):
                ingestor.buffers.evict_idle(at, 10.0)
    return [one, many]


def assert_same(one: Ingestor, many: Ingestor) -> None:
    assert (many.messages, many.samples) == (one.messages, one.samples)
    assert many.drops.counts == one.drops.counts
    assert many.buffers.slot_ids() == one.buffers.slot_ids()
    np.testing.assert_array_equal(many.buffers.state()[0], one.buffers.state()[0])
    np.testing.assert_array_equal(many.buffers.state()[1], one.buffers.state()[1])
    slots = np.arange(len(one.buffers.slot_ids()))
    for ingestor in (one, many):  # compare the rings as the tick reads them
        ingestor.gathered = ingestor.buffers.gather(slots, 8)  # type: ignore[attr-defined]
    a, b = one.gathered, many.gathered  # type: ignore[attr-defined]
    np.testing.assert_array_equal(b.features, a.features)  # bit for bit
    np.testing.assert_array_equal(b.ts, a.ts)


@settings(max_examples=150, deadline=None)
@given(batches=BATCHES)
def test_a_batch_of_messages_is_buffered_exactly_as_one_at_a_time(
    batches: list[tuple[list[tuple[str, bytes]], float, bool]],
) -> None:
    assert_same(*ingest_both(batches))


@pytest.mark.parametrize("turbines", [3, 40], ids=["each several times a read", "each once"])
def test_the_batch_path_takes_a_farms_stream_bit_for_bit(turbines: int) -> None:
    rng = np.random.default_rng(5)
    quats = rng.normal(size=(400, 4))
    quats[:300] /= np.linalg.norm(quats[:300], axis=1, keepdims=True)
    quats[300:] = np.clip(quats[300:], -1.5, 1.5)  # non-unit ones reach the asin clip
    rows = np.concatenate([quats, rng.normal(2.0, 1.0, size=(400, 3))], axis=1)
    batches = []
    for k in range(0, 400, 40):  # 40 messages per read
        messages = []
        for i in range(k, k + 40):
            sample = dict(zip(RAW_FIELDS, rows[i].tolist(), strict=True))
            messages.append((f"t{i % turbines}", json.dumps({"ts": 1000 + i, **sample}).encode()))
        batches.append((messages, 20.0 if k == 200 else 0.05, False))  # and one gap
    one, many = ingest_both(batches, max_turbines=turbines)
    assert one.samples == many.samples == 400 and many.drops.counts == {}
    assert_same(one, many)


@pytest.mark.parametrize("when", ["after the slots were looked up", "just before b asks"])
def test_a_slot_freed_and_given_away_during_a_batch_is_not_written_through_the_cache(
    when: str,
) -> None:
    ingestor = make(max_turbines=1, capacity=8)
    body = json.dumps(SAMPLE).encode()
    ingestor.on_messages([topic("a").encode()] * 8, [body] * 8, 1.0)  # a's topic is cached now
    buffers = ingestor.buffers
    # the tick thread frees a's slot during a read in which "b" comes first and takes it
    target: Any = ingestor if when.startswith("after") else buffers
    name = "_accept" if when.startswith("after") else "can_add"
    original = getattr(target, name)

    def evict_first(*args: Any) -> Any:
        buffers.evict_idle(100.0, 10.0)
        return original(*args)

    setattr(target, name, evict_first)
    names = [topic("b").encode()] + [topic("a").encode()] * 7  # a read's worth
    ingestor.on_messages(names, [body] * 8, 100.0)
    assert buffers.ids == ["b"]
    counts, _arrival = buffers.state()
    assert counts.tolist() == [1]  # b's sample only: a's went nowhere
    assert ingestor.drops.counts == {DropReason.TOO_MANY_TURBINES: 7}


def test_gather_copies_each_rings_newest_samples_oldest_first() -> None:
    buffers = TurbineBuffers(max_turbines=6, capacity=10, gap_reset_s=10.0)
    rows = np.random.default_rng(2).normal(size=(6, 27, N_RAW)) * 0.5
    for slot in range(6):  # 5 + slot * 4 samples each: rings wrapped or not, anywhere
        buffers.add(f"t{slot}")
        for k in range(5 + slot * 4):
            buffers.append(slot, rows[slot, k].tolist(), 1.0 + k * 0.05)
    for n in (1, 4, 5, 10):
        slots = np.array([5, 0, 3, 1])
        gathered = buffers.gather(slots, n)
        for k, slot in enumerate(slots.tolist()):
            count = 5 + slot * 4
            newest = [features_row(rows[slot, i]) for i in range(count - n, count) if i >= 0]
            if count >= n:  # a slot with fewer gets older ring content in front
                np.testing.assert_array_equal(gathered.features[k], np.array(newest))


def features_row(row: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    return np.array(sample_to_features(row.tolist()), dtype=np.float32)


def test_an_eviction_seen_first_by_a_small_read_empties_the_batch_paths_cache_too() -> None:
    ingestor = make(max_turbines=2, capacity=8)
    body = json.dumps(SAMPLE).encode()
    a, b, c = (topic(t).encode() for t in "abc")
    ingestor.on_messages([a, b] * 4, [body] * 8, 1.0)  # both cached by the batch path
    ingestor.on_messages([b] * 8, [body] * 8, 50.0)
    assert ingestor.buffers.evict_idle(60.0, 30.0) == ["a"]
    ingestor.on_messages([c], [body], 60.0)  # a small read: c takes a's slot
    ingestor.on_messages([a] * 8, [body] * 8, 60.1)  # a is back: no room, not c's slot
    counts, _arrival = ingestor.buffers.state()
    assert ingestor.buffers.slot_ids() == ["c", "b"]
    assert counts.tolist() == [1, 8]  # b restarted after its 49 s gap
    assert ingestor.drops.counts == {DropReason.TOO_MANY_TURBINES: 8}
