"""Untrusted sensor messages -> validated samples in the turbine buffers.

The hot path of the daemon: at 5,000 turbines x 20 Hz it runs 100,000 times a
second. The MQTT source hands it each socket read's messages at once
(``on_messages``): msgspec decodes and type-checks every one-sample message
in C against a fixed schema, the range checks run on the whole batch as
arrays, and the buffers take the batch under one lock (``append_many``).
Whatever that fast path does not accept (a batch of samples, a new turbine,
a bad or odd message) goes, in its place in the stream, through the general
path (``on_message``): the stdlib's ``json``, then per-sample checks that name
the reason a sample is dropped. Both paths accept exactly the same samples
with the same values (tests compare them); the fast one costs about a fifth.

A message is one sample ``{"ts"?, "qx", "qy", "qz", "qw", "wind_speed_rps",
"rps", "voltage"}`` (``"wind speed rps"`` accepted for ``wind_speed_rps``) or
``{"samples": [sample, ...]}``. ``ts`` (epoch ms) is optional.

Nothing here raises on bad input: every message or sample that cannot be used
is dropped and counted under one reason (``DropReason``), and each reason is
logged at most once per interval, with how many were dropped since.
"""

from __future__ import annotations

import enum
import itertools
import json
import math
import operator
from collections.abc import Mapping, Sequence
from typing import cast

import msgspec
import numpy as np
import structlog
from numpy.typing import NDArray

from edgeapp.buffers import TurbineBuffers
from edgeapp.features import N_RAW, RAW_FIELDS, samples_to_features
from edgeapp.sources import TopicPattern, valid_turbine_id

__all__ = ["DropCounter", "DropReason", "Ingestor"]

log = structlog.get_logger("edgeapp.ingest")

ALIAS = "wind speed rps"
"""The original workshop's spelling of ``wind_speed_rps``."""
MAX_TS_MS = 1e14
"""Largest plausible epoch-ms timestamp (year 5138)."""

_GET = operator.itemgetter(*RAW_FIELDS)
_GET_ALIASED = operator.itemgetter(
    *(ALIAS if name == "wind_speed_rps" else name for name in RAW_FIELDS)
)
_ALLOWED = frozenset((*RAW_FIELDS, ALIAS, "ts"))
_NUMBER_TYPES = frozenset((int, float))
_loads = json.loads


class _Sample(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, gc=False):
    """One sample as the fast path decodes it; fields in ``RAW_FIELDS`` order, then the
    workshop's spelling and ``ts``.

    Only numbers decode into these fields (not booleans, strings or null); an
    absent optional field is NaN, which JSON cannot spell; an unknown key fails.
    """

    qx: float
    qy: float
    qz: float
    qw: float
    wind_speed_rps: float = math.nan
    rps: float
    voltage: float
    wind_alias: float = msgspec.field(name=ALIAS, default=math.nan)
    ts: float = math.nan


_decode_sample = msgspec.json.Decoder(_Sample).decode
_astuple = msgspec.structs.astuple
_chain = itertools.chain.from_iterable
_SAMPLE_FIELDS = len(_Sample.__struct_fields__)
_MIN_BATCH = 8
"""Fewer messages than this in a read take the general path: the batch path's fixed cost
(some 30 us of array calls) is worth it from about this many on."""
_FAST_MAX_ABS = 1e300
"""The fast path leaves larger magnitudes to the general one (whose sum of 7 cannot
overflow below this)."""


def _decoded(payload: bytes) -> _Sample | None:
    if b'"samples"' in payload:  # a list of samples: never one (an exception costs 1.5 us)
        return None
    try:
        return _decode_sample(payload)
    except msgspec.DecodeError:  # ValidationError included: the general path says why
        return None


class DropReason(enum.StrEnum):
    """Why a message or sample was dropped (stable names: they appear in logs and counters)."""

    OVERSIZED = "oversized"
    """Message: payload larger than ``max_payload_bytes`` (not parsed)."""
    NOT_JSON = "not_json"
    """Message: not UTF-8 JSON (or nested absurdly deep)."""
    NOT_OBJECT = "not_object"
    """Message or sample: JSON, but not an object."""
    BAD_SAMPLES = "bad_samples"
    """Message: ``samples`` is not a non-empty list within ``max_samples_per_message``."""
    MISSING_FIELD = "missing_field"
    """Sample: a field is missing."""
    EXTRA_FIELD = "extra_field"
    """Sample or message: a key that does not belong (or both wind speed spellings)."""
    WRONG_TYPE = "wrong_type"
    """Sample: a value is not a number (strings, booleans and null are not)."""
    NON_FINITE = "non_finite"
    """Sample: NaN or infinity."""
    OUT_OF_RANGE = "out_of_range"
    """Sample: an absurd magnitude, or a timestamp outside 0..1e14 ms."""
    BAD_TOPIC = "bad_topic"
    """Message: the topic does not name a valid turbine id."""
    UNKNOWN_TURBINE = "unknown_turbine"
    """Message: a turbine outside the configured fixed list."""
    TOO_MANY_TURBINES = "too_many_turbines"
    """Message: a new turbine while ``max_turbines`` are already buffered."""
    EVICTED = "evicted"
    """Message: its turbine's slot was freed (silent for ``turbine_evict_s``) just as it
    arrived; the turbine's next message gets a new slot."""
    INTERNAL = "internal"
    """Message: a bug in the daemon (logged with its traceback)."""


