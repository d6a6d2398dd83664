"""A slot's strata and their e-values: each group against the rest of its feature, per cohort.

A slot's rows (``(cell, cohort)`` sums of its increments) are summed, for each feature, into
strata ``(cohort, group)``; the rest of a stratum is the other groups of the same feature in the
same cohort and slot (reserved groups ``__other__`` / ``__missing__`` take part in neither).
:func:`slot_evidence` then gives every (stratum, rate) its raise e-values (:mod:`.evidence`): the
score chain where every pair of the stratum has a score, the decisions' Fisher ratio otherwise.

Rows have the columns ``n0 n1 tp fp tn fn`` then the positives' and the negatives' score bins;
the labelled counts are in the confusion order of :class:`stream_fair.sequential.Counts`, whose
:data:`~stream_fair.sequential.RATES` say which columns a rate sums.

>>> cols = RateColumns(("selection_rate", "true_positive_rate"), bins=0)
>>> row = np.array([[70.0, 30.0, 25.0, 5.0, 60.0, 10.0]])
>>> (row @ cols.num).tolist(), (row @ cols.den).tolist()  # n1 of n0 + n1; tp of tp + fn
([[30.0, 25.0]], [[100.0, 35.0]])
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from stream_fair.sequential import RATES
from stream_fair.verdict.evidence import chain_log_lr, design_log_psi, proportional_odds_chain
from stream_fair.verdict.fisher import fisher_log_lr

__all__ = [
    "RateColumns",
    "Strata",
    "SlotEvidence",
    "feature_strata",
    "group_weights",
    "slot_evidence",
    "sum_by",
]

_LAB = 2  # labelled counts start at column 2


class RateColumns:
    """The rates as matrices over row columns: ``rows @ num`` successes, ``rows @ den`` trials."""

    def __init__(self, rates: tuple[str, ...], bins: int) -> None:
        self.rates, self.bins = rates, bins
        width = 6 + 2 * bins
        self.num = np.zeros((width, len(rates)))
        self.den = np.zeros((width, len(rates)))
        self.hist = np.full(len(rates), -1, dtype=np.int64)  # first score column, -1: none
        for j, rate in enumerate(rates):
            if rate == "selection_rate":  # from all predictions (n0, n1), not from labelled pairs
                self.num[1, j] = 1.0
                self.den[[0, 1], j] = 1.0
                continue
            num, den = RATES[rate]
            self.num[[_LAB + i for i in num], j] = 1.0
            self.den[[_LAB + i for i in den], j] = 1.0
            if bins:
                self.hist[j] = 6 if rate == "true_positive_rate" else 6 + bins


def sum_by(index: NDArray[np.int64], rows: NDArray[np.float64], size: int) -> NDArray[np.float64]:
    """Rows summed by ``index`` into ``size`` rows (a one-hot product: faster than ``np.add.at``)."""
    if size * index.size > 4_000_000:  # a huge slot: no huge one-hot matrix
        out = np.zeros((size, rows.shape[1]))
        np.add.at(out, index, rows)
        return out
    onehot = np.zeros((size, index.size))
    onehot[index, np.arange(index.size)] = 1.0
    return np.asarray(onehot @ rows)


@dataclass
class Strata:
    """One feature's strata of one slot: row ``i`` is ``groups[group[i]]`` in cohort ``cohort[i]``."""

    feature: str
    groups: list[str]
    cohort: NDArray[np.int64]
    group: NDArray[np.int64]
    own: NDArray[np.float64]
    rest: NDArray[np.float64]  # the rest of the feature in the same cohort and slot
    rest_before: NDArray[np.float64]  # the rest's cumulative row before the slot
    weight: NDArray[np.float64]  # the group's start weight (0: not tested)


def group_weights(
    groups: list[str], before: NDArray[np.float64], weighting: str, min_share: float
) -> NDArray[np.float64]:
    """Start weight of each group (0 when untested), summing to 1 over the tested groups.

    ``traffic``: proportional to ``1 / max(share, min_share)`` of the predictions so far; two
    groups are one hypothesis (group one against two is two against one): only the first is
    tested.

    >>> before = np.zeros((3, 6)); before[:, 0] = [800, 150, 50]
    >>> group_weights(["A", "B", "C"], before, "traffic", 0.01).round(3).tolist()
    [0.045, 0.239, 0.716]
    """
    tested = 1 if len(groups) == 2 else len(groups)
    w = np.zeros(len(groups))
    if weighting == "uniform" or tested == 1:
        w[:tested] = 1.0 / tested
        return w
    n = before[:, :2].sum(axis=1)
    share = n / n.sum() if n.sum() > 0 else np.zeros(len(groups))
    inv = 1.0 / np.maximum(share, min_share)
    return np.asarray(inv / inv.sum())


