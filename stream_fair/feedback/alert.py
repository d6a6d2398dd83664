"""The previous default alert condition (time-uniform verdict OR change detector), kept as a baseline.

The monitor's default alarm is now the verdict engine (:mod:`stream_fair.verdict`); this per-replica
condition on cumulative labelled pairs remains as the comparison in ``bench/detection.py``.

Per (model, feature), :class:`AlertCondition` keeps a :class:`~stream_fair.sequential.
SequentialDisparity` (is the gap certainly above ``threshold``? valid at every look) and the
:class:`~.change.ChangeDetectors` (did one group's rate just move ``min_effect`` away from the
rest? valid over a stated horizon). A disparity's :class:`LegacyAlarm` is raised when the
verdict flags it or a change detector of one of its rates is raised (demographic parity:
``selection_rate``; equal opportunity: ``true_positive_rate``; equalized odds: either rate).
Both parts have their own guarantee (``docs/feedback.md``); the union of two alarms with false
raise probabilities a and b has at most a + b.

:meth:`AlertCondition.feed` is the cheap path (change detectors only, reusing the last verdict);
:meth:`AlertCondition.check` also recomputes the verdict (a few ms: call it per scrape).

>>> alert = AlertCondition(SequentialSettings(), ChangeSettings(batch=100))
>>> alarms = alert.check({"A": (400, 50, 450, 100), "B": (100, 50, 450, 400)}, ts=1.0)
>>> a = alarms["equal_opportunity_difference"]
>>> a.flagged, a.reason, a.raised_total
(True, 'time-uniform verdict', 1)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from stream_fair.feedback.change import ChangeDetectors, ChangeSettings
from stream_fair.sequential import DISPARITIES, SequentialDisparity, SequentialSettings, Verdict

__all__ = ["AlertCondition", "LegacyAlarm"]


@dataclass(frozen=True)
class LegacyAlarm:
    """One disparity of :class:`AlertCondition`: flag, the verdict's time-uniform bounds, raises."""

    flagged: bool
    lower: float | None
    upper: float | None
    raised_total: int
    last_raised_ts: float | None
    reason: str


class AlertCondition:
    """Verdict OR change detector for the disparities of one (model, feature)."""

    __slots__ = ("sequential", "change", "verdict", "_flagged", "_raised", "_last_ts", "_reason")

    def __init__(self, sequential: SequentialSettings, change: ChangeSettings) -> None:
        self.sequential = SequentialDisparity(sequential)
        self.change = ChangeDetectors(change)
        self.verdict: Verdict | None = None
        self._flagged: dict[str, bool] = {}
        self._raised: dict[str, int] = {}
        self._last_ts: dict[str, float] = {}
        self._reason: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"AlertCondition(flagged={sorted(k for k, v in self._flagged.items() if v)})"

    def feed(self, cumulative: Mapping[str, Sequence[int]], ts: float) -> None:
        """Offer cumulative ``{group: (tp, fp, tn, fn)}`` to the change detectors only."""
        if self.change.update(cumulative, ts):
            self._evaluate(ts)

    def check(self, cumulative: Mapping[str, Sequence[int]], ts: float) -> dict[str, LegacyAlarm]:
        """Update verdict and change detectors from cumulative counts; the alarms."""
        self.verdict = self.sequential.update(cumulative)
        self.change.update(cumulative, ts)
        self._evaluate(ts)
        return self.alarms()

    def _evaluate(self, ts: float) -> None:
        changed = [(g, r) for (g, r), a in self.change.alarms().items() if a.flagged]
        for name, rates in DISPARITIES.items():
            reasons = []
            if self.verdict is not None and self.verdict.flagged.get(name, False):
                reasons.append("time-uniform verdict")
            reasons += [f"change: {g} {r}" for g, r in sorted(changed) if r in rates]
            flagged = bool(reasons)
            if flagged and not self._flagged.get(name, False):
                self._raised[name] = self._raised.get(name, 0) + 1
                self._last_ts[name] = ts
            self._flagged[name] = flagged
            self._reason[name] = "; ".join(reasons)

    def alarms(self) -> dict[str, LegacyAlarm]:
        """``{disparity: LegacyAlarm}`` as of the last feed or check."""
        out = {}
        for name in DISPARITIES:
            bounds = self.verdict.disparities.get(name) if self.verdict is not None else None
            out[name] = LegacyAlarm(
                flagged=self._flagged.get(name, False),
                lower=bounds.lower if bounds is not None else None,
                upper=bounds.upper if bounds is not None else None,
                raised_total=self._raised.get(name, 0),
                last_raised_ts=self._last_ts.get(name),
                reason=self._reason.get(name, ""),
            )
        return out

    def to_state(self) -> dict:
        return {
            "sequential": self.sequential.to_state(),
            "change": self.change.to_state(),
            "flagged": self._flagged,
            "raised": self._raised,
            "last_ts": self._last_ts,
            "reason": self._reason,
        }

    @classmethod
    def from_state(
        cls, state: dict, sequential: SequentialSettings, change: ChangeSettings
    ) -> AlertCondition:
        a = cls(sequential, change)
        a.sequential = SequentialDisparity.from_state(state["sequential"], sequential)
        a.change = ChangeDetectors.from_state(state["change"], change)
        a._flagged = {k: bool(v) for k, v in state["flagged"].items()}
        a._raised = {k: int(v) for k, v in state["raised"].items()}
        a._last_ts = {k: float(v) for k, v in state["last_ts"].items()}
        a._reason = dict(state["reason"])
        return a
