"""Threshold what-ifs (post-processing): per-group decision thresholds that meet a fairness criterion.

Pure numpy over per-group histograms of matured labelled pairs (no Kafka, no Prometheus). A group's
histogram has bin edges :math:`e_0 < \\dots < e_B` and per bin the number of pairs with label 1
(:math:`P_b`) and label 0 (:math:`N_b`). The decision is ``score >= threshold`` (as
``schema.score_threshold``); a threshold at edge :math:`e_k` selects bins :math:`k..B-1`, so its
confusion counts are exact: :math:`TP_k = \\sum_{b \\ge k} P_b`, :math:`FP_k = \\sum_{b \\ge k} N_b`,
:math:`FN_k = P - TP_k`, :math:`TN_k = N - FP_k`. Candidate thresholds are the edges; a threshold
between edges is moved to the nearest one (and reported as such).

Rates, their credible intervals and the disparities are those of :mod:`stream_fair.fairness` on the
projected counts (one definition of each). Criteria are the fairlearn constraints:

* ``demographic_parity``: equal ``selection_rate``;
* ``equal_opportunity``: equal ``true_positive_rate``;
* ``equalized_odds``: equal ``true_positive_rate`` and ``false_positive_rate``.

Two modes:

* ``deterministic`` (default): one threshold per group, chosen to maximize overall accuracy subject to
  the criterion's ``between_groups`` difference :math:`\\le` ``tolerance``. Exact search: in an
  optimum all groups' rates lie in a window :math:`[L, L + tol]` whose lower end is one of the
  achievable rates, and each rate is monotone in the threshold, so for each candidate window every
  group's feasible thresholds are a contiguous range and its best one is a range maximum. Selecting
  everyone (or no one) always satisfies every criterion, so a solution always exists; ``degenerate``
  says when that trivial one is all that is left (typical of equalized odds at a small tolerance:
  with single thresholds the ROC curves of two groups seldom cross at a useful point).
* ``randomized``: exact parity the way fairlearn's ``ThresholdOptimizer`` (Hardt, Price & Srebro 2016)
  reaches it: per group a mix of two thresholds (and, for equalized odds, a share of decisions taken
  by a coin of the common false-positive rate), found on the upper convex hull of the group's
  (rate, accuracy) or ROC points over a grid of ``grid_size + 1`` common rates. Projected counts are
  expectations; their intervals use them rounded to integers (the coin's own variance is not in
  them).

Pitfall 2 of the fairness workflow (overcorrection) is the ``accuracy_change`` of every group and
overall: projected minus current accuracy on the same pairs. Only pairs whose decision flips change
it: with :math:`a` flips that become right and :math:`b` that become wrong among :math:`n` pairs,
:math:`\\Delta = (a - b)/n`, with a normal interval of variance :math:`((a + b)/n - \\Delta^2)/n` (the
paired difference of two proportions, McNemar's setting). ``selection_change`` is the same with
newly selected (:math:`a`) and newly rejected (:math:`b`) pairs: the selection cost.

>>> edges = np.linspace(0.0, 1.0, 5)
>>> hists = {
...     "A": LabelledHistogram(edges, np.array([0, 10, 40, 150]), np.array([60, 50, 40, 10])),
...     "B": LabelledHistogram(edges, np.array([5, 30, 60, 5]), np.array([70, 50, 20, 10])),
... }
>>> w = optimize(hists, "equal_opportunity", current=0.5, settings=FairnessSettings(), tolerance=0.1)
>>> {g: r.rule.thresholds for g, r in w.groups.items()}
{'A': (0.75,), 'B': (0.5,)}
>>> round(w.disparities["equal_opportunity_difference"].value, 3), w.met
(0.1, True)
>>> w0 = optimize(hists, "equal_opportunity", current=0.5, settings=FairnessSettings(), tolerance=0.0)
>>> {g: r.rule.thresholds for g, r in w0.groups.items()}, round(w0.groups["B"].accuracy_change.value, 3)
({'A': (0.5,), 'B': (0.25,)}, -0.08)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import special

from stream_fair.disparity import DISPARITY_RATES
from stream_fair.errors import TooFewSamplesError, WhatIfError
from stream_fair.fairness import (
    RATES,
    Counts,
    Estimate,
    FairnessSettings,
    evaluate_feature,
    group_rates,
    is_reserved,
    observed_rates,
)

__all__ = [
    "CRITERIA",
    "MODES",
    "LabelledHistogram",
    "Rule",
    "WhatIf",
    "GroupWhatIf",
    "optimize",
    "what_if",
]

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]

CRITERIA: tuple[str, ...] = ("demographic_parity", "equal_opportunity", "equalized_odds")
MODES: tuple[str, ...] = ("deterministic", "randomized")
#: The rates shown per group, and the disparities shown (all three, whatever the criterion:
#: pitfall 4 of the workflow, how the other criteria move when one is enforced).
REPORTED_RATES: tuple[str, ...] = ("selection_rate", "true_positive_rate", "false_positive_rate", "accuracy")
REPORTED_DISPARITIES: tuple[str, ...] = tuple(f"{c}_difference" for c in CRITERIA) + ("accuracy_difference",)
DEFAULT_GRID_SIZE = 1000  # fairlearn's

UNKNOWN_CRITERION_ERROR = "unknown criterion {value!r}: use one of {choices}"
UNKNOWN_MODE_ERROR = "unknown mode {value!r}: use one of {choices}"
UNKNOWN_GROUP_ERROR = "unknown group {value!r}: groups with labelled pairs are {choices}"
TOO_FEW_GROUPS_ERROR = (
    "a what-if needs at least 2 groups with min_samples={min_samples} labelled pairs{labels}; "
    "eligible: {eligible}; too small or reserved: {small}"
)
HISTOGRAM_ERROR = (
    "a labelled histogram needs increasing edges and {bins} non-negative counts per label; {problem}"
)
EXCLUDED_GROUP_ERROR = "group {group!r} cannot be projected: {reason}"
NO_CURRENT_ERROR = "no current threshold for groups {groups}: give one per group, or one for all"
TOLERANCE_ERROR = "tolerance must lie in [0, 1], e.g. 0.05; got {value!r}"
MISMATCH_NOTE = (
    "the recorded decisions of {group} are not score >= {threshold:g} for {share:.1%} of its labelled "
    "pairs, so its current rates here are not the realized ones: pass its threshold as current={group}:T"
)
#: Above this share of a group's pairs, a current threshold that does not reproduce the recorded
#: decisions gets a note (a few pairs exactly on a bin edge may disagree).
MISMATCH_SHARE = 0.01
_EPS = 1e-12


@dataclass(frozen=True)
class LabelledHistogram:
    """One group's matured labelled pairs per score bin: ``positives[b]`` label 1, ``negatives[b]`` 0;
    optionally ``selected[b]``, those the model decided 1 (checks the current threshold)."""

    edges: FloatArray
    positives: IntArray
    negatives: IntArray
    selected: IntArray | None = None

    def __post_init__(self) -> None:
        edges = np.asarray(self.edges, dtype=np.float64)
        pos = np.asarray(self.positives, dtype=np.int64)
        neg = np.asarray(self.negatives, dtype=np.int64)
        bins = edges.size - 1
        if edges.ndim != 1 or bins < 1 or np.any(np.diff(edges) <= 0):
            raise WhatIfError(
                HISTOGRAM_ERROR.format(bins="len(edges) - 1", problem="edges are not increasing")
            )
        if pos.shape != (bins,) or neg.shape != (bins,) or pos.min() < 0 or neg.min() < 0:
            raise WhatIfError(HISTOGRAM_ERROR.format(bins=bins, problem="counts do not match"))
        object.__setattr__(self, "edges", edges)
        object.__setattr__(self, "positives", pos)
        object.__setattr__(self, "negatives", neg)
        if self.selected is not None:
            sel = np.asarray(self.selected, dtype=np.int64)
            if sel.shape != (bins,) or np.any(sel < 0) or np.any(sel > pos + neg):
                raise WhatIfError(HISTOGRAM_ERROR.format(bins=bins, problem="selected does not fit"))
            object.__setattr__(self, "selected", sel)

    @property
    def n(self) -> int:
        return int(self.positives.sum() + self.negatives.sum())

    def cells(self) -> FloatArray:
        """``(tp, fp, tn, fn)`` at every edge threshold, shape ``(B + 1, 4)``; row k is ``score >= e_k``."""
        tp = np.append(np.cumsum(self.positives[::-1])[::-1], 0)
        fp = np.append(np.cumsum(self.negatives[::-1])[::-1], 0)
        p, n = tp[0], fp[0]
        return np.column_stack([tp, fp, n - fp, p - tp]).astype(np.float64)

    def mismatch(self, threshold: float) -> int | None:
        """Labelled pairs whose recorded decision is not ``score >= threshold`` (None if unknown)."""
        if self.selected is None:
            return None
        k = self.index(threshold)
        above = self.positives[k:].sum() + self.negatives[k:].sum()
        return int(self.selected[:k].sum() + above - self.selected[k:].sum())

    def index(self, threshold: float) -> int:
        """The edge nearest to ``threshold`` (first of two equally near)."""
        return int(np.argmin(np.abs(self.edges - float(threshold))))


@dataclass(frozen=True)
class Rule:
    """A group's decision rule: ``score >= thresholds[i]`` with probability ``weights[i]``, and with
    probability ``constant`` a coin that selects at ``constant_rate`` whatever the score."""

    thresholds: tuple[float, ...]
    weights: tuple[float, ...]
    constant: float = 0.0
    constant_rate: float = 0.0

    @property
    def randomized(self) -> bool:
        return self.constant > 0.0 or sum(w > 0.0 for w in self.weights) > 1

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"thresholds": list(self.thresholds), "weights": list(self.weights)}
        if self.constant > 0.0:
            out["coin"] = {"weight": self.constant, "selection_rate": self.constant_rate}
        return out


def _deterministic(threshold: float) -> Rule:
    return Rule((float(threshold),), (1.0,))


@dataclass(frozen=True)
class GroupWhatIf:
    """One group under a rule, next to its current threshold."""

    group: str
    n: int
    rule: Rule
    current: float
    rates: dict[str, Estimate]
    current_rates: dict[str, Estimate]
    accuracy_change: Estimate
    selection_change: Estimate
    #: labelled pairs whose recorded decision differs from ``score >= current`` (None: unknown)
    current_mismatch: int | None = None


@dataclass(frozen=True)
class WhatIf:
    """The projection of a set of per-group rules. ``excluded`` groups keep their current threshold."""

    feature: str
    criterion: str | None
    mode: str
    tolerance: float | None
    groups: dict[str, GroupWhatIf]
    excluded: dict[str, str]
    disparities: dict[str, Estimate]
    current_disparities: dict[str, Estimate]
    overall: dict[str, Estimate]
    current_overall: dict[str, Estimate]
    accuracy_change: Estimate
    selection_change: Estimate
    met: bool | None = None
    degenerate: bool = False
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        def est(e: Estimate) -> dict[str, float]:
            return {"value": e.value, "lower": e.lower, "upper": e.upper}

        def table(d: Mapping[str, Estimate]) -> dict[str, dict[str, float]]:
            return {k: est(v) for k, v in d.items()}

        return {
            "feature": self.feature,
            "criterion": self.criterion,
            "mode": self.mode,
            "tolerance": self.tolerance,
            "met": self.met,
            "degenerate": self.degenerate,
            "groups": {
                g: {
                    "n": r.n,
                    "rule": r.rule.to_json(),
                    "current_threshold": r.current,
                    "rates": table(r.rates),
                    "current_rates": table(r.current_rates),
                    "accuracy_change": est(r.accuracy_change),
                    "selection_change": est(r.selection_change),
                    "current_mismatch": r.current_mismatch,
                }
                for g, r in self.groups.items()
            },
            "excluded": dict(self.excluded),
            "disparities": table(self.disparities),
            "current_disparities": table(self.current_disparities),
            "overall": table(self.overall),
            "current_overall": table(self.current_overall),
            "accuracy_change": est(self.accuracy_change),
            "selection_change": est(self.selection_change),
            "notes": list(self.notes),
        }


# -- evaluation of given rules ------------------------------------------------------------------


def _expected_cells(hist: LabelledHistogram, rule: Rule) -> FloatArray:
    cells = hist.cells()
    out = np.zeros(4)
    for t, w in zip(rule.thresholds, rule.weights, strict=True):
        out += w * cells[hist.index(t)]
    if rule.constant > 0.0:
        p, n = cells[0, 0], cells[0, 1]
        r = rule.constant_rate
        out += rule.constant * np.array([r * p, r * n, (1 - r) * n, (1 - r) * p])
    return out


def _flows(hist: LabelledHistogram, rule: Rule, current: float) -> FloatArray:
    """Expected pairs whose decision flips against ``current``: ``(positives newly selected,
    negatives newly selected, positives newly rejected, negatives newly rejected)``."""
    cells = hist.cells()
    c = cells[hist.index(current)]
    out = np.zeros(4)
    for t, w in zip(rule.thresholds, rule.weights, strict=True):
        k = cells[hist.index(t)]
        if k[0] >= c[0] and k[1] >= c[1]:  # lower threshold: more selected
            out += w * np.array([k[0] - c[0], k[1] - c[1], 0.0, 0.0])
        else:
            out += w * np.array([0.0, 0.0, c[0] - k[0], c[1] - k[1]])
    if rule.constant > 0.0:  # the coin rejects the selected with 1 - r, selects the rejected with r
        r = rule.constant_rate
        tp, fp, tn, fn = c
        out += rule.constant * np.array([r * fn, r * tn, (1 - r) * tp, (1 - r) * fp])
    return out


def _accuracy_change(flows: FloatArray, n: float, level: float) -> Estimate:
    """Right minus wrong flips over ``n``: newly selected positives and newly rejected negatives are
    right, the other two wrong."""
    return _change(flows[0] + flows[3], flows[1] + flows[2], n, level)


def _selection_change(flows: FloatArray, n: float, level: float) -> Estimate:
    return _change(flows[0] + flows[1], flows[2] + flows[3], n, level)


def _change(a: float, b: float, n: float, level: float) -> Estimate:
    if n <= 0:
        return Estimate(0.0, 0.0, 0.0)
    delta = float((a - b) / n)
    var = max(float((a + b) / n) - delta * delta, 0.0) / n
    half = float(special.ndtri(0.5 + level / 2.0)) * var**0.5
    return Estimate(delta, max(delta - half, -1.0), min(delta + half, 1.0))


def _counts(cells: FloatArray) -> Counts:
    tp, fp, tn, fn = (int(round(float(x))) for x in cells)
    return Counts(tp=tp, fp=fp, tn=tn, fn=fn)


def _disparities(counts: Mapping[str, Counts], settings: FairnessSettings) -> dict[str, Estimate]:
    report = evaluate_feature("", counts, settings)
    return {
        d: report.disparities[(d, "between_groups")]
        for d in REPORTED_DISPARITIES
        if (d, "between_groups") in report.disparities
    }


def _overall(counts: Mapping[str, Counts], settings: FairnessSettings) -> dict[str, Estimate]:
    total = Counts(0, 0, 0, 0)
    for c in counts.values():
        total = total + c
    rates = group_rates(total, settings)
    return {r: rates[r] for r in REPORTED_RATES if r in rates}


def _eligible(
    hists: Mapping[str, LabelledHistogram], criterion: str | None, settings: FairnessSettings
) -> tuple[list[str], dict[str, str]]:
    both = criterion in ("equal_opportunity", "equalized_odds")
    eligible, excluded = [], {}
    for g, h in hists.items():
        if is_reserved(g):
            excluded[g] = "reserved group"
        elif h.n < settings.min_samples:
            excluded[g] = f"{h.n} labelled pairs < min_samples={settings.min_samples}"
        elif both and (h.positives.sum() == 0 or h.negatives.sum() == 0):
            excluded[g] = "needs pairs of both labels for true/false positive rates"
        else:
            eligible.append(g)
    if len(eligible) < 2:
        raise TooFewSamplesError(
            TOO_FEW_GROUPS_ERROR.format(
                min_samples=settings.min_samples,
                labels=" of both labels" if both else "",
                eligible=eligible,
                small=excluded,
            )
        )
    return eligible, excluded


def _currents(hists: Mapping[str, Any], current: float | Mapping[str, float]) -> dict[str, float]:
    if isinstance(current, Mapping):
        for g in current:
            if g not in hists:
                raise WhatIfError(UNKNOWN_GROUP_ERROR.format(value=g, choices=sorted(hists)))
        missing = sorted(set(hists) - set(current))
        if missing:
            raise WhatIfError(NO_CURRENT_ERROR.format(groups=missing))
        return {g: float(current[g]) for g in hists}
    return dict.fromkeys(hists, float(current))


def evaluate(
    feature: str,
    hists: Mapping[str, LabelledHistogram],
    rules: Mapping[str, Rule],
    current: float | Mapping[str, float],
    settings: FairnessSettings,
    *,
    criterion: str | None = None,
    mode: str = "deterministic",
    tolerance: float | None = None,
) -> WhatIf:
    """Project ``rules`` (groups not in it keep their current threshold) against the current ones."""
    _check_criterion(criterion)
    eligible, excluded = _eligible(hists, criterion, settings)
    for g in rules:
        if g in excluded:
            raise TooFewSamplesError(EXCLUDED_GROUP_ERROR.format(group=g, reason=excluded[g]))
    cur = _currents(hists, current)
    level = settings.credible_level
    groups: dict[str, GroupWhatIf] = {}
    new_counts: dict[str, Counts] = {}
    old_counts: dict[str, Counts] = {}
    flows_all, n_all = np.zeros(4), 0.0
    for g in eligible:
        h = hists[g]
        now = _deterministic(h.edges[h.index(cur[g])])
        rule = rules.get(g, now)
        new_counts[g] = _counts(_expected_cells(h, rule))
        old_counts[g] = _counts(_expected_cells(h, now))
        flows = _flows(h, rule, cur[g])
        flows_all, n_all = flows_all + flows, n_all + h.n
        new_rates, old_rates = group_rates(new_counts[g], settings), group_rates(old_counts[g], settings)
        groups[g] = GroupWhatIf(
            group=g,
            n=h.n,
            rule=rule,
            current=now.thresholds[0],
            rates={r: new_rates[r] for r in REPORTED_RATES if r in new_rates},
            current_rates={r: old_rates[r] for r in REPORTED_RATES if r in old_rates},
            accuracy_change=_accuracy_change(flows, h.n, level),
            selection_change=_selection_change(flows, h.n, level),
            current_mismatch=h.mismatch(cur[g]),
        )
    disparities = _disparities(new_counts, settings)
    met = None
    if criterion is not None and tolerance is not None:
        # met on the exact (expected) rates, not on the rounded counts behind the intervals
        met = _spread(hists, rules, cur, eligible, criterion) <= tolerance + 1e-9
    degenerate = all(
        _expected_cells(hists[g], rules.get(g, _deterministic(cur[g])))[[0, 1]].sum() in (0.0, hists[g].n)
        for g in eligible
    )
    return WhatIf(
        feature=feature,
        criterion=criterion,
        mode=mode,
        tolerance=tolerance,
        groups=groups,
        excluded=excluded,
        disparities=disparities,
        current_disparities=_disparities(old_counts, settings),
        overall=_overall(new_counts, settings),
        current_overall=_overall(old_counts, settings),
        accuracy_change=_accuracy_change(flows_all, n_all, level),
        selection_change=_selection_change(flows_all, n_all, level),
        met=met,
        degenerate=bool(degenerate),
        notes=[
            MISMATCH_NOTE.format(group=g, share=r.current_mismatch / r.n, threshold=r.current)
            for g, r in groups.items()
            if r.current_mismatch is not None and r.current_mismatch > MISMATCH_SHARE * r.n
        ],
    )


def _spread(
    hists: Mapping[str, LabelledHistogram],
    rules: Mapping[str, Rule],
    cur: Mapping[str, float],
    eligible: list[str],
    criterion: str,
) -> float:
    cols = [RATES.index(r) for r in DISPARITY_RATES[f"{criterion}_difference"]]
    rates = np.vstack(
        [
            observed_rates(_expected_cells(hists[g], rules.get(g, _deterministic(cur[g]))))[0, cols]
            for g in eligible
        ]
    )
    return float(np.max(rates.max(axis=0) - rates.min(axis=0)))


def what_if(
    feature: str,
    hists: Mapping[str, LabelledHistogram],
    thresholds: Mapping[str, float],
    current: float | Mapping[str, float],
    settings: FairnessSettings,
    *,
    criterion: str | None = None,
    tolerance: float | None = None,
) -> WhatIf:
    """The plain what-if: the groups in ``thresholds`` at those thresholds, the others as now."""
    _check_criterion(criterion)
    for g in thresholds:
        if g not in hists:
            raise WhatIfError(UNKNOWN_GROUP_ERROR.format(value=g, choices=sorted(hists)))
    rules = {g: _deterministic(hists[g].edges[hists[g].index(t)]) for g, t in thresholds.items()}
    if criterion is not None and tolerance is None:
        tolerance = settings.thresholds[f"{criterion}_difference"]
    return evaluate(feature, hists, rules, current, settings, criterion=criterion, tolerance=tolerance)


# -- search ---------------------------------------------------------------------------------------


def _check_criterion(criterion: str | None) -> None:
    if criterion is not None and criterion not in CRITERIA:
        raise WhatIfError(UNKNOWN_CRITERION_ERROR.format(value=criterion, choices=", ".join(CRITERIA)))


def optimize(
    hists: Mapping[str, LabelledHistogram],
    criterion: str,
    current: float | Mapping[str, float],
    settings: FairnessSettings,
    *,
    feature: str = "",
    mode: str = "deterministic",
    tolerance: float | None = None,
    grid_size: int = DEFAULT_GRID_SIZE,
) -> WhatIf:
    """Per-group rules that meet ``criterion`` with the highest overall accuracy, projected.

    ``tolerance`` (deterministic mode) defaults to the configured flag threshold of the criterion's
    ``_difference`` disparity; randomized mode enforces exact parity.
    """
    _check_criterion(criterion)
    if mode not in MODES:
        raise WhatIfError(UNKNOWN_MODE_ERROR.format(value=mode, choices=", ".join(MODES)))
    eligible, _ = _eligible(hists, criterion, settings)
    cur = _currents(hists, current)
    if mode == "randomized":
        rules = _randomized(hists, eligible, criterion, grid_size)
        tolerance = 0.0
    else:
        if tolerance is None:
            tolerance = float(settings.thresholds[f"{criterion}_difference"])
        if not 0.0 <= tolerance <= 1.0:
            raise WhatIfError(TOLERANCE_ERROR.format(value=tolerance))
        rules = _search(hists, eligible, criterion, tolerance, cur)
    result = evaluate(
        feature, hists, rules, cur, settings, criterion=criterion, mode=mode, tolerance=tolerance
    )
    if result.degenerate:
        result.notes.append(
            "only the trivial solution (every group selects all or none) meets the criterion with "
            "single thresholds at this tolerance; try a larger tolerance or mode=randomized"
        )
    return result


def _search(
    hists: Mapping[str, LabelledHistogram],
    eligible: list[str],
    criterion: str,
    tol: float,
    cur: Mapping[str, float],
) -> dict[str, Rule]:
    """Exact search over edge thresholds: max total correct s.t. every rate's spread <= tol."""
    cols = [RATES.index(r) for r in DISPARITY_RATES[f"{criterion}_difference"]]
    tables = [hists[g].cells() for g in eligible]
    rates = [observed_rates(t)[:, cols] for t in tables]  # (B+1, J), non-increasing down each column
    correct = [t[:, 0] + t[:, 2] for t in tables]
    cands = [np.unique(np.concatenate([r[:, j] for r in rates])) for j in range(len(cols))]
    # per rate, group and candidate window [L, L + tol]: the feasible index range [lo, hi]
    lo = [
        np.array([np.searchsorted(-r[:, j], -(c + tol) - _EPS, "left") for r in rates])
        for j, c in enumerate(cands)
    ]
    hi = [
        np.array([np.searchsorted(-r[:, j], -c + _EPS, "right") - 1 for r in rates])
        for j, c in enumerate(cands)
    ]
    # range maxima of correct: best[g, i, k] = max correct[g, i..k]
    size = correct[0].size
    best = np.full((len(eligible), size, size), -np.inf)
    for g, c in enumerate(correct):
        for i in range(size):
            best[g, i, i:] = np.maximum.accumulate(c[i:])
    rows = np.arange(len(eligible))[:, None]

    def window_totals(first: int | None) -> tuple[FloatArray, IntArray, IntArray]:
        """Totals over the candidate windows of the last rate (first rate's window fixed if J=2)."""
        a, b = lo[-1], hi[-1]  # (groups, candidates)
        if first is not None:
            a, b = np.maximum(a, lo[0][:, first : first + 1]), np.minimum(b, hi[0][:, first : first + 1])
        value = np.where(a <= b, best[rows, np.minimum(a, b), b], -np.inf)
        return value.sum(axis=0), a, b

    choice: tuple[float, int | None, int] = (-np.inf, None, 0)
    firsts = range(cands[0].size) if len(cols) == 2 else [None]
    for first in firsts:
        if first is not None and np.any(lo[0][:, first] > hi[0][:, first]):
            continue  # some group has no threshold in this first-rate window
        total, _, _ = window_totals(first)
        i = int(np.argmax(total))
        if total[i] > choice[0] + 1e-9:
            choice = (float(total[i]), first, i)
    _, first, i = choice
    _, los, his = window_totals(first)
    rules = {}
    for g, name in enumerate(eligible):
        h = hists[name]
        a, b = int(los[g][i]), int(his[g][i])
        ks = np.arange(a, b + 1)
        top = ks[correct[g][a : b + 1] >= correct[g][a : b + 1].max() - 1e-9]
        k = int(top[np.argmin(np.abs(top - h.index(cur[name])))])  # ties: the least change
        rules[name] = _deterministic(h.edges[k])
    return rules


