"""What the engine reports: the alarm event log and status snapshots (plain frozen data).

>>> e = AlarmEvent(1, "alarm_raised", 7200.0, "m", "group", "equal_opportunity_difference", "E",
...                "true_positive_rate", "below", 14.2, 12.8, 3600.0, 0.69, 0.80,
...                {"group_successes": 310, "group_trials": 450, "rest_successes": 6840,
...                 "rest_trials": 8550})
>>> AlarmEvent.from_json(e.to_json()) == e
True
>>> print(e.message())  # doctest: +NORMALIZE_WHITESPACE
alarm_raised m group equal_opportunity_difference: E's true_positive_rate below the rest's by
the detector's test (pooled over the segment: 0.690 against 0.800; 14.2 >= 12.8 nats, change
point 3600)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

__all__ = ["AlarmEvent", "DetectorStatus", "DisparityStatus"]


@dataclass(frozen=True)
class AlarmEvent:
    """One ``alarm_raised`` or ``alarm_cleared`` of a (model, feature, disparity).

    ``ts`` is the event time of the evidence (the largest event time among the data the engine
    had folded, not a watermark); ``group`` / ``rate`` / ``direction`` name the detector that
    raised (or last cleared) the alarm, ``statistic`` and ``threshold`` its level (nats),
    ``change_point_ts`` the start of the cohort where its evidence segment begins (for a clear:
    where the recovery was found to begin), ``group_value`` / ``rest_value`` the rate of the group
    and of the rest of the feature over that segment, and ``evidence`` the counts behind them.
    ``direction`` is the detector's side, which can disagree with the pooled values: it compares
    within prediction-time cohorts, and with ``use_scores`` it compares the whole score
    distribution of the group's positives (negatives) against the rest's, so a group whose scores
    are spread wider can raise "above" at a lower TPR (docs/feedback.md, "Scores").
    """

    seq: int
    kind: Literal["alarm_raised", "alarm_cleared"]
    ts: float
    model: str
    feature: str
    disparity: str
    group: str
    rate: str
    direction: Literal["below", "above"]
    statistic: float
    threshold: float
    change_point_ts: float | None
    group_value: float | None
    rest_value: float | None
    evidence: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AlarmEvent:
        return cls(**{**data, "evidence": {k: int(v) for k, v in data["evidence"].items()}})

    def message(self) -> str:
        """One log line."""

        def fmt(v: float | None) -> str:
            return "n/a" if v is None else f"{v:.3f}"

        cp = "unknown" if self.change_point_ts is None else f"{self.change_point_ts:.0f}"
        return (
            f"{self.kind} {self.model} {self.feature} {self.disparity}: {self.group}'s {self.rate} "
            f"{self.direction} the rest's by the detector's test (pooled over the segment: "
            f"{fmt(self.group_value)} against {fmt(self.rest_value)}; "
            f"{self.statistic:.1f} >= {self.threshold:.1f} nats, change point {cp})"
        )


@dataclass(frozen=True)
class DetectorStatus:
    """One (model, feature, group, rate) detector.

    ``statistic`` is the larger one-sided raise statistic (nats, weighted log e-value, floored at
    0; frozen at its raise value while raised), ``threshold`` its raise level; ``direction`` says
    which side is raised (None while quiet); ``clear_statistic`` / ``clear_threshold`` the clear
    test while raised.
    """

    flagged: bool
    direction: Literal["below", "above"] | None
    statistic: float
    threshold: float
    clear_statistic: float | None
    clear_threshold: float
    raised_total: int
    cleared_total: int
    last_raised_ts: float | None
    last_cleared_ts: float | None


@dataclass(frozen=True)
class DisparityStatus:
    """One (model, feature, disparity) alarm: raised while any detector of its rates is raised.

    ``raised_by`` lists the raised detectors as ``(group, rate)``; ``last_event`` is the last
    ``alarm_raised`` or ``alarm_cleared`` of this alarm.
    """

    flagged: bool
    raised_total: int
    last_raised_ts: float | None
    raised_by: tuple[tuple[str, str], ...]
    last_event: AlarmEvent | None
