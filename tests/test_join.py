"""The join under every arrival order, duplicates, expiry and capacity, against a naive reference."""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from stream_fair.events import Outcome, Prediction
from stream_fair.join import (
    DUPLICATE,
    EXPIRED,
    FINAL_FATES,
    JOINED,
    LATE,
    ORPHAN,
    PENDING,
    JoinBuffer,
)


def pred(i: int, ts: float) -> Prediction:
    return Prediction(f"id{i}", ts, "m", 1, None, ("g",))


def out(i: int, ts: float) -> Outcome:
    return Outcome(f"id{i}", ts, 1)


@dataclass
class Reference:
    """The documented semantics, written naively (lists and linear scans, no heaps)."""

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


def run(buf: JoinBuffer, kind: str, key: int, ts: float) -> tuple[str, list[tuple[str, str]]]:
    fate, _ = buf.add_prediction(pred(key, ts)) if kind == "p" else buf.add_outcome(out(key, ts))
    released = buf.advance(ts)
    rel: list[tuple[str, str]] = []
    if released is not None:
        rel += [(EXPIRED, p.id) for p in released.predictions]
        rel += [(ORPHAN, o.id) for o in released.outcomes]
    return fate, sorted(rel)


events = st.lists(
    st.tuples(st.sampled_from("po"), st.integers(0, 12), st.integers(0, 60).map(float)),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(events, st.sampled_from([5.0, 15.0, 1e9]), st.sampled_from([0.5, 10.0, 1e9]))
def test_join_matches_naive_reference(
    evs: list[tuple[str, int, float]], ttl: float, retention: float
) -> None:
    buf = JoinBuffer(ttl=ttl, retention=retention)
    ref = Reference(ttl=ttl, retention=retention)
    for kind, key, ts in evs:
        assert run(buf, kind, key, ts) == ref.add(kind, f"id{key}", ts)
        assert sorted(buf.predictions) == sorted(k for k, _ in ref.preds)
        assert sorted(buf.outcomes) == sorted(k for k, _ in ref.outs)


@settings(max_examples=200, deadline=None)
@given(events, st.sampled_from([5.0, 1e9]))
def test_every_event_has_exactly_one_fate(evs: list[tuple[str, int, float]], ttl: float) -> None:
    """consumed = joined + expired + orphan + duplicate + late + pending, per topic, at every step."""
    buf = JoinBuffer(ttl=ttl)
    fates = {t: dict.fromkeys(FINAL_FATES, 0) for t in "po"}
    consumed = {"p": 0, "o": 0}
    for kind, key, ts in evs:
        consumed[kind] += 1
        fate, rel = run(buf, kind, key, ts)
        if fate == JOINED:
            fates["p"][JOINED] += 1
            fates["o"][JOINED] += 1
        elif fate != PENDING:
            fates[kind][fate] += 1
        for f, _ in rel:
            fates["p" if f == EXPIRED else "o"][f] += 1
        assert consumed["p"] == sum(fates["p"].values()) + len(buf.predictions)
        assert consumed["o"] == sum(fates["o"].values()) + len(buf.outcomes)


@settings(max_examples=200, deadline=None)
@given(st.permutations([("p", i) for i in range(6)] + [("o", i) for i in range(6)] + [("p", 2), ("o", 4)]))
def test_every_arrival_order_joins_each_pair_once(order: list[tuple[str, int]]) -> None:
    """Without expiry, any arrival order joins all six pairs exactly once; repeats are duplicates."""
    buf = JoinBuffer(ttl=1e9)
    fates = [run(buf, kind, key, 0.0)[0] for kind, key in order]
    assert fates.count(JOINED) == 6
    assert fates.count(DUPLICATE) == 2
    assert fates.count(PENDING) == 6
    assert not buf.predictions and not buf.outcomes


def test_outcome_after_expiry_is_late_and_then_duplicate() -> None:
    buf = JoinBuffer(ttl=10)
    assert run(buf, "p", 1, 0.0) == (PENDING, [])
    assert run(buf, "p", 2, 11.0) == (PENDING, [(EXPIRED, "id1")])
    assert run(buf, "o", 1, 12.0)[0] == LATE
    assert run(buf, "o", 1, 12.0)[0] == DUPLICATE
    assert run(buf, "p", 1, 12.0)[0] == DUPLICATE


def test_waiting_outcome_becomes_orphan() -> None:
    buf = JoinBuffer(ttl=10)
    assert run(buf, "o", 1, 0.0) == (PENDING, [])
    assert run(buf, "p", 9, 10.5) == (PENDING, [(ORPHAN, "id1")])


def test_capacity_bound_expires_oldest_and_counts_it() -> None:
    buf = JoinBuffer(ttl=1e9, max_pending=3)
    for i in range(5):
        buf.add_prediction(pred(i, float(i)))
    released = buf.enforce_capacity()
    assert released is not None
    assert [p.id for p in released.predictions] == ["id0", "id1"]
    assert sorted(buf.predictions) == ["id2", "id3", "id4"]
    assert buf.capacity_evictions == [2, 0]
    # an evicted prediction's outcome is late, never silently lost
    assert buf.add_outcome(out(0, 5.0))[0] == LATE


def test_state_round_trip_continues_identically() -> None:
    a = JoinBuffer(ttl=10)
    for i in range(5):
        run(a, "p", i, float(i))
    run(a, "o", 1, 6.0)
    b = JoinBuffer(ttl=10)
    b.load_state(a.to_state())
    for kind, key, ts in [("o", 2, 7.0), ("p", 1, 7.0), ("p", 9, 14.5), ("o", 0, 15.0)]:
        assert run(a, kind, key, ts) == run(b, kind, key, ts)
