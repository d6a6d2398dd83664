"""Ties decode → join → counts together, per partition ("shard").

The Kafka adapter hands every record to :meth:`Tracker.update_prediction` or
:meth:`Tracker.update_outcome` (or a whole poll to :meth:`Tracker.process`) with its partition and
offset. Predictions and outcomes are keyed by id, so with co-partitioned topics partition *p* of
both topics forms shard *p*: its pending ids (on disk, :mod:`stream_fair.join`), counts
(:mod:`stream_fair.counts`), event accounting and next offsets are one unit that is checkpointed
atomically (:meth:`Tracker.checkpoint`) and follows the partition to another replica.

:meth:`Tracker.snapshot` copies the committed counters into plain data for the exporter; the
fairness math runs afterwards on the copy (:mod:`stream_fair.report`).

>>> import tempfile
>>> from stream_fair.config import Config
>>> from stream_fair.state.rocks import RocksBackend
>>> t = Tracker(Config.model_validate({"fairness": {"features": ["sex"]}}), RocksBackend(tempfile.mkdtemp()))
>>> raw = b'{"id": "a", "ts": 1, "model": "m", "prediction": 1, "attributes": {"sex": "F"}}'
>>> t.update_prediction(0, raw, 0)
>>> t.update_outcome(0, b'{"id": "a", "ts": 2, "label": 1}', 0)
>>> t.update_outcome(0, b'not json', 1).reason
'invalid_json'
>>> t.commit(t.checkpoint())
>>> part = t.snapshot().partitions[0]
>>> part.fates[1]["joined"], part.fates[1]["rejected"], part.cells[("m", ("F",))]
(1, 1, (0, 1, 1, 0, 0, 0, 0))
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, NamedTuple, Protocol, TypeVar, overload

from stream_fair.config import Config, fingerprint, format_duration
from stream_fair.counts import (
    EXPIRED,
    PRED0,
    PRED1,
    SLOT,
    TP,
    WIDTH,
    Key,
    PartitionCounts,
    Quad,
    add_rows,
    confusion,
)
from stream_fair.decode import Decoder
from stream_fair.events import Rejection
from stream_fair.groups import MODEL_OVERFLOW, CardinalityGuard, Cell, FeatureKey, feature_keys
from stream_fair.histograms import PartitionHistograms, ScoreHistogram, feature_histograms
from stream_fair.join import (
    DUPLICATE,
    FINAL_FATES,
    JOINED,
    LATE,
    ORPHAN,
    PENDING,
    REJECTED,
    Expiry,
    Join,
)
from stream_fair.join import EXPIRED as FATE_EXPIRED
from stream_fair.label_windows import LabelledHistogram, LabelWindows, window_histograms
from stream_fair.state.codec import (
    FORMAT_VERSION,
    SPACE_COUNTS,
    SPACE_HIST,
    PendingPrediction,
    counts_key,
    decode_json,
    encode_json,
    histogram_key,
    increment_key,
    meta_key,
    parse_cell,
    prefix,
)
from stream_fair.state.identity import mark
from stream_fair.verdict.increments import CellCounts, IncrementBuilder
from stream_fair.verdict.settings import VerdictSettings

_T = TypeVar("_T")


class cached_property(Generic[_T]):  # noqa: N801 (named after the functools one it stands in for)
    """``functools.cached_property`` as Python 3.12 has it: computed at the first read, kept in the
    instance's ``__dict__``, and **no lock**. Up to 3.11 the functools one holds one lock per
    attribute *of the class* while it computes, so a reader of one snapshot's ``feedback`` waits for
    another thread computing an older snapshot's. Two readers of the very same first read may both
    compute; the first value stored is the one every reader gets (a snapshot's values are pure
    functions of the snapshot).

    >>> class A:
    ...     @cached_property
    ...     def x(self) -> list[int]:
    ...         return [1]
    >>> a = A()
    >>> a.x is a.x, "x" in vars(a)
    (True, True)
    """

    def __init__(self, func: Callable[[Any], _T]) -> None:
        self.func = func
        self.__doc__ = func.__doc__
        self.name = func.__name__

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> cached_property[_T]: ...
    @overload
    def __get__(self, obj: object, owner: type | None = None) -> _T: ...
    def __get__(self, obj: object, owner: type | None = None) -> Any:
        if obj is None:
            return self
        stored = obj.__dict__  # a frozen dataclass forbids setattr, not its __dict__
        if self.name in stored:  # another reader stored it while this one looked the descriptor up
            return stored[self.name]
        return stored.setdefault(self.name, self.func(obj))


TOPICS = ("predictions", "outcomes")
_P, _O = 0, 1


class _Record(NamedTuple):
    """One record handed to :meth:`Tracker.update_prediction` / ``update_outcome``."""

    offset: int
    timestamp: int | None
    value: bytes | None


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


HEARTBEAT_SECONDS = 10.0
"""A partition repeats its verdict message at least this often (see ``Tracker.heartbeat``)."""


@dataclass(slots=True)
class Shard:
    """Everything stream-fair knows about one partition pair."""

    index: int
    join: Join
    counts: PartitionCounts
    guard: CardinalityGuard
    # score histograms per cell (stream_fair.histograms), indexed like counts
    histograms: PartitionHistograms = field(default_factory=PartitionHistograms)
    # labelled score histograms over the recent windows (stream_fair.label_windows; not persisted)
    label_windows: LabelWindows | None = None
    consumed: list[int] = field(default_factory=lambda: [0, 0])
    fates: list[dict[str, int]] = field(
        default_factory=lambda: [dict.fromkeys(FINAL_FATES, 0), dict.fromkeys(FINAL_FATES, 0)]
    )
    rejected: list[dict[str, int]] = field(default_factory=lambda: [{}, {}])
    offsets: list[int | None] = field(default_factory=lambda: [None, None])  # next to read
    last_ts: list[float | None] = field(default_factory=lambda: [None, None])
    # Where the checkpoints of this shard stand: owner epoch, checkpoint sequence, and the
    # changelog offset after the last committed checkpoint (see stream_fair.state.checkpoint).
    epoch: int = 0
    seq: int = 0
    changelog_next: int | None = None
    dead_letters: dict[str, list[int]] = field(default_factory=lambda: {"sent": [0, 0], "errors": [0, 0]})
    # offsets at the previous checkpoint: an increment covers (from, to]
    committed_offsets: list[int | None] = field(default_factory=lambda: [None, None])
    # A topic known to have unread records holds the watermark back (not persisted: the run loop
    # sets it after every poll from the partition's high-water mark).
    behind: list[bool] = field(default_factory=lambda: [False, False])
    changed: bool = False
    # The model-wide verdict's input (stream_fair.leader): counts by cohort and slot since the
    # last checkpoint, and the committed increments not yet acknowledged by the increments topic
    # (the outbox travels in the meta, so a new owner publishes what the old one could not).
    builder: IncrementBuilder | None = None
    built: list[CellCounts] = field(default_factory=list)
    outbox: list[dict[str, Any]] = field(default_factory=list)
    lag_seen: list[bool] = field(default_factory=lambda: [False, False])
    announced: bool | None = None  # the caught_up of the last message (None: none since loading)
    announced_at: float = 0.0  # wall clock of the last message (a caught-up partition repeats it)
    # a random id given to a partition's state when it starts empty: the fold restarts the
    # partition's sequence when it changes (the state was wiped, the changelog renamed)
    incarnation: str = ""
    # Which topics the offsets belong to (stream_fair.state.identity): per topic the mark of the
    # last record read, and the topic ids and partition count the run loop saw when it claimed
    # the shard. A meta written before they existed loads with None.
    marks: list[list[int] | None] = field(default_factory=lambda: [None, None])
    topic_ids: list[str | None] = field(default_factory=lambda: [None, None])
    partitions: int | None = None

    @property
    def caught_up(self) -> bool:
        """Both input partitions read to their end, as far as the run loop last measured."""
        return all(self.lag_seen) and not any(self.behind)

    def meta(self) -> dict[str, Any]:
        return {
            "v": FORMAT_VERSION,
            "partition": self.index,
            "offsets": self.offsets,
            "consumed": self.consumed,
            "fates": self.fates,
            "rejected": self.rejected,
            "last_ts": self.last_ts,
            "join": self.join.to_state(),
            "guard": self.guard.to_state(),
            "cells": len(self.counts.keys),
            "epoch": self.epoch,
            "seq": self.seq,
            "dead_letters": self.dead_letters,
            "outbox": self.outbox,
            "incarnation": self.incarnation,
            "marks": self.marks,
            "topic_ids": self.topic_ids,
            "partitions": self.partitions,
        }

    def load_meta(self, m: dict[str, Any]) -> None:
        self.offsets = list(m["offsets"])
        self.committed_offsets = list(m["offsets"])
        self.consumed = [int(x) for x in m["consumed"]]
        self.fates = [{**dict.fromkeys(FINAL_FATES, 0), **f} for f in m["fates"]]
        self.rejected = [dict(r) for r in m["rejected"]]
        self.last_ts = list(m["last_ts"])
        self.join.load_state(m["join"])
        self.guard.load_state(m["guard"])
        self.epoch = int(m["epoch"])
        self.seq = int(m["seq"])
        dl = m.get("dead_letters") or {}
        self.dead_letters = {k: [int(x) for x in dl.get(k, [0, 0])] for k in ("sent", "errors")}
        self.changelog_next = m.get("changelog_next")
        self.outbox = list(m.get("outbox") or [])
        self.incarnation = str(m.get("incarnation", ""))
        self.marks = list(m.get("marks") or [None, None])
        self.topic_ids = list(m.get("topic_ids") or [None, None])
        self.partitions = m.get("partitions")


@dataclass(frozen=True)
class PartitionView:
    """One partition's committed counters (plain data, safe to read outside the lock)."""

    partition: int
    consumed: tuple[int, int]
    fates: tuple[dict[str, int], dict[str, int]]
    rejected: tuple[dict[str, int], dict[str, int]]
    pending: tuple[int, int]
    capacity_evictions: tuple[int, int]
    last_ts: tuple[float | None, float | None]
    watermark: float | None
    cells: dict[tuple[str, Cell], tuple[int, ...]]
    overflow: dict[str, int]
    dead_letters: dict[str, tuple[int, int]]
    remembered: int = 0
    capacity: int = 0
    # score histogram rows per (model, cell) (stream_fair.histograms); cells without a scored event absent
    histograms: dict[tuple[str, Cell], tuple[int, ...]] = field(default_factory=dict)
    # window label -> labelled score histogram rows per (model, cell) (stream_fair.label_windows)
    label_windows: dict[str, dict[tuple[str, Cell], tuple[int, ...]]] = field(default_factory=dict)


