"""Label coverage: which share of a group's predictions ever got an outcome.

Under *selective labels* (only approved applicants repay or default, only flagged transactions
are investigated) the joined pairs are not a sample of the predictions, and every rate computed
on them is biased in a way the data cannot reveal. stream-fair cannot repair that, but it can
say so: a group whose coverage differs from the others' is evaluated on a different slice.

Coverage counts *resolved* predictions only, so predictions still waiting inside the time-to-live
do not pull it down:

.. math:: \\mathrm{coverage}_g = \\frac{J_g}{J_g + E_g}

with :math:`J_g` the predictions joined with an outcome and :math:`E_g` those that expired. The
gap of a feature is :math:`\\max_g c_g - \\min_g c_g` over groups with at least ``min_samples``
resolved predictions; its lower bound uses the same time-uniform beta-mixture sequences as the
disparity verdict (:func:`stream_fair.sequential.rate_bounds`), so ``flagged`` may be read at
every scrape.

>>> resolved = {"A": (900, 100), "B": (300, 700)}
>>> gap = coverage_gap(resolved, min_samples=100, threshold=0.1, alpha=0.01)
>>> round(gap.value, 2), gap.flagged
(0.6, True)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from stream_fair.sequential import rate_bounds


def coverage(joined: int, expired: int) -> float | None:
    """``joined / (joined + expired)``; None when nothing is resolved yet.

    >>> coverage(3, 1), coverage(0, 0)
    (0.75, None)
    """
    resolved = joined + expired
    return joined / resolved if resolved else None


@dataclass(frozen=True)
class CoverageGap:
    """Coverage gap of a feature with its time-uniform bounds and verdict."""

    value: float
    lower: float
    upper: float
    flagged: bool
    groups: tuple[str, ...]


def coverage_gap(
    resolved_by_group: Mapping[str, tuple[int, int]],
    min_samples: int,
    threshold: float,
    alpha: float,
) -> CoverageGap | None:
    """Gap between the best- and worst-covered group, from ``{group: (joined, expired)}``.

    Each group's coverage sequence gets ``alpha / G``; ``flagged`` when the lower bound of the gap
    exceeds ``threshold``. None with fewer than two eligible groups.
    """
    groups = tuple(g for g, (j, e) in resolved_by_group.items() if j + e >= min_samples)
    if len(groups) < 2:
        return None
    j = np.array([resolved_by_group[g][0] for g in groups], dtype=np.float64)
    n = j + np.array([resolved_by_group[g][1] for g in groups], dtype=np.float64)
    lo, hi = rate_bounds(j, n, alpha / len(groups))
    c = j / n
    lower = max(0.0, float(lo.max() - hi.min()))
    return CoverageGap(
        float(c.max() - c.min()), lower, float(hi.max() - lo.min()), lower > threshold, groups
    )
