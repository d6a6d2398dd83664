"""Synthetic prediction/outcome streams with known ground truth (pure: no Kafka import).

A :class:`Scenario` describes a population (independent sensitive features with traffic
shares), a model (per-cell true/false positive rates), delayed and possibly selective labels,
and optional bias drift or a feedback loop. :func:`generate` turns it into events in arrival
order, lazily, in numpy-vectorised chunks; :func:`ground_truth` states what was injected;
:func:`messy` perturbs a stream the way real topics do.

Cells are written ``"feature=value"`` or ``"f1=v1&f2=v2"``; when several cell overrides match
an event, the most specific one (most conditions) wins, ties going to the later entry.

>>> scenario = SCENARIOS["fair"]()
>>> events = list(generate(scenario, 1_000, seed=1))
>>> sum(kind == "prediction" for kind, _ in events)
1000
>>> sorted(events[0][1])
['attributes', 'id', 'model', 'prediction', 'score', 'ts']
>>> all(a[1]["ts"] <= b[1]["ts"] for a, b in zip(events, events[1:]))
True
"""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np

__all__ = [
    "MALFORMED_KINDS",
    "SCENARIOS",
    "GroundTruth",
    "MessyStream",
    "Scenario",
    "expected_rates",
    "generate",
    "ground_truth",
    "messy",
]

FIVE_GROUPS: Mapping[str, float] = {"A": 0.40, "B": 0.30, "C": 0.15, "D": 0.10, "E": 0.05}
DelayDistribution = Literal["exponential", "fixed", "uniform", "lognormal"]
_CHUNK = 8192


@dataclass(frozen=True)
class GroundTruth:
    """What a scenario injected; ``extra`` holds scenario-specific, JSON-ready detail."""

    scenario: str
    affected_feature: str | None
    affected_group: str | None
    onset_ts: float | None
    onset_index: int | None
    description: str
    extra: dict[str, Any]


@dataclass(frozen=True)
class Scenario:
    """A synthetic population, model, labelling process and drift.

    Rates are probabilities: ``base_rate`` = P(label=1), ``tpr`` = P(prediction=1 | label=1),
    ``fpr`` = P(prediction=1 | label=0); ``*_by_cell`` override them per cell. The model scores
    every event ``score = sigmoid(z)`` with ``z ~ Logistic(logit(rate), 1)``, ``rate`` the event's
    TPR (label 1) or FPR (label 0), and decides ``prediction = score >= 0.5``: per cell and label
    the scores differ, and a TPR drop is a downward shift of the positives' scores.
    ``label_prob`` is the chance an outcome is ever emitted; cells in ``label_only_approved`` get
    outcomes only for ``prediction == 1`` (selective labels). Label delays have mean
    ``label_delay_mean_s``
    (per cell: ``label_delay_mean_by_cell``), multiplied for positives by
    ``label_delay_positive_factor_by_cell`` (label-dependent delays). From ``onset_index``
    (default ``onset_fraction * n``) the TPR of ``drift_cell`` (``"*"``: every cell, a model-wide
    change) drops by ``tpr_drop``, at once or linearly over ``drift_span`` predictions (default
    ``drift_span_fraction * n``). With ``feedback_cell``
    the stream is cut into ``feedback_periods`` periods and, with SR the cell's model-implied
    selection rate and SR_ref the rest's (period 0)::

        share[k+1]     = share[k]     * (1 + share_coupling     * (SR[k] - SR_ref) / SR_ref)
        base_rate[k+1] = base_rate[k] * (1 + base_rate_coupling * (SR[k] - SR_ref) / SR_ref)

    and ``share_trend`` multiplies the share by ``1 + share_trend`` each period on top (a
    traffic-mix shift that selection does not cause).
    """

    name: str
    features: Mapping[str, Mapping[str, float]]
    base_rate: float = 0.3
    tpr: float = 0.8
    fpr: float = 0.1
    base_rate_by_cell: Mapping[str, float] = field(default_factory=dict)
    tpr_by_cell: Mapping[str, float] = field(default_factory=dict)
    fpr_by_cell: Mapping[str, float] = field(default_factory=dict)
    label_delay: DelayDistribution = "exponential"
    label_delay_mean_s: float = 300.0
    label_delay_mean_by_cell: Mapping[str, float] = field(default_factory=dict)
    label_delay_positive_factor_by_cell: Mapping[str, float] = field(default_factory=dict)
    label_prob: float = 1.0
    label_prob_by_cell: Mapping[str, float] = field(default_factory=dict)
    label_only_approved: tuple[str, ...] = ()
    affected: str | None = None
    drift_cell: str | None = None
    tpr_drop: float = 0.0
    onset_fraction: float = 0.5
    onset_index: int | None = None
    drift_span_fraction: float = 0.0
    drift_span: int | None = None
    feedback_cell: str | None = None
    feedback_periods: int = 8
    share_coupling: float = 0.5
    share_trend: float = 0.0
    base_rate_coupling: float = 0.3
    min_share: float = 0.005
    min_base_rate: float = 0.02
    models: tuple[str, ...] = ("credit-v3",)
    description: str = ""

    def __post_init__(self) -> None:
        for feature, shares in self.features.items():
            if not shares or any(s <= 0 for s in shares.values()):
                raise ValueError(f"feature {feature!r} needs positive shares, e.g. {{'A': 0.5}}")
        if not self.models:
            raise ValueError("models must name at least one model, e.g. ('credit-v3',)")
        _Compiled(self)  # validates every cell spec and rate early