@dataclass(frozen=True)
class Snapshot:
    """A consistent copy of the committed state; no fairness math applied yet.

    ``partitions`` holds each owned partition's counters; the properties sum them (the replica's
    view). ``windows`` are the event-time windows' confusion counts per (model, cell).
    """

    taken_at: float
    partitions: dict[int, PartitionView]
    windows: dict[str, dict[Key, Quad]] = field(default_factory=dict)
    feedback_source: Any = None
    """The feedback monitor's indicators, or a capture of its state (anything with ``compute()``,
    e.g. :class:`~stream_fair.feedback.monitor.FeedbackCapture`): see :attr:`feedback`."""

    @cached_property
    def feedback(self) -> Any:
        """The feedback monitor's indicators (a ``FeedbackSnapshot``; None without a monitor).

        From a capture, the feedback math runs here, at the first read, on the reader's thread or
        process (the report worker's, or a scrape's): never on the consumer thread that published
        the snapshot, and once per snapshot, not per checkpoint, when the readers skip snapshots.
        A reader never waits for another snapshot's math (:class:`cached_property`)."""
        source = self.feedback_source
        return source.compute() if hasattr(source, "compute") else source

    @property
    def shards(self) -> tuple[int, ...]:
        return tuple(sorted(self.partitions))

    @property
    def consumed(self) -> dict[str, int]:
        return {t: sum(v.consumed[i] for v in self.partitions.values()) for i, t in enumerate(TOPICS)}

    @property
    def fates(self) -> dict[str, dict[str, int]]:
        return {
            t: {f: sum(v.fates[i].get(f, 0) for v in self.partitions.values()) for f in FINAL_FATES}
            for i, t in enumerate(TOPICS)
        }

    @property
    def pending(self) -> dict[str, int]:
        return {t: sum(v.pending[i] for v in self.partitions.values()) for i, t in enumerate(TOPICS)}

    @property
    def rejected(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {t: {} for t in TOPICS}
        for v in self.partitions.values():
            for i, t in enumerate(TOPICS):
                for reason, n in v.rejected[i].items():
                    out[t][reason] = out[t].get(reason, 0) + n
        return out

    @property
    def capacity_evictions(self) -> dict[str, int]:
        return {
            t: sum(v.capacity_evictions[i] for v in self.partitions.values()) for i, t in enumerate(TOPICS)
        }

    @property
    def last_event_ts(self) -> dict[str, float]:
        out = {}
        for i, t in enumerate(TOPICS):
            seen = [ts for v in self.partitions.values() if (ts := v.last_ts[i]) is not None]
            if seen:
                out[t] = max(seen)
        return out

    @property
    def watermark(self) -> float | None:
        marks = [v.watermark for v in self.partitions.values() if v.watermark is not None]
        return max(marks) if marks else None

    @cached_property  # a snapshot never changes: summed once, whoever asks first
    def _rows(self) -> dict[Key, list[int]]:
        out: dict[Key, list[int]] = {}
        for v in self.partitions.values():
            for k, row in v.cells.items():
                acc = out.get(k)
                if acc is None:
                    out[k] = list(row)
                else:
                    add_rows(acc, row)
        return out

    @cached_property
    def cumulative(self) -> dict[Key, Quad]:
        """Joined pairs' confusion counts per (model, cell), cells with no pair left out."""
        return {k: q for k, row in self._rows.items() if any(q := confusion(row))}

    @cached_property
    def predictions(self) -> dict[Key, tuple[int, int]]:
        return {k: (row[PRED0], row[PRED1]) for k, row in self._rows.items()}

    @cached_property
    def expired(self) -> dict[Key, int]:
        return {k: row[EXPIRED] for k, row in self._rows.items() if row[EXPIRED]}

    def score_histograms(self, key: FeatureKey) -> dict[str, dict[str, ScoreHistogram]]:
        """model -> group -> :class:`~stream_fair.histograms.ScoreHistogram` of one feature key,
        summed over the owned partitions (``docs/metrics.md``, "Score histograms")."""
        return feature_histograms((v.histograms for v in self.partitions.values()), [key])[key.name]

    def all_score_histograms(
        self, keys: Sequence[FeatureKey]
    ) -> dict[str, dict[str, dict[str, ScoreHistogram]]]:
        """:meth:`score_histograms` of several feature keys at once: key name -> model -> group."""
        return feature_histograms((v.histograms for v in self.partitions.values()), keys)

    def window_score_histograms(
        self, keys: Sequence[FeatureKey]
    ) -> dict[str, dict[str, dict[str, dict[str, LabelledHistogram]]]]:
        """window -> key name -> model -> group -> labelled score histogram of the labels whose
        event time lies in the window (:mod:`stream_fair.label_windows`), over the owned partitions."""
        labels = sorted({w for v in self.partitions.values() for w in v.label_windows})
        return {
            w: window_histograms((v.label_windows.get(w, {}) for v in self.partitions.values()), keys)
            for w in labels
        }

    @property
    def overflow(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for v in self.partitions.values():
            for f, n in v.overflow.items():
                out[f] = out.get(f, 0) + n
        return out


@dataclass
class ShardCheckpoint:
    """One shard's share of a checkpoint: local writes, changelog records and the commit marker."""

    partition: int
    store: dict[bytes, bytes | None]
    changelog: list[tuple[bytes, bytes | None]]
    meta: dict[str, Any]
    increment: dict[str, Any] | None


@dataclass
class Checkpoint:
    shards: list[ShardCheckpoint] = field(default_factory=list)


class Tracker:
    """The pure core's entry point: bytes in, checkpoints and snapshots out."""

    def __init__(
        self,
        config: Config,
        backend: Any,
        feedback: Feedback | None = None,
        verdict: VerdictSettings | None = None,
    ) -> None:
        self.config = config
        # what the state depends on, in every commit marker (checked when a changelog is restored)
        self.fingerprint = fingerprint(config)
        # with settings, every shard counts the model-wide verdict's increments (stream_fair.leader)
        self.verdict = verdict
        fc = config.fairness
        self.features: list[FeatureKey] = feature_keys(
            [f.name for f in fc.features], fc.intersections, [f.name for f in fc.audit_only]
        )
        self.decoder = Decoder(config)
        # audit_only attributes are bounded like features: they multiply the count rows
        self._limits = tuple(f.cardinality_limit or fc.cardinality_limit for f in fc.carried)
        self._intersections = tuple(k.indices for k in self.features if k.is_intersection)
        # the guard's overflow order: every carried attribute, then the intersections
        self._overflow_names = [f.name for f in fc.carried]
        self._overflow_names += [k.name for k in self.features if k.is_intersection]
        self.backend = backend
        self.shards: dict[int, Shard] = {}
        self.views: dict[int, PartitionView] = {}
        self.feedback = feedback

    @property
    def feedback(self) -> Feedback | None:
        return self._feedback

    @feedback.setter
    def feedback(self, monitor: Feedback | None) -> None:
        """A monitor that can read the count store (``attach``) reads the owned shards' counts
        instead of counting them again (one count store per event, :mod:`stream_fair.counts`)."""
        self._feedback = monitor
        if monitor is not None and hasattr(monitor, "attach"):
            monitor.attach(self.owned_counts)

    def owned_counts(self) -> dict[int, PartitionCounts]:
        """The count stores of the owned partitions, in partition order (what the report covers)."""
        return {i: self.shards[i].counts for i in sorted(self.shards) if i in self.views}

    def settled(self) -> None:
        """Every assigned partition is loaded (the run loop's restores are done): the monitor drops
        from its detectors' bases the partitions its restored state covered that did not come back."""
        settle = getattr(self._feedback, "settle", None)
        if settle is not None:
            settle()

    def _ownership_changes(self) -> None:
        """Called before and after a shard is added or dropped: the monitor feeds its detectors
        with the counts before the change, then rebases them on the counts after it."""
        flush = getattr(self._feedback, "flush", None)
        if flush is not None:
            flush()

    def __repr__(self) -> str:
        return f"Tracker(shards={sorted(self.shards)}, features={[k.name for k in self.features]})"

    # -- shards -----------------------------------------------------------------------------
    def shard(self, index: int) -> Shard:
        """The shard of a partition, loaded from the local store on first use."""
        s = self.shards.get(index)
        if s is None:
            self._ownership_changes()
            s = self.shards[index] = self._new_shard(index)
            stored = self.backend.get(meta_key(index))
            if stored is None:
                s.incarnation = uuid.uuid4().hex
            else:
                s.load_meta(decode_json(stored))
                for key, value in self.backend.scan(
                    prefix(SPACE_COUNTS, index), prefix(SPACE_COUNTS, index + 1)
                ):
                    s.counts.load_row(parse_cell(key[3:]), decode_json(value))
                for key, value in self.backend.scan(prefix(SPACE_HIST, index), prefix(SPACE_HIST, index + 1)):
                    s.histograms.load_row(parse_cell(key[3:]), decode_json(value))
            self.views[index] = self._view(s)
            self._ownership_changes()
        return s

    def _new_shard(self, index: int) -> Shard:
        j = self.config.join
        v = self.verdict
        return Shard(
            index,
            Join(
                self.backend, index, j.ttl, j.outcome_ttl, j.dedupe_retention, j.max_pending, j.max_remembered
            ),
            PartitionCounts(self.config.window_resolution),
            CardinalityGuard(
                limits=self._limits,
                intersections=self._intersections,
                intersection_limit=self.config.fairness.intersection_cardinality_limit,
                model_limit=self.config.fairness.model_limit,
            ),
            builder=None if v is None else IncrementBuilder(v.period, v.slot, v.bins),
            label_windows=LabelWindows(
                self.config.window_resolution,
                self.config.windows,
                [format_duration(w) for w in self.config.windows],
            ),
        )

    def stored_meta(self, index: int) -> dict[str, Any] | None:
        raw = self.backend.get(meta_key(index))
        return None if raw is None else decode_json(raw)  # type: ignore[no-any-return]

    def drop(self, index: int) -> None:
        """Forget a shard in memory (its partition moved to another replica); the store keeps it."""
        if index not in self.shards:
            return
        self._ownership_changes()
        self.shards.pop(index, None)
        self.views.pop(index, None)
        self._ownership_changes()

    # -- updates ----------------------------------------------------------------------------
    def process(self, shard: int, topic: int, records: Iterable[Any]) -> list[tuple[Any, Rejection]]:
        """Account for one poll's records of one partition (objects with ``offset``, ``value``,
        ``timestamp``); returns the rejected records with their reasons.

        The batch hot path: the records are decoded (one parse each), the stored records of their
        ids are read in one batched lookup (:meth:`IdTable.prefetch`), then each is joined and
        counted in order; offsets, consumed counts and the resume mark are set once per batch.
        The result equals feeding the records one by one to :meth:`update_prediction` /
        :meth:`update_outcome` (a test checks).
        """
        records = records if isinstance(records, list) else list(records)
        if not records:
            return []
        s = self.shards.get(shard)
        if s is None:
            s = self.shard(shard)
        rejected = self._batch(s, shard, topic, records)
        r = records[-1]  # what the stored offset is checked against on resume
        s.marks[topic] = mark(r.offset, r.timestamp, getattr(r, "key", None), r.value)
        return rejected

    def update_prediction(
        self, shard: int, raw: bytes | None, offset: int, kafka_ts_ms: int | None = None
    ) -> Rejection | None:
        """Account for one prediction record; returns a :class:`Rejection` when it is unusable."""
        return self._one(shard, _P, raw, offset, kafka_ts_ms)

    def update_outcome(
        self, shard: int, raw: bytes | None, offset: int, kafka_ts_ms: int | None = None
    ) -> Rejection | None:
        """Account for one outcome record; returns a :class:`Rejection` when it is unusable."""
        return self._one(shard, _O, raw, offset, kafka_ts_ms)

    def _one(
        self, shard: int, topic: int, raw: bytes | None, offset: int, ts_ms: int | None
    ) -> Rejection | None:
        s = self.shards.get(shard)
        if s is None:
            s = self.shard(shard)
        rejected = self._batch(s, shard, topic, [_Record(offset, ts_ms, raw)])
        return rejected[0][1] if rejected else None

    def _batch(self, s: Shard, shard: int, topic: int, records: list[Any]) -> list[tuple[Any, Rejection]]:
        s.changed = True
        if topic == _P:
            events: list[Any] = self.decoder.predictions(records)
        else:
            events = self.decoder.outcomes(records)
        s.join.ids.prefetch([ev.id for ev in events if ev.__class__ is not Rejection])
        rejected = (self._predictions if topic == _P else self._outcomes)(s, shard, records, events)
        s.offsets[topic] = records[-1].offset + 1
        s.consumed[topic] += len(records)
        return rejected

    def _predictions(
        self, s: Shard, shard: int, records: list[Any], events: list[Any]
    ) -> list[tuple[Any, Rejection]]:
        """Join and count one batch of decoded predictions, in order (the hot path: inlined)."""
        rejected = []
        join, counts, guard, hist = s.join, s.counts, s.guard, s.histograms
        last_ts, behind, fates = s.last_ts, s.behind, s.fates[_P]
        event_time = self.decoder.event_time
        skew, runs = event_time.allowed_skew, event_time._runs  # noqa: SLF001 - its fast check inlined
        unfolded, model_limit, models = guard._unfolded, guard.model_limit, guard.models  # noqa: SLF001
        index, rows, dirty, increments, period = (
            counts.index,
            counts.rows,
            counts.dirty,
            counts.increments,
            counts.period,
        )
        feedback = self._feedback
        on_prediction = feedback.on_prediction if feedback is not None else None
        builder = s.builder
        key = (shard, _P)
        floor = math.floor
        for r, ev in zip(records, events):  # noqa: B905 (same length by construction)
            if ev.__class__ is Rejection:
                rejected.append((r, self._reject(s, _P, ev)))
                continue
            ts = ev.ts
            last = last_ts[_P]
            # event time the watermark may see: a far jump moves it by event_time.allowed_skew at most
            if (last is None or ts <= last + skew) and not runs:
                t = ts
            else:
                t = event_time.admit(key, join.watermark, last, ts)
                if t.__class__ is Rejection:
                    rejected.append((r, self._reject(s, _P, t)))  # type: ignore[arg-type]
                    continue
            # cell, intersection groups and model within their cardinality limits; a duplicate
            # admits no new group, model or cell (it would take a slot a real group then misses)
            cell = unfolded.get(ev.cell)
            if cell is None or (model_limit is not None and ev.model not in models):
                if join.is_duplicate_prediction(ev.id):
                    fates[DUPLICATE] += 1
                    self._advance(s, _P, t, last_ts, behind, join)  # type: ignore[arg-type]
                    continue
                guard.fold(ev)
                cell = ev.cell
            model, predicted, score = ev.model, ev.predicted, ev.score
            ci = index.get((model, cell))
            if ci is None:
                if join.is_duplicate_prediction(ev.id):
                    fates[DUPLICATE] += 1
                    self._advance(s, _P, t, last_ts, behind, join)  # type: ignore[arg-type]
                    continue
                ci = counts.cell(model, cell)
            p = PendingPrediction(ts, ci, predicted, score)
            fate, outcome = join.add_prediction(ev.id, p)
            if fate == DUPLICATE:
                fates[DUPLICATE] += 1
            else:
                column = PRED1 if predicted else PRED0
                rows[ci][column] += 1  # PartitionCounts.add_prediction, inlined
                dirty.add(ci)
                k = (ci, floor(ts / period))
                inc = increments.get(k)
                if inc is None:
                    inc = increments[k] = [0] * WIDTH
                inc[column] += 1
                if score is not None:
                    hist.add(ci, column, score)
                if on_prediction is not None:
                    on_prediction(model, cell, predicted, ts)
                if builder is not None:
                    builder.add_prediction(model, cell, predicted, ts)
                if fate == JOINED:
                    self._joined(s, p, outcome.ts, outcome.label)  # type: ignore[union-attr]
            self._advance(s, _P, t, last_ts, behind, join)  # type: ignore[arg-type]
        return rejected

    def _outcomes(
        self, s: Shard, shard: int, records: list[Any], events: list[Any]
    ) -> list[tuple[Any, Rejection]]:
        """Join one batch of decoded outcomes, in order (the hot path: inlined)."""
        rejected = []
        join, last_ts, behind, fates = s.join, s.last_ts, s.behind, s.fates[_O]
        event_time = self.decoder.event_time
        skew, runs = event_time.allowed_skew, event_time._runs  # noqa: SLF001
        key = (shard, _O)
        add_outcome, joined = join.add_outcome, self._joined
        for r, ev in zip(records, events):  # noqa: B905 (same length by construction)
            if ev.__class__ is Rejection:
                rejected.append((r, self._reject(s, _O, ev)))
                continue
            ts = ev.ts
            last = last_ts[_O]
            if (last is None or ts <= last + skew) and not runs:
                t = ts
            else:
                t = event_time.admit(key, join.watermark, last, ts)
                if t.__class__ is Rejection:
                    rejected.append((r, self._reject(s, _O, t)))  # type: ignore[arg-type]
                    continue
            label = ev.label
            fate, prediction = add_outcome(ev.id, ts, label)
            if fate == JOINED:
                joined(s, prediction, ts, label)  # type: ignore[arg-type]
            elif fate != PENDING:
                fates[fate] += 1  # duplicate or late
            self._advance(s, _O, t, last_ts, behind, join)  # type: ignore[arg-type]
        return rejected

    def _reject(self, s: Shard, topic: int, r: Rejection) -> Rejection:
        s.fates[topic][REJECTED] += 1
        reasons = s.rejected[topic]
        reasons[r.reason] = reasons.get(r.reason, 0) + 1
        return r

    def _joined(self, s: Shard, p: PendingPrediction, outcome_ts: float, label: int) -> None:
        fates = s.fates
        fates[_P][JOINED] += 1
        fates[_O][JOINED] += 1
        ci, predicted, ts = p.cell, p.predicted, p.ts
        counts = s.counts  # PartitionCounts.add_joined, inlined
        column = TP + SLOT[label, predicted]
        counts.rows[ci][column] += 1
        counts.dirty.add(ci)
        k = (ci, math.floor(ts / counts.period))
        inc = counts.increments.get(k)
        if inc is None:
            inc = counts.increments[k] = [0] * WIDTH
        inc[column] += 1
        score = p.score
        if score is not None:
            s.histograms.add(ci, column, score)  # PartitionHistograms.add_joined
            if s.label_windows is not None:
                s.label_windows.add(ci, label, score, outcome_ts)
        feedback, builder = self._feedback, s.builder
        if feedback is not None or builder is not None:
            model, cell = counts.keys[ci]
            if feedback is not None:
                feedback.on_joined(model, cell, predicted, label, ts, outcome_ts, score)
            if builder is not None:
                builder.add_labelled(model, cell, predicted, label, ts, outcome_ts, score)

    def _advance(
        self, s: Shard, topic: int, ts: float, last_ts: list[float | None], behind: list[bool], join: Join
    ) -> None:
        last = last_ts[topic]
        if last is None or ts > last:
            last_ts[topic] = ts
            if ts > join.watermark:
                if behind[0] or behind[1]:
                    self._move_watermark(s)
                else:  # the common case, inlined: event time is the newest record's
                    ids = join.ids
                    if ts <= ids.next_due and ts <= ids.next_forget:
                        join.watermark = ts  # Join.advance with nothing due (its cheap checks, inlined)
                    else:
                        released = join.advance(ts)
                        if released is not None:
                            self._release(s, released)
        if (
            join.pending_predictions + join.pending_outcomes > join.max_pending
            or join.remembered > join.max_remembered
        ):  # Join.over_capacity, inlined
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
            if released is not None:
                self._release(s, released)

    def heartbeat(self) -> None:
        """Partitions whose last verdict message is older than ``HEARTBEAT_SECONDS`` send one at
        the next checkpoint, so the leader can tell an idle, caught-up partition from a lost one."""
        now = time.time()
        for s in self.shards.values():
            # not while messages wait for the increments topic: they say the partition is alive
            # when they go, and a heartbeat each interval would grow the outbox (in every meta)
            # for as long as the topic refuses writes
            if s.builder is not None and not s.outbox and now - s.announced_at >= HEARTBEAT_SECONDS:
                s.changed = True

    def unannounce(self, shard: int) -> None:
        """The partition is leaving this replica: its next message says it is not caught up, so the
        leader waits for its next owner instead of lifting its watermark."""
        s = self.shards.get(shard)
        if s is not None and s.builder is not None:
            s.lag_seen = [False, False]
            s.changed = True

    def set_behind(self, shard: int, topic: int, behind: bool) -> None:
        """Tell the core whether a partition has unread records (0 = predictions, 1 = outcomes)."""
        s = self.shards.get(shard)
        if s is None:
            return
        moved = s.behind[topic] != behind
        s.lag_seen[topic] = True
        s.behind[topic] = behind
        if s.builder is not None and s.caught_up != s.announced:
            s.changed = True  # the model-wide fold hears when a partition is caught up or not
        if moved and not behind and any(t is not None for t in s.last_ts):
            s.changed = True
            self._move_watermark(s)  # a caught-up topic no longer holds event time back

    def _release(self, s: Shard, released: Expiry) -> None:
        counts = s.counts
        for _, p in released.predictions:
            s.fates[_P][FATE_EXPIRED] += 1
            counts.add_expired(p.cell, p.ts)
            if p.score is not None:
                s.histograms.add_expired(p.cell, p.predicted, p.score)
            if self._feedback is not None:
                model, cell = counts.keys[p.cell]
                self._feedback.on_expired(model, cell, p.ts)
        s.fates[_O][ORPHAN] += len(released.outcomes)

    # -- checkpoints ------------------------------------------------------------------------
    def checkpoint(self, shards: Iterable[int] | None = None) -> Checkpoint:
        """The changes of the given (default: all) shards since their last checkpoint.

        Nothing is marked committed until :meth:`commit`: the caller first makes the changelog
        records durable, then writes ``store`` to the local store, then calls :meth:`commit`.
        """
        out = Checkpoint()
        ids = sorted(self.shards) if shards is None else sorted(set(shards) & set(self.shards))
        for i in ids:
            s = self.shards[i]
            if not s.changed and not s.join.ids.changed:
                continue
            store, changelog = s.join.ids.changes()
            counts = s.counts
            for ci in sorted(counts.dirty):
                value = encode_json(counts.row_document(ci))
                store[counts_key(i, ci)] = value
                changelog.append((counts_key(i, ci), value))
            hist = s.histograms
            for ci in sorted(hist.dirty):
                value = encode_json(hist.row_document(ci, counts.keys[ci]))
                store[histogram_key(i, ci)] = value
                changelog.append((histogram_key(i, ci), value))
            increment = self._increment(s)
            meta = s.meta()
            meta["seq"] = s.seq + 1
            meta["config"] = self.fingerprint
            if s.builder is not None:
                meta["outbox"] = self._outbox(s, meta["seq"])
            meta["wall"] = time.time()
            out.shards.append(ShardCheckpoint(i, store, changelog, meta, increment))
        return out

    def _outbox(self, s: Shard, seq: int) -> list[dict[str, Any]]:
        """The outbox with this checkpoint's verdict increment (see :mod:`stream_fair.leader`).

        Rows built by a checkpoint that then failed stay in ``built`` and go with the next one.
        """
        assert s.builder is not None
        if len(s.builder):
            s.built.extend(s.builder.build("", None).counts)
        quiet = bool(s.outbox) or time.time() - s.announced_at < HEARTBEAT_SECONDS
        if not s.built and s.offsets == s.committed_offsets and s.caught_up == s.announced and quiet:
            return list(s.outbox)
        wm = s.join.watermark
        message = {
            "partition": s.index,
            "seq": seq,
            "epoch": s.epoch,
            "watermark": None if wm == float("-inf") else wm,
            "caught_up": s.caught_up,
            "incarnation": s.incarnation,
            "rows": [c.to_json() for c in s.built],
        }
        return [*s.outbox, message]

    def _increment(self, s: Shard) -> dict[str, Any] | None:
        rows = s.counts.increments  # cleared by commit(): a failed checkpoint is simply retried
        if not rows and s.offsets == s.committed_offsets:
            return None
        refs: dict[int, int] = {}
        cells: list[list[Any]] = []
        out_rows = []
        for (ci, period), row in sorted(rows.items()):
            r = refs.get(ci)
            if r is None:
                model, cell = s.counts.keys[ci]
                r = refs[ci] = len(cells)
                cells.append([model, list(cell)])
            out_rows.append([r, period, row])
        return {
            "v": FORMAT_VERSION,
            "partition": s.index,
            "from": list(s.committed_offsets),
            "to": list(s.offsets),
            "watermark": s.join.watermark if s.join.watermark != float("-inf") else None,
            "period": self.config.window_resolution,
            "cells": cells,
            "rows": out_rows,
        }

    def commit(
        self,
        checkpoint: Checkpoint,
        changelog_next: dict[int, int] | None = None,
        extra: dict[bytes, bytes | None] | None = None,
    ) -> None:
        """The checkpoint is durable in the changelog (when there is one): write it to the local
        store, with ``extra`` keys in the same batch, and start new overlays."""
        writes: dict[bytes, bytes | None] = dict(extra or {})
        for sc in checkpoint.shards:
            s = self.shards[sc.partition]
            s.seq = sc.meta["seq"]
            if "outbox" in sc.meta:
                if sc.meta["outbox"] and sc.meta["outbox"][-1]["seq"] == sc.meta["seq"]:
                    s.announced = sc.meta["outbox"][-1]["caught_up"]
                    s.announced_at = sc.meta["wall"]
                s.outbox = sc.meta["outbox"]
                s.built = []
            if changelog_next is not None and sc.partition in changelog_next:
                s.changelog_next = changelog_next[sc.partition]
            local = dict(sc.meta)
            local["changelog_next"] = s.changelog_next
            writes.update(sc.store)
            writes[meta_key(sc.partition)] = encode_json(local)
        if writes:
            self.backend.write(writes)
        for sc in checkpoint.shards:
            s = self.shards[sc.partition]
            s.join.ids.committed()
            s.counts.dirty.clear()
            s.histograms.dirty.clear()
            s.counts.increments = {}
            s.committed_offsets = list(s.offsets)
            s.changed = False
            self.views[sc.partition] = self._view(s)

    # -- reads ------------------------------------------------------------------------------
    def _view(self, s: Shard) -> PartitionView:
        j = s.join
        return PartitionView(
            partition=s.index,
            consumed=(s.consumed[0], s.consumed[1]),
            fates=(dict(s.fates[0]), dict(s.fates[1])),
            rejected=(dict(s.rejected[0]), dict(s.rejected[1])),
            pending=(j.pending_predictions, j.pending_outcomes),
            capacity_evictions=(j.capacity_evictions[0], j.capacity_evictions[1]),
            last_ts=(s.last_ts[0], s.last_ts[1]),
            watermark=j.watermark if j.watermark != float("-inf") else None,
            cells={k: tuple(row) for k, row in zip(s.counts.keys, s.counts.rows, strict=True)},
            overflow={
                **{name: n for name, n in zip(self._overflow_names, s.guard.overflow, strict=True)},
                MODEL_OVERFLOW: s.guard.model_overflow,
            },
            dead_letters={k: (v[0], v[1]) for k, v in s.dead_letters.items()},
            remembered=j.remembered,
            capacity=j.max_pending,
            histograms=self._histogram_view(s),
            label_windows=s.label_windows.view(s.counts.keys) if s.label_windows is not None else {},
        )

    def _histogram_view(self, s: Shard) -> dict[tuple[str, Cell], tuple[int, ...]]:
        # unchanged rows keep the previous view's tuples: a commit copies only what changed
        old = self.views.get(s.index)
        prev = old.histograms if old is not None else {}
        keys, rows = s.counts.keys, s.histograms.rows
        changed = s.histograms.unviewed
        out = {}
        for ci, row in enumerate(rows):
            k = keys[ci]
            t = prev.get(k)
            if t is None or ci in changed:
                if not any(row):
                    continue
                t = tuple(row)
            out[k] = t
        changed.clear()
        return out

    def snapshot(self, windows: dict[str, dict[Key, Quad]] | None = None, feedback: Any = None) -> Snapshot:
        """The committed views of the owned partitions (call under the lock that guards commits).

        ``feedback``: the monitor's capture (its math then runs where the snapshot is read, see
        :attr:`Snapshot.feedback`) or its computed snapshot; by default its ``snapshot()`` here."""
        if feedback is None and self.feedback is not None:
            feedback = self.feedback.snapshot()
        return Snapshot(
            taken_at=time.time(),
            partitions={i: self.views[i] for i in sorted(self.shards) if i in self.views},
            windows=windows or {},
            feedback_source=feedback,
        )


__all__ = [
    "TOPICS", "Tracker", "Snapshot", "Shard", "PartitionView", "Feedback", "Checkpoint",
    "ShardCheckpoint", "LATE", "ORPHAN", "increment_key",
]  # fmt: skip
