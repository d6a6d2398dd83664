"""Settings of the verdict engine (defaults and the threshold they imply).

>>> s = VerdictSettings()
>>> s.horizon_cohorts
8760
>>> round(s.threshold(n_features=2), 2)  # log(8760 * 2 / 0.05)
12.77
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from stream_fair.verdict.increments import ScoreBins

__all__ = ["RATES_WATCHED", "VerdictSettings"]

RATES_WATCHED = ("selection_rate", "true_positive_rate", "false_positive_rate")
"""The rates the engine compares, group against the rest of its feature (fairlearn names)."""


@dataclass(frozen=True)
class VerdictSettings:
    """Settings of :class:`~stream_fair.verdict.engine.VerdictEngine`.

    Parameters
    ----------
    period
        Cohort length, seconds of *prediction* event time. Groups are compared only within a
        cohort; the guarantee assumes each group's rates are constant within one (a change inside
        a cohort is seen as a mixture for that cohort only).
    slot
        Evaluation slot, seconds of *arrival* event time: the engine's batch.
    min_effect
        Design shift of a group's rate against the rest's (0.10: a TPR of 0.8 falling to 0.7).
    clear_effect
        A raised alarm clears once the evidence shows the gap is below this.
    alpha
        Expected false raises per ``horizon`` of cohorts, all features of one model together.
    clear_alpha
        Probability that a raised alarm clears while the gap is still at least ``clear_effect``.
    horizon
        Seconds of cohorts over which ``alpha`` is spent (one year).
    open_cohorts
        Cohorts kept individually as possible change points; older ones are folded into one
        prefix (bounded memory; a change older than this is still detected, its start is coarser).
    bins
        Score histogram bins (must match the increments'); ``ScoreBins(count=0)`` for no scores.
    use_scores
        Compare score distributions of labelled positives (negatives) for the true (false)
        positive rate when every pair of a stratum has a score; else only the decisions.
    weighting
        ``"traffic"``: a group's share of ``alpha`` grows as its traffic share shrinks
        (``1 / max(share, min_share)``, normalised); ``"uniform"``: plain Bonferroni.
    min_share
        Floor of the traffic share in the weights.
    rates
        Rates compared (subset of :data:`RATES_WATCHED`).
    max_events
        Alarm events kept in the engine's state (the oldest are dropped first).
    """

    period: float = 3600.0
    slot: float = 600.0
    min_effect: float = 0.10
    clear_effect: float = 0.05
    alpha: float = 0.05
    clear_alpha: float = 0.05
    horizon: float = 365 * 86400.0
    open_cohorts: int = 24
    bins: ScoreBins = field(default_factory=ScoreBins)
    use_scores: bool = True
    weighting: Literal["traffic", "uniform"] = "traffic"
    min_share: float = 0.01
    rates: tuple[str, ...] = RATES_WATCHED
    max_events: int = 1000

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha < 1.0 or not 0.0 < self.clear_alpha < 1.0:
            raise ValueError("alpha and clear_alpha must lie in (0, 1), e.g. VerdictSettings(alpha=0.05)")
        if not 0.0 < self.clear_effect < self.min_effect < 1.0:
            raise ValueError("need 0 < clear_effect < min_effect < 1, e.g. clear_effect=0.05, min_effect=0.1")
        if self.period <= 0 or self.slot <= 0 or self.horizon < self.period:
            raise ValueError("need period > 0, slot > 0 and horizon >= period, e.g. period=3600, slot=600")
        if self.open_cohorts < 1:
            raise ValueError("open_cohorts must be at least 1, e.g. VerdictSettings(open_cohorts=24)")
        unknown = [r for r in self.rates if r not in RATES_WATCHED]
        if unknown or not self.rates:
            raise ValueError(f"rates must be a non-empty subset of {RATES_WATCHED}, not {self.rates!r}")
        if self.weighting not in ("traffic", "uniform"):
            raise ValueError(f"weighting must be 'traffic' or 'uniform', not {self.weighting!r}")

    @property
    def horizon_cohorts(self) -> int:
        """Cohorts in the horizon: the number of change points ``alpha`` is spread over."""
        return max(1, round(self.horizon / self.period))

    def threshold(self, n_features: int) -> float:
        """Raise level (nats) of a weighted statistic: ``log(horizon_cohorts * n_features / alpha)``."""
        return math.log(self.horizon_cohorts * max(1, n_features) / self.alpha)

    @property
    def clear_threshold(self) -> float:
        """Clear level (nats): ``log(horizon_cohorts / clear_alpha)``."""
        return math.log(self.horizon_cohorts / self.clear_alpha)
