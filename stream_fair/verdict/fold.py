"""The model-wide fold: every partition's published increments, each applied once, into one engine.

Partition owners publish one message per committed checkpoint (see :mod:`stream_fair.leader`)::

    {"partition": 3, "seq": 118, "epoch": 2, "watermark": 1.7e9, "caught_up": true, "rows": [...]}

``rows`` are :class:`~.increments.CellCounts` in JSON form, ``seq`` the partition's checkpoint
sequence. A message is applied only if its ``seq`` is above the last applied one of its partition,
so the re-publication of an outbox after a crash or a move is a no-op; ``seq`` may skip numbers
(checkpoints with nothing to say publish nothing).

The fold also runs the **feedback-loop test** (:mod:`stream_fair.feedback.loop`) on the model's
whole stream: prediction rows are counted per ``loop.period`` by their slot's start (the same
periods as a single monitor's when the period is a multiple of the slot, as the defaults are), and
a period is closed once the engine's watermark has passed the end of its last slot.

Each partition is one engine *source*: the engine evaluates a slot once every source's watermark
has passed it. A partition whose input is read to its end (``caught_up``) will next see records of
the present, so it does not hold the model back: its watermark is lifted to the newest of all
sources *as its message is applied*. Rows it publishes later come from records read after it was
read to its end, so they are newer than that lift (up to the records produced between its check
and the other partitions' last messages, a poll's time). Lifting it to the newest at any later
time would close slots and loop periods while its next message may still hold rows of them (they
would count one slot or period late, and the model-wide figures would depend on when each replica
checkpoints). A caught-up partition moves on with its next message: its next checkpoint, or its
heartbeat when idle (``tracker.HEARTBEAT_SECONDS``).

>>> from stream_fair.groups import feature_keys
>>> from stream_fair.verdict import ScoreBins, VerdictSettings
>>> fold = ModelWide(feature_keys(["g"], []), VerdictSettings(bins=ScoreBins(count=0)))
>>> row = ["m", ["A"], 0, 0, [5, 5], [0, 0, 0, 0], [], [], 10.0]
>>> msg = {"partition": 0, "seq": 1, "epoch": 1, "watermark": 10.0, "caught_up": True, "rows": [row]}
>>> fold.update(msg), fold.update(msg), fold.duplicates
(True, False, 1)
>>> ModelWide.from_state(fold.to_state(), fold.features, fold.engine.settings).applied
{0: 1}
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from stream_fair.groups import Cell, FeatureKey
from stream_fair.verdict.engine import VerdictEngine
from stream_fair.verdict.increments import CellCounts, Increment
from stream_fair.verdict.records import AlarmEvent
from stream_fair.verdict.settings import VerdictSettings

if TYPE_CHECKING:  # feedback.monitor imports the verdict package
    from stream_fair.feedback.monitor import FeedbackSettings

__all__ = ["ModelWide", "source_of"]

STATE_VERSION = 1


def source_of(partition: int) -> str:
    """The engine source name of an input partition."""
    return f"p{partition}"


class ModelWide:
    """One verdict engine over the increments of every partition (module docstring)."""

    def __init__(
        self, features: Sequence[FeatureKey], settings: VerdictSettings, loop: FeedbackSettings | None = None
    ) -> None:
        self.features = list(features)
        self.loop = loop  # the feedback-loop test's settings (all features'; None: no loop test)
        self.engine = VerdictEngine(self.features, settings)
        self.applied: dict[int, int] = {}
        self.epochs: dict[int, int] = {}  # the highest owner epoch seen per partition
        self.incarnations: dict[int, str] = {}
        self.reported: dict[int, float] = {}  # each partition's own watermark
        self.caught_up: dict[int, bool] = {}
        self.lifted: dict[int, float] = {}  # a caught-up partition's lift: the newest at its message
        self.heard: dict[int, float] = {}  # when each partition was last heard (caller's clock)
        self.offset: int | None = None  # next increments-topic offset to read
        self.duplicates = 0
        self.fenced = 0
        self.logged = 0  # seq of the last alarm event written to the log
        # the loop test's input: open periods' prediction counts, closed periods per (model, feature)
        self._open: dict[int, dict[tuple[str, Cell], list[int]]] = {}
        self._history: dict[tuple[str, str], deque[dict[str, tuple[int, int]]]] = {}
        self._closed: int | None = None

    def __repr__(self) -> str:
        return f"ModelWide(partitions={sorted(self.applied)}, offset={self.offset}, engine={self.engine!r})"

    def expect(self, partitions: int) -> None:
        """Wait for these input partitions (``0 .. partitions - 1``) before evaluating any slot.

        Without it, the first partition to report would let the engine evaluate slots the others
        have not reported yet, and their rows would count late (in the next slot).
        """
        known = self.engine.sources
        for p in range(partitions):
            if source_of(p) not in known:
                self.engine.hold(source_of(p), -math.inf)

    def update(self, message: dict[str, Any], now: float | None = None) -> bool:
        """Apply one published increment; False when it was applied already or is fenced.

        A message of an owner epoch below the highest seen for its partition comes from an owner
        that lost the partition (a zombie) and is dropped; a new ``incarnation`` (the partition's
        state started over) restarts its sequence. ``now`` (seconds, any clock) is when it was
        received: a caught-up partition silent for longer than ``stale_after`` is held again.
        """
        p, seq = int(message["partition"]), int(message["seq"])
        epoch = int(message.get("epoch", 0))
        incarnation = str(message.get("incarnation", ""))
        wm = message.get("watermark")
        rows = tuple(CellCounts.from_json(r) for r in message.get("rows", ()))  # parse before mutating
        if incarnation != self.incarnations.get(p, incarnation):
            self.applied.pop(p, None)
            self.epochs.pop(p, None)
        if epoch < self.epochs.get(p, epoch):
            self.fenced += 1
            return False
        if seq <= self.applied.get(p, 0):
            self.duplicates += 1
            return False
        if epoch > self.epochs.get(p, epoch):
            self.caught_up[p] = False  # a new owner: held until it says it is caught up
        self.incarnations[p] = incarnation
        self.epochs[p] = epoch
        self.applied[p] = seq
        self.caught_up[p] = bool(message.get("caught_up", False))
        if now is not None:
            self.heard[p] = now
        if wm is not None:
            self.reported[p] = max(self.reported.get(p, -math.inf), float(wm))
        self.lifted[p] = self._newest()
        self.engine.update(Increment(source_of(p), None, rows))
        self.release(now)
        if self.loop is not None:
            self._count_periods(rows)
            self._close_periods()
        return True

    def _newest(self) -> float:
        finite = [m for m in self.reported.values() if not math.isinf(m)]
        return max(finite) if finite else -math.inf

    def release(self, now: float | None = None, stale_after: float = 60.0) -> None:
        """Each partition's watermark for the engine: its own, or while it is caught up (and was
        heard within ``stale_after`` of ``now``, when given) the newest of all when its last
        message was applied (module docstring)."""
        marks = self.engine.sources
        for p in self.reported.keys() | self.caught_up.keys():
            src = source_of(p)
            fresh = now is None or now - self.heard.get(p, -math.inf) <= stale_after
            own = self.reported.get(p, -math.inf)
            lift = self.lifted.get(p, -math.inf)
            lifted = self.caught_up.get(p, False) and fresh and not math.isinf(lift)
            want = max(own, lift) if lifted else own
            # a partition with no watermark yet that nobody awaits (no expect()) stays unknown
            if marks.get(src) != want and (src in marks or not math.isinf(want)):
                self.engine.hold(src, want)

    # -- the feedback-loop test ----------------------------------------------------------------
    def _count_periods(self, rows: Sequence[CellCounts]) -> None:
        assert self.loop is not None
        for c in rows:
            n0, n1 = c.predictions
            if not n0 and not n1:
                continue
            k = self._period_of(c.slot)
            if self._closed is not None and k <= self._closed:
                k = self._closed + 1  # late rows count in the oldest open period
            acc = self._open.setdefault(k, {}).setdefault((c.model, c.cell), [0, 0])
            acc[0] += n0 + n1
            acc[1] += n1

    def _close_periods(self) -> None:
        assert self.loop is not None
        wm = self.engine.watermark
        if wm is None or math.isinf(wm):
            return
        for k in sorted(k for k in self._open if self._period_end(k) <= wm):
            per: dict[tuple[str, str], dict[str, tuple[int, int]]] = {}
            for (model, cell), (n, pos) in self._open.pop(k).items():
                for f in self.features:
                    g = f.group(cell)
                    by = per.setdefault((model, f.name), {})
                    old = by.get(g, (0, 0))
                    by[g] = (old[0] + n, old[1] + pos)
            for mf, counts in per.items():
                hist = self._history.setdefault(mf, deque(maxlen=self.loop.loop_window + 1))
                hist.append(counts)
            self._closed = k

    def _period_of(self, slot: int) -> int:
        """The loop period of a slot (index): the one its start lies in."""
        return math.floor(slot * self.engine.settings.slot / self.loop.period)  # type: ignore[union-attr]

    def _period_end(self, k: int) -> float:
        """When period ``k``'s rows are all in: the end of its last slot (a period that is not a
        multiple of the slot takes the whole of its last slot, and closes when that slot does)."""
        j = math.ceil((k + 1) * self.loop.period / self.engine.settings.slot)  # type: ignore[union-attr]
        while j > 0 and self._period_of(j - 1) > k:  # the first slot of a later period, rounding aside
            j -= 1
        while self._period_of(j) <= k:
            j += 1
        return j * self.engine.settings.slot

    def loop_history(self) -> dict[tuple[str, str], list[dict[str, tuple[int, int]]]]:
        """A copy of the closed periods the loop test looks at, per (model, feature), for a snapshot
        to run the test on off the caller's thread (``FeedbackCapture.loop_history``; closed periods
        are never changed, so the copy shares them)."""
        return {mf: list(h) for mf, h in self._history.items()}

    def new_events(self) -> list[AlarmEvent]:
        """Alarm events not returned before (for the log line)."""
        events = self.engine.events_after(self.logged)
        if events:
            self.logged = events[-1].seq
        return events

    # -- state ---------------------------------------------------------------------------------
    def to_state(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "engine": self.engine.to_state(),
            "applied": [[p, s] for p, s in self.applied.items()],
            "epochs": [[p, e] for p, e in self.epochs.items()],
            "incarnations": [[p, i] for p, i in self.incarnations.items()],
            "reported": [[p, w] for p, w in self.reported.items() if not math.isinf(w)],
            "caught_up": [[p, u] for p, u in self.caught_up.items()],
            "fenced": self.fenced,
            "offset": self.offset,
            "duplicates": self.duplicates,
            "logged": self.logged,
            "open": [[k, [[m, list(c), v] for (m, c), v in by.items()]] for k, by in self._open.items()],
            "history": [
                [m, f, [{g: list(v) for g, v in p.items()} for p in h]] for (m, f), h in self._history.items()
            ],
            "closed": self._closed,
        }

    @classmethod
    def from_state(
        cls,
        state: dict[str, Any],
        features: Sequence[FeatureKey],
        settings: VerdictSettings,
        loop: FeedbackSettings | None = None,
    ) -> ModelWide:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported model-wide state version {state.get('version')!r}")
        m = cls(features, settings, loop)
        m.engine = VerdictEngine.from_state(state["engine"], features, settings)
        m.applied = {int(p): int(s) for p, s in state["applied"]}
        m.epochs = {int(p): int(e) for p, e in state["epochs"]}
        m.incarnations = {int(p): str(i) for p, i in state["incarnations"]}
        m.reported = {int(p): float(w) for p, w in state["reported"]}
        # after a failover nobody is known to be caught up until it says so again
        m.caught_up = {int(p): False for p, _ in state["caught_up"]}
        m.fenced = int(state["fenced"])
        m.offset = state["offset"]
        m.duplicates = int(state["duplicates"])
        m.logged = int(state["logged"])
        m._open = {
            int(k): {(mo, tuple(c)): [int(x) for x in v] for mo, c, v in by} for k, by in state["open"]
        }
        window = (loop.loop_window + 1) if loop is not None else None
        for mo, f, periods in state["history"]:
            m._history[(mo, f)] = deque(
                ({g: (int(v[0]), int(v[1])) for g, v in p.items()} for p in periods), maxlen=window
            )
        m._closed = state["closed"]
        return m
