"""Feedback-loop indicator: does a group's selection now predict its traffic later?

A model's decisions change the data it will see (pitfall 6 of the seven-step workflow): a group
that is approved less applies less, or is scored less, or leaves, and the model then sees even less
of it. Two numbers per (model, feature), from the last closed periods:

**Descriptive value** (``LoopEstimate.value``). For every group :math:`g` with at least
``min_predictions`` predictions in two consecutive periods :math:`k, k+1`,

.. math::
    x_{g,k} = s_{g,k} - \\bar s_{k}, \\qquad
    y_{g,k} = \\log\\frac{\\mathrm{share}_{g,k+1}}{\\mathrm{share}_{g,k}}
              - \\overline{\\log\\frac{\\mathrm{share}_{k+1}}{\\mathrm{share}_{k}}}

(selection rate :math:`s` and log share change, each centred on the period's mean over groups).
``value`` is Pearson's :math:`r` of the pooled pairs over the window, in [-1, 1]; above 0, groups
selected more than average gain traffic and groups selected less lose it. No test is attached to
:math:`r`: its pairs are dependent (a period's shares sum to one, consecutive :math:`y` share a
period) and it is read at every scrape.

**The test** (``LoopEstimate.amplifying``): a *share-trend test with the sign of the selection
deviation*, Bonferroni over groups and over period closes up to a stated horizon. For each group
with at least ``min_predictions`` predictions in at least ``min_periods`` periods
:math:`k_1 < \\dots < k_m` of the window (positions in the window, so gaps are kept),

.. math::
    L_{g,k} = \\log\\frac{N_{g,k}}{N_k}, \\qquad
    \\hat\\beta_g = \\frac{\\sum_i (k_i - \\bar k)(L_{g,k_i} - \\bar L_g)}{\\sum_i (k_i - \\bar k)^2},
    \\qquad
    t_g = \\frac{\\hat\\beta_g}{\\hat\\sigma_g / \\sqrt{\\sum_i (k_i - \\bar k)^2}},

with :math:`\\hat\\sigma_g^2` the residual variance (:math:`m - 2` degrees of freedom), and the
group's mean selection deviation :math:`d_g = \\frac1m \\sum_i (s_{g,k_i} - P_{k_i}/N_{k_i})`
(its selection rate minus the period's overall rate). Group :math:`g` is *amplifying* when

.. math::
    |t_g| > q = F^{-1}_{t,\\,m-2}\\Big(1 - \\frac{\\alpha}{2\\,G\\,H}\\Big)
    \\quad\\text{and}\\quad \\operatorname{sign} t_g = \\operatorname{sign} d_g,

i.e. its traffic share trends significantly, in the direction of its selection deviation: a
group selected less is leaving, a group selected more is growing. :math:`G` is the number of
groups tested at this look and :math:`H` = ``horizon`` the number of period closes covered.

**Guarantee.** Null hypothesis: the per-period traffic counts are i.i.d. across periods (a
stationary traffic mix, whatever the selection rates are, so a constant disparity or a bias onset
is *not* a loop). Then for normal :math:`L_{g,k}`, :math:`t_g` has Student's :math:`t_{m-2}` law,
each look flags a group with probability at most :math:`\\alpha / (G H)` whatever :math:`d_g`, and
by the union bound *P(amplifying at any of the first H period closes) <= alpha*; beyond the horizon
the expected number of false flags stays below :math:`\\alpha/H` per period close. (The flag is a
function of the closed periods only, so reading it at every scrape adds no looks.) With Poisson
arrivals and at least ``min_predictions`` = 100 predictions per group and period the normal
approximation of :math:`L` is close; the test of the null simulation in ``tests/`` checks the level.

**Limits.** It is an association, not a causal effect: a group whose traffic trends for reasons
of its own *and* that is selected less (or more) is flagged too. Traffic that is not stationary
within the window (a daily cycle of the mix with hourly periods, a campaign) violates the null:
choose a ``period`` of a whole cycle or longer. A loop that acts faster than a period, or that
moves base rates but not traffic, is not seen.

>>> periods = [{"A": (1000 + 25 * k, 600), "B": (1000 - 25 * k + (k % 2) * 9, 300)}
...            for k in range(12)]
>>> est = loop_indicator(periods, min_predictions=100, min_periods=8, alpha=0.05, horizon=100)
>>> round(est.value, 2), est.pairs, est.amplifying, est.group
(0.92, 22, True, 'A')
>>> flat = [{"A": (1000 + (k % 3) * 20, 600), "B": (1000 - (k % 2) * 20, 300)} for k in range(12)]
>>> loop_indicator(flat, min_predictions=100, min_periods=8, alpha=0.05, horizon=100).amplifying
False
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import t as student_t

__all__ = ["LoopEstimate", "ShareTrend", "loop_indicator", "loop_pairs", "share_trends"]


@dataclass(frozen=True)
class LoopEstimate:
    """Loop indicator of a feature.

    ``value`` and ``pairs``: the descriptive correlation and its number of (group, period) pairs.
    ``amplifying``: the share-trend test flags some group; ``group``, ``statistic`` (:math:`t_g`)
    and ``threshold`` (:math:`q`) are the most significant concordant group's, if any.
    """

    value: float
    pairs: int
    amplifying: bool
    group: str | None = None
    statistic: float | None = None
    threshold: float | None = None


@dataclass(frozen=True)
class ShareTrend:
    """One group's log-share trend over the window: :math:`t_g`, :math:`d_g`, periods used."""

    group: str
    t: float
    deviation: float
    periods: int


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


