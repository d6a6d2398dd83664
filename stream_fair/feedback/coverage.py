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

**Label arrival ratio** (does not wait for the time-to-live). Coverage is known only once
predictions resolve; under selective labels a group's outcomes are *missing from the start*. If
labels arrive independently of the group (same label probability and delay distribution, and a
stable traffic mix), the groups' shares of the labels that arrived so far equal their shares of
the predictions, at every moment. So for each group

.. math:: \\rho_g = \\frac{J_g / J}{P_g / P}

(share of arrived labels over share of predictions; 1 when labels are not selective). Each
arriving label is a Bernoulli trial "belongs to g" with probability :math:`P_g/P` under that
null, so the beta-mixture confidence sequence of :math:`J_g / J` (level ``alpha / G``) divided by
:math:`P_g/P` bounds :math:`\\rho_g` at every look; a group is flagged when its bounds lie below
``threshold`` or above ``1 / threshold``. A group whose labels are merely *slower* also shows
:math:`\\rho_g < 1` for a while (then see ``label_delay_seconds``); a fast change of the traffic
mix biases :math:`\\rho` by the share change within one label delay.

>>> arr = arrival_ratios({"A": (1000, 700), "B": (1000, 200)}, 100, 0.8, 0.01)
>>> round(arr.ratios["B"], 2), arr.flagged
(0.44, True)

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
    return CoverageGap(float(c.max() - c.min()), lower, float(hi.max() - lo.min()), lower > threshold, groups)


@dataclass(frozen=True)
class ArrivalRatios:
    """Label arrival ratio per group (module docstring) and whether any group is flagged."""

    ratios: dict[str, float]
    flagged_groups: tuple[str, ...]

    @property
    def flagged(self) -> bool:
        return bool(self.flagged_groups)


def arrival_ratios(
    by_group: Mapping[str, tuple[int, int]], min_samples: int, threshold: float, alpha: float
) -> ArrivalRatios:
    """``{group: (predictions, joined)}`` to arrival ratios; groups need ``min_samples``
    predictions, and the feature two such groups and at least one arrived label."""
    groups = tuple(g for g, (p, _) in by_group.items() if p >= min_samples)
    preds = sum(by_group[g][0] for g in groups)
    labels = sum(by_group[g][1] for g in groups)
    if len(groups) < 2 or labels == 0:
        return ArrivalRatios({}, ())
    share = np.array([by_group[g][0] / preds for g in groups])
    j = np.array([by_group[g][1] for g in groups], dtype=np.float64)
    lo, hi = rate_bounds(j, np.full_like(j, labels), alpha / len(groups))
    ratio = j / labels / share
    bad = (hi / share < threshold) | (lo / share > 1.0 / threshold)
    return ArrivalRatios(
        {g: float(r) for g, r in zip(groups, ratio, strict=True)},
        tuple(g for g, b in zip(groups, bad, strict=True) if b),
    )
