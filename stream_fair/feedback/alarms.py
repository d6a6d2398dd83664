"""The alarm records the snapshot carries: per-group change alarms and per-feature disparity alarms.

Plain frozen data, read by the exporter (``stream_fair.feedback_metrics``); the monitor fills them
from the verdict engine's detectors and alarms (:mod:`stream_fair.verdict`).

>>> ChangeAlarm(flagged=False, statistic=0.0, threshold=13.3, raised_total=0, last_raised_ts=None)
ChangeAlarm(flagged=False, statistic=0.0, threshold=13.3, raised_total=0, last_raised_ts=None)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ChangeAlarm:
    """One (model, feature, group, signal) detector of the verdict engine.

    ``statistic`` is the larger of the two one-sided raise statistics (weighted log e-values,
    nats; frozen at the raise value while raised), ``threshold`` the level at which it raises;
    ``flagged`` while raised; ``raised_total`` counts raises (a counter); ``last_raised_ts`` is
    the event time of the evidence of the last raise, None before the first.
    """

    flagged: bool
    statistic: float
    threshold: float
    raised_total: int
    last_raised_ts: float | None


@dataclass(frozen=True)
class Alarm:
    """The calibrated default alarm of one (model, feature, disparity): the verdict engine's.

    ``flagged`` while any detector of a rate the disparity is built from is raised (demographic
    parity: ``selection_rate`` of all predictions; equal opportunity: ``true_positive_rate``;
    equalized odds: either rate); it clears only when the clear test shows the gap is gone.
    ``reason`` names the raised detectors as ``"group rate"`` (``""`` when not flagged);
    ``group``, ``rate``, ``statistic``, ``threshold`` and ``change_point_ts`` describe the alarm's
    last event, its raise or the clear that ended it (None before the first).
    """

    flagged: bool
    raised_total: int
    last_raised_ts: float | None
    reason: str
    group: str | None = None
    rate: str | None = None
    statistic: float | None = None
    threshold: float | None = None
    change_point_ts: float | None = None
