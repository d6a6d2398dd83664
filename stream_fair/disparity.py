"""Disparities between groups, their simultaneous credible intervals and the flag verdict.

Pure numpy/scipy: :mod:`stream_fair.fairness` computes each group's rate and Beta posterior and
calls :func:`disparity_table`; this module applies the fairlearn functionals to the observed rates
and bounds them with **simultaneous** per-group intervals.

Why simultaneous: the posterior of ``max_g r_g - min_g r_g`` is biased away from 0 when groups are
small (the largest of several noisy rates sits above its mean, the smallest below), so a credible
interval of that functional excludes "no disparity" on perfectly fair data and flags by chance.
Instead each usable group gets an equal-tailed Beta-posterior interval ``[L_g, U_g]`` at level
``1 - (1 - credible_level) / k`` (Bonferroni over the ``k`` usable groups of the rate): with
posterior probability at least ``credible_level`` every group's rate lies in its interval at once,
and the disparity lies between the values its functional takes over those boxes, e.g. the
``between_groups`` difference in ``[max(0, max L - min U), max U - min L]`` and the ratio in
``[min L / max U, min(1, min U / max L)]``; likewise for ``to_reference``. Equalized odds combines
the TPR and FPR bounds (worst of both), so its level is at least ``1 - 2 (1 - credible_level)``.
Conservative by design: a flag needs a gap that no arrangement of plausible group rates explains.

For one rate with values :math:`r_g` over the usable groups :math:`G` (eligible, non-zero
denominator) and a reference group :math:`\\rho`:

* ``between_groups``: difference :math:`\\max_g r_g - \\min_g r_g`, ratio
  :math:`\\min_g r_g / \\max_g r_g` (fairlearn ``method="between_groups"``);
* ``to_reference``: difference :math:`\\max_g |r_g - r_\\rho|`, ratio
  :math:`\\min_g \\min(r_g / r_\\rho, r_\\rho / r_g)`.

A ratio :math:`0 / 0` (every rate involved is 0) is 1: the groups are equal. fairlearn returns NaN
there; it is the one place where the values differ, and the tests check it.

>>> values = np.array([0.2, 0.5, 0.4])
>>> x = values[:, None]  # one column: a single draw
>>> float(between_groups_difference(x)[0]), float(between_groups_ratio(x)[0])
(0.3, 0.4)
>>> is_flagged("demographic_parity_difference", lower=0.12, upper=0.3, threshold=0.1)
True
>>> is_flagged("demographic_parity_ratio", lower=0.5, upper=0.85, threshold=0.8)
False
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import special

FloatArray = NDArray[np.float64]
Array = NDArray[np.floating[Any]]

DISPARITIES: tuple[str, ...] = (
    "demographic_parity_difference",
    "demographic_parity_ratio",
    "equal_opportunity_difference",
    "equal_opportunity_ratio",
    "equalized_odds_difference",
    "equalized_odds_ratio",
    "predictive_parity_difference",
    "accuracy_difference",
)
METHODS: tuple[str, ...] = ("between_groups", "to_reference")

#: disparity -> the rates it is taken over (equalized odds: the worst of both).
DISPARITY_RATES: Mapping[str, tuple[str, ...]] = {
    "demographic_parity_difference": ("selection_rate",),
    "demographic_parity_ratio": ("selection_rate",),
    "equal_opportunity_difference": ("true_positive_rate",),
    "equal_opportunity_ratio": ("true_positive_rate",),
    "equalized_odds_difference": ("true_positive_rate", "false_positive_rate"),
    "equalized_odds_ratio": ("true_positive_rate", "false_positive_rate"),
    "predictive_parity_difference": ("positive_predictive_value",),
    "accuracy_difference": ("accuracy",),
}
DISPARITY_INPUT_RATES: tuple[str, ...] = tuple(
    dict.fromkeys(r for rates in DISPARITY_RATES.values() for r in rates)
)


def is_ratio(disparity: str) -> bool:
    """True for ``*_ratio`` disparities (1 = parity), False for ``*_difference`` (0 = parity)."""
    return disparity.endswith("_ratio")


def is_flagged(disparity: str, lower: float, upper: float, threshold: float) -> bool:
    """The verdict: the credible interval lies entirely beyond the threshold.

    A difference is flagged when ``lower > threshold``, a ratio when ``upper < threshold``. This is
    the single place the verdict is decided, so a sequential (always-valid) rule can replace it.

    >>> is_flagged("accuracy_difference", lower=0.1, upper=0.2, threshold=0.1)
    False
    """
    return upper < threshold if is_ratio(disparity) else lower > threshold


def _safe_ratio(num: Array, den: Array) -> Array:
    """``num / den`` with ``0 / 0 = 1`` (equal rates); ``den`` is never below ``num`` here."""
    out = np.ones(np.broadcast(num, den).shape)
    np.divide(num, den, out=out, where=den > 0)
    return out


def between_groups_difference(x: Array) -> Array:
    """:math:`\\max_g x_g - \\min_g x_g` along axis 0 (groups)."""
    return np.asarray(x.max(axis=0) - x.min(axis=0), dtype=np.float64)


def between_groups_ratio(x: Array) -> Array:
    """:math:`\\min_g x_g / \\max_g x_g` along axis 0, with 0/0 = 1."""
    return _safe_ratio(x.min(axis=0), x.max(axis=0))


def to_reference_difference(x: Array, ref: Array) -> Array:
    """:math:`\\max_g |x_g - x_\\rho|`: attained at the largest or the smallest group."""
    return np.asarray(np.maximum(x.max(axis=0) - ref, ref - x.min(axis=0)), dtype=np.float64)


def to_reference_ratio(x: Array, ref: Array) -> Array:
    """:math:`\\min_g \\min(x_g/x_\\rho, x_\\rho/x_g)`, also attained at the extremes; 0/0 = 1."""
    lo, hi = x.min(axis=0), x.max(axis=0)
    below = _safe_ratio(np.minimum(lo, ref), np.maximum(lo, ref))
    above = _safe_ratio(np.minimum(hi, ref), np.maximum(hi, ref))
    return np.minimum(below, above)


@dataclass(frozen=True, slots=True)
class RatePosteriors:
    """One rate over a feature's groups: observed values, Beta posterior, usable-group mask."""

    observed: FloatArray  # (groups,), NaN where the denominator is 0
    alpha: FloatArray  # (groups,)
    beta: FloatArray  # (groups,)
    usable: NDArray[np.bool_]  # eligible and non-zero denominator


