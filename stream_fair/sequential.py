"""Time-uniform disparity verdicts: confidence sequences that stay valid at every scrape.

A fixed-level interval checked at every scrape is wrong by repetition: a 95% interval looked at a
thousand times will, on a perfectly fair stream, sooner or later exclude the truth. This module
replaces it with *confidence sequences* (CS): intervals :math:`C_t` with

.. math:: P(\\exists t \\ge 1: p \\notin C_t) \\le \\alpha,

so they may be checked after every event and still fail at most with probability alpha, however
often they are looked at (Ville's inequality; Howard, Ramdas, McAuliffe & Sekhon, "Time-uniform,
nonparametric, nonasymptotic confidence sequences", Ann. Statist. 49(2), 2021; Robbins 1970).

**The boundary.** For a rate :math:`p` estimated from :math:`s` successes in :math:`n` Bernoulli
trials (TP out of TP+FN for the true positive rate, ...), the Beta(a, b)-mixture likelihood ratio

.. math:: M_n(p) = \\frac{B(a + s,\\, b + n - s) / B(a, b)}{p^{s} (1-p)^{n-s}}

is a non-negative martingale with :math:`M_0 = 1` when the trials are i.i.d. Bernoulli(p) (the
conjugate "beta-binomial mixture" of Howard et al. 2021, Sec. 3, after Robbins 1970), so by Ville's
inequality :math:`C_n = \\{p : \\log M_n(p) < \\log(1/\\alpha)\\}` is a confidence sequence. It is
an interval (the log-likelihood is concave in p), is variance-adaptive (narrow near 0 and 1) and
is found here by vectorised bisection: :func:`rate_bounds`.

**Many cells.** A feature with G groups and R rates has G·R sequences; each gets
``alpha / (G·R)`` (Bonferroni), so with probability at least 1 - alpha *all* of them cover at once,
and then every difference between groups is covered too:
:math:`\\max_g p_g - \\min_g p_g \\ge \\max_g L_g - \\min_g U_g`. The verdict flags a difference
when that lower bound exceeds the threshold.

**Change.** A sequence started at the beginning of time dilutes a recent change into years of
history, so the verdict runs *epochs*: a new sequence starts every ``epoch_events`` labelled events
of the feature and lives ``epochs_alive`` epochs (:class:`SequentialDisparity`). Each epoch has
level ``alpha_epoch = alpha / (horizon_epochs + epochs_alive - 1)``, which gives the guarantee

    **P(any false flag, in any group-rate of the feature, during any run of ``horizon_epochs``
    consecutive epochs) <= alpha** (union bound; a run of H epochs meets at most
    H + epochs_alive - 1 epochs' sequences), and so at most ``alpha_epoch`` expected false-flag
    epochs per epoch, forever (an average run length of at least ``1 / alpha_epoch`` epochs).

A false flag is a flag while the true difference (of the epoch's rates) is at most the threshold.
Across features and models, divide ``alpha`` by their number (:meth:`SequentialSettings.for_cells`).
The guarantee assumes that within one epoch each group's outcomes are exchangeable (i.i.d. given
the group); it covers neither label bias (selective labels: see ``feedback.coverage``) nor a
change inside an epoch that crosses the threshold (then the sequence covers a mixture).

>>> settings = SequentialSettings(threshold=0.05)
>>> fair = {"A": Counts(800, 100, 900, 200), "B": Counts(790, 105, 895, 210)}
>>> disparity_verdict(fair, settings).flagged["equal_opportunity_difference"]
False
>>> unfair = {"A": Counts(800, 100, 900, 200), "B": Counts(500, 100, 900, 500)}
>>> v = disparity_verdict(unfair, settings)
>>> eo = "equal_opportunity_difference"
>>> v.flagged[eo], round(v.disparities[eo].value, 2)
(True, 0.3)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.special import betaln, xlogy

from stream_fair.disparity import DISPARITY_RATES
from stream_fair.fairness import RATE_CELLS

__all__ = [
    "RATES",
    "DISPARITIES",
    "Counts",
    "Bounds",
    "SequentialSettings",
    "Verdict",
    "rate_bounds",
    "disparity_verdict",
    "SequentialDisparity",
]


class Counts(NamedTuple):
    """Confusion counts of one group (same field order as ``stream_fair.fairness.Counts``)."""

    tp: int
    fp: int
    tn: int
    fn: int


class Bounds(NamedTuple):
    """A point estimate with its confidence-sequence bounds."""

    value: float
    lower: float
    upper: float


RATES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    r: RATE_CELLS[r] for r in ("selection_rate", "true_positive_rate", "false_positive_rate")
}
"""Rates the verdict bounds, as sums of ``Counts`` fields (fairlearn names; the definitions are
:data:`stream_fair.fairness.RATE_CELLS`)."""

DISPARITIES: dict[str, tuple[str, ...]] = {
    d: DISPARITY_RATES[d]
    for d in ("demographic_parity_difference", "equal_opportunity_difference", "equalized_odds_difference")
}
"""Between-groups differences (fairlearn names) and the rates they are built from; the
equalized-odds difference is the larger of its rates' differences, as in fairlearn."""


