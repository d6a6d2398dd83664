"""Event-time plausibility: which timestamps to believe, and how far one record may move event time.

One record stamped in the year 9999, or in milliseconds where seconds are configured, used to move
the watermark to the far future: every pending prediction expired at once, their outcomes became
late, and the windows emptied. Two defences, both pure:

* :meth:`EventTimeGuard.check` (called by the decoder) rejects a timestamp beyond the wall clock
  plus ``allowed_skew`` (``future_timestamp``) or before ``min_timestamp``
  (``timestamp_before_epoch``), naming a likely unit mistake in the detail.
* :meth:`EventTimeGuard.admit` (called by the tracker once per decoded event) is what the
  watermark sees: a record more than ``allowed_skew`` ahead of its topic's last event time moves it
  by ``allowed_skew`` only, until ``confirmations`` consecutive records agree that time really
  moved on (a traffic gap of days, a producer restarted after an outage); then event time jumps to
  the earliest of them. With ``max_jump`` set, unconfirmed records further than that ahead of the
  watermark are rejected (``timestamp_jump``) instead of being counted.

The trade-off is documented in docs/configuration.md (``event_time``): a record far in the past is
always accepted (replaying a months-old backlog is legitimate); one far ahead can move event time
by at most ``allowed_skew`` until it is confirmed.

>>> g = EventTimeGuard(allowed_skew=60, min_timestamp=0, clock=lambda: 1_800_000_000.0)
>>> g.check(1_800_000_000_000.0, 1_800_000_000_000.0).reason
'future_timestamp'
>>> print(g.check(1_800_000_000_000.0, 1_800_000_000_000.0).detail)  # doctest: +NORMALIZE_WHITESPACE
timestamp 1800000000000 is 5.7e+04 y after the wall clock (more than event_time.allowed_skew): it
looks like milliseconds (1800000000000 milliseconds = 2027-01-15T08:00:00Z) while
schema.timestamp_unit is seconds; fix the producer or schema.timestamp_unit
>>> [g.admit("p0", None, last, ts) for last, ts in ((None, 100.0), (100.0, 130.0), (130.0, 1e6))]
[100.0, 130.0, 190.0]
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable
from datetime import datetime, timezone

from stream_fair.events import Rejection

FUTURE_TIMESTAMP = "future_timestamp"
TIMESTAMP_BEFORE_EPOCH = "timestamp_before_epoch"
TIMESTAMP_JUMP = "timestamp_jump"
REASONS = (FUTURE_TIMESTAMP, TIMESTAMP_BEFORE_EPOCH, TIMESTAMP_JUMP)

_HINT_SPAN = 100 * 365.25 * 86400  # a unit mistake is named when the other unit gives a date this recent
_UNITS = (("seconds", 1.0), ("milliseconds", 1e-3), ("microseconds", 1e-6), ("nanoseconds", 1e-9))


def iso(ts: float) -> str:
    """``2026-11-29T12:00:00Z`` for a Unix time, or the number when no date can show it.

    >>> iso(0), iso(1e20)
    ('1970-01-01T00:00:00Z', '1e+20')
    """
    try:
        return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return f"{ts:g}"


class EventTimeGuard:
    """Plausible range of event times and the robust step of the watermark (see the module doc).

    Parameters
    ----------
    allowed_skew
        Seconds a timestamp may lie beyond the wall clock; also the most one unconfirmed record
        moves its topic's event time.
    min_timestamp
        Earliest believable event time (Unix seconds).
    max_jump
        Reject unconfirmed records more than this far ahead of the watermark (None: only clamp).
    confirmations
        Consecutive records ahead of ``last + allowed_skew`` that confirm a real jump.
    unit_scale
        Seconds per unit of numeric timestamps (1 or 0.001), to name unit mistakes.
    """

    def __init__(
        self,
        allowed_skew: float,
        min_timestamp: float = 0.0,
        max_jump: float | None = None,
        confirmations: int = 5,
        unit_scale: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.allowed_skew = allowed_skew
        self.min_timestamp = min_timestamp
        self.max_jump = max_jump
        self.confirmations = confirmations
        self.unit_scale = unit_scale
        self.clock = clock
        self._runs: dict[Hashable, tuple[int, float]] = {}  # key -> (records ahead, earliest)

    def __repr__(self) -> str:
        return (
            f"EventTimeGuard(allowed_skew={self.allowed_skew:g}, min_timestamp={iso(self.min_timestamp)}, "
            f"max_jump={self.max_jump}, confirmations={self.confirmations})"
        )

    def latest(self) -> float:
        """The latest believable event time right now."""
        return self.clock() + self.allowed_skew

    def check(self, ts: float, raw: float | None = None) -> Rejection | None:
        """None when ``ts`` (seconds) is plausible, else a rejection naming the bound and the fix.

        ``raw`` is the number as sent (before unit scaling), when it was a number.
        """
        if ts != ts or ts < self.min_timestamp:  # NaN, or before the epoch
            return Rejection(
                TIMESTAMP_BEFORE_EPOCH,
                f"timestamp {_shown(ts, raw)} is before event_time.min_timestamp "
                f"{iso(self.min_timestamp)}{self._unit_hint(raw)}",
            )
        latest = self.latest()
        if ts > latest:
            ahead = ts - (latest - self.allowed_skew)
            return Rejection(
                FUTURE_TIMESTAMP,
                f"timestamp {_shown(ts, raw)} is {_span(ahead)} after the wall clock (more than "
                f"event_time.allowed_skew){self._unit_hint(raw)}",
            )
        return None

    def _unit_hint(self, raw: float | None) -> str:
        if raw is None or not math.isfinite(raw):
            return ""
        configured = "milliseconds" if self.unit_scale == 1e-3 else "seconds"
        latest = self.latest()
        earliest = max(self.min_timestamp, latest - _HINT_SPAN)
        for unit, scale in _UNITS:
            if unit != configured and earliest <= raw * scale <= latest:
                return (
                    f": it looks like {unit} ({raw:.0f} {unit} = {iso(raw * scale)}) while "
                    f"schema.timestamp_unit is {configured}; fix the producer or schema.timestamp_unit"
                )
        return ""

    def admit(
        self, key: Hashable, watermark: float | None, last: float | None, ts: float
    ) -> float | Rejection:
        """The event time this record may move its topic's clock to, or a ``timestamp_jump`` rejection.

        ``key`` names the clock (e.g. partition and topic), ``last`` is its current value (None
        before the first record), ``watermark`` the partition's join watermark.
        """
        if last is None or ts <= last + self.allowed_skew:
            if self._runs:
                self._runs.pop(key, None)
            return ts
        count, earliest = self._runs.get(key, (0, ts))
        count, earliest = count + 1, min(earliest, ts)
        if count >= self.confirmations:  # enough records agree: time really moved on
            self._runs.pop(key, None)
            return earliest
        self._runs[key] = (count, earliest)
        if (
            self.max_jump is not None
            and watermark is not None
            and watermark != -math.inf
            and ts > watermark + self.max_jump
        ):
            return Rejection(
                TIMESTAMP_JUMP,
                f"timestamp {iso(ts)} is {_span(ts - watermark)} ahead of the watermark {iso(watermark)} "
                f"(more than event_time.max_jump); accepted once {self.confirmations} consecutive "
                "records agree",
            )
        return last + self.allowed_skew


def _shown(ts: float, raw: float | None) -> str:
    if raw is None:
        return iso(ts)
    date = iso(ts)
    return f"{raw:.15g}" + (f" ({date})" if date.endswith("Z") else "")


def _span(seconds: float) -> str:
    """A rough human duration: ``90 s``, ``3.5 h``, ``12 d``, ``5e+07 y``."""
    for unit, size in (("y", 365.25 * 86400), ("d", 86400.0), ("h", 3600.0)):
        if seconds >= 2 * size:
            return f"{seconds / size:.3g} {unit}"
    return f"{seconds:.0f} s"