def share_trends(
    periods: Sequence[Mapping[str, tuple[int, int]]], min_predictions: int, min_periods: int
) -> list[ShareTrend]:
    """:math:`t_g` and :math:`d_g` of every group with ``min_periods`` eligible periods."""
    tot = [sum(n for n, _ in p.values()) for p in periods]
    pos = [sum(q for _, q in p.values()) for p in periods]
    out: list[ShareTrend] = []
    for g in sorted({g for p in periods for g in p}):
        ks = [i for i, p in enumerate(periods) if p.get(g, (0, 0))[0] >= min_predictions]
        if len(ks) < max(min_periods, 3):
            continue
        k = np.asarray(ks, float)
        level = np.array([math.log(periods[i][g][0] / tot[i]) for i in ks])
        dev = float(np.mean([periods[i][g][1] / periods[i][g][0] - pos[i] / tot[i] for i in ks]))
        kc = k - k.mean()
        sxx = float(kc @ kc)
        beta = float(kc @ (level - level.mean())) / sxx
        resid = level - level.mean() - beta * kc
        s2 = float(resid @ resid) / (len(ks) - 2)
        t = beta / math.sqrt(s2 / sxx) if s2 > 0 else math.copysign(math.inf, beta) if beta else 0.0
        out.append(ShareTrend(g, t, dev, len(ks)))
    return out


def loop_indicator(
    periods: Sequence[Mapping[str, tuple[int, int]]],
    min_predictions: int,
    min_periods: int,
    alpha: float,
    horizon: int = 10_000,
) -> LoopEstimate | None:
    """Descriptive correlation and the share-trend test (module docstring) of a window.

    ``alpha`` is the false-flag probability over ``horizon`` period closes (split over the groups
    tested at each). None until there are at least 3 pairs.
    """
    x, y = loop_pairs(periods, min_predictions)
    n = x.size
    if n < 3:
        return None
    sx, sy = float(np.sqrt((x * x).sum())), float(np.sqrt((y * y).sum()))
    r = float((x * y).sum() / (sx * sy)) if sx > 0 and sy > 0 else 0.0
    r = min(1.0, max(-1.0, r))
    trends = share_trends(periods, min_predictions, min_periods)
    best: tuple[float, ShareTrend, float] | None = None
    for tr in trends:
        q = float(student_t.ppf(1.0 - alpha / (2.0 * len(trends) * horizon), tr.periods - 2))
        if tr.t * tr.deviation > 0 and abs(tr.t) > q and (best is None or abs(tr.t) / q > best[0]):
            best = (abs(tr.t) / q, tr, q)
    if best is None:
        return LoopEstimate(r, n, False)
    return LoopEstimate(r, n, True, best[1].group, best[1].t, best[2])