def _parse_cell(scenario: Scenario, spec: str) -> list[tuple[int, int]]:
    names = list(scenario.features)
    parsed = []
    for part in spec.split("&"):
        feature, sep, value = part.partition("=")
        if not sep or feature not in scenario.features or value not in scenario.features[feature]:
            raise ValueError(
                f"unknown cell {spec!r}: write 'feature=value[&feature=value]' with features "
                f"and values from {dict((k, list(v)) for k, v in scenario.features.items())}"
            )
        parsed.append((names.index(feature), list(scenario.features[feature]).index(value)))
    return parsed


def _cell_name(scenario: Scenario, spec: str) -> tuple[str, str]:
    """``"race=Black&sex=Female"`` -> ``("race&sex", "Black&Female")`` as groups.py names them."""
    parts = [p.partition("=") for p in spec.split("&")]
    return "&".join(p[0] for p in parts), "&".join(p[2] for p in parts)


class _Compiled:
    """Per-cell parameter arrays over the full cross product of feature values."""

    def __init__(self, s: Scenario) -> None:
        self.names = list(s.features)
        self.values = [list(v) for v in s.features.values()]
        sizes = [len(v) for v in self.values]
        self.radix = np.array([math.prod(sizes[i + 1 :]) for i in range(len(sizes))], np.int64)
        self.cells = list(itertools.product(*[range(n) for n in sizes]))
        self.shares = [np.array(list(v.values()), float) / sum(v.values()) for v in s.features.values()]

        def table(default: float, by_cell: Mapping[str, float], what: str) -> np.ndarray:
            out = np.full(len(self.cells), float(default))
            rank = np.full(len(self.cells), -1)
            for spec, value in by_cell.items():
                mask = self.mask(_parse_cell(s, spec))
                better = mask & (rank <= len(spec.split("&")))
                out[better], rank[better] = value, len(spec.split("&"))
            if what != "delay" and not ((out >= 0) & (out <= 1)).all():
                raise ValueError(f"{what} values must lie in [0, 1]; got {sorted(set(out))}")
            return out

        self.base_rate = table(s.base_rate, s.base_rate_by_cell, "base_rate")
        self.tpr = table(s.tpr, s.tpr_by_cell, "tpr")
        self.fpr = table(s.fpr, s.fpr_by_cell, "fpr")
        self.label_prob = table(s.label_prob, s.label_prob_by_cell, "label_prob")
        self.delay_mean = table(s.label_delay_mean_s, s.label_delay_mean_by_cell, "delay")
        self.positive_delay = table(1.0, s.label_delay_positive_factor_by_cell, "delay")
        self.only_approved = np.zeros(len(self.cells), bool)
        for spec in s.label_only_approved:
            self.only_approved |= self.mask(_parse_cell(s, spec))
        none = np.zeros(len(self.cells), bool)
        self.drift = none
        if s.drift_cell == "*":
            self.drift = np.ones(len(self.cells), bool)
        elif s.drift_cell:
            self.drift = self.mask(_parse_cell(s, s.drift_cell))
        self.feedback: tuple[int, int] | None = None
        if s.feedback_cell:
            parsed = _parse_cell(s, s.feedback_cell)
            if len(parsed) != 1:
                raise ValueError("feedback_cell must be one 'feature=value', e.g. 'group=D'")
            self.feedback = parsed[0]
        if s.affected:
            _parse_cell(s, s.affected)

    def mask(self, parsed: list[tuple[int, int]]) -> np.ndarray:
        return np.array([all(c[f] == v for f, v in parsed) for c in self.cells], bool)

    def cell_probs(self, shares: list[np.ndarray]) -> np.ndarray:
        return np.array([math.prod(float(shares[f][v]) for f, v in enumerate(c)) for c in self.cells])


@dataclass(frozen=True)
class _Timeline:
    """Index-dependent parts of a scenario resolved for a stream of ``n`` predictions."""

    n: int
    onset: int | None
    span: int
    period_len: int
    share: np.ndarray  # per feedback period: the feedback group's traffic share
    br_factor: np.ndarray  # per feedback period: its base-rate multiplier
    selection_rate: np.ndarray  # per feedback period: its model-implied selection rate
    reference_selection_rate: float

    def ramp(self, index: np.ndarray) -> np.ndarray:
        if self.onset is None:
            return np.zeros(index.shape)
        if self.span <= 0:
            return (index >= self.onset).astype(float)
        return np.clip((index - self.onset) / self.span, 0.0, 1.0)