def feature_strata(
    feature: str,
    found: list[tuple[int, str]],
    cohorts: list[int],
    agg: NDArray[np.float64],
    cum: dict[str, NDArray[np.float64]],
    weighting: str,
    min_share: float,
) -> Strata:
    """Sum rows ``agg[i]`` of group ``g`` (``found`` pairs ``(i, g)``) into (cohort, group) strata.

    ``cum`` holds the feature's cumulative row per group; the strata's references are taken from
    it *before* the slot, then the slot's rows are added to it.
    """
    keep = [i for i, _ in found]
    groups = sorted(set(cum) | {g for _, g in found})
    gid = {g: i for i, g in enumerate(groups)}
    big = len(groups)
    key = np.array([cohorts[i] * big + gid[g] for i, g in found], dtype=np.int64)
    ukey, inv = np.unique(key, return_inverse=True)
    own = sum_by(inv, agg[keep], ukey.size)
    cohort, g_idx = ukey // big, ukey % big
    ucoh, cinv = np.unique(cohort, return_inverse=True)
    totals = sum_by(cinv, own, ucoh.size)
    zero = np.zeros(agg.shape[1])
    before = np.array([cum.get(g, zero) for g in groups])
    added = sum_by(g_idx, own, big)
    for i in np.flatnonzero(added.any(axis=1)).tolist():
        cum[groups[i]] = before[i] + added[i]
    return Strata(
        feature=feature,
        groups=groups,
        cohort=cohort,
        group=g_idx,
        own=own,
        rest=totals[cinv] - own,
        rest_before=before.sum(axis=0)[None, :] - before[g_idx],
        weight=group_weights(groups, before, weighting, min_share)[g_idx],
    )


@dataclass
class SlotEvidence:
    """Every compared (stratum, rate) of a slot: counts, the rest's reference rate, raise e-values.

    ``pair`` indexes ``(feature, group)`` over the slot's strata in order, ``col`` the rate;
    ``raise_llr`` is ``[group below the rest, above]``.
    """

    pair: NDArray[np.int64]
    col: NDArray[np.int64]
    cohort: NDArray[np.int64]
    weight: NDArray[np.float64]
    x: NDArray[np.float64]
    n: NDArray[np.float64]
    xr: NDArray[np.float64]
    nr: NDArray[np.float64]
    ref: NDArray[np.float64]
    raise_llr: NDArray[np.float64]

    def clear_llr(self, side: NDArray[np.int64], clear_effect: float) -> NDArray[np.float64]:
        """Log e-values of "no gap" against a gap of ``clear_effect`` on ``side`` (-1 below, +1
        above; 0: not raised, 0.0), from the decisions."""
        out = np.zeros(self.x.size)
        up = np.flatnonzero(side)
        if up.size:
            col = (side[up] > 0).astype(int)  # column 0: the group below the rest, 1: above
            psi = design_log_psi(self.ref[up], clear_effect)[np.arange(up.size), col]
            x, n, xr, nr = self.x[up], self.n[up], self.xr[up], self.nr[up]
            out[up] = -fisher_log_lr(x, n, nr, x + xr, psi)
        return out


def slot_evidence(
    strata: list[Strata], columns: RateColumns, min_effect: float, use_scores: bool
) -> SlotEvidence | None:
    """Raise e-values of every tested (stratum, rate) with trials on both sides; None if none."""
    own = np.concatenate([st.own for st in strata])
    rest = np.concatenate([st.rest for st in strata])
    x_all, n_all, xr_all, nr_all = (
        own @ columns.num,
        own @ columns.den,
        rest @ columns.num,
        rest @ columns.den,
    )
    rest_before = np.concatenate([st.rest_before for st in strata])
    cx, cn = rest_before @ columns.num, rest_before @ columns.den
    weight = np.concatenate([st.weight for st in strata])
    row, col = np.nonzero((n_all > 0) & (nr_all > 0) & (weight[:, None] > 0))
    if row.size == 0:
        return None
    x, n, xr, nr = x_all[row, col], n_all[row, col], xr_all[row, col], nr_all[row, col]
    # the rest's rate before this slot; the stratum's pooled rate (a margin) until known
    known = cn[row, col] >= 20
    ref = np.where(known, cx[row, col] / np.maximum(cn[row, col], 1.0), (x + xr) / (n + nr))
    lp = design_log_psi(ref, min_effect)
    raise_llr = np.zeros((row.size, 2))
    scored = np.zeros(row.size, dtype=bool)
    start = columns.hist[col]
    pos = np.flatnonzero(start >= 0) if use_scores else np.zeros(0, dtype=np.int64)
    if pos.size:
        cols = start[pos][:, None] + np.arange(columns.bins)[None, :]
        hg = own[row[pos][:, None], cols]
        ht = hg + rest[row[pos][:, None], cols]
        ok = (hg.sum(axis=1) == n[pos]) & (ht.sum(axis=1) == n[pos] + nr[pos])  # every pair scored
        pos, hg, ht, cols = pos[ok], hg[ok], ht[ok], cols[ok]
        if pos.size:
            # the alternative's shape: the rest's score histogram before the slot
            chain = proportional_odds_chain(rest_before[row[pos][:, None], cols], lp[pos])
            raise_llr[pos] = chain_log_lr(hg, ht, chain)
            scored[pos] = True
    plain = np.flatnonzero(~scored)
    if plain.size:
        raise_llr[plain] = fisher_log_lr(x[plain], n[plain], nr[plain], x[plain] + xr[plain], lp[plain])
    base = np.cumsum([0] + [len(st.groups) for st in strata])
    pair = np.concatenate([base[k] + st.group for k, st in enumerate(strata)])
    cohort = np.concatenate([st.cohort for st in strata])
    return SlotEvidence(pair[row], col, cohort[row], weight[row], x, n, xr, nr, ref, raise_llr)
