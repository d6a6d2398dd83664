"""Feedback-loop indicator: does a group's selection now predict its traffic later?

A model's decisions change the data it will see (pitfall 6 of the seven-step workflow): a group
that is approved less applies less, or is scored less, or leaves, and the model then sees even less
of it. The indicator looks for that signature in closed periods. For every group :math:`g` with at
least ``min_predictions`` predictions in two consecutive periods :math:`k, k+1`,

.. math::
    x_{g,k} = s_{g,k} - \\bar s_{k}, \\qquad
    y_{g,k} = \\log\\frac{\\mathrm{share}_{g,k+1}}{\\mathrm{share}_{g,k}}
              - \\overline{\\log\\frac{\\mathrm{share}_{k+1}}{\\mathrm{share}_{k}}}

(selection rate :math:`s` and log share change, each centred on the period's mean over groups so
that shocks common to all groups cancel). The indicator is Pearson's correlation :math:`r` of the
pooled pairs :math:`(x, y)` over the last ``window`` period pairs, in [-1, 1]: above 0, groups
selected more than average gain traffic and groups selected less lose it, which is how a loop
amplifies itself. ``amplifying`` is set when :math:`r > 0` and Fisher's
:math:`z = \\operatorname{artanh}(r)\\sqrt{n - 3}` exceeds the one-sided normal quantile of
``alpha``, with :math:`n \\ge` ``min_pairs`` pairs.

Limits: it is an association, not a causal effect. A group that shrinks for reasons of its own
while also being selected less produces the same signature, and the test treats pairs as
independent although shares within a period are tied together, so read ``amplifying`` as "look
here", not as a calibrated p-value. It needs at least two groups with traffic and several periods;
the period must be longer than the loop's lag (if decisions affect traffic a day later, hourly
periods dilute it). Base-rate feedback (the model changes who repays) is not measured: outcomes
arrive too late to give a per-period base rate in time.

>>> periods = [{"A": (1000, 600), "B": (1000, 300)}, {"A": (1100, 660), "B": (900, 270)},
...            {"A": (1200, 720), "B": (800, 240)}, {"A": (1300, 780), "B": (700, 210)}]
>>> est = loop_indicator(periods, min_predictions=100, min_pairs=6, alpha=0.05)
>>> round(est.value, 2), est.pairs, est.amplifying
(1.0, 6, True)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import norm


@dataclass(frozen=True)
class LoopEstimate:
    """Loop indicator of a feature: correlation, number of pairs, verdict."""

    value: float
    pairs: int
    amplifying: bool


def loop_pairs(
    periods: Sequence[Mapping[str, tuple[int, int]]], min_predictions: int
) -> tuple[np.ndarray, np.ndarray]:
    """The centred (x, y) pairs of consecutive periods ``{group: (predictions, positives)}``."""
    xs: list[float] = []
    ys: list[float] = []
    for now, nxt in zip(periods, periods[1:], strict=False):
        tot_now = sum(n for n, _ in now.values())
        tot_nxt = sum(n for n, _ in nxt.values())
        groups = [
            g
            for g, (n, _) in now.items()
            if n >= min_predictions and nxt.get(g, (0, 0))[0] >= min_predictions
        ]
        if len(groups) < 2 or not tot_now or not tot_nxt:
            continue
        x = np.array([now[g][1] / now[g][0] for g in groups])
        y = np.array([math.log((nxt[g][0] / tot_nxt) / (now[g][0] / tot_now)) for g in groups])
        xs.extend(x - x.mean())
        ys.extend(y - y.mean())
    return np.asarray(xs), np.asarray(ys)


def loop_indicator(
    periods: Sequence[Mapping[str, tuple[int, int]]],
    min_predictions: int,
    min_pairs: int,
    alpha: float,
) -> LoopEstimate | None:
    """Correlation of this period's selection with the next period's traffic change.

    None until there are at least 3 pairs; ``amplifying`` needs ``min_pairs``.
    """
    x, y = loop_pairs(periods, min_predictions)
    n = x.size
    if n < 3:
        return None
    sx, sy = float(np.sqrt((x * x).sum())), float(np.sqrt((y * y).sum()))
    r = float((x * y).sum() / (sx * sy)) if sx > 0 and sy > 0 else 0.0
    r = min(1.0, max(-1.0, r))
    z = math.atanh(min(r, 1 - 1e-12)) * math.sqrt(max(n - 3, 0))
    return LoopEstimate(r, n, bool(n >= min_pairs and r > 0 and z > norm.ppf(1 - alpha)))
