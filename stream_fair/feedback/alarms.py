"""The alarm records the snapshot carries: per-group change alarms and per-feature disparity alarms.

Plain frozen data, read by the exporter (``stream_fair.feedback_metrics``); the detectors that
produce them live in :mod:`.change` (change detectors) and :mod:`stream_fair.sequential` (the
time-uniform verdict).

>>> ChangeAlarm(flagged=False, statistic=0.0, threshold=13.3, raised_total=0, last_raised_ts=None)
ChangeAlarm(flagged=False, statistic=0.0, threshold=13.3, raised_total=0, last_raised_ts=None)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ChangeAlarm:
    """One (model, feature, group, signal) change detector.

    ``statistic`` is the larger of the two one-sided CUSUM log e-values (nats), ``threshold`` the
    level at which it raises; ``flagged`` while raised; ``raised_total`` counts raises (a
    counter); ``last_raised_ts`` is the watermark of the last raise, None before the first.
    """

    flagged: bool
    statistic: float
    threshold: float
    raised_total: int
    last_raised_ts: float | None


@dataclass(frozen=True)
class Alarm:
    """The calibrated default alert condition of one (model, feature, disparity).

    ``flagged`` = the time-uniform verdict flags the disparity OR a change detector of a rate it
    is built from is raised; ``lower`` / ``upper`` are the verdict's time-uniform bounds of the
    disparity (None while fewer than two groups are eligible); ``reason`` says what raised it
    (``""`` when not flagged).
    """

    flagged: bool
    lower: float | None
    upper: float | None
    raised_total: int
    last_raised_ts: float | None
    reason: str
