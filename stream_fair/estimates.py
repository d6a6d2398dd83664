"""Label-free fairness estimates from the scores of predictions still waiting for their labels.

Pure numpy on :class:`~stream_fair.histograms.ScoreHistogram` (no Kafka, no Prometheus). The
estimator is confidence-based performance estimation (CBPE, as NannyML names it) applied per
group: if the scores are calibrated in a group, ``P(label = 1 | score = s) = s``, so a pending
prediction of score ``s`` counts as ``s`` of a positive and ``1 - s`` of a negative. Summed over
the pending predictions of a group, by predicted value ``d``:

    E[TP] = sum_{d=1} s    E[FP] = sum_{d=1} (1 - s)    E[TN] = sum_{d=0} (1 - s)    E[FN] = sum_{d=0} s

(``s`` is the score bin's centre: bins are 0.02 wide, so a count moves by at most 0.01 per
prediction). Every rate of :data:`stream_fair.fairness.RATE_CELLS` is then ``k / m`` of these
expected counts; the ``pending`` view uses only the pending predictions (the traffic of the last
label delay: it sees a change as soon as the scores move), the ``combined`` view adds the realized
confusion counts of the labelled pairs, so it converges to the realized rate as labels mature.

**Intervals.** Each prediction ``i`` contributes a soft confusion vector ``c_i`` (one-hot for a
labelled pair, the expectation above for a pending one); a rate is the ratio estimator
``R = sum num(c_i) / sum den(c_i)`` with linearised sampling variance
``V = sum (num(c_i) - R den(c_i))^2 / (sum den(c_i))^2`` (it reduces to ``R(1-R)/m`` for labelled
pairs alone). ``R`` and ``V`` are matched to a Beta distribution with the effective sample size
``R(1-R)/V`` plus the configured prior, and the disparities and their simultaneous intervals come
from :func:`stream_fair.disparity.disparity_table`, exactly as for the realized rates. The
calibration of the scores is not assumed blindly: :func:`calibration` measures it per group on
the matured labels, and a group whose calibration is off is *untrusted*: its estimates are still
reported, but it takes no part in the estimated disparities (so in the estimated alarm).

What this can see and cannot: a change in the score distribution of a group (covariate shift,
a different mix of applicants, a model update that moves scores) moves the estimates at once; a
change in ``P(label | score)`` (concept shift: the same score now means another default risk) is
invisible until labels mature, when the calibration check on matured labels marks the group
untrusted (``docs/estimates.md``).

>>> from stream_fair.histograms import PartitionHistograms, ScoreHistogram
>>> from stream_fair.counts import PRED0, PRED1
>>> h = PartitionHistograms()
>>> for s in (0.81, 0.81, 0.31):
...     h.add(0, PRED1 if s >= 0.5 else PRED0, s)
>>> c = expected_counts(ScoreHistogram.from_row(h.rows[0]))
>>> [round(x, 2) for x in c]
[1.62, 0.38, 0.69, 0.31]
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import NamedTuple, Protocol

import numpy as np
from numpy.typing import NDArray
from scipy import special

from stream_fair.disparity import DISPARITY_INPUT_RATES, RatePosteriors, disparity_table, is_flagged
from stream_fair.fairness import PRIORS, RATE_CELLS, Counts, Estimate, FairnessSettings, is_reserved
from stream_fair.histograms import NBINS, ScoreHistogram, edges

__all__ = [
    "CALIBRATION_BINS", "ESTIMATED_RATES", "VIEWS", "Calibration", "CalibrationCache", "EstimateSettings",
    "FeatureEstimates", "GroupEstimates", "Labelled", "calibration", "calibrations", "estimate_feature",
    "expected_counts", "recent_trust",
]  # fmt: skip

VIEWS: tuple[str, ...] = ("pending", "combined")
"""``pending``: predictions still waiting for a label; ``combined``: realized + pending."""

ESTIMATED_RATES: tuple[str, ...] = (
    "selection_rate",
    "true_positive_rate",
    "false_positive_rate",
    "accuracy",
)
"""The rates estimated and exported per group (the inputs of the exported disparities)."""

CALIBRATION_BINS = 10
"""Reliability bins (of width 0.1, each five histogram bins)."""

_CENTRES = (edges()[:-1] + edges()[1:]) / 2.0
_BOOTSTRAP = 500


@dataclass(frozen=True)
class EstimateSettings:
    """``max_calibration_error``: a group whose ECE is above it with confidence (interval lower
    bound above it) is untrusted; ``min_labelled``: fewer matured labels leave calibration unchecked
    (untrusted too); ``min_window_labelled``: a window's calibration of a group is checked (can
    alarm, and decides the group's trust) only with this many labels in the window.

    Why 500 for windows: the plug-in ECE of a calibrated group is noise of order
    ``sqrt(bins / n)``; a window is checked at every scrape for as long as it runs, so its
    per-check false-alarm rate must be far below the interval's nominal 2.5%. Measured on
    calibrated Beta(2, 2) scores (1,500 groups each): 2.8% of checks alarm at 150 labels, 0.75% at
    300, 0.2% at 400, 0.07% at 500 (0 of 1,500 at 500 and at 600)."""

    max_calibration_error: float = 0.05
    min_labelled: int = 100
    min_window_labelled: int = 500


class ReliabilityBin(NamedTuple):
    """One bin of a reliability diagram (a named tuple: a report builds ten per group and window)."""

    low: float
    high: float
    count: int  # type: ignore[assignment]  # matured labelled pairs with a score in [low, high)
    mean_score: float  # NaN when empty
    frequency: float  # observed share of label 1; NaN when empty


@dataclass(frozen=True)
class Calibration:
    """Calibration of one group's scores on its matured labels.

    ``ece`` = sum_b (n_b / n) |frequency_b - mean_score_b| over :data:`CALIBRATION_BINS` bins, with
    a basic-bootstrap interval (which also removes the upward bias of the plug-in ECE from its
    bounds). ``alarm``: the interval lies above ``max_calibration_error``.
    """

    bins: tuple[ReliabilityBin, ...]
    samples: int
    ece: Estimate | None  # None without labelled pairs
    alarm: bool
    trusted: bool
    reason: str  # "" when trusted, else "miscalibrated" or "too_few_labels"


class CalibrationCache:
    """Calibrations by (model, feature, window, group), each kept with the labelled counts it was
    computed from: a report reuses it while they (and the settings) are unchanged, so the
    bootstrap runs only for the groups that received labels since the last report.

    Bounded by the exported groups (the cardinality limits bound them). Not thread-safe: one
    report is built at a time (``Detector.current``)."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, ...], tuple[bytes, Calibration]] = {}
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple[str, ...], inputs: bytes) -> Calibration | None:
        hit = self._entries.get(key)
        if hit is not None and hit[0] == inputs:
            self.hits += 1
            return hit[1]
        self.misses += 1
        return None

    def put(self, key: tuple[str, ...], inputs: bytes, cal: Calibration) -> None:
        self._entries[key] = (inputs, cal)


