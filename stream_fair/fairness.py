"""Per-group rates with Beta-posterior credible intervals, and fairness disparities per feature.

Pure math on confusion counts (no Kafka, no Prometheus). Names and definitions follow
``docs/metrics.md`` and fairlearn; the derivations are in ``docs/fairness.md``.

With counts :math:`TP, FP, TN, FN` and :math:`n = TP+FP+TN+FN`, each rate is
:math:`k / m` for a numerator :math:`k` and denominator :math:`m` (see :data:`RATES`). Its estimate
is the observed :math:`k/m` (fairlearn's number on the same pairs) with the equal-tailed credible
interval of the posterior :math:`\\mathrm{Beta}(a_0 + k, b_0 + m - k)`.

>>> report = evaluate_feature(
...     "sex",
...     {"F": Counts(tp=40, fp=10, tn=130, fn=20), "M": Counts(tp=90, fp=30, tn=70, fn=10)},
...     FairnessSettings(),
...     reference="M",
... )
>>> report.groups["F"].rates["selection_rate"].value
0.25
>>> round(report.disparities[("demographic_parity_difference", "between_groups")].value, 6)
0.35
>>> report.flagged[("demographic_parity_difference", "between_groups")]
True
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from scipy import special

from stream_fair.counts import CONFUSION
from stream_fair.disparity import (
    DISPARITIES,
    DISPARITY_INPUT_RATES,
    METHODS,
    RatePosteriors,
    disparity_table,
    is_flagged,
    is_ratio,
)

__all__ = [
    "DISPARITIES",
    "METHODS",
    "RATES",
    "RATE_CELLS",
    "RESERVED_GROUPS",
    "Counts",
    "Estimate",
    "FairnessSettings",
    "FeatureReport",
    "GroupReport",
    "evaluate_feature",
    "group_rates",
    "is_flagged",
    "is_reserved",
    "observed_rates",
    "rate_parts",
]

RATES: tuple[str, ...] = (
    "selection_rate",
    "base_rate",
    "true_positive_rate",
    "false_positive_rate",
    "false_negative_rate",
    "true_negative_rate",
    "positive_predictive_value",
    "negative_predictive_value",
    "accuracy",
)
RESERVED_GROUPS = frozenset({"__other__", "__missing__"})
INTERSECTION_SEPARATOR = "&"

PRIORS: Mapping[str, tuple[float, float]] = MappingProxyType({"jeffreys": (0.5, 0.5), "uniform": (1.0, 1.0)})
POOLINGS = ("none", "empirical_bayes")
DEFAULT_THRESHOLDS: Mapping[str, float] = MappingProxyType(
    {d: (0.8 if is_ratio(d) else 0.1) for d in DISPARITIES}
)
#: Fewest groups (with a non-zero denominator) to fit an empirical-Bayes prior to.
MIN_POOLING_GROUPS = 3

NEGATIVE_COUNTS_ERROR = "Counts must be non-negative integers, got {counts!r}"
CREDIBLE_LEVEL_ERROR = "credible_level must lie strictly between 0 and 1, e.g. 0.95; got {value!r}"
MIN_SAMPLES_ERROR = "min_samples must be at least 1 (groups need data to compare); got {value!r}"
PRIOR_ERROR = "prior must be one of {choices}; got {value!r}"
POOLING_ERROR = "pooling must be one of {choices}; got {value!r}"
THRESHOLD_NAME_ERROR = "unknown disparity {name!r} in thresholds; use one of {choices}"
THRESHOLD_RANGE_ERROR = (
    "threshold {name} = {value!r} is out of range: thresholds lie in [0, 1] (a ratio's 0.8 is the "
    "four-fifths rule, a difference's e.g. 0.1; a ratio's 0 or a difference's 1 never flags)"
)
PRIOR_PARAMS_ERROR = "a Beta prior needs two positive parameters, e.g. (0.5, 0.5); got {value!r}"

# Column order of the count matrix (the one cell order, stream_fair.counts.CONFUSION), and each
# rate's numerator / denominator cells.
_TP, _FP, _TN, _FN = (CONFUSION.index(c) for c in ("tp", "fp", "tn", "fn"))
_RATE_CELLS: Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "selection_rate": ((_TP, _FP), (_TP, _FP, _TN, _FN)),
    "base_rate": ((_TP, _FN), (_TP, _FP, _TN, _FN)),
    "true_positive_rate": ((_TP,), (_TP, _FN)),
    "false_positive_rate": ((_FP,), (_FP, _TN)),
    "false_negative_rate": ((_FN,), (_TP, _FN)),
    "true_negative_rate": ((_TN,), (_FP, _TN)),
    "positive_predictive_value": ((_TP,), (_TP, _FP)),
    "negative_predictive_value": ((_TN,), (_TN, _FN)),
    "accuracy": ((_TP, _TN), (_TP, _FP, _TN, _FN)),
}
RATE_CELLS = _RATE_CELLS
"""rate -> (confusion columns summed in the numerator, ... in the denominator), ``tp fp tn fn`` order.