@dataclass(frozen=True)
class SequentialSettings:
    """Settings of the time-uniform verdict.

    Parameters
    ----------
    alpha
        False-flag probability over ``horizon_epochs`` consecutive epochs, for one feature.
    threshold
        A difference is flagged when its lower confidence bound exceeds this.
    min_samples
        A group takes part in a rate only with at least this many trials (denominator) in the epoch.
    epoch_events
        Labelled events of the feature between epoch starts.
    epochs_alive
        Epochs kept; the verdict flags when any of them does.
    horizon_epochs
        Epochs over which ``alpha`` is spent (see the module docstring).
    prior
        Beta(a, b) mixing distribution of the boundary.
    rates
        Rates bounded (and sharing ``alpha``); must cover the rates of the reported disparities.
    """

    alpha: float = 0.05
    threshold: float = 0.05
    min_samples: int = 100
    epoch_events: int = 10_000
    epochs_alive: int = 4
    horizon_epochs: int = 10_000
    prior: tuple[float, float] = (1.0, 1.0)
    rates: tuple[str, ...] = ("selection_rate", "true_positive_rate", "false_positive_rate")

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha < 1.0:
            raise ValueError("alpha must lie in (0, 1), e.g. SequentialSettings(alpha=0.05)")
        unknown = [r for r in self.rates if r not in RATES]
        if unknown:
            raise ValueError(f"unknown rate {unknown[0]!r}; choose from {sorted(RATES)}")

    @property
    def alpha_epoch(self) -> float:
        """Level of one epoch's sequences (all groups and rates of the feature together)."""
        return self.alpha / (self.horizon_epochs + self.epochs_alive - 1)

    def for_cells(self, n_cells: int) -> SequentialSettings:
        """Settings for one of ``n_cells`` (model, feature) pairs sharing ``alpha`` (Bonferroni).

        >>> SequentialSettings(alpha=0.06).for_cells(3).alpha
        0.02
        """
        return replace(self, alpha=self.alpha / max(1, n_cells))


