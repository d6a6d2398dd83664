"""The join under every arrival order, duplicates, expiry, capacity and checkpoints, against a naive
reference; and a restore from the changelog records continues identically."""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_fair.join import (
    DUPLICATE,
    EXPIRED,
    FINAL_FATES,
    JOINED,
    LATE,
    ORPHAN,
    PENDING,
    Join,
)
from stream_fair.state.codec import (
    FORMAT_VERSION,
    KIND_E,
    KIND_J,
    PendingOutcome,
    PendingPrediction,
    Remembered,
    decode_json,
    meta_key,
)
from stream_fair.state.restore import PartitionRestore
from stream_fair.state.rocks import RocksBackend


def pred(ts: float) -> PendingPrediction:
    return PendingPrediction(ts, cell=0, predicted=1, score=None)


@dataclass
class Reference:
    """The documented semantics, written naively (lists and linear scans, no indexes)."""

    ttl: float
    retention: float
    preds: list[tuple[str, float]] = field(default_factory=list)  # pending
    outs: list[tuple[str, float]] = field(default_factory=list)
    joined: list[tuple[str, float]] = field(default_factory=list)  # id, forget at
    expired: list[tuple[str, float]] = field(default_factory=list)
    watermark: float = float("-inf")

    def _has(self, rows: list[tuple[str, float]], key: str) -> bool:
        return any(k == key for k, _ in rows)

    def _drop(self, rows: list[tuple[str, float]], key: str) -> None:
        rows[:] = [r for r in rows if r[0] != key]

    def add(self, kind: str, key: str, ts: float) -> tuple[str, list[tuple[str, str]]]:
        if kind == "p":
            if self._has(self.preds, key) or self._has(self.joined, key) or self._has(self.expired, key):
                fate = DUPLICATE
            elif self._has(self.outs, key):
                o_ts = next(t for k, t in self.outs if k == key)
                self._drop(self.outs, key)
                self.joined.append((key, max(ts, o_ts) + self.retention))
                fate = JOINED
            else:
                self.preds.append((key, ts))
                fate = PENDING
        else:
            if self._has(self.outs, key) or self._has(self.joined, key):
                fate = DUPLICATE
            elif self._has(self.expired, key):
                self._drop(self.expired, key)
                self.joined.append((key, ts + self.retention))
                fate = LATE
            elif self._has(self.preds, key):
                p_ts = next(t for k, t in self.preds if k == key)
                self._drop(self.preds, key)
                self.joined.append((key, max(ts, p_ts) + self.retention))
                fate = JOINED
            else:
                self.outs.append((key, ts))
                fate = PENDING
        released: list[tuple[str, str]] = []
        if ts > self.watermark:
            self.watermark = ts
            for k, t in list(self.preds):
                if t + self.ttl < ts:
                    self.preds.remove((k, t))
                    self.expired.append((k, t + self.ttl + self.retention))
                    released.append((EXPIRED, k))
            for k, t in list(self.outs):
                if t + self.ttl < ts:
                    self.outs.remove((k, t))
                    released.append((ORPHAN, k))
            self.joined = [(k, f) for k, f in self.joined if f >= ts]
            self.expired = [(k, f) for k, f in self.expired if f >= ts]
        return fate, sorted(released)

    def state_of(self, key: str) -> str | None:
        for rows, name in ((self.preds, "P"), (self.outs, "O"), (self.joined, "J"), (self.expired, "E")):
            if self._has(rows, key):
                return name
        return None


def kind_of(join: Join, key: str) -> str | None:
    rec = join.ids.get(key)
    if rec is None:
        return None
    if isinstance(rec, Remembered):
        return rec.kind.decode()
    return "P" if isinstance(rec, PendingPrediction) else "O"


@contextmanager
def backend() -> Iterator[RocksBackend]:
    with tempfile.TemporaryDirectory() as d:
        b = RocksBackend(d)
        try:
            yield b
        finally:
            b.close()


def ident(key: int) -> str:
    """Ids of both key forms: even keys are canonical UUIDs (17 bytes in keys), odd ones text."""
    if key % 2:
        return f"id{key}"
    return str(uuid.UUID(int=(key + 1) * 0x9E3779B97F4A7C15F39CC0605CEDC835 % (1 << 128)))