class Labelled(Protocol):
    """Labelled pairs per score bin: a :class:`~stream_fair.histograms.ScoreHistogram` (all matured
    labels) or a :class:`~stream_fair.label_windows.LabelledHistogram` (the labels of a window)."""

    @property
    def positives(self) -> NDArray[np.int64]: ...

    @property
    def negatives(self) -> NDArray[np.int64]: ...


def calibration(h: Labelled, settings: EstimateSettings, level: float = 0.95) -> Calibration:
    """Reliability bins and ECE of one group's matured labels (see :class:`Calibration`)."""
    return calibrations({"": h}, settings, level)[""]


def calibrations(
    hists: Mapping[str, Labelled],
    settings: EstimateSettings,
    level: float = 0.95,
    *,
    key: tuple[str, ...] | None = None,
    cache: CalibrationCache | None = None,
) -> dict[str, Calibration]:
    """:func:`calibration` of several groups at once.

    A group's result depends on its own counts only (every group's bootstrap uses the same
    standard-normal draws, :data:`_Z`), so with ``key`` (model, feature, window) ``cache`` keeps it
    and serves it while the group's counts are unchanged.
    """
    names = list(hists)
    if not names:
        return {}
    step = NBINS // CALIBRATION_BINS
    pos = np.stack([hists[g].positives for g in names]).reshape(len(names), CALIBRATION_BINS, step)
    neg = np.stack([hists[g].negatives for g in names]).reshape(len(names), CALIBRATION_BINS, step)
    n_fine = pos + neg
    n = n_fine.sum(axis=2)  # (groups, bins)
    k = pos.sum(axis=2)
    centres = _CENTRES.reshape(CALIBRATION_BINS, step)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (n_fine * centres).sum(axis=2) / n
        freq = k / n
    total = n.sum(axis=1)
    w = n / np.maximum(total, 1)[:, None]
    f0, m0 = np.nan_to_num(freq), np.nan_to_num(mean)
    ece = np.sum(w * np.abs(f0 - m0), axis=1)
    tail = (1.0 - level) / 2.0
    e = edges()[::step]
    tag = repr((level, settings)).encode()
    out: dict[str, Calibration] = {}
    todo: list[tuple[int, tuple[str, ...] | None, bytes | None]] = []  # groups without a cached result
    for i, g in enumerate(names):
        if cache is None or key is None:
            todo.append((i, None, None))
            continue
        gkey, inputs = (*key, g), tag + pos[i].tobytes() + neg[i].tobytes()
        hit = cache.get(gkey, inputs)
        if hit is not None:
            out[g] = hit
        else:
            todo.append((i, gkey, inputs))
    drawn = np.array([i for i, _, _ in todo if total[i]], dtype=np.intp)
    bounds: dict[int, tuple[float, float]] = {}
    if len(drawn):
        star = _bootstrap(n[drawn], f0[drawn], w[drawn], m0[drawn])  # (groups, draws)
        lo, hi = np.quantile(star, [tail, 1.0 - tail], axis=1)
        bounds = {int(i): (float(lo[j]), float(hi[j])) for j, i in enumerate(drawn)}
    # plain Python numbers, converted once (a numpy scalar per field costs more than the bins)
    el, nl, ml, fl = e.tolist(), n.tolist(), mean.tolist(), freq.tolist()
    totals, eces = total.tolist(), ece.tolist()
    for i, ckey, inputs in todo:
        g = names[i]
        ni, mi, fi = nl[i], ml[i], fl[i]
        bins = tuple(ReliabilityBin(el[b], el[b + 1], ni[b], mi[b], fi[b]) for b in range(CALIBRATION_BINS))
        t = totals[i]
        if t == 0:
            cal = Calibration(bins, 0, None, False, False, "too_few_labels")
        else:
            v = eces[i]
            lower, upper = max(0.0, 2 * v - bounds[i][1]), max(0.0, 2 * v - bounds[i][0])
            est = Estimate(v, min(lower, v), max(upper, v))
            if t < settings.min_labelled:
                cal = Calibration(bins, t, est, False, False, "too_few_labels")
            else:
                alarm = est.lower > settings.max_calibration_error
                cal = Calibration(bins, t, est, alarm, not alarm, "miscalibrated" if alarm else "")
        if cache is not None and ckey is not None and inputs is not None:
            cache.put(ckey, inputs, cal)
        out[g] = cal
    return {g: out[g] for g in names}


