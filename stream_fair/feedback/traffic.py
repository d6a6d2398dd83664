"""Traffic share and exposure ratio: who is being scored, and who gets the positive decisions.

For a feature with groups :math:`g` and, in one period, :math:`N_g` predictions of which
:math:`P_g` are positive:

.. math::
    \\mathrm{share}_g = \\frac{N_g}{\\sum_h N_h}, \\qquad
    \\mathrm{exposure}_g = \\frac{P_g / \\sum_h P_h}{N_g / \\sum_h N_h}
                         = \\frac{\\mathrm{sr}_g}{\\mathrm{sr}_{overall}}

An exposure ratio of 1 means the group gets its traffic's worth of positive decisions; below 1 it
is under-exposed. The *reference* share is the share pooled over the first ``reference_periods``
complete periods (frozen afterwards), so a slow population shift is measured against where it
started, not against a moving baseline that drifts along with it.

>>> shares({"A": (75, 30), "B": (25, 5)})
{'A': 0.75, 'B': 0.25}
>>> {g: round(r, 3) for g, r in exposure_ratios({"A": (75, 30), "B": (25, 5)}).items()}
{'A': 1.143, 'B': 0.571}
"""

from __future__ import annotations

from collections.abc import Mapping


def shares(counts: Mapping[str, tuple[int, int]]) -> dict[str, float]:
    """Traffic share per group from ``{group: (predictions, positives)}`` ({} without traffic)."""
    total = sum(n for n, _ in counts.values())
    return {g: n / total for g, (n, _) in counts.items()} if total else {}


def exposure_ratios(counts: Mapping[str, tuple[int, int]]) -> dict[str, float]:
    """Share of positive predictions over share of traffic, per group with traffic.

    Undefined (left out) when the period had no positive prediction at all.
    """
    total = sum(n for n, _ in counts.values())
    positives = sum(p for _, p in counts.values())
    if not total or not positives:
        return {}
    overall = positives / total
    return {g: (p / n) / overall for g, (n, p) in counts.items() if n}


class ReferenceShares:
    """Pools the first ``periods`` complete periods' counts, then freezes.

    >>> ref = ReferenceShares(periods=2)
    >>> for period in ({"A": (60, 0), "B": (40, 0)}, {"A": (80, 0), "B": (20, 0)}, {"A": (0, 0)}):
    ...     ref.add(period)
    >>> ref.shares(), ref.frozen
    ({'A': 0.7, 'B': 0.3}, True)
    """

    def __init__(self, periods: int) -> None:
        self.periods = periods
        self.seen = 0
        self.counts: dict[str, int] = {}

    @property
    def frozen(self) -> bool:
        return self.seen >= self.periods

    def add(self, period: Mapping[str, tuple[int, int]]) -> None:
        if self.frozen:
            return
        for g, (n, _) in period.items():
            self.counts[g] = self.counts.get(g, 0) + n
        self.seen += 1

    def shares(self) -> dict[str, float]:
        total = sum(self.counts.values())
        return {g: n / total for g, n in self.counts.items()} if total else {}

    def to_state(self) -> dict:
        return {"periods": self.periods, "seen": self.seen, "counts": self.counts}

    @classmethod
    def from_state(cls, state: dict) -> ReferenceShares:
        ref = cls(int(state["periods"]))
        ref.seen = int(state["seen"])
        ref.counts = {str(g): int(n) for g, n in state["counts"].items()}
        return ref
