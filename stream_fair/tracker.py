"""Ties decode → join → counts (→ feedback) together, per partition ("shard").

The Kafka adapter hands every record to :meth:`Tracker.update_prediction` or
:meth:`Tracker.update_outcome` with its partition and offset. Predictions and outcomes are keyed
by id, so with co-partitioned topics partition *p* of both topics forms shard *p*: its join state,
counts, event accounting and next offsets are one unit that is checkpointed atomically and can
follow the partition to another replica on rebalance.

:meth:`Tracker.snapshot` copies everything an exporter needs into plain data; the caller holds the
lock, the fairness math runs afterwards on the copy (:mod:`stream_fair.report`).

>>> from stream_fair.config import Config
>>> t = Tracker(Config.model_validate({"fairness": {"features": ["sex"]}}))
>>> raw = b'{"id": "a", "ts": 1, "model": "m", "prediction": 1, "attributes": {"sex": "F"}}'
>>> t.update_prediction(0, raw, 0)
>>> t.update_outcome(0, b'{"id": "a", "ts": 2, "label": 1}', 0)
>>> t.update_outcome(0, b'not json', 1).reason
'invalid_json'
>>> snap = t.snapshot()
>>> snap.fates["outcomes"]["joined"], snap.fates["outcomes"]["rejected"], snap.cumulative
(1, 1, {('m', ('F',)): (1, 0, 0, 0)})
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from stream_fair.config import Config, format_duration
from stream_fair.counts import CellCounts, Key, Quad, add_quads
from stream_fair.decode import Decoder
from stream_fair.events import Outcome, Prediction, Rejection
from stream_fair.groups import CardinalityGuard, Cell, FeatureKey, feature_keys
from stream_fair.join import (
    DUPLICATE,
    EXPIRED,
    FINAL_FATES,
    JOINED,
    LATE,
    ORPHAN,
    PENDING,
    REJECTED,
    Expiry,
    JoinBuffer,
)

TOPICS = ("predictions", "outcomes")
_P, _O = 0, 1


class Feedback(Protocol):
    """What the tracker tells the feedback-loop monitor (see :mod:`stream_fair.feedback`)."""

    def on_prediction(self, model: str, cell: Cell, predicted: int, ts: float) -> None: ...

    def on_joined(
        self,
        model: str,
        cell: Cell,
        predicted: int,
        label: int,
        prediction_ts: float,
        outcome_ts: float,
        score: float | None = None,
    ) -> None: ...

    def on_expired(self, model: str, cell: Cell, prediction_ts: float) -> None: ...

    def snapshot(self) -> Any: ...

    def to_state(self) -> dict[str, Any]: ...


@dataclass(slots=True)
class Shard:
    """Everything stream-fair knows about one partition pair."""

    join: JoinBuffer
    counts: CellCounts
    consumed: list[int] = field(default_factory=lambda: [0, 0])
    fates: list[dict[str, int]] = field(
        default_factory=lambda: [dict.fromkeys(FINAL_FATES, 0), dict.fromkeys(FINAL_FATES, 0)]
    )
    rejected: list[dict[str, int]] = field(default_factory=lambda: [{}, {}])
    offsets: list[int | None] = field(default_factory=lambda: [None, None])  # next to read
    last_ts: list[float | None] = field(default_factory=lambda: [None, None])
    # A topic known to have unread records holds the watermark back (not persisted: the run loop
    # sets it after every poll from the partition's high-water mark).
    behind: list[bool] = field(default_factory=lambda: [False, False])

    def to_state(self) -> dict[str, Any]:
        return {
            "join": self.join.to_state(),
            "counts": self.counts.to_state(),
            "consumed": self.consumed,
            "fates": self.fates,
            "rejected": self.rejected,
            "offsets": self.offsets,
            "last_ts": self.last_ts,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.join.load_state(state["join"])
        self.counts.load_state(state["counts"])
        self.consumed = list(state["consumed"])
        self.fates = [dict(f) for f in state["fates"]]
        self.rejected = [dict(r) for r in state["rejected"]]
        self.offsets = list(state["offsets"])
        self.last_ts = list(state["last_ts"])


@dataclass(frozen=True)
class Snapshot:
    """A consistent copy of the detector's raw state; no fairness math applied yet."""

    taken_at: float
    watermark: float | None
    consumed: dict[str, int]
    fates: dict[str, dict[str, int]]
    pending: dict[str, int]
    rejected: dict[str, dict[str, int]]
    capacity_evictions: dict[str, int]
    last_event_ts: dict[str, float]
    cumulative: dict[Key, Quad]
    windows: dict[str, dict[Key, Quad]]
    predictions: dict[Key, tuple[int, int]]
    expired: dict[Key, int]
    overflow: dict[str, int]
    shards: tuple[int, ...]
    feedback: Any = None