def rate_bounds(
    successes: ArrayLike,
    trials: ArrayLike,
    alpha: float,
    prior: tuple[float, float] = (1.0, 1.0),
    iterations: int = 40,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Beta-mixture confidence sequence for Bernoulli rates, elementwise.

    Returns the lower and upper ends of :math:`\\{p: \\log M_n(p) < \\log(1/\\alpha)\\}` (module
    docstring); ``trials == 0`` gives ``(0, 1)``. Bisection to ``2**-iterations``, rounded outward.

    >>> lo, hi = rate_bounds([70, 700], [100, 1000], alpha=0.05)
    >>> [round(float(x), 3) for x in (lo[0], hi[0], lo[1], hi[1])]
    [0.543, 0.831, 0.647, 0.75]
    """
    s = np.asarray(successes, dtype=np.float64)
    n = np.asarray(trials, dtype=np.float64)
    s, n = np.broadcast_arrays(s, n)
    a, b = prior
    log_mix = betaln(a + s, b + n - s) - betaln(a, b)
    bar = np.log(1.0 / alpha)
    p_hat = np.where(n > 0, s / np.maximum(n, 1.0), 0.5)
    # both ends bisected at once (the lower ends in the first half of each array, the upper ends
    # in the second): one pass of array operations per step instead of two, the same arithmetic
    # per element, so the same bounds
    s2, f2, mix2 = (np.concatenate([x.ravel(), x.ravel()]) for x in (s, n - s, log_mix))
    inside = np.concatenate([p_hat.ravel(), p_hat.ravel()])
    outer = np.concatenate([np.zeros(p_hat.size), np.ones(p_hat.size)])
    for _ in range(iterations):
        mid = 0.5 * (inside + outer)
        out = mix2 - (xlogy(s2, mid) + xlogy(f2, 1.0 - mid)) >= bar
        outer = np.where(out, mid, outer)
        inside = np.where(out, inside, mid)
    lo_out, hi_out = outer[: p_hat.size].reshape(p_hat.shape), outer[p_hat.size :].reshape(p_hat.shape)
    empty = n <= 0
    return np.where(empty, 0.0, lo_out), np.where(empty, 1.0, hi_out)


@dataclass(frozen=True)
class Verdict:
    """Bounds and flags of one feature at one time (one epoch, or the best live epoch).

    ``rates[(rate, group)]`` and ``disparities[name]`` carry value and bounds; ``flagged[name]`` is
    True when the disparity's lower bound exceeds the threshold. ``eligible[rate]`` lists the groups
    with at least ``min_samples`` trials.
    """

    rates: dict[tuple[str, str], Bounds]
    disparities: dict[str, Bounds]
    flagged: dict[str, bool]
    eligible: dict[str, tuple[str, ...]]
    alpha: float
    epoch: int = 0


def _rate_arrays(
    counts: Mapping[str, Sequence[int]], rate: str
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    num, den = RATES[rate]
    arr = np.array([list(c) for c in counts.values()], dtype=np.float64).reshape(-1, 4)
    return arr[:, list(num)].sum(axis=1), arr[:, list(den)].sum(axis=1)


def disparity_verdict(
    counts_by_group: Mapping[str, Sequence[int]],
    settings: SequentialSettings,
    alpha: float | None = None,
    epoch: int = 0,
) -> Verdict:
    """Time-uniform bounds and flags for one feature from per-group ``(tp, fp, tn, fn)``.

    Every (group, rate) sequence gets ``alpha / (G·R)`` with G the number of groups given and R the
    number of rates in ``settings.rates``; ``alpha`` defaults to ``settings.alpha_epoch``. For each
    disparity in :data:`DISPARITIES` over the eligible groups,

    .. math:: D = \\max_g \\hat p_g - \\min_g \\hat p_g,\\quad
              D_{lower} = \\max(0, \\max_g L_g - \\min_g U_g),\\quad
              D_{upper} = \\max_g U_g - \\min_g L_g,

    (for equalized odds, the larger over its rates) and ``flagged = D_lower > threshold``.
    Counts must be those of the epoch only, i.e. accrued since the sequence started.

    >>> v = disparity_verdict({"A": (50, 5, 40, 5)}, SequentialSettings())
    >>> v.flagged["demographic_parity_difference"], v.eligible["selection_rate"]
    (False, ('A',))
    """
    level = settings.alpha_epoch if alpha is None else alpha
    groups = tuple(counts_by_group)
    cs_alpha = level / max(1, len(groups) * len(settings.rates))
    rates: dict[tuple[str, str], Bounds] = {}
    eligible: dict[str, tuple[str, ...]] = {}
    per_rate: dict[str, tuple[NDArray[np.float64], ...]] = {}
    arrays = [_rate_arrays(counts_by_group, rate) for rate in settings.rates]
    # every rate's bounds in one call (one alpha): one bisection over all of them
    nums = np.concatenate([num for num, _ in arrays]) if arrays else np.zeros(0)
    dens = np.concatenate([den for _, den in arrays]) if arrays else np.zeros(0)
    lo_all, hi_all = rate_bounds(nums, dens, cs_alpha, settings.prior)
    for r, (rate, (num, den)) in enumerate(zip(settings.rates, arrays, strict=True)):
        part = slice(r * len(groups), (r + 1) * len(groups))
        lo, hi = lo_all[part], hi_all[part]
        value = num / np.maximum(den, 1.0)
        ok = den >= settings.min_samples
        for i, g in enumerate(groups):
            if den[i] > 0:
                rates[(rate, g)] = Bounds(float(value[i]), float(lo[i]), float(hi[i]))
        eligible[rate] = tuple(g for g, e in zip(groups, ok, strict=False) if e)
        per_rate[rate] = (value[ok], lo[ok], hi[ok])
    disparities: dict[str, Bounds] = {}
    flagged: dict[str, bool] = {}
    for name, parts in DISPARITIES.items():
        best: Bounds | None = None
        for rate in parts:
            if rate not in per_rate or per_rate[rate][0].size < 2:
                best = None
                break
            value, lo, hi = per_rate[rate]
            b = Bounds(
                float(value.max() - value.min()),
                float(max(0.0, lo.max() - hi.min())),
                float(hi.max() - lo.min()),
            )
            best = b if best is None else Bounds(*(max(x, y) for x, y in zip(best, b, strict=False)))
        if best is not None:
            disparities[name] = best
            flagged[name] = best.lower > settings.threshold
        else:
            flagged[name] = False
    return Verdict(rates, disparities, flagged, eligible, level, epoch)


def _sub(a: Sequence[int], b: Sequence[int]) -> Counts:
    return Counts(*(int(x) - int(y) for x, y in zip(a, b, strict=False)))


@dataclass
class SequentialDisparity:
    """Epoch bookkeeping for one (model, feature): the stateful side of :func:`disparity_verdict`.

    Feed it the feature's *cumulative* per-group counts whenever convenient (at every scrape, or
    every k events); it starts a new epoch (baseline = the counts passed) at the first update at
    least ``epoch_events`` labelled events after the previous start, keeps ``epochs_alive``
    baselines, and returns the verdict of the live epoch
    with the largest evidence (flagged if any epoch flags). Epoch starts depend only on how many
    pairs arrived, never on their labels, so each epoch's sequences keep their guarantee.

    >>> s = SequentialSettings(epoch_events=1000, epochs_alive=2, min_samples=50)
    >>> tracker = SequentialDisparity(s)
    >>> v = tracker.update({"A": Counts(400, 50, 450, 100), "B": Counts(100, 50, 450, 400)})
    >>> v.flagged["equal_opportunity_difference"], tracker.epoch_starts
    (True, [0, 2000])
    """

    settings: SequentialSettings
    baselines: list[dict[str, Counts]] = field(default_factory=list)
    epoch_starts: list[int] = field(default_factory=list)
    last: Verdict | None = None

    def update(self, cumulative: Mapping[str, Sequence[int]]) -> Verdict:
        total = int(sum(sum(c) for c in cumulative.values()))
        step = self.settings.epoch_events
        if not self.epoch_starts:
            self.epoch_starts.append(0)
            self.baselines.append({})
        if total >= self.epoch_starts[-1] + step:
            self.epoch_starts.append(total)
            self.baselines.append({g: Counts(*map(int, c)) for g, c in cumulative.items()})
        del self.epoch_starts[: -self.settings.epochs_alive]
        del self.baselines[: -self.settings.epochs_alive]
        best: Verdict | None = None
        for start, base in zip(self.epoch_starts, self.baselines, strict=False):
            counts = {g: _sub(c, base.get(g, (0, 0, 0, 0))) for g, c in cumulative.items()}
            v = disparity_verdict(counts, self.settings, epoch=start)
            if best is None or _evidence(v) > _evidence(best):
                best = v
        assert best is not None
        self.last = best
        return best

    def to_state(self) -> dict:
        return {
            "epoch_starts": list(self.epoch_starts),
            "baselines": [{g: list(c) for g, c in b.items()} for b in self.baselines],
        }

    @classmethod
    def from_state(cls, state: dict, settings: SequentialSettings) -> SequentialDisparity:
        return cls(
            settings,
            [{g: Counts(*c) for g, c in b.items()} for b in state["baselines"]],
            [int(x) for x in state["epoch_starts"]],
        )


def _evidence(v: Verdict) -> tuple[int, float]:
    """Order verdicts: more flags first, then the largest lower bound beyond the threshold."""
    lows = [d.lower for d in v.disparities.values()]
    return sum(v.flagged.values()), max(lows, default=-1.0)