def _ratio_bounds(lo: FloatArray, hi: FloatArray, rl: float, rh: float) -> tuple[float, float]:
    """Bounds of ``min_g min(x_g, 1/x_g)`` for ``x_g = r_g / r_ref`` over the box."""
    lower, upper = 1.0, 1.0
    for gl, gh in zip(lo, hi, strict=True):
        a = float(_safe_ratio(np.array(gl), np.array(rh))) if rh > 0 else 1.0  # smallest x
        b = gh / rl if rl > 0 else (1.0 if gh == 0 else np.inf)  # largest x
        sym_lo = min(a, 1.0 / b if b > 0 else 0.0)
        if a <= 1.0 <= b:
            sym_hi = 1.0
        else:
            sym_hi = max(min(a, 1.0 / a) if a > 0 else 0.0, min(b, 1.0 / b) if b > 0 else 0.0)
        lower, upper = min(lower, sym_lo), min(upper, sym_hi)
    return lower, upper


def disparity_table(
    rates: Mapping[str, RatePosteriors],
    reference: int | None,
    credible_level: float,
) -> dict[tuple[str, str], tuple[float, float, float]]:
    """``(disparity, method) -> (value, lower, upper)`` for every disparity that is defined.

    ``rates`` holds every rate in :data:`DISPARITY_INPUT_RATES`. A rate is usable with at least two
    usable groups (for ``to_reference``: the reference among them); equalized odds needs both of
    its rates. ``value`` is the fairlearn functional of the observed rates; the bounds come from
    simultaneous per-group intervals (see the module docstring).
    """
    Bounds3 = tuple[float, float, float]
    parts: dict[str, dict[str, tuple[Bounds3, Bounds3]]] = {m: {} for m in METHODS}
    for name in DISPARITY_INPUT_RATES:
        post = rates[name]
        idx = np.flatnonzero(post.usable)
        if idx.size < 2:
            continue
        tail = (1.0 - credible_level) / (2.0 * idx.size)
        obs = post.observed[idx]
        lo = np.minimum(special.betaincinv(post.alpha[idx], post.beta[idx], tail), obs)
        hi = np.maximum(special.betaincinv(post.alpha[idx], post.beta[idx], 1.0 - tail), obs)
        x = obs[:, None]
        diff = (float(between_groups_difference(x)[0]), max(0.0, lo.max() - hi.min()), hi.max() - lo.min())
        ratio = (
            float(between_groups_ratio(x)[0]),
            float(_safe_ratio(np.array(lo.min()), np.array(hi.max()))),
            min(1.0, float(_safe_ratio(np.array(hi.min()), np.array(lo.max())))),
        )
        parts["between_groups"][name] = (diff, ratio)
        if reference is not None and post.usable[reference]:
            r = int(np.flatnonzero(idx == reference)[0])
            rl, rh = float(lo[r]), float(hi[r])
            gap_lo = np.maximum(0.0, np.maximum(lo - rh, rl - hi))
            gap_hi = np.maximum(hi - rl, rh - lo)
            parts["to_reference"][name] = (
                (float(to_reference_difference(x, x[r])[0]), float(gap_lo.max()), float(gap_hi.max())),
                (float(to_reference_ratio(x, x[r])[0]), *_ratio_bounds(lo, hi, rl, rh)),
            )
    table: dict[tuple[str, str], tuple[float, float, float]] = {}
    for method, per_rate in parts.items():
        for disparity, needed in DISPARITY_RATES.items():
            if not all(r in per_rate for r in needed):
                continue
            which = 1 if is_ratio(disparity) else 0
            combine = min if which else max
            v, lower, upper = per_rate[needed[0]][which]
            for other in needed[1:]:
                ov, ol, ou = per_rate[other][which]
                v, lower, upper = combine(v, ov), combine(lower, ol), combine(upper, ou)
            table[disparity, method] = (float(v), float(min(lower, v)), float(max(upper, v)))
    return table