class Tracker:
    """The pure core's entry point: bytes in, consistent snapshots out."""

    def __init__(self, config: Config, feedback: Feedback | None = None) -> None:
        self.config = config
        fc = config.fairness
        self.features: list[FeatureKey] = feature_keys([f.name for f in fc.features], fc.intersections)
        self.decoder = Decoder(config)
        self.guard = CardinalityGuard(
            limits=tuple(f.cardinality_limit or fc.cardinality_limit for f in fc.features)
        )
        self.window_labels = tuple(format_duration(w) for w in config.windows)
        self.feedback = feedback
        self.shards: dict[int, Shard] = {}

    def __repr__(self) -> str:
        return f"Tracker(shards={sorted(self.shards)}, features={[k.name for k in self.features]})"

    # -- shards -----------------------------------------------------------------------------
    def shard(self, index: int) -> Shard:
        s = self.shards.get(index)
        if s is None:
            j = self.config.join
            s = self.shards[index] = Shard(
                JoinBuffer(j.ttl, j.outcome_ttl, j.dedupe_retention, j.max_pending),
                CellCounts(self.config.window_resolution, tuple(self.config.windows)),
            )
        return s

    def drop(self, index: int) -> None:
        """Forget a shard (its partition moved to another replica)."""
        self.shards.pop(index, None)

    # -- updates ----------------------------------------------------------------------------
    def update_prediction(
        self, shard: int, raw: bytes | None, offset: int, kafka_ts_ms: int | None = None
    ) -> Rejection | None:
        """Account for one prediction record; returns a :class:`Rejection` when it is unusable."""
        s = self.shards.get(shard)
        if s is None:
            s = self.shard(shard)
        s.offsets[_P] = offset + 1
        s.consumed[_P] += 1
        ev = self.decoder.prediction(raw, kafka_ts_ms)
        if ev.__class__ is Rejection:
            return self._reject(s, _P, ev)  # type: ignore[arg-type]
        p: Prediction = ev  # type: ignore[assignment]
        p.cell = self.guard.cell(p.cell)
        fate, outcome = s.join.add_prediction(p)
        if fate == DUPLICATE:
            s.fates[_P][DUPLICATE] += 1
        else:
            s.counts.add_prediction(p.model, p.cell, p.predicted)
            if self.feedback is not None:
                self.feedback.on_prediction(p.model, p.cell, p.predicted, p.ts)
            if fate == JOINED:
                self._joined(s, p, outcome)  # type: ignore[arg-type]
        self._advance(s, _P, p.ts)
        return None

    def update_outcome(
        self, shard: int, raw: bytes | None, offset: int, kafka_ts_ms: int | None = None
    ) -> Rejection | None:
        """Account for one outcome record; returns a :class:`Rejection` when it is unusable."""
        s = self.shards.get(shard)
        if s is None:
            s = self.shard(shard)
        s.offsets[_O] = offset + 1
        s.consumed[_O] += 1
        ev = self.decoder.outcome(raw, kafka_ts_ms)
        if ev.__class__ is Rejection:
            return self._reject(s, _O, ev)  # type: ignore[arg-type]
        o: Outcome = ev  # type: ignore[assignment]
        fate, prediction = s.join.add_outcome(o)
        if fate == JOINED:
            self._joined(s, prediction, o)  # type: ignore[arg-type]
        elif fate != PENDING:
            s.fates[_O][fate] += 1  # duplicate or late
        self._advance(s, _O, o.ts)
        return None

    def _reject(self, s: Shard, topic: int, r: Rejection) -> Rejection:
        s.fates[topic][REJECTED] += 1
        reasons = s.rejected[topic]
        reasons[r.reason] = reasons.get(r.reason, 0) + 1
        return r

    def _joined(self, s: Shard, p: Prediction, o: Outcome) -> None:
        s.fates[_P][JOINED] += 1
        s.fates[_O][JOINED] += 1
        s.counts.add_joined(p.model, p.cell, o.label, p.predicted, p.ts)
        if self.feedback is not None:
            self.feedback.on_joined(p.model, p.cell, p.predicted, o.label, p.ts, o.ts, p.score)

    def _advance(self, s: Shard, topic: int, ts: float) -> None:
        last = s.last_ts[topic]
        if last is None or ts > last:
            s.last_ts[topic] = ts
            join = s.join
            if ts > join.watermark:
                if s.behind[0] or s.behind[1]:
                    self._move_watermark(s)
                else:  # the common case, inlined: event time is the newest record's
                    released = join.advance(ts)
                    s.counts.advance(ts)
                    if released is not None:
                        self._release(s, released)
        join = s.join
        if len(join.predictions) + len(join.outcomes) > join.max_pending:
            released = join.enforce_capacity()
            if released is not None:
                self._release(s, released)

    def _move_watermark(self, s: Shard) -> None:
        """Event time may advance to the newest record, but not past a topic that is behind.

        Like a two-input watermark in stream processors: when a backlog is read, Kafka hands out
        one topic's records faster than the other's; expiring predictions by the fast topic's
        clock would expire them before their outcomes, already written, are read.
        """
        lp, lo = s.last_ts
        wm = max(t for t in s.last_ts if t is not None)
        if s.behind[_P]:
            wm = min(wm, lp) if lp is not None else float("-inf")
        if s.behind[_O]:
            wm = min(wm, lo) if lo is not None else float("-inf")
        if wm > s.join.watermark:
            released = s.join.advance(wm)
            s.counts.advance(wm)
            if released is not None:
                self._release(s, released)

    def set_behind(self, shard: int, topic: int, behind: bool) -> None:
        """Tell the core whether a partition has unread records (0 = predictions, 1 = outcomes)."""
        s = self.shards.get(shard)
        if s is None or s.behind[topic] == behind:
            return
        s.behind[topic] = behind
        if not behind and any(t is not None for t in s.last_ts):
            self._move_watermark(s)  # a caught-up topic no longer holds event time back

    def _release(self, s: Shard, released: Expiry) -> None:
        for p in released.predictions:
            s.fates[_P][EXPIRED] += 1
            s.counts.add_expired(p.model, p.cell)
            if self.feedback is not None:
                self.feedback.on_expired(p.model, p.cell, p.ts)
        s.fates[_O][ORPHAN] += len(released.outcomes)

    # -- reads ------------------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        """Copy the raw state of all shards (call under the same lock as the updates)."""
        shards = list(self.shards.values())
        consumed = {t: sum(s.consumed[i] for s in shards) for i, t in enumerate(TOPICS)}
        fates = {
            t: {f: sum(s.fates[i][f] for s in shards) for f in FINAL_FATES} for i, t in enumerate(TOPICS)
        }
        pending = {
            "predictions": sum(len(s.join.predictions) for s in shards),
            "outcomes": sum(len(s.join.outcomes) for s in shards),
        }
        rejected: dict[str, dict[str, int]] = {t: {} for t in TOPICS}
        for s in shards:
            for i, t in enumerate(TOPICS):
                for reason, n in s.rejected[i].items():
                    rejected[t][reason] = rejected[t].get(reason, 0) + n
        last_ts = {
            t: max(ts for s in shards if (ts := s.last_ts[i]) is not None)
            for i, t in enumerate(TOPICS)
            if any(s.last_ts[i] is not None for s in shards)
        }
        marks = [s.join.watermark for s in shards if s.join.watermark != float("-inf")]
        return Snapshot(
            taken_at=time.time(),
            watermark=max(marks) if marks else None,
            consumed=consumed,
            fates=fates,
            pending=pending,
            rejected=rejected,
            capacity_evictions={
                t: sum(s.join.capacity_evictions[i] for s in shards) for i, t in enumerate(TOPICS)
            },
            last_event_ts=last_ts,
            cumulative=_merge(s.counts.cumulative() for s in shards),
            windows={
                label: _merge(s.counts.window(i) for s in shards)
                for i, label in enumerate(self.window_labels)
            },
            predictions={
                k: (v[0], v[1]) for k, v in _merge_lists(s.counts.predictions for s in shards).items()
            },
            expired=_merge_ints(s.counts.expired for s in shards),
            overflow={
                f.name: n for f, n in zip(self.config.fairness.features, self.guard.overflow, strict=True)
            },
            shards=tuple(sorted(self.shards)),
            feedback=self.feedback.snapshot() if self.feedback is not None else None,
        )

    # -- persistence ------------------------------------------------------------------------
    def shard_state(self, index: int) -> dict[str, Any]:
        return self.shards[index].to_state()

    def load_shard(self, index: int, state: dict[str, Any]) -> None:
        self.shard(index).load_state(state)

    def global_state(self) -> dict[str, Any]:
        """Replica-wide state (cardinality admissions, feedback monitor)."""
        return {
            "guard": self.guard.to_state(),
            "feedback": self.feedback.to_state() if self.feedback is not None else None,
        }

    def load_global(self, state: dict[str, Any]) -> None:
        self.guard.load_state(state["guard"])
        stored = state.get("feedback")
        if self.feedback is not None and stored is not None:
            monitor = type(self.feedback)
            self.feedback = monitor.from_state(stored, self.features, self.feedback.settings)  # type: ignore[attr-defined]


def _merge(parts: Any) -> dict[Key, Quad]:
    out: dict[Key, Quad] = {}
    for part in parts:
        for k, q in part.items():
            prev = out.get(k)
            out[k] = q if prev is None else add_quads(prev, q)
    return out


def _merge_lists(parts: Any) -> dict[Key, list[int]]:
    out: dict[Key, list[int]] = {}
    for part in parts:
        for k, row in part.items():
            acc = out.setdefault(k, [0] * len(row))
            for i, n in enumerate(row):
                acc[i] += n
    return out


def _merge_ints(parts: Any) -> dict[Key, int]:
    out: dict[Key, int] = {}
    for part in parts:
        for k, n in part.items():
            out[k] = out.get(k, 0) + n
    return out


__all__ = ["TOPICS", "Tracker", "Snapshot", "Shard", "Feedback", "LATE", "ORPHAN"]
