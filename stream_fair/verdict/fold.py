"""The model-wide fold: every partition's published increments, each applied once, into one engine.

Partition owners publish one message per committed checkpoint (see :mod:`stream_fair.leader`)::

    {"partition": 3, "seq": 118, "epoch": 2, "watermark": 1.7e9, "caught_up": true, "rows": [...]}

``rows`` are :class:`~.increments.CellCounts` in JSON form, ``seq`` the partition's checkpoint
sequence. A message is applied only if its ``seq`` is above the last applied one of its partition,
so the re-publication of an outbox after a crash or a move is a no-op; ``seq`` may skip numbers
(checkpoints with nothing to say publish nothing).

Each partition is one engine *source*: the engine evaluates a slot once every source's watermark
has passed it. A partition whose input is read to its end (``caught_up``) will next see records of
the present, so it does not hold the model back: its watermark follows the newest of all sources.

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
from collections.abc import Sequence
from typing import Any

from stream_fair.groups import FeatureKey
from stream_fair.verdict.engine import VerdictEngine
from stream_fair.verdict.increments import CellCounts, Increment
from stream_fair.verdict.records import AlarmEvent
from stream_fair.verdict.settings import VerdictSettings

__all__ = ["ModelWide", "source_of"]

STATE_VERSION = 1


def source_of(partition: int) -> str:
    """The engine source name of an input partition."""
    return f"p{partition}"


class ModelWide:
    """One verdict engine over the increments of every partition (module docstring)."""

    def __init__(self, features: Sequence[FeatureKey], settings: VerdictSettings) -> None:
        self.features = list(features)
        self.engine = VerdictEngine(self.features, settings)
        self.applied: dict[int, int] = {}
        self.caught_up: dict[int, bool] = {}
        self.offset: int | None = None  # next increments-topic offset to read
        self.duplicates = 0
        self.logged = 0  # seq of the last alarm event written to the log

    def __repr__(self) -> str:
        return f"ModelWide(partitions={sorted(self.applied)}, offset={self.offset}, engine={self.engine!r})"

    def update(self, message: dict[str, Any]) -> bool:
        """Apply one published increment; False when its partition's ``seq`` was applied already."""
        p, seq = int(message["partition"]), int(message["seq"])
        if seq <= self.applied.get(p, 0):
            self.duplicates += 1
            return False
        self.applied[p] = seq
        self.caught_up[p] = bool(message.get("caught_up", False))
        wm = message.get("watermark")
        rows = tuple(CellCounts.from_json(r) for r in message.get("rows", ()))
        self.engine.update(Increment(source_of(p), None if wm is None else float(wm), rows))
        self._release_caught_up()
        return True

    def expect(self, partitions: int) -> None:
        """Wait for these input partitions (``0 .. partitions - 1``) before evaluating any slot.

        Without it, the first partition to report would let the engine evaluate slots the others
        have not reported yet, and their rows would count late (in the next slot).
        """
        known = self.engine.sources
        for p in range(partitions):
            if source_of(p) not in known:
                self.engine.update(Increment(source_of(p), -math.inf, ()))

    def _release_caught_up(self) -> None:
        marks = self.engine.sources
        finite = [m for m in marks.values() if not math.isinf(m)]
        if not finite:
            return
        newest = max(finite)
        for p, up in self.caught_up.items():
            src = source_of(p)
            if up and marks.get(src, -math.inf) < newest:
                self.engine.update(Increment(src, newest, ()))

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
            "caught_up": [[p, u] for p, u in self.caught_up.items()],
            "offset": self.offset,
            "duplicates": self.duplicates,
            "logged": self.logged,
        }

    @classmethod
    def from_state(
        cls, state: dict[str, Any], features: Sequence[FeatureKey], settings: VerdictSettings
    ) -> ModelWide:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported model-wide state version {state.get('version')!r}")
        m = cls(features, settings)
        m.engine = VerdictEngine.from_state(state["engine"], features, settings)
        m.applied = {int(p): int(s) for p, s in state["applied"]}
        m.caught_up = {int(p): bool(u) for p, u in state["caught_up"]}
        m.offset = state["offset"]
        m.duplicates = int(state["duplicates"])
        m.logged = int(state["logged"])
        return m