class DropCounter:
    """Counts drops per reason and logs each reason at most once per interval."""

    def __init__(self, *, interval_s: float) -> None:
        self.interval_s = interval_s
        self.counts: dict[str, int] = {}
        self._since_log: dict[str, int] = {}
        self._last_log: dict[str, float] = {}

    def add(self, reason: DropReason, source: str, now: float, count: int = 1) -> None:
        total = self.counts.get(reason, 0) + count
        self.counts[reason] = total
        pending = self._since_log.get(reason, 0) + count
        last = self._last_log.get(reason)
        if last is None or now - last >= self.interval_s:
            log.warning(
                "input dropped",
                reason=str(reason),
                example=source[:128],
                dropped=pending,
                total=total,
            )
            self._last_log[reason] = now
            pending = 0
        self._since_log[reason] = pending

    def snapshot(self) -> dict[str, int]:
        """The counts so far (a copy)."""
        return dict(self.counts)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


_Checked = tuple[tuple[float, ...], float | None]


class Ingestor:
    """Parses, validates and buffers samples; the sources call it from their thread."""

    def __init__(
        self,
        *,
        buffers: TurbineBuffers,
        topics: TopicPattern,
        drops: DropCounter,
        max_payload_bytes: int,
        max_samples_per_message: int,
        max_abs_quaternion: float,
        max_abs_value: float,
    ) -> None:
        self.buffers = buffers
        self.topics = topics
        self.drops = drops
        self.max_payload_bytes = max_payload_bytes
        self.max_samples = max_samples_per_message
        self.max_abs_quaternion = max_abs_quaternion
        self.max_abs_value = max_abs_value
        self.messages = 0
        """Messages (or replay records) handed in."""
        self.samples = 0
        """Samples accepted into the buffers."""
        self._slot_of_topic: dict[str, int] = {}
        self._slot_of_name: dict[bytes, int] = {}  # the same, by the topic's bytes
        self._evicted = 0  # buffers.evicted when the cache above was last valid

    # ---- entry points

    def on_messages(
        self, topics: Sequence[bytes], payloads: Sequence[bytes], arrival: float
    ) -> None:
        """Several MQTT messages that arrived together (one socket read), in order;
        ``topics`` as the packets spell them (UTF-8).

        The same as ``on_message`` for each in turn, in a fraction of the time:
        one-sample messages of known turbines that pass every check are decoded,
        checked and buffered as a batch; the others (``{"samples": [...]}`` lists
        too) go through ``on_message``'s path in their place in the stream.
        """
        count = len(payloads)
        self.messages += count
        if count < _MIN_BATCH:  # cheaper one by one than the batch's fixed cost
            for name, payload in zip(topics, payloads, strict=True):
                self._general(name, payload, arrival)
            return
        evicted = self._forget_freed_slots()
        slots = list(map(self._slot_of_name.get, topics))
        try:
            samples: list[_Sample | None] = list(map(_decode_sample, payloads))
        except msgspec.DecodeError:
            samples = list(map(_decoded, payloads))
        if max(map(len, payloads)) > self.max_payload_bytes:
            samples = [
                None if len(p) > self.max_payload_bytes else s
                for p, s in zip(payloads, samples, strict=True)
            ]
        if None in slots or None in samples:
            candidates = [
                i for i, (slot, sample) in enumerate(zip(slots, samples, strict=True))
                if slot is not None and sample is not None
            ]  # fmt: skip
        else:  # the stream: known turbines, every message decoded
            candidates = list(range(count))
        fast = np.zeros(count, dtype=np.bool_)
        raw = np.empty((count, N_RAW))
        ts = np.empty(count)
        if candidates:
            decoded = cast(
                "list[_Sample]",  # candidates decoded
                samples if len(candidates) == count else [samples[i] for i in candidates],
            )
            values = np.fromiter(
                _chain(map(_astuple, decoded)), np.float64, len(candidates) * _SAMPLE_FIELDS
            ).reshape(len(candidates), _SAMPLE_FIELDS)
            ok = self._accept(values)
            chosen = np.asarray(candidates, dtype=np.intp)
            fast[chosen] = ok
            raw[chosen] = values[:, :7]
            alias = np.isnan(values[:, 4])
            raw[chosen[alias], 4] = values[alias, 7]
            ts[chosen] = values[:, 8]
        if fast.all():
            self._append_fast(np.asarray(slots, dtype=np.intp), raw, ts, arrival, topics)
            return

        def run(begin: int, end: int) -> None:
            """Buffer messages ``begin:end``, all accepted by the fast path."""
            if begin >= end:
                return
            if self.buffers.evicted != evicted:
                # a slot freed since the lookup above may have gone to a new turbine on
                # the general path meanwhile: these messages find their slots there
                for i in range(begin, end):
                    self._general(topics[i], payloads[i], arrival)
                return
            part = slice(begin, end)
            chosen = np.asarray(slots[part], dtype=np.intp)
            self._append_fast(chosen, raw[part], ts[part], arrival, topics[part])

        begin = 0
        for i in np.flatnonzero(~fast).tolist():  # in stream order, fast runs between
            run(begin, i)
            self._general(topics[i], payloads[i], arrival)
            begin = i + 1
        run(begin, count)

    def _forget_freed_slots(self) -> int:
        """Empty both slot caches when the buffers evicted turbines since they were filled;
        returns the eviction count they are valid for."""
        evicted = self.buffers.evicted
        if evicted != self._evicted:
            self._evicted = evicted
            self._slot_of_topic.clear()
            self._slot_of_name.clear()
        return evicted

    def _general(self, name: bytes, payload: bytes, arrival: float) -> None:
        """A message of a batch through the general path; its slot is remembered."""
        topic = name.decode("utf-8", "replace")
        self._message(topic, payload, arrival)
        slot = self._slot_of_topic.get(topic)
        if slot is not None:
            self._slot_of_name[name] = slot

    def _accept(self, values: NDArray[np.float64]) -> NDArray[np.bool_]:
        """Which decoded samples ``(M, 9)`` (``_Sample`` order) the fast path takes: exactly
        one wind speed spelling, every magnitude and the ts within range."""
        wind, alias, ts = values[:, 4], values[:, 7], values[:, 8]
        spelled = np.isnan(wind)
        ok: NDArray[np.bool_] = spelled != np.isnan(alias)
        magnitude = np.abs(values[:, :7])
        magnitude[spelled, 4] = np.abs(alias[spelled])
        ok &= magnitude[:, :4].max(axis=1) <= min(self.max_abs_quaternion, _FAST_MAX_ABS)
        ok &= magnitude[:, 4:].max(axis=1) <= min(self.max_abs_value, _FAST_MAX_ABS)
        ok &= np.isnan(ts) | ((ts >= 0.0) & (ts <= MAX_TS_MS))
        return ok

    def _append_fast(
        self,
        slots: NDArray[np.intp],
        raw: NDArray[np.float64],
        ts: NDArray[np.float64],
        arrival: float,
        topics: Sequence[bytes],
    ) -> None:
        features = samples_to_features(raw).astype(np.float32)  # exactly what append stores
        written = self.buffers.append_many(slots, features, arrival, ts)
        accepted = int(np.count_nonzero(written))
        self.samples += accepted
        if accepted < len(slots):
            for i in np.flatnonzero(~written).tolist():
                self.drops.add(DropReason.EVICTED, topics[i].decode("utf-8", "replace"), arrival)

    def on_message(self, topic: str, payload: bytes | bytearray, arrival: float) -> None:
        """One MQTT message: ``topic`` names the turbine, ``payload`` is JSON."""
        self.messages += 1
        self._message(topic, payload, arrival)

    def _message(self, topic: str, payload: bytes | bytearray, arrival: float) -> None:
        if len(payload) > self.max_payload_bytes:
            self.drops.add(DropReason.OVERSIZED, topic, arrival)
            return
        self._forget_freed_slots()
        slot = self._slot_of_topic.get(topic)
        turbine = None
        if slot is None:
            turbine = self.topics.turbine_of(topic)
            if turbine is None:
                self.drops.add(DropReason.BAD_TOPIC, topic, arrival)
                return
            slot = self._known_slot(turbine, topic, arrival)
            if slot is None:
                return
            if slot >= 0:
                self._slot_of_topic[topic] = slot
        try:
            obj = _loads(payload)
        except (ValueError, RecursionError):
            self.drops.add(DropReason.NOT_JSON, topic, arrival)
            return
        self._ingest(obj, arrival, slot, turbine, topic)

    def on_oversized(self, topic: str, size: int, arrival: float) -> None:
        """A message the transport skipped unread because of its size."""
        self.messages += 1
        self.drops.add(DropReason.OVERSIZED, f"{topic} ({size} bytes)", arrival)

    def ingest_object(self, turbine: str, obj: object, arrival: float) -> None:
        """One already-parsed record of a turbine (the replay source)."""
        self.messages += 1
        if not valid_turbine_id(turbine):
            self.drops.add(DropReason.BAD_TOPIC, turbine, arrival)
            return
        slot = self._known_slot(turbine, turbine, arrival)
        if slot is not None:
            self._ingest(obj, arrival, slot, turbine, turbine)

    # ---- internals

    def _known_slot(self, turbine: str, label: str, arrival: float) -> int | None:
        """The turbine's slot; -1 when it may get one; None (dropped) when it may not."""
        slot = self.buffers.find(turbine)
        if slot is not None:
            return slot
        if self.buffers.can_add():
            return -1
        reason = DropReason.UNKNOWN_TURBINE if self.buffers.fixed else DropReason.TOO_MANY_TURBINES
        self.drops.add(reason, label, arrival)
        return None

    def _allocate(self, turbine: str | None, label: str, arrival: float) -> int | None:
        slot = self.buffers.add(turbine) if turbine is not None else None
        if slot is None:
            self.drops.add(DropReason.TOO_MANY_TURBINES, label, arrival)
        elif label != turbine:
            self._slot_of_topic[label] = slot
        return slot

    def _ingest(
        self, obj: object, arrival: float, slot: int, turbine: str | None, label: str
    ) -> None:
        if type(obj) is not dict:
            self.drops.add(DropReason.NOT_OBJECT, label, arrival)
            return
        if "samples" not in obj:  # the common case: one sample per message
            checked = self._check(obj)
            if isinstance(checked, DropReason):
                self.drops.add(checked, label, arrival)
                return
            row, ts = checked
            if slot < 0:
                allocated = self._allocate(turbine, label, arrival)
                if allocated is None:
                    return
                slot = allocated
            if self.buffers.append(slot, row, arrival, ts):
                self.samples += 1
            else:
                self.drops.add(DropReason.EVICTED, label, arrival)
            return
        self._ingest_many(obj, arrival, slot, turbine, label)

    def _ingest_many(
        self,
        obj: Mapping[str, object],
        arrival: float,
        slot: int,
        turbine: str | None,
        label: str,
    ) -> None:
        if len(obj) != 1:
            self.drops.add(DropReason.EXTRA_FIELD, label, arrival)
            return
        samples = obj["samples"]
        if type(samples) is not list or not samples or len(samples) > self.max_samples:
            self.drops.add(DropReason.BAD_SAMPLES, label, arrival)
            return
        rows: list[tuple[float, ...]] = []
        ts: float | None = None
        for sample in samples:
            checked = self._check(sample)
            if isinstance(checked, DropReason):
                self.drops.add(checked, label, arrival)
                continue
            row, ts = checked
            rows.append(row)
        if not rows:
            return
        if slot < 0:
            allocated = self._allocate(turbine, label, arrival)
            if allocated is None:
                return
            slot = allocated
        if self.buffers.extend(slot, rows, arrival, ts):
            self.samples += len(rows)
        else:
            self.drops.add(DropReason.EVICTED, label, arrival)

    def _check(self, sample: object) -> _Checked | DropReason:
        """A sample's 7 values (``RAW_FIELDS`` order) and its ts, or why it is dropped."""
        if type(sample) is not dict:
            return DropReason.NOT_OBJECT
        if not sample.keys() <= _ALLOWED:
            return DropReason.EXTRA_FIELD
        try:
            row: tuple[object, ...] = _GET(sample)
        except KeyError:
            try:
                row = _GET_ALIASED(sample)
            except KeyError:
                return DropReason.MISSING_FIELD
        else:
            if ALIAS in sample:
                return DropReason.EXTRA_FIELD  # both spellings: which one is meant?
        if not _NUMBER_TYPES.issuperset(map(type, row)):
            return DropReason.WRONG_TYPE
        values: tuple[float, ...] = row  # type: ignore[assignment]  # all int or float now
        try:
            if not math.isfinite(sum(values)):
                if not all(map(math.isfinite, values)):
                    return DropReason.NON_FINITE
                return DropReason.OUT_OF_RANGE  # finite values whose sum overflows
            if (
                max(map(abs, values[:4])) > self.max_abs_quaternion
                or max(map(abs, values[4:])) > self.max_abs_value
            ):
                return DropReason.OUT_OF_RANGE
        except OverflowError:  # an integer too large for a float
            return DropReason.OUT_OF_RANGE
        ts = sample.get("ts")
        if ts is None:
            if "ts" in sample:
                return DropReason.WRONG_TYPE  # "ts": null
            return values, None
        if type(ts) not in _NUMBER_TYPES:
            return DropReason.WRONG_TYPE
        if ts != ts:  # noqa: PLR0124 - the NaN test without a function call
            return DropReason.NON_FINITE
        if not 0 <= ts <= MAX_TS_MS:
            return DropReason.OUT_OF_RANGE
        return values, float(ts)