The one definition of every rate: the report, the verdict, the feedback monitor, the status page
and the explanations all take their numerators and denominators from here (:func:`rate_parts`)."""


def rate_parts(rate: str, counts: Any) -> tuple[Any, Any]:
    """``(numerator, denominator)`` of ``rate`` from confusion counts in :data:`CONFUSION` order.

    ``counts`` is a sequence of four counts, or an array whose last axis holds them (then the
    parts are arrays over the leading axes).

    >>> rate_parts("true_positive_rate", (8, 1, 9, 2)), rate_parts("selection_rate", (8, 1, 9, 2))
    ((8, 10), (9, 20))
    >>> rate_parts("false_positive_rate", np.array([[8, 1, 9, 2], [0, 0, 0, 0]]))
    (array([1, 0]), array([10,  0]))
    """
    num, den = _RATE_CELLS[rate]
    if isinstance(counts, np.ndarray):
        return counts[..., list(num)].sum(axis=-1), counts[..., list(den)].sum(axis=-1)
    return sum(counts[i] for i in num), sum(counts[i] for i in den)


_NUM = np.array([[i in _RATE_CELLS[r][0] for r in RATES] for i in range(4)], dtype=np.int64)
_DEN = np.array([[i in _RATE_CELLS[r][1] for r in RATES] for i in range(4)], dtype=np.int64)

IntArray = NDArray[np.int64]
FloatArray = NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class Counts:
    """Confusion counts of one group's joined (prediction, outcome) pairs.

    >>> Counts(tp=3, fp=1, tn=5, fn=1) + Counts(tp=1, fp=0, tn=0, fn=0)
    Counts(tp=4, fp=1, tn=5, fn=1)
    >>> Counts.from_labels([1, 0, 1], [1, 1, 0]).n
    3
    """

    tp: int
    fp: int
    tn: int
    fn: int

    def __post_init__(self) -> None:
        if min(self.tp, self.fp, self.tn, self.fn) < 0:
            raise ValueError(NEGATIVE_COUNTS_ERROR.format(counts=self))

    @property
    def n(self) -> int:
        """Number of pairs, :math:`TP+FP+TN+FN`."""
        return self.tp + self.fp + self.tn + self.fn

    def __add__(self, other: Counts) -> Counts:
        return Counts(self.tp + other.tp, self.fp + other.fp, self.tn + other.tn, self.fn + other.fn)

    @classmethod
    def from_confusion(cls, cm: Any, positive: Any = 1, negative: Any = 0) -> Counts:
        """From a binary confusion matrix indexed ``cm[actual][predicted]``.

        Works with a river ``ConfusionMatrix``, a nested mapping or a 2x2 array.

        >>> from river.metrics import ConfusionMatrix
        >>> cm = ConfusionMatrix()
        >>> for y, p in [(1, 1), (0, 1), (0, 0)]:
        ...     cm.update(y, p)
        >>> Counts.from_confusion(cm)
        Counts(tp=1, fp=1, tn=1, fn=0)
        """
        return cls(
            tp=int(cm[positive][positive]),
            fp=int(cm[negative][positive]),
            tn=int(cm[negative][negative]),
            fn=int(cm[positive][negative]),
        )

    @classmethod
    def from_labels(cls, y_true: Any, y_pred: Any) -> Counts:
        """From 0/1 outcome and prediction sequences."""
        t = np.asarray(y_true, dtype=bool)
        p = np.asarray(y_pred, dtype=bool)
        return cls(
            tp=int(np.sum(t & p)),
            fp=int(np.sum(~t & p)),
            tn=int(np.sum(~t & ~p)),
            fn=int(np.sum(t & ~p)),
        )


@dataclass(frozen=True, slots=True)
class Estimate:
    """A point value with a credible interval ``[lower, upper]``."""

    value: float
    lower: float
    upper: float


def _thresholds_default() -> Mapping[str, float]:
    return DEFAULT_THRESHOLDS


@dataclass(frozen=True)
class FairnessSettings:
    """Settings of the fairness math.

    ``thresholds`` may name only some disparities; the rest keep their defaults (differences 0.1,
    ratios 0.8, the four-fifths rule).

    >>> settings = FairnessSettings(thresholds={"demographic_parity_ratio": 0.9})
    >>> settings.thresholds["accuracy_difference"], settings.thresholds["demographic_parity_ratio"]
    (0.1, 0.9)
    """

    credible_level: float = 0.95
    min_samples: int = 100
    prior: Literal["jeffreys", "uniform"] = "jeffreys"
    pooling: Literal["none", "empirical_bayes"] = "none"
    thresholds: Mapping[str, float] = field(default_factory=_thresholds_default)

    def __post_init__(self) -> None:
        if not 0.0 < self.credible_level < 1.0:
            raise ValueError(CREDIBLE_LEVEL_ERROR.format(value=self.credible_level))
        if self.min_samples < 1:
            raise ValueError(MIN_SAMPLES_ERROR.format(value=self.min_samples))
        if self.prior not in PRIORS:
            raise ValueError(PRIOR_ERROR.format(choices=tuple(PRIORS), value=self.prior))
        if self.pooling not in POOLINGS:
            raise ValueError(POOLING_ERROR.format(choices=POOLINGS, value=self.pooling))
        for name, value in self.thresholds.items():
            if name not in DEFAULT_THRESHOLDS:
                raise ValueError(THRESHOLD_NAME_ERROR.format(name=name, choices=DISPARITIES))
            if not 0.0 <= value <= 1.0:
                raise ValueError(THRESHOLD_RANGE_ERROR.format(name=name, value=value))
        merged = MappingProxyType({**DEFAULT_THRESHOLDS, **self.thresholds})
        object.__setattr__(self, "thresholds", merged)


@dataclass(frozen=True)
class GroupReport:
    """One group: its counts, rates (only those with a non-zero denominator), eligibility."""

    group: str
    counts: Counts
    rates: dict[str, Estimate]
    eligible: bool  # n >= min_samples and not a reserved group


@dataclass(frozen=True)
class FeatureReport:
    """One feature (or intersection): its groups, disparities and verdicts.

    ``disparities[(disparity, method)]`` is absent when fewer than two eligible groups have the
    rate (for ``to_reference``: when the reference is not one of them); ``flagged`` has the same
    keys.
    """

    feature: str
    reference: str | None
    groups: dict[str, GroupReport]
    disparities: dict[tuple[str, str], Estimate]
    flagged: dict[tuple[str, str], bool]


def is_reserved(group: str) -> bool:
    """A reserved group, or an intersection with a reserved part (``A&__missing__``).

    >>> is_reserved("__other__"), is_reserved("Black&__missing__"), is_reserved("Black&Female")
    (True, True, False)
    """
    return group in RESERVED_GROUPS or any(
        part in RESERVED_GROUPS for part in group.split(INTERSECTION_SEPARATOR)
    )


def _count_matrix(counts: list[Counts]) -> IntArray:
    return np.array([(c.tp, c.fp, c.tn, c.fn) for c in counts], dtype=np.int64).reshape(-1, 4)


def observed_rates(cells: NDArray[np.floating[Any]] | IntArray) -> FloatArray:
    """Observed value :math:`k / m` of every rate (columns in :data:`RATES` order) per row.

    ``cells`` has one row per operating point with columns ``(tp, fp, tn, fn)``; expected
    (non-integer) counts are allowed. NaN where the denominator is 0.

    >>> r = observed_rates(np.array([[3, 1, 5, 1]]))
    >>> float(r[0, RATES.index("true_positive_rate")]), float(r[0, RATES.index("accuracy")])
    (0.75, 0.8)
    """
    c = np.asarray(cells, dtype=np.float64).reshape(-1, 4)
    k, m = c @ _NUM, c @ _DEN
    out = np.full(k.shape, np.nan)
    np.divide(k, m, out=out, where=m > 0)
    return out


def _credible_bounds(
    k: IntArray, m: IntArray, a0: FloatArray, b0: FloatArray, level: float
) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
    """Posterior parameters and equal-tailed bounds, all entries with ``m > 0``.

    ``special.betaincinv`` is the kernel of ``scipy.stats.beta.ppf`` without its per-call
    argument checking. At ``k = 0`` the lower bound is 0 and at ``k = m`` the upper bound is 1
    (Brown, Cai & DasGupta 2001), so the interval always contains the observed rate ``k/m``.
    """
    a = a0 + k
    b = b0 + (m - k)
    tail = (1.0 - level) / 2.0
    lower = np.where(k == 0, 0.0, special.betaincinv(a, b, tail))
    upper = np.where(k == m, 1.0, special.betaincinv(a, b, 1.0 - tail))
    return a, b, lower, upper


def _check_prior(prior: tuple[float, float]) -> tuple[float, float]:
    if len(prior) != 2 or not (prior[0] > 0 and prior[1] > 0):
        raise ValueError(PRIOR_PARAMS_ERROR.format(value=prior))
    return float(prior[0]), float(prior[1])


def group_rates(
    counts: Counts, settings: FairnessSettings, prior: tuple[float, float] | None = None
) -> dict[str, Estimate]:
    """Every rate of one group with a non-zero denominator, as an :class:`Estimate`.

    ``value = k / m``; ``[lower, upper]`` are the :math:`(1 \\mp \\ell)/2` quantiles of
    :math:`\\mathrm{Beta}(a_0 + k, b_0 + m - k)` with :math:`\\ell` = ``settings.credible_level``
    and :math:`(a_0, b_0)` = ``prior`` or the ``settings.prior`` (Jeffreys (0.5, 0.5), uniform
    (1, 1)).

    >>> rates = group_rates(Counts(tp=0, fp=0, tn=8, fn=2), FairnessSettings())
    >>> sorted(rates)[:3], "positive_predictive_value" in rates
    (['accuracy', 'base_rate', 'false_negative_rate'], False)
    >>> e = rates["accuracy"]
    >>> e.value, round(e.lower, 3), round(e.upper, 3)
    (0.8, 0.497, 0.956)
    """
    a0, b0 = _check_prior(prior) if prior is not None else PRIORS[settings.prior]
    k = (_count_matrix([counts]) @ _NUM)[0]
    m = (_count_matrix([counts]) @ _DEN)[0]
    ok = m > 0
    _, _, lower, upper = _credible_bounds(
        k[ok], m[ok], np.full(ok.sum(), a0), np.full(ok.sum(), b0), settings.credible_level
    )
    names = [r for r, keep in zip(RATES, ok, strict=True) if keep]
    return {
        name: Estimate(float(k[ok][i] / m[ok][i]), float(lower[i]), float(upper[i]))
        for i, name in enumerate(names)
    }


def empirical_bayes_prior(k: IntArray, m: IntArray, fallback: tuple[float, float]) -> tuple[float, float]:
    """Beta prior fitted to groups' successes ``k`` out of ``m`` by the method of moments.

    With :math:`\\hat\\mu = \\sum k / \\sum m`, :math:`M = \\sum m`, :math:`G` groups and
    :math:`S = \\sum m_g (k_g/m_g - \\hat\\mu)^2`, the beta-binomial intra-class correlation
    :math:`\\rho = 1/(a+b+1)` is estimated from
    :math:`E[S] = \\mu(1-\\mu)\\,[(G-1) + \\rho\\,(M - \\sum m_g^2/M - (G-1))]`, and the prior is
    :math:`\\mathrm{Beta}(\\hat\\mu\\kappa, (1-\\hat\\mu)\\kappa)` with
    :math:`\\kappa = 1/\\hat\\rho - 1`, clipped to :math:`[a_0 + b_0, M]` (never vaguer than
    the base prior, never worth more than all the feature's data). Returns ``fallback`` with
    fewer than :data:`MIN_POOLING_GROUPS` groups, when every group is at 0 or at 1, or when
    the moment equation is degenerate.

    >>> a, b = empirical_bayes_prior(np.array([40, 50, 60, 45]), np.array([100] * 4), (0.5, 0.5))
    >>> round(a, 1), round(b, 1)
    (24.7, 25.9)
    >>> empirical_bayes_prior(np.array([0, 0]), np.array([10, 10]), (0.5, 0.5))
    (0.5, 0.5)
    """
    keep = m > 0
    k, m = k[keep].astype(np.float64), m[keep].astype(np.float64)
    groups = k.size
    if groups < MIN_POOLING_GROUPS:
        return fallback
    total = m.sum()
    mu = k.sum() / total
    if mu <= 0.0 or mu >= 1.0:
        return fallback
    spread = float(np.sum(m * (k / m - mu) ** 2))
    scale = total - float(np.sum(m * m)) / total - (groups - 1)
    if scale <= 0.0:
        return fallback
    rho = (spread / (mu * (1.0 - mu)) - (groups - 1)) / scale
    kappa = 1.0 / rho - 1.0 if rho > 0.0 else float(np.inf)
    kappa = float(np.clip(kappa, sum(fallback), max(total, sum(fallback))))
    return float(mu * kappa), float((1.0 - mu) * kappa)


def _priors(
    k: IntArray, m: IntArray, fit: NDArray[np.bool_], settings: FairnessSettings
) -> tuple[FloatArray, FloatArray]:
    """Prior parameters per rate, shape ``(len(RATES),)``: base prior or pooled fit."""
    base = PRIORS[settings.prior]
    if settings.pooling == "none":
        return np.full(len(RATES), base[0]), np.full(len(RATES), base[1])
    fitted = [empirical_bayes_prior(k[fit, j], m[fit, j], base) for j in range(len(RATES))]
    return np.array([p[0] for p in fitted]), np.array([p[1] for p in fitted])


def evaluate_feature(
    feature: str,
    counts: Mapping[str, Counts],
    settings: FairnessSettings,
    reference: str | None = None,
) -> FeatureReport:
    """Rates of every group of one feature, disparities between the eligible ones, verdicts.

    A group is eligible when :math:`n \\ge` ``min_samples`` and it is not reserved
    (:func:`is_reserved`); a disparity uses the eligible groups whose rate has a non-zero
    denominator. Values are the fairlearn functionals on observed rates; intervals are the range
    of the same functionals over simultaneous (Bonferroni) per-group credible intervals, jointly
    at level ``credible_level`` (:mod:`stream_fair.disparity`). With
    ``pooling="empirical_bayes"`` each rate's prior is :func:`empirical_bayes_prior` fitted to the
    feature's non-reserved groups.

    >>> r = evaluate_feature("race", {"A": Counts(50, 50, 50, 50), "__other__": Counts(9, 0, 0, 0)},
    ...                      FairnessSettings())
    >>> r.groups["__other__"].eligible, r.disparities
    (False, {})
    """
    names = list(counts)
    c = _count_matrix([counts[g] for g in names])
    k, m = c @ _NUM, c @ _DEN
    reserved = np.array([is_reserved(g) for g in names], dtype=bool)
    eligible = (c.sum(axis=1) >= settings.min_samples) & ~reserved
    a0, b0 = _priors(k, m, ~reserved, settings)

    defined = m > 0
    observed = np.full(k.shape, np.nan)
    np.divide(k, m, out=observed, where=defined)
    alpha = np.full(k.shape, np.nan)
    beta = np.full(k.shape, np.nan)
    lower = np.full(k.shape, np.nan)
    upper = np.full(k.shape, np.nan)
    a0g, b0g = np.broadcast_to(a0, k.shape)[defined], np.broadcast_to(b0, k.shape)[defined]
    alpha[defined], beta[defined], lower[defined], upper[defined] = _credible_bounds(
        k[defined], m[defined], a0g, b0g, settings.credible_level
    )

    groups: dict[str, GroupReport] = {}
    for i, g in enumerate(names):
        rates = {
            r: Estimate(float(observed[i, j]), float(lower[i, j]), float(upper[i, j]))
            for j, r in enumerate(RATES)
            if defined[i, j]
        }
        groups[g] = GroupReport(g, counts[g], rates, bool(eligible[i]))

    posteriors = {
        r: RatePosteriors(observed[:, j], alpha[:, j], beta[:, j], eligible & defined[:, j])
        for j, r in enumerate(RATES)
        if r in DISPARITY_INPUT_RATES
    }
    ref = names.index(reference) if reference is not None and reference in counts else None
    table = disparity_table(posteriors, ref, settings.credible_level)
    disparities = {key: Estimate(*v) for key, v in table.items()}
    flagged = {
        key: is_flagged(key[0], e.lower, e.upper, settings.thresholds[key[0]])
        for key, e in disparities.items()
    }
    return FeatureReport(feature, reference, groups, disparities, flagged)
