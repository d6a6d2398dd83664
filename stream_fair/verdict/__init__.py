"""The model-wide verdict: calibrated, cohort-stratified disparity alarms from count increments.

One concept per module:

* :mod:`.increments` -- what the engine reads (:class:`CellCounts`, :class:`Increment`) and the
  :class:`IncrementBuilder` that counts events into them
* :mod:`.settings` -- :class:`VerdictSettings` and the levels they imply
* :mod:`.fisher` -- the exact conditional (Fisher) likelihood ratio of one 2x2 table
* :mod:`.evidence` -- e-values of one stratum: decisions, and the score chain
* :mod:`.strata` -- a slot's rows summed into (cohort, group) strata, and their e-values
* :mod:`.cusum` -- the cohort-ordered e-detector with its clear test
* :mod:`.records` -- the alarm event log and status snapshots
* :mod:`.engine` -- :class:`VerdictEngine`: sources and slots, detectors and their start
  weights, alarms and their event log, state

It imports neither Kafka nor Prometheus; the statistics and their guarantees are in
``docs/feedback.md`` ("The verdict engine").
"""

from __future__ import annotations

from stream_fair.verdict.engine import VerdictEngine
from stream_fair.verdict.increments import CellCounts, Increment, IncrementBuilder, ScoreBins
from stream_fair.verdict.records import AlarmEvent, DetectorStatus, DisparityStatus
from stream_fair.verdict.settings import VerdictSettings

__all__ = [
    "AlarmEvent",
    "CellCounts",
    "DetectorStatus",
    "DisparityStatus",
    "Increment",
    "IncrementBuilder",
    "ScoreBins",
    "VerdictEngine",
    "VerdictSettings",
]