def _timeline(s: Scenario, c: _Compiled, n: int) -> _Timeline:
    onset = None
    if s.drift_cell is not None:
        onset = s.onset_index if s.onset_index is not None else int(s.onset_fraction * n)
    span = s.drift_span if s.drift_span is not None else int(s.drift_span_fraction * n)
    periods = max(1, s.feedback_periods) if c.feedback else 1
    period_len = max(1, math.ceil(n / periods))
    share, factor, rate, ref = np.ones(periods), np.ones(periods), np.zeros(periods), 0.0
    if c.feedback is not None:
        f, v = c.feedback
        in_group = c.mask([c.feedback])
        probs = c.cell_probs(c.shares)
        sr = c.base_rate * c.tpr + (1 - c.base_rate) * c.fpr
        ref = float((probs * sr)[~in_group].sum() / probs[~in_group].sum())
        share[0] = c.shares[f][v]
        for k in range(periods):
            br = np.clip(c.base_rate * factor[k], 0, 1)
            sr_k = br * c.tpr + (1 - br) * c.fpr
            rate[k] = float((probs * sr_k)[in_group].sum() / probs[in_group].sum())
            if k + 1 < periods:
                push = (rate[k] - ref) / ref
                moved = share[k] * (1 + s.share_coupling * push) * (1 + s.share_trend)
                share[k + 1] = min(max(moved, s.min_share), 0.95)
                group_br = float((probs * c.base_rate)[in_group].sum() / probs[in_group].sum())
                new_br = max(group_br * factor[k] * (1 + s.base_rate_coupling * push), s.min_base_rate)
                factor[k + 1] = new_br / group_br
    return _Timeline(n, onset, span, period_len, share, factor, rate, ref)


def _period_shares(c: _Compiled, t: _Timeline, period: int) -> list[np.ndarray]:
    shares = [a.copy() for a in c.shares]
    if c.feedback is not None:
        f, v = c.feedback
        rest = 1.0 - shares[f][v]
        shares[f] *= (1.0 - t.share[period]) / rest
        shares[f][v] = t.share[period]
    return shares


def _arrival_chunks(seed: int, n: int, start_ts: float, rate_per_s: float) -> Iterator[np.ndarray]:
    """Poisson arrival times, on their own random stream so ground truth can replay them."""
    rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(2)[0])
    t = start_ts
    for lo in range(0, n, _CHUNK):
        gaps = rng.exponential(1.0 / rate_per_s, min(_CHUNK, n - lo))
        ts = t + np.concatenate(([0.0], np.cumsum(gaps[:-1])))
        t = float(ts[-1] + gaps[-1])
        yield ts


