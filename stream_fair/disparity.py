"""Disparities between groups, their Monte Carlo credible intervals and the flag verdict.

Pure numpy: :mod:`stream_fair.fairness` computes each group's rate and Beta posterior and calls
:func:`disparity_table`; this module applies the fairlearn functionals to the observed rates and to
posterior draws.

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
from functools import lru_cache
from typing import Any

import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.float64]
DrawArray = NDArray[np.float32]  # posterior draws: float32 halves the memory traffic
Array = NDArray[np.floating[Any]]  # observed rates (float64) or draws (float32)

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

#: Posteriors with both parameters at least this large are sampled through a Cornish-Fisher
#: expansion of shared normal draws; below it numpy's exact Beta sampler is used (see
#: docs/fairness.md: the expansion's quantile error is under 0.012 posterior sd out to 3.8 sd).
CORNISH_FISHER_MIN_PARAM = 20.0


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


def _cornish_fisher(alpha: FloatArray, beta: FloatArray, z: DrawArray) -> DrawArray:
    """Beta quantiles at standard-normal scores ``z`` by a 4-moment Cornish-Fisher expansion.

    ``x = m + s (z + g1/6 (z^2-1) + g2/24 (z^3-3z) - g1^2/36 (2z^3-5z))`` with the Beta's mean,
    sd, skewness and excess kurtosis; accurate for large parameters only (see the module note).
    Evaluated as a cubic in ``z`` (Horner, in place, float32: memory traffic dominates).
    """
    a, b = alpha[:, None], beta[:, None]
    t = a + b
    mean = a / t
    sd = np.sqrt(a * b / (t * t * (t + 1.0)))
    g1 = 2.0 * (b - a) * np.sqrt(t + 1.0) / ((t + 2.0) * np.sqrt(a * b))
    g2 = 6.0 * ((a - b) ** 2 * (t + 1.0) - a * b * (t + 2.0)) / (a * b * (t + 2.0) * (t + 3.0))
    coef = [
        c.astype(np.float32)
        for c in (
            sd * (g2 / 24.0 - g1 * g1 / 18.0),
            sd * g1 / 6.0,
            sd * (1.0 - g2 / 8.0 + 5.0 * g1 * g1 / 36.0),
            mean - sd * g1 / 6.0,
        )
    ]
    out = coef[0] * z
    for c in coef[1:-1]:
        out += c
        out *= z
    out += coef[-1]
    return np.clip(out, 0.0, 1.0, out=out)


@lru_cache(maxsize=16)
def _normal_scores(seed: int, stream: int, groups: int, draws: int) -> DrawArray:
    """Standard normal draws, cached: scrapes re-evaluate the same feature shapes constantly."""
    rng = np.random.default_rng([seed, stream, groups])
    z = rng.standard_normal((groups, draws), dtype=np.float32)
    z.setflags(write=False)
    return z


def sample_posteriors(
    alpha: FloatArray, beta: FloatArray, z: DrawArray, rng: np.random.Generator
) -> DrawArray:
    """Posterior draws, shape ``(groups, draws)``: Cornish-Fisher on ``z`` or exact Beta draws."""
    large = np.minimum(alpha, beta) >= CORNISH_FISHER_MIN_PARAM
    if large.all():
        return _cornish_fisher(alpha, beta, z)
    out = np.empty(z.shape, dtype=np.float32)
    if large.any():
        out[large] = _cornish_fisher(alpha[large], beta[large], z[large])
    small = ~large
    shape = (int(small.sum()), z.shape[1])
    out[small] = rng.beta(alpha[small, None], beta[small, None], size=shape)
    return out


def disparity_table(
    rates: Mapping[str, RatePosteriors],
    reference: int | None,
    credible_level: float,
    draws: int,
    seed: int,
) -> dict[tuple[str, str], tuple[float, float, float]]:
    """``(disparity, method) -> (value, lower, upper)`` for every disparity that is defined.

    ``rates`` holds every rate in :data:`DISPARITY_INPUT_RATES`. A rate is usable with at least two
    usable groups (for ``to_reference``: the reference among them); equalized odds needs both of
    its rates. Draws of different rates of one group share their normal scores except the false
    positive rate: every disparity reads one rate, or TPR and FPR together, whose posteriors are
    independent, so only those two need independent draws.
    """
    rng = np.random.default_rng([seed, 2])
    n_groups = len(next(iter(rates.values())).observed)
    quantiles = ((1.0 - credible_level) / 2.0, (1.0 + credible_level) / 2.0)
    # method -> rate -> (difference, ratio), each as (observed value, draws)
    parts: dict[str, dict[str, tuple[tuple[float, Array], tuple[float, Array]]]] = {m: {} for m in METHODS}
    for name in DISPARITY_INPUT_RATES:
        post = rates[name]
        idx = np.flatnonzero(post.usable)
        if idx.size < 2:
            continue
        z = _normal_scores(seed, int(name == "false_positive_rate"), n_groups, draws)
        if idx.size < n_groups:
            z = z[idx]
        x = sample_posteriors(post.alpha[idx], post.beta[idx], z, rng)
        obs = post.observed[idx][:, None]
        parts["between_groups"][name] = (
            (float(between_groups_difference(obs)[0]), between_groups_difference(x)),
            (float(between_groups_ratio(obs)[0]), between_groups_ratio(x)),
        )
        if reference is not None and post.usable[reference]:
            r = int(np.flatnonzero(idx == reference)[0])
            ref_obs, ref_x = obs[r], x[r]
            diff_obs = float(to_reference_difference(obs, ref_obs)[0])
            ratio_obs = float(to_reference_ratio(obs, ref_obs)[0])
            parts["to_reference"][name] = (
                (diff_obs, to_reference_difference(x, ref_x)),
                (ratio_obs, to_reference_ratio(x, ref_x)),
            )
    keys: list[tuple[str, str]] = []
    values: list[float] = []
    samples: list[Array] = []
    for method, per_rate in parts.items():
        for disparity, needed in DISPARITY_RATES.items():
            if not all(r in per_rate for r in needed):
                continue
            which = 1 if is_ratio(disparity) else 0
            combine = np.minimum if which else np.maximum
            value, draw = per_rate[needed[0]][which]
            for other in needed[1:]:
                value = float(combine(value, per_rate[other][which][0]))
                draw = combine(draw, per_rate[other][which][1])
            keys.append((disparity, method))
            values.append(value)
            samples.append(draw)
    if not keys:
        return {}
    bounds = np.quantile(np.stack(samples), quantiles, axis=1)
    return {key: (values[i], float(bounds[0, i]), float(bounds[1, i])) for i, key in enumerate(keys)}