_Z = np.random.default_rng(0x5F_CA1B).standard_normal((_BOOTSTRAP, CALIBRATION_BINS))
"""The bootstrap's draws, shared by every group: a group's interval is a function of its counts."""

_CHUNK = 32  # groups per vectorised step: temporaries of ~1 MB (in the CPU cache: measured fastest)


def _bootstrap(
    n: NDArray[np.int64], f0: NDArray[np.float64], w: NDArray[np.float64], m0: NDArray[np.float64]
) -> NDArray[np.float64]:
    """Bootstrap ECEs, ``(groups, draws)``: every bin's observed frequency redrawn from the normal
    approximation of ``Binomial(n_b, frequency_b) / n_b`` (clipped to [0, 1]), the bins' weights
    and mean scores held.

    Why not exact binomial draws (the earlier form): they cost ~90 ns each, 3.7M per report at 45k
    series (~550 ms of every scrape after a new snapshot, with the consumer's interpreter busy);
    these are a few array operations over shared draws (~15x less). The two agree where the
    interval matters: a bin with few labels weighs ``n_b / n`` in the ECE, and a group with fewer
    than ``min_labelled`` labels is never checked (tests/test_estimates.py: coverage and alarms).
    """
    with np.errstate(invalid="ignore", divide="ignore"):
        sd = np.sqrt(f0 * (1.0 - f0) / np.maximum(n, 1))  # 0 for an empty bin (weight 0 as well)
    out = np.empty((len(n), _BOOTSTRAP))
    for a in range(0, len(n), _CHUNK):
        b = min(a + _CHUNK, len(n))
        buf = sd[a:b, None, :] * _Z  # (chunk, draws, bins)
        buf += f0[a:b, None, :]
        np.clip(buf, 0.0, 1.0, out=buf)
        buf -= m0[a:b, None, :]
        np.abs(buf, out=buf)
        out[a:b] = (buf @ w[a:b, :, None])[..., 0]
    return out