def run(join: Join, kind: str, key: int, ts: float) -> tuple[str, list[tuple[str, str]]]:
    i = ident(key)
    fate = join.add_prediction(i, pred(ts))[0] if kind == "p" else join.add_outcome(i, ts, 1)[0]
    released = join.advance(ts)
    rel: list[tuple[str, str]] = []
    if released is not None:
        rel += [(EXPIRED, k) for k, _ in released.predictions]
        rel += [(ORPHAN, k) for k in released.outcomes]
    return fate, sorted(rel)


def checkpoint(join: Join, b: RocksBackend, log: list[tuple[bytes, bytes | None]] | None = None) -> None:
    """Write the overlay to the store (and the changelog list), as the run loop does."""
    store, changelog = join.ids.changes()
    b.write(store)
    join.ids.committed()
    if log is not None:
        import orjson

        log.extend(changelog)
        log.append((meta_key(0), orjson.dumps({"v": FORMAT_VERSION, "join": join.to_state()})))


events = st.lists(
    st.tuples(st.sampled_from("po"), st.integers(0, 12), st.integers(0, 60).map(float), st.booleans()),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(events, st.sampled_from([5.0, 15.0, 1e9]), st.sampled_from([0.5, 10.0, 1e9]))
def test_join_matches_naive_reference_across_checkpoints(
    evs: list[tuple[str, int, float, bool]], ttl: float, retention: float
) -> None:
    """Same fates, same releases and the same state of every id, whatever the checkpoint schedule
    (the overlay, the store and the two indexes must agree)."""
    with backend() as b:
        join = Join(b, 0, ttl=ttl, retention=retention)
        ref = Reference(ttl=ttl, retention=retention)
        for kind, key, ts, cut in evs:
            assert run(join, kind, key, ts) == ref.add(kind, ident(key), ts)
            if cut:
                checkpoint(join, b)
            for k in range(13):
                assert kind_of(join, ident(k)) == ref.state_of(ident(k)), k
            assert (join.pending_predictions, join.pending_outcomes) == (len(ref.preds), len(ref.outs))
            assert join.remembered == len(ref.joined) + len(ref.expired)


@settings(max_examples=200, deadline=None)
@given(events, st.sampled_from([5.0, 1e9]))
def test_every_event_has_exactly_one_fate(evs: list[tuple[str, int, float, bool]], ttl: float) -> None:
    """consumed = joined + expired + orphan + duplicate + late + pending, per topic, at every step."""
    with backend() as b:
        join = Join(b, 0, ttl=ttl)
        fates = {t: dict.fromkeys(FINAL_FATES, 0) for t in "po"}
        consumed = {"p": 0, "o": 0}
        for kind, key, ts, cut in evs:
            consumed[kind] += 1
            fate, rel = run(join, kind, key, ts)
            if fate == JOINED:
                fates["p"][JOINED] += 1
                fates["o"][JOINED] += 1
            elif fate != PENDING:
                fates[kind][fate] += 1
            for f, _ in rel:
                fates["p" if f == EXPIRED else "o"][f] += 1
            if cut:
                checkpoint(join, b)
            assert consumed["p"] == sum(fates["p"].values()) + join.pending_predictions
            assert consumed["o"] == sum(fates["o"].values()) + join.pending_outcomes


@settings(max_examples=100, deadline=None)
@given(events, events, st.sampled_from([5.0, 15.0, 1e9]), st.booleans())
def test_restore_from_changelog_continues_identically(
    first: list[tuple[str, int, float, bool]],
    then: list[tuple[str, int, float, bool]],
    ttl: float,
    full: bool,
) -> None:
    """A store rebuilt from the changelog records (full, or tail onto an older copy) continues
    exactly as the original, indexes included."""
    with backend() as a, backend() as r:
        join = Join(a, 0, ttl=ttl)
        log: list[tuple[bytes, bytes | None]] = []
        half = len(first) // 2
        for i, (kind, key, ts, cut) in enumerate(first):
            run(join, kind, key, ts)
            if cut or i == len(first) - 1:
                checkpoint(join, a, log)
            if i == half and not full:  # the restoring replica's local copy stops here
                copy = list(log)
        if full or not first:
            copy = []
        # the local copy (tail case), then the tail restore from there
        if copy:
            pr0 = PartitionRestore(r, 0, epoch=0, full=True, ttl=ttl, outcome_ttl=ttl)
            for off, (k, v) in enumerate(copy):
                pr0.feed(off, k, v, 0)
            pr0.finish()
        pr = PartitionRestore(r, 0, epoch=0, full=not copy, ttl=ttl, outcome_ttl=ttl)
        pr.position = len(copy)
        for off, (k, v) in enumerate(log):
            pr.feed(off, k, v, 0)
        assert pr.finish() == set()
        restored = Join(r, 0, ttl=ttl)
        stored = r.get(meta_key(0))
        if stored is not None:
            restored.load_state(decode_json(stored)["join"])
        for kind, key, ts, _ in then:
            assert run(restored, kind, key, ts) == run(join, kind, key, ts)
            for k in range(13):
                assert kind_of(restored, ident(k)) == kind_of(join, ident(k))


def test_an_uncommitted_tail_is_ignored_and_reported_for_repair() -> None:
    """Records after the last meta (a checkpoint that died midway) are not applied."""
    with backend() as a, backend() as r:
        join = Join(a, 0, ttl=100.0)
        log: list[tuple[bytes, bytes | None]] = []
        join.add_prediction("x", pred(1.0))
        checkpoint(join, a, log)
        join.add_outcome("x", 2.0, 1)
        join.add_prediction("y", pred(2.0))
        store, changelog = join.ids.changes()
        log.extend(changelog)  # no meta after these: the writer died
        pr = PartitionRestore(r, 0, epoch=0, full=True, ttl=100.0, outcome_ttl=100.0)
        for off, (k, v) in enumerate(log):
            pr.feed(off, k, v, 0)
        repair = pr.finish()
        restored = Join(r, 0, ttl=100.0)
        assert isinstance(restored.ids.get("x"), PendingPrediction)
        assert restored.ids.get("y") is None
        assert {k[3:] for k in repair} == {b"x", b"y"}


def test_records_of_a_fenced_epoch_are_ignored() -> None:
    """A previous owner that keeps writing after the new owner's claim cannot change the state."""
    import orjson

    with backend() as r:
        pr = PartitionRestore(r, 0, epoch=0, full=True, ttl=100.0, outcome_ttl=100.0)
        from stream_fair.state.codec import encode_record, id_key

        meta = orjson.dumps({"v": FORMAT_VERSION, "join": {}})
        seq = [
            (id_key(0, "a"), encode_record(pred(1.0)), 1),
            (meta_key(0), meta, 1),
            (meta_key(0), meta, 2),  # the new owner's claim
            (id_key(0, "a"), encode_record(Remembered(KIND_J, 9.0)), 1),  # the zombie
            (meta_key(0), meta, 1),
        ]
        for off, (k, v, e) in enumerate(seq):
            pr.feed(off, k, v, e)
        pr.finish()
        assert pr.fenced == 2
        assert isinstance(Join(r, 0, ttl=100.0).ids.get("a"), PendingPrediction)


def test_a_commit_marker_of_another_configuration_is_refused_one_without_is_read() -> None:
    """Markers carry the writer's config fingerprint; markers from before it existed carry none."""
    import orjson

    from stream_fair.errors import StateError

    mine = {"features": ["sex"], "windows": [3600.0]}
    other = {"features": ["sex"], "windows": [3600.0], "feedback": {"alarm_slot": 300.0}}
    with backend() as r:
        pr = PartitionRestore(
            r, 0, epoch=0, full=True, ttl=100.0, outcome_ttl=100.0, fingerprint=mine, topic="t"
        )
        pr.feed(0, meta_key(0), orjson.dumps({"v": FORMAT_VERSION, "join": {}}), 0)  # an old marker
        pr.feed(1, meta_key(0), orjson.dumps({"v": FORMAT_VERSION, "join": {}, "config": mine}), 0)
        assert pr.committed == 2
        with pytest.raises(StateError) as err:
            pr.feed(2, meta_key(0), orjson.dumps({"v": FORMAT_VERSION, "join": {}, "config": other}), 0)
        assert str(err.value).startswith(
            "state error: the changelog t holds partition 0's state written with another configuration "
            "(feedback differ): "
        )
        assert pr.committed == 2


@settings(max_examples=100, deadline=None)
@given(st.permutations([("p", i) for i in range(6)] + [("o", i) for i in range(6)] + [("p", 2), ("o", 4)]))
def test_every_arrival_order_joins_each_pair_once(order: list[tuple[str, int]]) -> None:
    """Without expiry, any arrival order joins all six pairs exactly once; repeats are duplicates."""
    with backend() as b:
        join = Join(b, 0, ttl=1e9)
        fates = [run(join, kind, key, 0.0)[0] for kind, key in order]
        assert fates.count(JOINED) == 6
        assert fates.count(DUPLICATE) == 2
        assert fates.count(PENDING) == 6
        assert join.pending_predictions == join.pending_outcomes == 0


def test_outcome_after_expiry_is_late_and_then_duplicate() -> None:
    with backend() as b:
        join = Join(b, 0, ttl=10)
        assert run(join, "p", 1, 0.0) == (PENDING, [])
        checkpoint(join, b)
        assert run(join, "p", 2, 11.0) == (PENDING, [(EXPIRED, "id1")])
        assert run(join, "o", 1, 12.0)[0] == LATE
        checkpoint(join, b)
        assert run(join, "o", 1, 12.0)[0] == DUPLICATE
        assert run(join, "p", 1, 12.0)[0] == DUPLICATE
        assert kind_of(join, "id1") == "J"


def test_waiting_outcome_becomes_orphan() -> None:
    with backend() as b:
        join = Join(b, 0, ttl=10)
        assert run(join, "o", 1, 0.0) == (PENDING, [])
        checkpoint(join, b)
        assert run(join, "p", 9, 10.5) == (PENDING, [(ORPHAN, "id1")])
        assert join.ids.get("id1") is None


def test_capacity_bound_expires_oldest_and_counts_it() -> None:
    with backend() as b:
        join = Join(b, 0, ttl=1e9, max_pending=3)
        for i in range(5):
            join.add_prediction(f"id{i}", pred(float(i)))
            if i == 2:
                checkpoint(join, b)
        released = join.enforce_capacity()
        assert released is not None
        assert [k for k, _ in released.predictions] == ["id0", "id1"]
        assert [kind_of(join, f"id{i}") for i in range(5)] == ["E", "E", "P", "P", "P"]
        assert join.capacity_evictions == [2, 0]
        # an evicted prediction's outcome is late, never silently lost
        assert join.add_outcome("id0", 5.0, 1)[0] == LATE


def test_remembered_ids_are_bounded_too() -> None:
    with backend() as b:
        join = Join(b, 0, ttl=1e9, max_remembered=2)
        for i in range(4):
            join.add_prediction(f"id{i}", pred(float(i)))
            join.add_outcome(f"id{i}", float(i), 0)
        checkpoint(join, b)
        join.enforce_capacity()
        assert join.remembered == 2 and join.memory_evictions == 2
        assert [kind_of(join, f"id{i}") for i in range(4)] == [None, None, "J", "J"]


def test_pending_records_are_compact_on_disk() -> None:
    """A pending prediction is one 22-byte record plus its index entry (the disk budget's unit)."""
    rec = pred(1.0)
    from stream_fair.state.codec import encode_record

    assert len(encode_record(rec)) == 22
    assert len(encode_record(PendingOutcome(1.0, 1))) == 10
    assert len(encode_record(Remembered(KIND_E, 1.0))) == 9


def test_a_changelog_of_another_format_is_refused_in_one_line() -> None:
    import orjson
    import pytest

    from stream_fair.errors import StateError

    with backend() as r:
        pr = PartitionRestore(r, 0, epoch=0, full=True, ttl=1.0, outcome_ttl=1.0)
        with pytest.raises(StateError, match=r"holds state format 1 .* set state.changelog_topic") as err:
            pr.feed(0, meta_key(0), orjson.dumps({"v": 1}), 0)
        assert "\n" not in str(err.value)