def generate(
    scenario: Scenario,
    n_predictions: int,
    *,
    seed: int = 0,
    start_ts: float = 1_790_000_000.0,
    rate_per_s: float = 50.0,
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``("prediction" | "outcome", payload)`` in arrival (event-time) order.

    Predictions arrive as a Poisson process of ``rate_per_s``; each labelled prediction's
    outcome arrives after its label delay. Ids are ``"req-<index>"``. Deterministic per seed;
    memory is bounded by the chunk size plus the outcomes still in flight.
    """
    c = _Compiled(scenario)
    t = _timeline(scenario, c, n_predictions)
    rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(2)[1])
    attrs = [
        {name: c.values[f][v] for f, (name, v) in enumerate(zip(c.names, cell, strict=True))}
        for cell in c.cells
    ]
    models = list(scenario.models)
    pend_ts, pend_idx, pend_label = np.empty(0), np.empty(0, np.int64), np.empty(0, np.int64)
    lo = 0
    for ts in _arrival_chunks(seed, n_predictions, start_ts, rate_per_s):
        m = len(ts)
        index = np.arange(lo, lo + m)
        u = rng.random((len(c.names) + 6, m))
        period = index // t.period_len
        codes = np.zeros(m, np.int64)
        for f in range(len(c.names)):
            fcodes = np.empty(m, np.int64)
            for p in np.unique(period):
                sel = period == p
                cum = np.cumsum(_period_shares(c, t, int(p))[f])
                drawn = np.searchsorted(cum, u[f][sel], side="right")
                fcodes[sel] = np.minimum(drawn, len(cum) - 1)
            codes += fcodes * c.radix[f]
        k = len(c.names)
        model = (u[k] * len(models)).astype(np.int64)
        br = c.base_rate[codes]
        if c.feedback is not None:
            br = np.where(c.mask([c.feedback])[codes], np.clip(br * t.br_factor[period], 0, 1), br)
        tpr = np.clip(c.tpr[codes] - scenario.tpr_drop * t.ramp(index) * c.drift[codes], 0, 1)
        label = u[k + 1] < br
        rate = np.where(label, tpr, c.fpr[codes])
        pred = u[k + 2] < rate
        score = _scores(pred, u[k + 3], rate)
        observed = (u[k + 4] < c.label_prob[codes]) & ~(c.only_approved[codes] & ~pred)
        mean = c.delay_mean[codes] * np.where(label, c.positive_delay[codes], 1.0)
        delay = _delays(scenario.label_delay, mean, u[k + 5])

        last = math.inf if lo + m >= n_predictions else float(ts[-1])
        pend_ts = np.concatenate((pend_ts, (ts + delay)[observed]))
        pend_idx = np.concatenate((pend_idx, index[observed]))
        pend_label = np.concatenate((pend_label, label[observed].astype(np.int64)))
        due = pend_ts <= last
        out_ts, out_idx, out_label = pend_ts[due], pend_idx[due], pend_label[due]
        pend_ts, pend_idx, pend_label = pend_ts[~due], pend_idx[~due], pend_label[~due]

        payloads: list[dict[str, Any]] = [
            {
                "id": f"req-{i}",
                "ts": round(x, 3),
                "model": models[mi],
                "prediction": int(p),
                "score": s,
                "attributes": attrs[cell].copy(),
            }
            for i, x, mi, p, s, cell in zip(
                index.tolist(),
                ts.tolist(),
                model.tolist(),
                pred.tolist(),
                score.tolist(),
                codes.tolist(),
                strict=True,
            )
        ]
        payloads += [
            {"id": f"req-{i}", "ts": round(x, 3), "label": y}
            for i, x, y in zip(out_idx.tolist(), out_ts.tolist(), out_label.tolist(), strict=True)
        ]
        order = np.argsort(np.concatenate((ts, out_ts)), kind="stable")
        for j in order.tolist():
            yield ("prediction" if j < m else "outcome"), payloads[j]
        lo += m


def _scores(pred: np.ndarray, u: np.ndarray, rate: np.ndarray) -> np.ndarray:
    """Score ``sigmoid(z)``, ``z ~ Logistic(logit(rate), 1)``, drawn given the decision ``z >= 0``.

    ``pred`` was drawn with probability ``rate`` = P(z >= 0), so the pair (score, prediction) has
    exactly the law of scoring first and deciding ``prediction = score >= 0.5``.
    """
    p = np.clip(rate, 1e-6, 1 - 1e-6)
    loc = np.log(p / (1 - p))
    below = 1.0 / (1.0 + np.exp(loc))  # P(z < 0) for z ~ Logistic(loc, 1)
    q = np.clip(np.where(pred, below + u * (1 - below), u * below), 1e-9, 1 - 1e-9)
    score = np.round(1.0 / (1.0 + np.exp(-(loc + np.log(q / (1 - q))))), 4)
    return np.where(pred, np.maximum(score, 0.5), np.minimum(score, 0.4999))


def _delays(kind: DelayDistribution, mean: np.ndarray, u: np.ndarray) -> np.ndarray:
    q = np.clip(u, 1e-12, 1 - 1e-12)
    if kind == "exponential":
        return -mean * np.log1p(-q)
    if kind == "fixed":
        return mean.copy()
    if kind == "uniform":
        return 2 * mean * q
    if kind == "lognormal":  # sigma 1, mu chosen so the mean is ``mean``
        from scipy.special import ndtri

        return np.exp(np.log(np.maximum(mean, 1e-9)) - 0.5 + ndtri(q))
    raise ValueError(f"label_delay must be exponential, fixed, uniform or lognormal, not {kind!r}")


def expected_rates(
    scenario: Scenario,
    feature: str,
    *,
    n_predictions: int = 0,
    at_index: int = 0,
) -> dict[str, dict[str, float]]:
    """Model-implied rates per group of ``feature`` (``"race"`` or ``"race&sex"``) at ``at_index``.

    With p_c the share, b_c the base rate and l_c the label probability of cell c in the group:
    ``tpr = sum p b tpr / sum p b``, ``fpr = sum p (1-b) fpr / sum p (1-b)``,
    ``selection_rate = sum p (b tpr + (1-b) fpr) / sum p``; ``label_coverage`` is the expected
    fraction of predictions that ever get an outcome. ``n_predictions`` resolves onset, drift span
    and feedback periods.

    >>> rates = expected_rates(SCENARIOS["fair"](), "group")
    >>> round(rates["E"]["share"], 2), round(rates["E"]["selection_rate"], 2)
    (0.05, 0.31)
    """
    c = _Compiled(scenario)
    t = _timeline(scenario, c, max(n_predictions, at_index + 1))
    period = min(at_index // t.period_len, len(t.share) - 1)
    probs = c.cell_probs(_period_shares(c, t, period))
    br = c.base_rate.copy()
    if c.feedback is not None:
        br = np.where(c.mask([c.feedback]), np.clip(br * t.br_factor[period], 0, 1), br)
    ramp = float(t.ramp(np.array([at_index]))[0])
    tpr = np.clip(c.tpr - scenario.tpr_drop * ramp * c.drift, 0, 1)
    sel = br * tpr + (1 - br) * c.fpr
    coverage = c.label_prob * np.where(c.only_approved, sel, 1.0)
    positions = [c.names.index(name) for name in feature.split("&")]
    out: dict[str, dict[str, float]] = {}
    for key in sorted({tuple(cell[i] for i in positions) for cell in c.cells}):
        group = "&".join(c.values[i][v] for i, v in zip(positions, key, strict=True))
        g = c.mask(list(zip(positions, key, strict=True)))
        p = probs * g
        out[group] = {
            "share": float(p.sum()),
            "base_rate": float((p * br).sum() / p.sum()),
            "tpr": float((p * br * tpr).sum() / (p * br).sum()),
            "fpr": float((p * (1 - br) * c.fpr).sum() / (p * (1 - br)).sum()),
            "selection_rate": float((p * sel).sum() / p.sum()),
            "label_coverage": float((p * coverage).sum() / p.sum()),
        }
    return out


def ground_truth(
    scenario: Scenario,
    n_predictions: int,
    *,
    seed: int = 0,
    start_ts: float = 1_790_000_000.0,
    rate_per_s: float = 50.0,
) -> GroundTruth:
    """What :func:`generate` with the same arguments injects, including onset time and index.

    >>> gt = ground_truth(SCENARIOS["bias_onset"](), 10_000)
    >>> gt.affected_feature, gt.affected_group, gt.onset_index
    ('group', 'E', 5000)
    """
    c = _Compiled(scenario)
    t = _timeline(scenario, c, n_predictions)
    feature, group = _cell_name(scenario, scenario.affected) if scenario.affected else (None, None)
    names = list(scenario.features)

    def ts_at(index: int) -> float | None:
        if not 0 <= index < n_predictions:
            return None
        chunks = _arrival_chunks(seed, n_predictions, start_ts, rate_per_s)
        chunk = next(itertools.islice(chunks, index // _CHUNK, None))
        return round(float(chunk[index % _CHUNK]), 3)

    extra: dict[str, Any] = {"n_predictions": n_predictions, "features": names}
    if feature is not None:
        last = max(n_predictions - 1, 0)
        extra["expected"] = expected_rates(scenario, feature, n_predictions=n_predictions)
        if scenario.drift_cell is not None or c.feedback is not None:
            extra["expected_at_end"] = expected_rates(
                scenario, feature, n_predictions=n_predictions, at_index=last
            )
        if "&" in feature:
            extra["expected_marginals"] = {
                f: expected_rates(scenario, f, n_predictions=n_predictions) for f in names
            }
    onset = t.onset
    if scenario.drift_cell is not None:
        extra.update(
            tpr_drop=scenario.tpr_drop,
            drift_span=t.span,
            end_index=(onset or 0) + t.span,
            end_ts=ts_at((onset or 0) + t.span),
        )
    if c.feedback is not None:
        onset = t.period_len if len(t.share) > 1 else None
        extra["coupling"] = {
            "share": scenario.share_coupling,
            "base_rate": scenario.base_rate_coupling,
            "reference_selection_rate": t.reference_selection_rate,
            "formula": "x[k+1] = x[k] * (1 + coupling * (SR[k] - SR_ref) / SR_ref)",
        }
        moved_feature, moved_group = _cell_name(scenario, scenario.feedback_cell or "")
        group_br = expected_rates(scenario, moved_feature, n_predictions=n_predictions)
        extra["periods"] = [
            {
                "period": k,
                "start_index": k * t.period_len,
                "end_index": min((k + 1) * t.period_len, n_predictions),
                "start_ts": ts_at(k * t.period_len),
                "share": float(t.share[k]),
                "base_rate": float(group_br[moved_group]["base_rate"] * t.br_factor[k]),
                "selection_rate": float(t.selection_rate[k]),
            }
            for k in range(len(t.share))
            if k * t.period_len < max(n_predictions, 1)
        ]
    return GroundTruth(
        scenario=scenario.name,
        affected_feature=feature,
        affected_group=group,
        onset_ts=ts_at(onset) if onset is not None else None,
        onset_index=onset,
        description=scenario.description,
        extra=extra,
    )


# -- scenarios ----------------------------------------------------------------------------------
def _fair(**overrides: Any) -> Scenario:
    base = Scenario(
        name="fair",
        features={"group": dict(FIVE_GROUPS)},
        base_rate=0.3,
        tpr=0.8,
        fpr=0.1,
        description="Five groups A..E (40/30/15/10/5 %), equal base rate, TPR and FPR.",
    )
    return replace(base, **overrides)


def _lending(*, tpr_drop: float = 0.25, **overrides: Any) -> Scenario:
    tpr = float(overrides.pop("tpr", 0.75))
    # The Black&Female cell loses ``tpr_drop``; Black&Male and White&Female gain and White&Male
    # loses just enough that both marginals stay nearly level: bias hidden by aggregation
    # ("fairness gerrymandering", Kearns et al. 2018).
    base = Scenario(
        name="lending",
        features={
            "sex": {"Female": 0.5, "Male": 0.5},
            "race": {"White": 0.60, "Black": 0.15, "Hispanic": 0.15, "Asian": 0.10},
            "age": {"18-24": 0.2, "25-44": 0.5, "45+": 0.3},
        },
        base_rate=0.4,
        tpr=tpr,
        fpr=0.10,
        tpr_by_cell={
            "race=Black&sex=Female": tpr - tpr_drop,
            "race=Black&sex=Male": min(tpr + 0.8 * tpr_drop, 0.98),
            "race=White&sex=Female": tpr + 0.2 * tpr_drop,
            "race=White&sex=Male": tpr - 0.2 * tpr_drop,
        },
        fpr_by_cell={"race=Black&sex=Female": 0.05, "race=Black&sex=Male": 0.15},
        label_delay_mean_s=600.0,
        affected="race=Black&sex=Female",
        # Four cells differ, not one: hiding a cell's gap in both marginals takes offsets.
        description=f"credit-v3's true-positive rate is {tpr - tpr_drop:.2f} for Black women and "
        f"{min(tpr + 0.8 * tpr_drop, 0.98):.2f} for Black men, offset by White women "
        f"{tpr + 0.2 * tpr_drop:.2f} and White men {tpr - 0.2 * tpr_drop:.2f} (everyone else "
        f"{tpr:.2f}), so the marginal sex and race gaps stay small and only the race&sex "
        "intersection shows the bias.",
    )
    return replace(base, **overrides)


def _bias_onset(*, group: str = "E", tpr_drop: float = 0.10, **overrides: Any) -> Scenario:
    base = _fair(
        name="bias_onset",
        drift_cell=f"group={group}",
        affected=f"group={group}",
        tpr_drop=tpr_drop,
        onset_fraction=0.5,
        description=f"Group {group}'s TPR drops by {tpr_drop:g} at onset_index (default n/2).",
    )
    return replace(base, **overrides)


def _gradual_drift(*, group: str = "C", tpr_drop: float = 0.20, **overrides: Any) -> Scenario:
    base = _fair(
        name="gradual_drift",
        drift_cell=f"group={group}",
        affected=f"group={group}",
        tpr_drop=tpr_drop,
        onset_fraction=0.3,
        drift_span_fraction=0.4,
        description=f"Group {group}'s TPR declines linearly by {tpr_drop:g} from onset over "
        "drift_span predictions (default 0.4 n).",
    )
    return replace(base, **overrides)


def _selective_labels(
    *, group: str = "B", label_prob: float = 1.0, approved_only: bool = True, **overrides: Any
) -> Scenario:
    base = _fair(
        name="selective_labels",
        affected=f"group={group}",
        label_prob_by_cell={f"group={group}": label_prob},
        label_only_approved=(f"group={group}",) if approved_only else (),
        description=f"Group {group} gets outcomes with probability {label_prob:g}"
        + (" and only when approved" if approved_only else "")
        + "; other groups always.",
    )
    return replace(base, **overrides)


def _feedback_loop(*, group: str = "D", tpr_gap: float = 0.05, **overrides: Any) -> Scenario:
    # A slow loop: a TPR gap below the usual 0.1 difference threshold,
    # 40 periods, the share reacting to half the relative selection shortfall and the base rate
    # to a tenth of it. D's share falls from 10% to ~5% by period 18 and ~1% by period 33, while
    # its selection-rate gap grows from 0.015 to ~0.1 only near the end.
    base = _fair(
        name="feedback_loop",
        affected=f"group={group}",
        feedback_cell=f"group={group}",
        tpr_by_cell={f"group={group}": 0.8 - tpr_gap},
        feedback_periods=40,
        share_coupling=0.5,
        base_rate_coupling=0.1,
        description=f"Group {group} is under-approved (TPR -{tpr_gap:g}); each period its "
        "selection rate shrinks its next-period traffic share and base rate.",
    )
    return replace(base, **overrides)


# -- two features, labels after hours: the verdict engine's benchmark scenarios -----------------
TWO_FEATURES: Mapping[str, Mapping[str, float]] = {"group": FIVE_GROUPS, "sex": {"F": 0.5, "M": 0.5}}
HOUR = 3600.0


def _delayed(name: str, description: str, **fields: Any) -> Scenario:
    """Groups A..E and sex F/M (independent), labels after an exponential delay of mean 4 h."""
    fields.setdefault("label_delay_mean_s", 4 * HOUR)
    features = {k: dict(v) for k, v in TWO_FEATURES.items()}
    return Scenario(name=name, features=features, description=description, **fields)


def _bias_onset_delayed(*, group: str = "E", tpr_drop: float = 0.10, **overrides: Any) -> Scenario:
    base = _delayed(
        "bias_onset_delayed",
        f"Two features (group A..E, sex F/M), labels after ~4 h; group {group}'s TPR drops by "
        f"{tpr_drop:g} at onset_index (default n/2).",
        drift_cell=f"group={group}",
        affected=f"group={group}",
        tpr_drop=tpr_drop,
    )
    return replace(base, **overrides)


def _unequal_base_rates(**overrides: Any) -> Scenario:
    rates = {"A": 0.2, "B": 0.3, "C": 0.4, "D": 0.5, "E": 0.6}
    base = _delayed(
        "unequal_base_rates",
        "Fair in TPR and FPR (equal opportunity, equalized odds) with base rates 0.2..0.6 over "
        "groups A..E: selection rates differ, so demographic parity is truly violated.",
        base_rate_by_cell={f"group={g}": r for g, r in rates.items()},
    )
    return replace(base, **overrides)


def _mix_shift(*, group: str = "E", share_trend: float = 0.04, **overrides: Any) -> Scenario:
    base = _delayed(
        "mix_shift",
        f"Fair; group {group}'s traffic share grows by {share_trend:g} (relative) per period over "
        "40 periods (5% to ~23%), the other groups shrinking in proportion.",
        feedback_cell=f"group={group}",
        feedback_periods=40,
        share_coupling=0.0,
        base_rate_coupling=0.0,
        share_trend=share_trend,
    )
    return replace(base, **overrides)


def _group_delays(**overrides: Any) -> Scenario:
    delays = {"A": 12 * HOUR, "B": 4 * HOUR, "C": 2 * HOUR, "D": HOUR, "E": 0.5 * HOUR}
    base = _delayed(
        "group_delays",
        "Fair; mean label delay depends on the group: A 12 h, B 4 h, C 2 h, D 1 h, E 30 min.",
        label_delay_mean_by_cell={f"group={g}": d for g, d in delays.items()},
    )
    return replace(base, **overrides)


def _label_delays(**overrides: Any) -> Scenario:
    factors = {"A": 1.0, "B": 2.0, "C": 3.0, "D": 4.0, "E": 8.0}
    base = _delayed(
        "label_delays",
        "Fair; positives are labelled later than negatives, by a factor depending on the group "
        "(A 1, B 2, C 3, D 4, E 8; negatives after ~2 h).",
        label_delay_mean_s=2 * HOUR,
        label_delay_positive_factor_by_cell={f"group={g}": f for g, f in factors.items()},
    )
    return replace(base, **overrides)


def _model_change(*, tpr_drop: float = 0.10, **overrides: Any) -> Scenario:
    base = _delayed(
        "model_change",
        f"Fair at every moment: every group's TPR drops by {tpr_drop:g} at onset_index (default "
        "n/2), while group E's labels arrive after ~1 day and the others' after ~20 days.",
        drift_cell="*",
        tpr_drop=tpr_drop,
        label_delay_mean_s=20 * 24 * HOUR,
        label_delay_mean_by_cell={"group=E": 24 * HOUR},
    )
    return replace(base, **overrides)


SCENARIOS: dict[str, Callable[..., Scenario]] = {
    "lending": _lending,
    "fair": _fair,
    "bias_onset": _bias_onset,
    "gradual_drift": _gradual_drift,
    "selective_labels": _selective_labels,
    "feedback_loop": _feedback_loop,
    "bias_onset_delayed": _bias_onset_delayed,
    "unequal_base_rates": _unequal_base_rates,
    "mix_shift": _mix_shift,
    "group_delays": _group_delays,
    "label_delays": _label_delays,
    "model_change": _model_change,
}
"""Scenario factories by name; keyword arguments override any :class:`Scenario` field."""


# -- messy streams ------------------------------------------------------------------------------
MALFORMED_KINDS = ("not_json", "missing_id", "bad_prediction", "bad_timestamp")


class MessyStream(Iterator[tuple[str, "dict[str, Any] | bytes"]]):
    """Iterator returned by :func:`messy`; ``counts`` tallies what it did so far.

    Keys: ``input``, ``output``, ``duplicate``, ``early_outcome`` (outcomes emitted before their
    prediction), ``held_released`` (held predictions released without an early outcome),
    ``malformed`` and ``malformed_<kind>`` for each of :data:`MALFORMED_KINDS`.
    """

    def __init__(
        self,
        events: Iterable[tuple[str, Any]],
        *,
        seed: int,
        duplicate_rate: float,
        malformed_rate: float,
        early_outcome_rate: float,
        shuffle_window: int,
        max_hold: int,
    ) -> None:
        self.counts: Counter[str] = Counter()
        self._rnd = random.Random(seed)
        self._buf: list[tuple[str, Any, str | None]] = []
        self._buf_preds: Counter[str] = Counter()
        self._held: dict[str, tuple[int, dict[str, Any]]] = {}
        self._template: dict[str, Any] = {
            "id": "req-0",
            "ts": 0.0,
            "model": "m",
            "prediction": 0,
            "score": 0.1,
            "attributes": {},
        }
        self._gen = self._run(
            iter(events), duplicate_rate, malformed_rate, early_outcome_rate, shuffle_window, max_hold
        )

    def __next__(self) -> tuple[str, dict[str, Any] | bytes]:
        return next(self._gen)

    def _push(self, kind: str, payload: Any, tracked_id: str | None) -> None:
        self._buf.append((kind, payload, tracked_id))
        if kind == "prediction" and tracked_id is not None:
            self._buf_preds[tracked_id] += 1

    def _pop(self) -> Iterator[tuple[str, Any]]:
        buf = self._buf
        j = self._rnd.randrange(len(buf))
        kind, _, ident = buf[j]
        if kind == "outcome" and ident is not None and self._buf_preds[ident]:
            # never let the shuffle put an outcome before its prediction: only holds do that
            j = next(i for i, e in enumerate(buf) if e[0] == "prediction" and e[2] == ident)
        buf[j], buf[-1] = buf[-1], buf[j]
        kind, payload, ident = buf.pop()
        if kind == "prediction" and ident is not None:
            self._buf_preds[ident] -= 1
        yield kind, payload
        self.counts["output"] += 1
        if kind == "outcome" and ident is not None and ident in self._held:
            self.counts["early_outcome"] += 1
            yield "prediction", self._held.pop(ident)[1]
            self.counts["output"] += 1

    def _malformed(self, kind: str, payload: Any) -> tuple[str, Any]:
        n = self.counts["malformed"]
        what = MALFORMED_KINDS[n % len(MALFORMED_KINDS)]
        self.counts["malformed"] += 1
        self.counts[f"malformed_{what}"] += 1
        junk = {**self._template, "id": f"junk-{n}"}
        if what == "not_json":
            return kind, b"\xff\x00not json {" + str(n).encode()
        if what == "missing_id":
            base = payload if isinstance(payload, dict) else self._template
            return kind, {k: v for k, v in base.items() if k != "id"}
        if what == "bad_prediction":
            return "prediction", {**junk, "prediction": "maybe"}
        return "prediction", {**junk, "ts": "not-a-timestamp"}

    def _run(
        self,
        events: Iterator[tuple[str, Any]],
        duplicate_rate: float,
        malformed_rate: float,
        early_rate: float,
        window: int,
        max_hold: int,
    ) -> Iterator[tuple[str, Any]]:
        rnd, held = self._rnd, self._held

        def countdown() -> int:
            return int(rnd.expovariate(malformed_rate)) + 1 if malformed_rate > 0 else -1

        until_malformed = countdown()
        for i, (kind, payload) in enumerate(events):
            self.counts["input"] += 1
            ident = payload.get("id") if isinstance(payload, dict) else None
            ident = ident if isinstance(ident, str) else None
            if kind == "prediction" and isinstance(payload, dict):
                self._template = payload
            if kind == "prediction" and ident is not None and ident not in held and rnd.random() < early_rate:
                held[ident] = (i + max_hold, payload)
            else:
                self._push(kind, payload, ident)
                if rnd.random() < duplicate_rate:
                    self._push(kind, payload, ident)
                    self.counts["duplicate"] += 1
            until_malformed -= 1
            if until_malformed == 0:
                self._push(*self._malformed(kind, payload), None)
                until_malformed = countdown()
            while held and next(iter(held.values()))[0] <= i:
                old = next(iter(held))
                self._push("prediction", held.pop(old)[1], old)
                self.counts["held_released"] += 1
            while len(self._buf) > window:
                yield from self._pop()
        for ident, (_, payload) in list(held.items()):
            self._push("prediction", payload, ident)
            self.counts["held_released"] += 1
        held.clear()
        while self._buf:
            yield from self._pop()


def messy(
    events: Iterable[tuple[str, dict[str, Any]]],
    *,
    seed: int,
    duplicate_rate: float = 0.02,
    malformed_rate: float = 0.01,
    early_outcome_rate: float = 0.05,
    shuffle_window: int = 50,
    max_hold: int = 100_000,
) -> MessyStream:
    """Perturb a clean stream the way real topics arrive.

    - local shuffles: events leave through a random buffer of ``shuffle_window`` (never putting
      an outcome before its prediction by itself);
    - early outcomes: a prediction is held with probability ``early_outcome_rate`` until its
      outcome has been emitted (or ``max_hold`` input events have passed);
    - duplicates: an event is re-sent verbatim (the same payload object) with
      ``duplicate_rate``;
    - malformed messages at ``malformed_rate``, cycling through :data:`MALFORMED_KINDS`: bytes
      that are not JSON, a payload without ``id``, ``"prediction": "maybe"``, a non-numeric
      ``ts`` (these use ids ``junk-<n>``).

    >>> stream = messy(generate(SCENARIOS["fair"](), 2_000, seed=3), seed=3)
    >>> events = list(stream)
    >>> all(stream.counts[f"malformed_{k}"] > 0 for k in MALFORMED_KINDS)
    True
    >>> stream.counts["output"] == len(events)
    True
    """
    return MessyStream(
        events,
        seed=seed,
        duplicate_rate=duplicate_rate,
        malformed_rate=malformed_rate,
        early_outcome_rate=early_outcome_rate,
        shuffle_window=shuffle_window,
        max_hold=max_hold,
    )