def _upper_hull(x: FloatArray, y: FloatArray) -> IntArray:
    """Indices of the upper convex hull, by increasing x (Andrew's monotone chain, as fairlearn)."""
    keep: list[int] = []
    for i in np.lexsort((y, x)):
        while len(keep) >= 2:
            i0, i1 = keep[-2], keep[-1]
            if (y[i1] - y[i0]) * (x[i] - x[i0]) <= (y[i] - y[i0]) * (x[i1] - x[i0]):
                keep.pop()
            else:
                break
        keep.append(int(i))
    return np.array(keep, dtype=np.int64)


def _interpolate(
    x: FloatArray, y: FloatArray, grid: FloatArray
) -> tuple[FloatArray, IntArray, IntArray, FloatArray]:
    """On the hull ``(x, y)``: y at each grid point, its two hull vertices and the weight of the first."""
    idx = np.searchsorted(x, grid, side="right") - 1
    idx[1:] = np.where(grid[1:] == x[idx[1:]], idx[1:] - 1, idx[1:])
    idx = np.clip(idx, 0, x.size - 2)
    p0 = (x[idx + 1] - grid) / (x[idx + 1] - x[idx])
    return p0 * y[idx] + (1 - p0) * y[idx + 1], idx, idx + 1, p0


def _randomized(
    hists: Mapping[str, LabelledHistogram], eligible: list[str], criterion: str, grid_size: int
) -> dict[str, Rule]:
    """fairlearn's ThresholdOptimizer (objective accuracy, no flipping) on the histograms."""
    grid = np.linspace(0.0, 1.0, grid_size + 1)
    curves = {}
    for g in eligible:
        h = hists[g]
        cells = h.cells()
        r = observed_rates(cells)
        if criterion == "equalized_odds":
            x, y = r[:, RATES.index("false_positive_rate")], r[:, RATES.index("true_positive_rate")]
        else:
            x = r[:, RATES.index(DISPARITY_RATES[f"{criterion}_difference"][0])]
            y = r[:, RATES.index("accuracy")]
        hull = _upper_hull(x, y)
        curves[g] = (hull, *_interpolate(x[hull], y[hull], grid))
    if criterion == "equalized_odds":
        n_pos = sum(float(hists[g].positives.sum()) for g in eligible)
        n_neg = sum(float(hists[g].negatives.sum()) for g in eligible)
        y_min = np.min([curves[g][1] for g in eligible], axis=0)
        objective = np.around((n_pos * y_min + n_neg * (1 - grid)) / (n_pos + n_neg), 15)
    else:
        n = sum(hists[g].n for g in eligible)
        objective = np.sum([hists[g].n / n * curves[g][1] for g in eligible], axis=0)
    best = int(np.argmax(objective))
    rules = {}
    for g in eligible:
        hull, y, i0, i1, p0 = curves[g]
        edges = hists[g].edges
        t0, t1 = float(edges[hull[i0[best]]]), float(edges[hull[i1[best]]])
        ignore = 0.0
        if criterion == "equalized_odds" and y[best] != grid[best]:
            ignore = float((y[best] - y_min[best]) / (y[best] - grid[best]))
        w0, w1 = (1 - ignore) * float(p0[best]), (1 - ignore) * float(1 - p0[best])
        parts = [(t, w) for t, w in ((t0, w0), (t1, w1)) if w > 1e-12] or [(t0, 0.0)]
        rules[g] = Rule(
            tuple(t for t, _ in parts),
            tuple(w for _, w in parts),
            ignore,
            float(grid[best]) if ignore else 0.0,
        )
    return rules