def expected_counts(h: ScoreHistogram) -> tuple[float, float, float, float]:
    """Expected ``(tp, fp, tn, fn)`` of the group's pending predictions, scores taken as P(label 1)."""
    p1, p0 = h.pending(1).astype(np.float64), h.pending(0).astype(np.float64)
    q = _CENTRES
    return (float(p1 @ q), float(p1 @ (1 - q)), float(p0 @ (1 - q)), float(p0 @ q))


def _soft_items(
    h: ScoreHistogram | None, realized: Counts | None
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """(weights, soft confusion vectors (tp, fp, tn, fn)) of a view's predictions."""
    vecs: list[NDArray[np.float64]] = []
    weights: list[NDArray[np.float64]] = []
    if h is not None:
        q = _CENTRES
        z = np.zeros(NBINS)
        weights += [h.pending(1).astype(np.float64), h.pending(0).astype(np.float64)]
        vecs += [np.stack([q, 1 - q, z, z], axis=1), np.stack([z, z, 1 - q, q], axis=1)]
    if realized is not None:
        weights.append(np.array([realized.tp, realized.fp, realized.tn, realized.fn], dtype=np.float64))
        vecs.append(np.eye(4))
    if not weights:
        return np.zeros(0), np.zeros((0, 4))
    return np.concatenate(weights), np.concatenate(vecs)


def _rate(weights: NDArray[np.float64], vecs: NDArray[np.float64], rate: str) -> tuple[float, float, float]:
    """(R, variance of R, denominator) of one rate over soft items; R is NaN with no denominator."""
    num_cells, den_cells = RATE_CELLS[rate]
    num = vecs[:, list(num_cells)].sum(axis=1)
    den = vecs[:, list(den_cells)].sum(axis=1)
    m = float(weights @ den)
    if m <= 0:
        return float("nan"), float("nan"), 0.0
    r = float(weights @ num) / m
    v = float(weights @ (num - r * den) ** 2) / (m * m)
    return r, v, m


@dataclass(frozen=True)
class GroupEstimates:
    """One group's estimates in one view: expected counts, rates with intervals, trust."""

    group: str
    expected: tuple[float, float, float, float]  # (tp, fp, tn, fn) of the view
    rates: dict[str, Estimate]
    denominators: dict[str, float]
    trusted: bool
    eligible: bool  # trusted, not reserved, and every rate's denominator >= min_samples


@dataclass(frozen=True)
class FeatureEstimates:
    """One (model, feature): calibration per group and, per view, group estimates and disparities."""

    feature: str
    calibration: dict[str, Calibration]
    groups: dict[str, dict[str, GroupEstimates]]  # view -> group -> estimates
    disparities: dict[str, dict[tuple[str, str], Estimate]]  # view -> (disparity, method) -> estimate
    flagged: dict[str, dict[tuple[str, str], bool]]
    pending: dict[str, int]  # group -> scored predictions pending
    # window -> group -> calibration of the labels whose event time lies in the window
    window_calibration: dict[str, dict[str, Calibration]] = field(default_factory=dict)
    # group -> (trusted, the calibration that decided it: a window label or "cumulative")
    trust: dict[str, tuple[bool, str]] = field(default_factory=dict)


def recent_trust(
    cumulative: Mapping[str, Calibration],
    windows: Mapping[str, Mapping[str, Calibration]],
) -> dict[str, tuple[bool, str]]:
    """Per group, whether its estimates count and which calibration decided. With a window whose
    calibration of the group is checked (``min_window_labelled`` labels; windows in the order
    given, shortest first), the recent labels decide: untrusted when any checked window alarms
    (the first such window is named), else trusted (named: the shortest checked window), whatever
    the cumulative calibration says; a group drifting now is untrusted at once, one that recovered
    is trusted again once every checked window is clean, without waiting for its history to
    dilute the bad period. With no checked window, the cumulative calibration decides. The alert
    ``StreamFairCalibrationDrift`` is this same rule in PromQL."""
    out: dict[str, tuple[bool, str]] = {}
    for g in set(cumulative) | {g for w in windows.values() for g in w}:
        checked = [(w, c[g]) for w, c in windows.items() if g in c and c[g].reason != "too_few_labels"]
        alarms = [w for w, c in checked if c.alarm]
        if alarms:
            out[g] = (False, alarms[0])
        elif checked:
            out[g] = (True, checked[0][0])
        else:
            c = cumulative.get(g)
            out[g] = (c is not None and c.trusted, "cumulative")
    return out


def _beta(r: float, v: float, m: float, prior: tuple[float, float]) -> tuple[float, float]:
    """Beta parameters with mean ~ r and the variance v (effective sample size r(1-r)/v)."""
    n_eff = r * (1 - r) / v if v > 0 and 0 < r < 1 else m
    n_eff = min(n_eff, 1e9)
    return prior[0] + r * n_eff, prior[1] + (1 - r) * n_eff


def estimate_feature(
    feature: str,
    histograms: Mapping[str, ScoreHistogram],
    realized: Mapping[str, Counts],
    settings: FairnessSettings,
    estimate: EstimateSettings,
    reference: str | None = None,
    model: str = "",
    windows: Mapping[str, Mapping[str, Labelled]] | None = None,
    cache: CalibrationCache | None = None,
) -> FeatureEstimates:
    """Calibration (cumulative and per window of ``windows``: window label -> group -> labelled
    histogram, shortest first) and both views' estimates of every group of one (model, feature)."""
    prior = PRIORS[settings.prior]
    groups = sorted(set(histograms) | set(realized))
    level = settings.credible_level
    cal = calibrations(histograms, estimate, level, key=(model, feature, ""), cache=cache)
    in_window = replace(estimate, min_labelled=max(estimate.min_labelled, estimate.min_window_labelled))
    wcal = {
        w: calibrations(h, in_window, level, key=(model, feature, w), cache=cache)
        for w, h in (windows or {}).items()
    }
    trust = recent_trust(cal, wcal)
    out_groups: dict[str, dict[str, GroupEstimates]] = {}
    out_disp: dict[str, dict[tuple[str, str], Estimate]] = {}
    out_flag: dict[str, dict[tuple[str, str], bool]] = {}
    tail = (1.0 - settings.credible_level) / 2.0
    for view in VIEWS:
        per: dict[str, GroupEstimates] = {}
        posts: dict[str, dict[str, tuple[float, float, float, bool]]] = {r: {} for r in DISPARITY_INPUT_RATES}
        for g in groups:
            h = histograms.get(g)
            if h is None and view == "pending":
                continue
            w, vecs = _soft_items(h, realized.get(g) if view == "combined" else None)
            if not w.size or w.sum() <= 0:
                continue
            expected = tuple(float(x) for x in w @ vecs)
            trusted = trust.get(g, (False, ""))[0]
            rates: dict[str, Estimate] = {}
            dens: dict[str, float] = {}
            eligible = trusted and not is_reserved(g)
            for rate in DISPARITY_INPUT_RATES:
                r, v, m = _rate(w, vecs, rate)
                if m <= 0:
                    eligible = eligible and rate not in ESTIMATED_RATES
                    continue
                a, b = _beta(r, v, m, prior)
                lo = float(special.betaincinv(a, b, tail))
                hi = float(special.betaincinv(a, b, 1 - tail))
                dens[rate] = m
                usable = eligible and m >= settings.min_samples
                posts[rate][g] = (r, a, b, usable)
                if rate in ESTIMATED_RATES:
                    rates[rate] = Estimate(r, min(lo, r), max(hi, r))
            eligible = eligible and all(dens.get(r, 0.0) >= settings.min_samples for r in ESTIMATED_RATES)
            per[g] = GroupEstimates(g, expected, rates, dens, trusted, eligible)  # type: ignore[arg-type]
        names = sorted(per)
        rp = {}
        for rate in DISPARITY_INPUT_RATES:
            vals = [posts[rate].get(g, (np.nan, 1.0, 1.0, False)) for g in names]
            rp[rate] = RatePosteriors(
                observed=np.array([x[0] for x in vals], dtype=np.float64),
                alpha=np.array([x[1] for x in vals], dtype=np.float64),
                beta=np.array([x[2] for x in vals], dtype=np.float64),
                usable=np.array([x[3] for x in vals], dtype=bool),
            )
        ref = names.index(reference) if reference in names else None
        table = disparity_table(rp, ref, settings.credible_level) if names else {}
        out_groups[view] = per
        out_disp[view] = {k: Estimate(*v) for k, v in table.items()}
        out_flag[view] = {
            k: is_flagged(k[0], e.lower, e.upper, settings.thresholds[k[0]])
            for k, e in out_disp[view].items()
        }
    pending = {g: int(h.pending().sum()) for g, h in histograms.items()}
    return FeatureEstimates(feature, cal, out_groups, out_disp, out_flag, pending, wcal, trust)
