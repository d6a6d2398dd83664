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
either topic still has unread records). A prediction expires
when ``watermark > prediction.ts + ttl``; a waiting outcome becomes an orphan when
``watermark > outcome.ts + outcome_ttl``. Joined and expired ids are remembered for
``retention`` more seconds to recognise duplicates and late outcomes. Pending state is bounded by
``max_pending``: at the bound the event closest to its deadline is expired (or orphaned) early and
counted in ``capacity_evictions``; remembered ids are bounded the same way.

No maintained library offers a keyed two-sided join with per-event fates, so this is hand-written:
two dicts for pending events and two heaps of deadlines with lazy deletion.

>>> from stream_fair.events import Outcome, Prediction
>>> buf = JoinBuffer(ttl=60)
>>> buf.add_outcome(Outcome("a", 5.0, 1))        # the outcome comes first and waits
('pending', None)
>>> fate, other = buf.add_prediction(Prediction("a", 1.0, "m", 1, None, ("F",)))
>>> fate, other.label
('joined', 1)
>>> buf.add_prediction(Prediction("a", 1.0, "m", 1, None, ("F",)))[0]
'duplicate'
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any

from stream_fair.events import Outcome, Prediction

JOINED = "joined"
PENDING = "pending"
EXPIRED = "expired"
ORPHAN = "orphan"
DUPLICATE = "duplicate"
LATE = "late"
REJECTED = "rejected"
FINAL_FATES = (JOINED, EXPIRED, ORPHAN, DUPLICATE, LATE, REJECTED)

_PRED, _OUT = 0, 1


@dataclass(slots=True)
class Expiry:
    """What one watermark advance released."""

    predictions: list[Prediction] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)


