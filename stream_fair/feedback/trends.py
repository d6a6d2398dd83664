"""Trends: is a group's selection rate, or a feature's disparity, moving, and which way.

A trend is the difference between a fast and a slow exponentially weighted mean of one value per
closed period (river ``stats.EWMean``, :math:`m \\leftarrow a x + (1 - a) m`):

.. math:: \\mathrm{trend} = \\mathrm{EWMean}_{a_{fast}} - \\mathrm{EWMean}_{a_{slow}}

Positive: the value has recently been above its long-run level (a disparity trend above 0 means
the gap is widening). With one value per period the trend reacts within about
:math:`1/a_{fast}` periods and forgets within about :math:`1/a_{slow}` periods.

>>> t = Trend(fast=0.5, slow=0.1)
>>> for x in (0.1, 0.1, 0.1, 0.3, 0.3):
...     t.update(x)
>>> round(t.get(), 3)
0.112
"""

from __future__ import annotations

from typing import Any

from river import stats


class Trend:
    """Fast minus slow ``EWMean`` of a per-period value."""

    __slots__ = ("fast", "slow", "n")

    def __init__(self, fast: float, slow: float) -> None:
        if not 0.0 < slow < fast <= 1.0:
            raise ValueError("need 0 < slow_alpha < fast_alpha <= 1, e.g. fast=0.3, slow=0.05")
        self.fast = stats.EWMean(fast)
        self.slow = stats.EWMean(slow)
        self.n = 0

    def __repr__(self) -> str:
        return f"Trend: {self.get():+.4f}"

    def update(self, x: float) -> None:
        self.fast.update(x)
        self.slow.update(x)
        self.n += 1

    def get(self) -> float:
        return float(self.fast.get() - self.slow.get()) if self.n else 0.0

    def to_state(self) -> list[float]:
        """Explicit, JSON-able state: the two fading factors, the two means and the count (never a
        pickle: loading a state runs no code)."""
        return [self.fast.fading_factor, self.slow.fading_factor, self.fast.get(), self.slow.get(), self.n]

    @classmethod
    def from_state(cls, state: Any) -> Trend:
        """Restore :meth:`to_state` output exactly (river's ``EWMean`` takes its first value as its
        mean, so one update with the saved mean puts it back where it was)."""
        if not (isinstance(state, list) and len(state) == 5):
            raise ValueError(
                "feedback state: a trend is not in the explicit form [fast, slow, fast_mean, slow_mean, n] "
                "(a state written by an older version): start on a new state directory"
            )
        fast, slow, fast_mean, slow_mean, n = state
        t = cls(float(fast), float(slow))
        t.n = int(n)
        if t.n:
            t.fast.update(float(fast_mean))
            t.slow.update(float(slow_mean))
        return t
