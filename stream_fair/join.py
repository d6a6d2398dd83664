"""Where an outcome gets joined to its prediction: pending events by id, event-time expiry, fates.

Every event gets exactly one fate, per topic:

=============  ===========================================================================
``joined``     its partner arrived (both arrival orders)
``pending``    still waiting for its partner (the only non-final fate)
``expired``    a prediction whose time-to-live passed without an outcome (no label)
``orphan``     an outcome whose time-to-live passed without a prediction
``duplicate``  the id was already pending, joined or expired on this topic (counted once)
``late``       an outcome for a prediction that had already expired
``rejected``   undecodable or invalid (decided before the join, see :mod:`stream_fair.decode`)
=============  ===========================================================================

Time is event time: the *watermark* is set by the tracker (the newest event time, held back while
either topic still has unread records). A prediction expires when ``watermark > ts + ttl``; a
waiting outcome becomes an orphan when ``watermark > ts + outcome_ttl``. Joined and expired ids
are remembered for ``retention`` more seconds (joined: from the later of the two event times;
expired: from the deadline) to recognise duplicates and late outcomes. At most ``max_pending``
events wait and at most ``max_remembered`` ids are remembered; beyond that, the event closest to
its deadline is expired (or orphaned, or forgotten) early and counted.

The records live in an :class:`~stream_fair.state.ids.IdTable` over the local store, so a pending
prediction costs disk, not RAM (see ``docs/state.md``).

>>> import tempfile
>>> from stream_fair.state.rocks import RocksBackend
>>> from stream_fair.state.codec import PendingPrediction
>>> join = Join(RocksBackend(tempfile.mkdtemp()), partition=0, ttl=60)
>>> join.add_outcome("a", ts=5.0, label=1)                     # the outcome comes first and waits
('pending', None)
>>> fate, partner = join.add_prediction("a", PendingPrediction(1.0, cell=0, predicted=1, score=None))
>>> fate, partner.label
('joined', 1)
>>> join.add_prediction("a", PendingPrediction(1.0, cell=0, predicted=1, score=None))[0]
'duplicate'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from stream_fair.state.codec import (
    KIND_E,
    KIND_J,
    KIND_O,
    KIND_P,
    PendingOutcome,
    PendingPrediction,
    Record,
    Remembered,
)
from stream_fair.state.ids import IdTable

JOINED = "joined"
PENDING = "pending"
EXPIRED = "expired"
ORPHAN = "orphan"
DUPLICATE = "duplicate"
LATE = "late"
REJECTED = "rejected"
FINAL_FATES = (JOINED, EXPIRED, ORPHAN, DUPLICATE, LATE, REJECTED)


@dataclass(slots=True)
class Expiry:
    """What one watermark advance (or a capacity eviction) released: ids with their records."""

    predictions: list[tuple[str, PendingPrediction]] = field(default_factory=list)
    outcomes: list[str] = field(default_factory=list)


class Join:
    """Pending predictions and outcomes of one partition, joined by id in event time."""

    __slots__ = (
        "ids", "ttl", "outcome_ttl", "retention", "max_pending", "max_remembered", "watermark",
        "pending_predictions", "pending_outcomes", "remembered", "capacity_evictions",
        "memory_evictions",
    )  # fmt: skip

    def __init__(
        self,
        backend: Any,
        partition: int,
        ttl: float,
        outcome_ttl: float | None = None,
        retention: float | None = None,
        max_pending: int = 300_000_000,
        max_remembered: int | None = None,
    ) -> None:
        self.ttl = ttl
        self.outcome_ttl = ttl if outcome_ttl is None else outcome_ttl
        self.retention = ttl if retention is None else retention
        self.max_pending = max_pending
        self.max_remembered = max_pending if max_remembered is None else max_remembered
        self.ids = IdTable(backend, partition, self.ttl, self.outcome_ttl)
        self.watermark = float("-inf")
        self.pending_predictions = 0
        self.pending_outcomes = 0
        self.remembered = 0
        self.capacity_evictions = [0, 0]  # predictions, outcomes
        self.memory_evictions = 0

    def __repr__(self) -> str:
        return (
            f"Join(pending_predictions={self.pending_predictions}, "
            f"pending_outcomes={self.pending_outcomes}, watermark={self.watermark})"
        )

    # -- updates ----------------------------------------------------------------------------
    def add_prediction(self, event_id: str, p: PendingPrediction) -> tuple[str, PendingOutcome | None]:
        """Offer a prediction; returns its fate and, when joined, the waiting outcome."""
        ids = self.ids
        rec = ids.get(event_id)
        if rec is None:
            ids.put(event_id, p)
            self.pending_predictions += 1
            return PENDING, None
        if rec.__class__ is PendingOutcome:
            o: PendingOutcome = rec  # type: ignore[assignment]
            ids.put(event_id, Remembered(KIND_J, max(p.ts, o.ts) + self.retention))
            self.pending_outcomes -= 1
            self.remembered += 1
            return JOINED, o
        return DUPLICATE, None

    def is_duplicate_prediction(self, event_id: str) -> bool:
        """Whether :meth:`add_prediction` would call a prediction of ``event_id`` a duplicate:
        checked before a new group, model or cell is admitted for it (a duplicate admits none)."""
        rec = self.ids.get(event_id)
        return rec is not None and rec.__class__ is not PendingOutcome

    def add_outcome(self, event_id: str, ts: float, label: int) -> tuple[str, PendingPrediction | None]:
        """Offer an outcome; returns its fate and, when joined, the waiting prediction."""
        ids = self.ids
        rec = ids.get(event_id)
        if rec is None:
            ids.put(event_id, PendingOutcome(ts, label))
            self.pending_outcomes += 1
            return PENDING, None
        cls = rec.__class__
        if cls is PendingPrediction:
            p: PendingPrediction = rec  # type: ignore[assignment]
            ids.put(event_id, Remembered(KIND_J, max(p.ts, ts) + self.retention))
            self.pending_predictions -= 1
            self.remembered += 1
            return JOINED, p
        if cls is Remembered and rec.kind == KIND_E:  # type: ignore[union-attr]
            # a second copy of this outcome is a duplicate, not late
            ids.put(event_id, Remembered(KIND_J, ts + self.retention))
            return LATE, None
        return DUPLICATE, None

    def advance(self, ts: float) -> Expiry | None:
        """Move the watermark to ``ts`` if later; return what expired, or None (the common case)."""
        if ts <= self.watermark:
            return None
        self.watermark = ts
        ids = self.ids
        released = None
        if ids.due_before(ts):
            released = self._release(ids.pop_due(ts))
        if ids.forget_before(ts):
            for event_id, _ in ids.pop_forget(ts):
                ids.delete(event_id)
                self.remembered -= 1
        return released

    def enforce_capacity(self) -> Expiry | None:
        """Expire the events closest to their deadline while over ``max_pending``; forget likewise."""
        released = None
        over = self.pending_predictions + self.pending_outcomes - self.max_pending
        if over > 0:
            before = self.pending_predictions, self.pending_outcomes
            released = self._release(self.ids.pop_due(limit=over))
            self.capacity_evictions[0] += before[0] - self.pending_predictions
            self.capacity_evictions[1] += before[1] - self.pending_outcomes
        over = self.remembered - self.max_remembered
        if over > 0:
            for event_id, _ in self.ids.pop_forget(limit=over):
                self.ids.delete(event_id)
                self.remembered -= 1
                self.memory_evictions += 1
        return released

    @property
    def over_capacity(self) -> bool:
        return (
            self.pending_predictions + self.pending_outcomes > self.max_pending
            or self.remembered > self.max_remembered
        )

    def _release(self, due: list[tuple[str, Record]]) -> Expiry | None:
        if not due:
            return None
        out = Expiry()
        ids = self.ids
        for event_id, rec in due:
            if rec.kind == KIND_P:
                p: PendingPrediction = rec  # type: ignore[assignment]
                ids.put(event_id, Remembered(KIND_E, p.ts + self.ttl + self.retention))
                self.pending_predictions -= 1
                self.remembered += 1
                out.predictions.append((event_id, p))
            else:
                assert rec.kind == KIND_O
                ids.delete(event_id)
                self.pending_outcomes -= 1
                out.outcomes.append(event_id)
        return out

    # -- persistence (the counters; records live in the store) -------------------------------
    def to_state(self) -> dict[str, Any]:
        return {
            "watermark": self.watermark if self.watermark != float("-inf") else None,
            "pending": [self.pending_predictions, self.pending_outcomes],
            "remembered": self.remembered,
            "capacity_evictions": list(self.capacity_evictions),
            "memory_evictions": self.memory_evictions,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        wm = state["watermark"]
        self.watermark = float("-inf") if wm is None else float(wm)
        self.pending_predictions, self.pending_outcomes = (int(x) for x in state["pending"])
        self.remembered = int(state["remembered"])
        self.capacity_evictions = [int(x) for x in state["capacity_evictions"]]
        self.memory_evictions = int(state["memory_evictions"])


__all__ = [
    "DUPLICATE", "EXPIRED", "FINAL_FATES", "JOINED", "LATE", "ORPHAN", "PENDING", "REJECTED",
    "Expiry", "Join", "KIND_J",
]  # fmt: skip