class JoinBuffer:
    """Pending predictions and outcomes of one partition, joined by id in event time."""

    def __init__(
        self,
        ttl: float,
        outcome_ttl: float | None = None,
        retention: float | None = None,
        max_pending: int = 1_000_000,
    ) -> None:
        self.ttl = ttl
        self.outcome_ttl = ttl if outcome_ttl is None else outcome_ttl
        self.retention = ttl if retention is None else retention
        self.max_pending = max_pending
        self.predictions: dict[str, Prediction] = {}
        self.outcomes: dict[str, Outcome] = {}
        self.joined_ids: dict[str, float] = {}  # id -> forget at (event time)
        self.expired_ids: dict[str, float] = {}
        self.watermark = float("-inf")
        self.capacity_evictions = [0, 0]  # predictions, outcomes
        self.memory_evictions = 0
        self._pending_heap: list[tuple[float, int, str]] = []  # (deadline, kind, id)
        self._memory_heap: list[tuple[float, str]] = []  # (forget at, id)

    def __repr__(self) -> str:
        return (
            f"JoinBuffer(pending_predictions={len(self.predictions)}, "
            f"pending_outcomes={len(self.outcomes)}, watermark={self.watermark})"
        )

    # -- updates ----------------------------------------------------------------------------
    def add_prediction(self, p: Prediction) -> tuple[str, Outcome | None]:
        """Offer a prediction; returns its fate and, when joined, the waiting outcome."""
        pid = p.id
        if pid in self.predictions or pid in self.joined_ids or pid in self.expired_ids:
            return DUPLICATE, None
        outcome = self.outcomes.pop(pid, None)
        if outcome is not None:
            self._remember(pid, max(p.ts, outcome.ts), self.joined_ids)
            return JOINED, outcome
        self.predictions[pid] = p
        heapq.heappush(self._pending_heap, (p.ts + self.ttl, _PRED, pid))
        return PENDING, None

    def add_outcome(self, o: Outcome) -> tuple[str, Prediction | None]:
        """Offer an outcome; returns its fate and, when joined, the waiting prediction."""
        oid = o.id
        if oid in self.outcomes or oid in self.joined_ids:
            return DUPLICATE, None
        if oid in self.expired_ids:
            del self.expired_ids[oid]  # a second copy of this outcome is a duplicate, not late
            self._remember(oid, o.ts, self.joined_ids)
            return LATE, None
        prediction = self.predictions.pop(oid, None)
        if prediction is not None:
            self._remember(oid, max(prediction.ts, o.ts), self.joined_ids)
            return JOINED, prediction
        self.outcomes[oid] = o
        heapq.heappush(self._pending_heap, (o.ts + self.outcome_ttl, _OUT, oid))
        return PENDING, None

    def advance(self, ts: float) -> Expiry | None:
        """Move the watermark to ``ts`` if later; return what expired, or None (the common case)."""
        if ts <= self.watermark:
            return None
        self.watermark = ts
        released = None
        heap = self._pending_heap
        while heap and heap[0][0] < ts:
            released = self._release(heapq.heappop(heap), released)
        memory = self._memory_heap
        while memory and memory[0][0] < ts:
            _, key = heapq.heappop(memory)
            self._forget(key, ts)
        return released

    def enforce_capacity(self) -> Expiry | None:
        """Expire the events closest to their deadline while over ``max_pending``."""
        released = None
        heap = self._pending_heap
        while len(self.predictions) + len(self.outcomes) > self.max_pending and heap:
            before = len(self.predictions), len(self.outcomes)
            released = self._release(heapq.heappop(heap), released)
            after = len(self.predictions), len(self.outcomes)
            self.capacity_evictions[0] += before[0] - after[0]
            self.capacity_evictions[1] += before[1] - after[1]
        while len(self.joined_ids) + len(self.expired_ids) > self.max_pending and self._memory_heap:
            _, key = heapq.heappop(self._memory_heap)
            if self._forget(key, float("inf")):
                self.memory_evictions += 1
        return released

    # -- internals --------------------------------------------------------------------------
    def _release(self, entry: tuple[float, int, str], released: Expiry | None) -> Expiry | None:
        deadline, kind, key = entry
        if kind == _PRED:
            p = self.predictions.get(key)
            if p is None or p.ts + self.ttl != deadline:
                return released  # joined since, or re-added later with another deadline
            del self.predictions[key]
            self._remember(key, deadline, self.expired_ids)
            released = released or Expiry()
            released.predictions.append(p)
        else:
            o = self.outcomes.get(key)
            if o is None or o.ts + self.outcome_ttl != deadline:
                return released
            del self.outcomes[key]
            released = released or Expiry()
            released.outcomes.append(o)
        return released

    def _remember(self, key: str, ts: float, into: dict[str, float]) -> None:
        forget_at = ts + self.retention
        into[key] = forget_at
        heapq.heappush(self._memory_heap, (forget_at, key))

    def _forget(self, key: str, now: float) -> bool:
        for ids in (self.joined_ids, self.expired_ids):
            forget_at = ids.get(key)
            if forget_at is not None and forget_at <= now:
                del ids[key]
                return True
        return False

    # -- persistence ------------------------------------------------------------------------
    def to_state(self) -> dict[str, Any]:
        return {
            "watermark": self.watermark if self.watermark != float("-inf") else None,
            "predictions": [
                [p.id, p.ts, p.model, p.predicted, p.score, list(p.cell)] for p in self.predictions.values()
            ],
            "outcomes": [[o.id, o.ts, o.label] for o in self.outcomes.values()],
            "joined_ids": self.joined_ids,
            "expired_ids": self.expired_ids,
            "capacity_evictions": self.capacity_evictions,
            "memory_evictions": self.memory_evictions,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        wm = state["watermark"]
        self.watermark = float("-inf") if wm is None else float(wm)
        self.predictions = {
            r[0]: Prediction(r[0], r[1], r[2], r[3], r[4], tuple(r[5])) for r in state["predictions"]
        }
        self.outcomes = {r[0]: Outcome(r[0], r[1], r[2]) for r in state["outcomes"]}
        self.joined_ids = dict(state["joined_ids"])
        self.expired_ids = dict(state["expired_ids"])
        self.capacity_evictions = list(state["capacity_evictions"])
        self.memory_evictions = int(state["memory_evictions"])
        self._pending_heap = [(p.ts + self.ttl, _PRED, k) for k, p in self.predictions.items()]
        self._pending_heap += [(o.ts + self.outcome_ttl, _OUT, k) for k, o in self.outcomes.items()]
        heapq.heapify(self._pending_heap)
        self._memory_heap = [(t, k) for ids in (self.joined_ids, self.expired_ids) for k, t in ids.items()]
        heapq.heapify(self._memory_heap)
