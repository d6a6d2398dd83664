"""The feedback monitor: the tracker's per-event hooks and the snapshot the exporter reads.

Hot path: each hook touches one row of plain ints per (model, cell) and, for joined pairs,
appends the delay to that row's buffer; nothing per feature. Everything per feature happens
lazily:

* every ``flush_every`` hook calls (and at every snapshot) the delay buffers are binned and the
  drift detectors are fed batch rates (:mod:`.drift`);
* when a prediction's event time crosses a period boundary, the period is closed: traffic shares,
  exposure, reference shares, trends and the loop history are updated from the period's counts.

Predictions whose event time lies before the open period (out of order) count in the open
period. Periods without any prediction are skipped, so the loop indicator pairs the periods on
either side of a gap.

>>> from stream_fair.groups import feature_keys
>>> settings = FeedbackSettings(period=10.0, min_samples=1)
>>> monitor = FeedbackMonitor(feature_keys(["sex"], []), settings)
>>> for i in range(30):
...     cell = ("F",) if i % 3 == 0 else ("M",)
...     monitor.on_prediction("m", cell, int(cell == ("M",)), ts=float(i))
...     if i % 2:
...         monitor.on_joined("m", cell, int(cell == ("M",)), 1, float(i), float(i) + 60.0)
...     else:
...         monitor.on_expired("m", cell, float(i))
>>> snap = monitor.snapshot()
>>> g = snap.groups[("m", "sex", "F")]
>>> g.label_coverage, round(g.traffic_share, 2), g.exposure_ratio
(0.5, 0.3, 0.0)
>>> round(snap.groups[("m", "sex", "M")].label_delay_seconds[0.5])
60
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from stream_fair.feedback.alarms import Alarm, ChangeAlarm
from stream_fair.feedback.alert import AlertCondition
from stream_fair.feedback.change import ChangeSettings
from stream_fair.feedback.coverage import CoverageGap, arrival_ratios, coverage, coverage_gap
from stream_fair.feedback.delay import DelayHistogram
from stream_fair.feedback.drift import BatchedDetector
from stream_fair.feedback.loop import LoopEstimate, loop_indicator
from stream_fair.feedback.traffic import ReferenceShares, exposure_ratios, shares
from stream_fair.feedback.trends import Trend
from stream_fair.groups import Cell, FeatureKey
from stream_fair.sequential import SequentialSettings

GROUP_SIGNALS = ("selection_rate", "true_positive_rate", "false_positive_rate")
"""Per-group signals watched by drift detectors (fairlearn names)."""

DISPARITY_SIGNALS = ("demographic_parity_difference", "equal_opportunity_difference")
"""Per-feature disparities watched by drift detectors and trends."""

# row layout: cumulative predictions, positive predictions, the same in the open period,
# joined, expired, cumulative tp fp tn fn, the same in the open period
_N, _POS, _PN, _PPOS, _J, _E, _TP, _FP, _TN, _FN, _PTP, _PFP, _PTN, _PFN = range(14)
_WIDTH = 14
# (predicted, label) -> index offset of tp/fp/tn/fn
_QUAD = {(1, 1): 0, (1, 0): 1, (0, 0): 2, (0, 1): 3}


@dataclass(frozen=True)
class FeedbackSettings:
    """Settings of the feedback monitor.

    Parameters
    ----------
    detector
        River drift detector for group rates and disparities.
    period
        Event-time seconds per period (traffic share, exposure, trends, loop indicator).
    reference_periods
        Complete periods pooled into the frozen reference traffic share.
    fast_alpha, slow_alpha
        Weights of the newest period in the fast and slow ``EWMean`` of a trend.
    delay_quantiles
        Label-delay quantiles reported per group.
    min_samples
        Minimum predictions (per period, for shares and the loop) or resolved predictions
        (coverage) or trials (disparity drift) for a group to take part.
    drift_batch
        Trials per batch rate fed to a detector.
    detector_params
        Extra keyword arguments of the river detector, as ``(name, value)`` pairs.
    flush_every
        Hook calls between lazy flushes (delay binning, detector feeding).
    coverage_gap_threshold, coverage_alpha
        The coverage gap is flagged when its time-uniform lower bound (level ``coverage_alpha``
        over all groups of the feature) exceeds the threshold.
    arrival_ratio_threshold
        A group's label arrival ratio is flagged when its time-uniform bounds lie wholly below
        this or wholly above its inverse (level ``coverage_alpha`` over the groups).
    loop_window, loop_min_periods, loop_alpha, loop_horizon
        Period pairs in the loop indicator's window; periods a group needs for the share-trend
        test; probability of any false ``amplifying`` within ``loop_horizon`` period closes
        (:mod:`.loop`).
    min_effect, change_alpha, change_horizon, change_batch
        Change detectors (:mod:`.change`): design shift of a group's rate vs the rest, false-raise
        probability over ``change_horizon`` labelled events of a feature, labelled events per
        batch.
    verdict_alpha, verdict_threshold
        Time-uniform verdict (:mod:`stream_fair.sequential`) of the default alarm.

    ``loop_alpha``, ``change_alpha`` and ``verdict_alpha`` hold for *all* the monitor's feature
    keys together (marginals and intersections): the monitor gives each (model, feature)
    ``alpha / n_features`` (Bonferroni, :meth:`per_feature`). They are not split over models,
    which are discovered from the stream: divide them by the number of models yourself.
    """

    detector: Literal["adwin", "page_hinkley"] = "adwin"
    period: float = 3600.0
    reference_periods: int = 24
    fast_alpha: float = 0.3
    slow_alpha: float = 0.05
    delay_quantiles: tuple[float, ...] = (0.5, 0.9, 0.99)
    min_samples: int = 100
    drift_batch: int = 50
    detector_params: tuple[tuple[str, float], ...] = ()
    flush_every: int = 4096
    coverage_gap_threshold: float = 0.05
    coverage_alpha: float = 0.001
    loop_window: int = 48
    loop_min_periods: int = 8
    loop_alpha: float = 0.01
    loop_horizon: int = 10_000
    arrival_ratio_threshold: float = 0.8
    min_effect: float = 0.10
    change_alpha: float = 0.05
    change_horizon: int = 2_000_000
    change_batch: int = 1_000
    verdict_alpha: float = 0.05
    verdict_threshold: float = 0.05

    def per_feature(self, n_features: int) -> FeedbackSettings:
        """The settings one of ``n_features`` feature keys gets: the three alphas divided.

        >>> s = FeedbackSettings(change_alpha=0.04, verdict_alpha=0.08, loop_alpha=0.02)
        >>> p = s.per_feature(4)
        >>> p.change_alpha, p.verdict_alpha, p.loop_alpha
        (0.01, 0.02, 0.005)
        """
        k = max(1, n_features)
        return replace(
            self,
            change_alpha=self.change_alpha / k,
            verdict_alpha=self.verdict_alpha / k,
            loop_alpha=self.loop_alpha / k,
        )

    def alert_settings(self) -> tuple[SequentialSettings, ChangeSettings]:
        """Settings of the two parts of the default alarm (verdict, change detectors)."""
        seq = SequentialSettings(
            alpha=self.verdict_alpha, threshold=self.verdict_threshold, min_samples=self.min_samples
        )
        change = ChangeSettings(
            min_effect=self.min_effect,
            alpha=self.change_alpha,
            horizon=self.change_horizon,
            batch=self.change_batch,
        )
        return seq, change


@dataclass(frozen=True)
class GroupFeedback:
    """Feedback indicators of one (model, feature, group); None where undefined yet."""

    predictions: int
    positive_predictions: int
    joined: int
    expired: int
    label_coverage: float | None
    label_delay_seconds: dict[float, float]
    traffic_share: float | None
    traffic_share_reference: float | None
    exposure_ratio: float | None
    selection_rate_trend: float | None
    drift_detections: dict[str, int]
    last_drift_timestamp_seconds: dict[str, float]
    change_alarms: dict[str, ChangeAlarm] = field(default_factory=dict)
    label_arrival_ratio: float | None = None


@dataclass(frozen=True)
class FeatureFeedback:
    """Feedback indicators of one (model, feature)."""

    label_coverage_gap: CoverageGap | None
    disparity_trend: dict[str, float]
    feedback_loop: LoopEstimate | None
    disparity_drift_detections: dict[str, int]
    last_disparity_drift_timestamp_seconds: dict[str, float]
    alarms: dict[str, Alarm] = field(default_factory=dict)
    label_coverage_flagged: bool = False


@dataclass(frozen=True)
class FeedbackSnapshot:
    """Plain frozen data: ``groups[(model, feature, group)]``, ``features[(model, feature)]``."""

    groups: dict[tuple[str, str, str], GroupFeedback]
    features: dict[tuple[str, str], FeatureFeedback]
    watermark: float | None
    periods_closed: int


class FeedbackMonitor:
    """Coverage, delay, traffic, exposure, trends, loop indicator and drift detectors."""

    def __init__(self, features: Sequence[FeatureKey], settings: FeedbackSettings) -> None:
        self.features = list(features)
        self.settings = settings
        # Bonferroni over the feature keys: what each (model, feature) gets (see FeedbackSettings)
        self._per_feature = settings.per_feature(len(self.features))
        self._rows: dict[tuple[str, Cell], list[int]] = {}
        self._delays: dict[tuple[str, Cell], list[float]] = {}
        self._hist: dict[tuple[str, Cell], DelayHistogram] = {}
        self._ticks = 0
        self._watermark = -math.inf
        self._period_end = -math.inf
        self.periods_closed = 0
        mf = tuple[str, str]
        self._reference: dict[mf, ReferenceShares] = {}
        self._last_period: dict[mf, dict[str, tuple[int, int]]] = {}
        self._history: dict[mf, deque[dict[str, tuple[int, int]]]] = {}
        self._sr_trend: dict[tuple[str, str, str], Trend] = {}
        self._disp_trend: dict[tuple[str, str, str], Trend] = {}
        self._detectors: dict[tuple[str, str, str, str], BatchedDetector] = {}
        self._disp_detectors: dict[tuple[str, str, str], BatchedDetector] = {}
        self._disp_base: dict[tuple[str, str, str], dict[str, tuple[int, int]]] = {}
        self._alerts: dict[tuple[str, str], AlertCondition] = {}

    def __repr__(self) -> str:
        return f"FeedbackMonitor(cells={len(self._rows)}, periods_closed={self.periods_closed})"

    # -- hot path ------------------------------------------------------------------------------
    def on_prediction(self, model: str, cell: Cell, predicted: int, ts: float) -> None:
        if ts >= self._period_end:
            self._roll(ts)
        row = self._rows.get((model, cell))
        if row is None:
            row = self._row(model, cell)
        row[_N] += 1
        row[_PN] += 1
        if predicted:
            row[_POS] += 1
            row[_PPOS] += 1
        if ts > self._watermark:
            self._watermark = ts
        self._ticks += 1
        if self._ticks >= self.settings.flush_every:
            self._flush()

    def on_joined(
        self,
        model: str,
        cell: Cell,
        predicted: int,
        label: int,
        prediction_ts: float,
        outcome_ts: float,
    ) -> None:
        key = (model, cell)
        row = self._rows.get(key)
        if row is None:
            row = self._row(model, cell)
        q = _QUAD[(1 if predicted else 0, 1 if label else 0)]
        row[_J] += 1
        row[_TP + q] += 1
        row[_PTP + q] += 1
        self._delays[key].append(outcome_ts - prediction_ts)
        if outcome_ts > self._watermark:
            self._watermark = outcome_ts
        self._ticks += 1
        if self._ticks >= self.settings.flush_every:
            self._flush()

    def on_expired(self, model: str, cell: Cell, prediction_ts: float) -> None:
        row = self._rows.get((model, cell))
        if row is None:
            row = self._row(model, cell)
        row[_E] += 1
        self._ticks += 1
        if self._ticks >= self.settings.flush_every:
            self._flush()

    def _row(self, model: str, cell: Cell) -> list[int]:
        key = (model, cell)
        row = self._rows[key] = [0] * _WIDTH
        self._delays[key] = []
        self._hist[key] = DelayHistogram()
        return row

    # -- aggregation ---------------------------------------------------------------------------
    def _by_group(self, cols: Sequence[int]) -> dict[tuple[str, str], dict[str, list[int]]]:
        """Sum the given row columns over cells into ``{(model, feature): {group: [...]}}``."""
        out: dict[tuple[str, str], dict[str, list[int]]] = {}
        for (model, cell), row in self._rows.items():
            vals = [row[c] for c in cols]
            for f in self.features:
                acc = out.setdefault((model, f.name), {}).setdefault(f.group(cell), [0] * len(cols))
                for i, v in enumerate(vals):
                    acc[i] += v
        return out

    def _roll(self, ts: float) -> None:
        if self._period_end != -math.inf:
            self._close_period()
        start = math.floor(ts / self.settings.period) * self.settings.period
        self._period_end = start + self.settings.period

    def _close_period(self) -> None:
        s = self.settings
        per = self._by_group((_PN, _PPOS, _PTP, _PFP, _PTN, _PFN))
        if not any(v[0] for groups in per.values() for v in groups.values()):
            return
        self.periods_closed += 1
        for (model, fname), groups in per.items():
            mf = (model, fname)
            counts = {g: (v[0], v[1]) for g, v in groups.items()}
            self._reference.setdefault(mf, ReferenceShares(s.reference_periods)).add(counts)
            self._last_period[mf] = counts
            hist = self._history.setdefault(mf, deque(maxlen=s.loop_window + 1))
            hist.append(counts)
            for g, (n, pos) in counts.items():
                if n:
                    self._trend(self._sr_trend, (model, fname, g)).update(pos / n)
            sr = [pos / n for n, pos in counts.values() if n >= s.min_samples]
            if len(sr) >= 2:
                self._trend(self._disp_trend, (*mf, DISPARITY_SIGNALS[0])).update(max(sr) - min(sr))
            tpr = [v[2] / (v[2] + v[5]) for v in groups.values() if v[2] + v[5] >= s.min_samples]
            if len(tpr) >= 2:
                eo = self._trend(self._disp_trend, (*mf, DISPARITY_SIGNALS[1]))
                eo.update(max(tpr) - min(tpr))
        for row in self._rows.values():
            row[_PN] = row[_PPOS] = row[_PTP] = row[_PFP] = row[_PTN] = row[_PFN] = 0

    def _trend(self, store: dict[tuple[str, str, str], Trend], key: tuple[str, str, str]) -> Trend:
        t = store.get(key)
        if t is None:
            t = store[key] = Trend(self.settings.fast_alpha, self.settings.slow_alpha)
        return t

    def _detector(self, store: dict[Any, BatchedDetector], key: Any) -> BatchedDetector:
        d = store.get(key)
        if d is None:
            s = self.settings
            d = store[key] = BatchedDetector(s.detector, s.drift_batch, **dict(s.detector_params))
        return d

    def _flush(self) -> None:
        self._ticks = 0
        for key, buf in self._delays.items():
            if buf:
                self._hist[key].add(buf)
                buf.clear()
        ts = self._watermark
        for (model, fname), groups in self._by_group((_N, _POS, _TP, _FP, _TN, _FN)).items():
            ratios = {}
            for g, (n, pos, tp, fp, tn, fn) in groups.items():
                ratios[g] = {
                    "selection_rate": (pos, n),
                    "true_positive_rate": (tp, tp + fn),
                    "false_positive_rate": (fp, fp + tn),
                }
                for signal, (num, den) in ratios[g].items():
                    self._detector(self._detectors, (model, fname, g, signal)).feed(num, den, ts)
            for name, rate in zip(DISPARITY_SIGNALS, ("selection_rate", "true_positive_rate"), strict=False):
                cum = {g: r[rate] for g, r in ratios.items()}
                self._feed_disparity((model, fname, name), cum, ts)
            conf = {g: v[2:] for g, v in groups.items()}
            self._alert((model, fname)).feed(conf, ts)

    def _alert(self, key: tuple[str, str]) -> AlertCondition:
        a = self._alerts.get(key)
        if a is None:
            a = self._alerts[key] = AlertCondition(*self._per_feature.alert_settings())
        return a

    def _feed_disparity(self, key: tuple[str, str, str], cum: dict[str, tuple[int, int]], ts: float) -> None:
        """Feed max - min of the groups' batch rates once every established group has a batch.

        Established: at least ``min_samples`` trials so far. A group that stops receiving
        traffic cannot block the detector: after ``20 * drift_batch`` trials per established
        group the batch is fed with the groups that are ready.
        """
        s = self.settings
        base = self._disp_base.get(key, {})
        delta = {}
        for g, (n, d) in cum.items():
            n0, d0 = base.get(g, (0, 0))
            delta[g] = (n - n0, d - d0)
        established = [g for g, (_, d) in cum.items() if d >= s.min_samples]
        ready = [g for g in established if delta[g][1] >= s.drift_batch]
        total = sum(d for _, d in delta.values())
        if len(ready) < 2 or (
            len(ready) < len(established) and total < 20 * s.drift_batch * len(established)
        ):
            return
        rates = [delta[g][0] / delta[g][1] for g in ready]
        self._detector(self._disp_detectors, key).feed_value(max(rates) - min(rates), ts)
        self._disp_base[key] = dict(cum)

    # -- snapshot ------------------------------------------------------------------------------
    def snapshot(self) -> FeedbackSnapshot:
        """Flush, then read every indicator into plain frozen data."""
        self._flush()
        s = self.settings
        totals = self._by_group((_N, _POS, _J, _E, _TP, _FP, _TN, _FN))
        ts = self._watermark if self._watermark != -math.inf else 0.0
        hists: dict[tuple[str, str, str], DelayHistogram] = {}
        for (model, cell), h in self._hist.items():
            for f in self.features:
                hists.setdefault((model, f.name, f.group(cell)), DelayHistogram()).merge(h)
        groups: dict[tuple[str, str, str], GroupFeedback] = {}
        features: dict[tuple[str, str], FeatureFeedback] = {}
        for (model, fname), by_group in totals.items():
            mf = (model, fname)
            last = self._last_period.get(mf, {})
            share_now = shares(last)
            ref = self._reference[mf].shares() if mf in self._reference else {}
            exposure = exposure_ratios(last)
            alert = self._alert(mf)
            alarms = alert.check({g: v[4:] for g, v in by_group.items()}, ts)
            change: dict[str, dict[str, ChangeAlarm]] = {}
            for (g, sig), a in alert.change.alarms().items():
                change.setdefault(g, {})[sig] = a
            arrival = arrival_ratios(
                {g: (v[0], v[2]) for g, v in by_group.items()},
                s.min_samples,
                s.arrival_ratio_threshold,
                s.coverage_alpha,
            )
            for g, (n, pos, joined, expired, *_) in by_group.items():
                key = (model, fname, g)
                gh = hists.get(key)
                qs = gh.quantiles(s.delay_quantiles) if gh is not None and gh.n else []
                trend = self._sr_trend.get(key)
                dets = {
                    sig: self._detectors[(*key, sig)]
                    for sig in GROUP_SIGNALS
                    if (*key, sig) in self._detectors
                }
                groups[key] = GroupFeedback(
                    predictions=n,
                    positive_predictions=pos,
                    joined=joined,
                    expired=expired,
                    label_coverage=coverage(joined, expired),
                    label_delay_seconds=dict(zip(s.delay_quantiles, qs, strict=False)),
                    traffic_share=share_now.get(g),
                    traffic_share_reference=ref.get(g),
                    exposure_ratio=exposure.get(g),
                    selection_rate_trend=trend.get() if trend is not None else None,
                    drift_detections={sig: d.detections for sig, d in dets.items()},
                    last_drift_timestamp_seconds={
                        sig: d.last_ts for sig, d in dets.items() if d.last_ts is not None
                    },
                    change_alarms=change.get(g, {}),
                    label_arrival_ratio=arrival.ratios.get(g),
                )
            resolved = {g: (v[2], v[3]) for g, v in by_group.items()}
            ddets = {
                name: self._disp_detectors[(*mf, name)]
                for name in DISPARITY_SIGNALS
                if (*mf, name) in self._disp_detectors
            }
            history = self._history.get(mf, ())
            gap = coverage_gap(resolved, s.min_samples, s.coverage_gap_threshold, s.coverage_alpha)
            features[mf] = FeatureFeedback(
                label_coverage_gap=gap,
                disparity_trend={
                    name: self._disp_trend[(*mf, name)].get()
                    for name in DISPARITY_SIGNALS
                    if (*mf, name) in self._disp_trend
                },
                feedback_loop=loop_indicator(
                    list(history),
                    s.min_samples,
                    s.loop_min_periods,
                    self._per_feature.loop_alpha,
                    s.loop_horizon,
                ),
                disparity_drift_detections={n: d.detections for n, d in ddets.items()},
                last_disparity_drift_timestamp_seconds={
                    n: d.last_ts for n, d in ddets.items() if d.last_ts is not None
                },
                alarms=alarms,
                label_coverage_flagged=bool((gap is not None and gap.flagged) or arrival.flagged),
            )
        wm = self._watermark if self._watermark != -math.inf else None
        return FeedbackSnapshot(groups, features, wm, self.periods_closed)

    # -- persistence ---------------------------------------------------------------------------
    def to_state(self) -> dict:
        """JSON-serialisable state (river objects travel as base64 pickles)."""
        self._flush()

        def enc(x: float) -> float | None:
            return None if math.isinf(x) else x

        return {
            "version": 1,
            "rows": [[m, list(c), row, self._hist[(m, c)].to_state()] for (m, c), row in self._rows.items()],
            "watermark": enc(self._watermark),
            "period_end": enc(self._period_end),
            "periods_closed": self.periods_closed,
            "reference": [[*k, r.to_state()] for k, r in self._reference.items()],
            "last_period": [[*k, _enc_counts(v)] for k, v in self._last_period.items()],
            "history": [[*k, [_enc_counts(p) for p in v]] for k, v in self._history.items()],
            "sr_trend": [[*k, t.to_state()] for k, t in self._sr_trend.items()],
            "disp_trend": [[*k, t.to_state()] for k, t in self._disp_trend.items()],
            "detectors": [[*k, d.to_state()] for k, d in self._detectors.items()],
            "disp_detectors": [[*k, d.to_state()] for k, d in self._disp_detectors.items()],
            "disp_base": [[*k, _enc_counts(v)] for k, v in self._disp_base.items()],
            "alerts": [[*k, a.to_state()] for k, a in self._alerts.items()],
        }

    @classmethod
    def from_state(
        cls, state: dict, features: Sequence[FeatureKey], settings: FeedbackSettings
    ) -> FeedbackMonitor:
        """Restore :meth:`to_state` output."""
        m = cls(features, settings)
        for model, cell, row, hist in state["rows"]:
            key = (model, tuple(cell))
            m._rows[key] = [int(x) for x in row]
            m._delays[key] = []
            m._hist[key] = DelayHistogram.from_state(hist)
        m._watermark = -math.inf if state["watermark"] is None else float(state["watermark"])
        m._period_end = -math.inf if state["period_end"] is None else float(state["period_end"])
        m.periods_closed = int(state["periods_closed"])
        m._reference = {(a, b): ReferenceShares.from_state(r) for a, b, r in state["reference"]}
        m._last_period = {(a, b): _dec_counts(v) for a, b, v in state["last_period"]}
        for a, b, periods in state["history"]:
            m._history[(a, b)] = deque((_dec_counts(p) for p in periods), maxlen=settings.loop_window + 1)
        m._sr_trend = {(a, b, c): Trend.from_state(t) for a, b, c, t in state["sr_trend"]}
        m._disp_trend = {(a, b, c): Trend.from_state(t) for a, b, c, t in state["disp_trend"]}
        m._detectors = {(a, b, c, d): BatchedDetector.from_state(x) for a, b, c, d, x in state["detectors"]}
        m._disp_detectors = {
            (a, b, c): BatchedDetector.from_state(x) for a, b, c, x in state["disp_detectors"]
        }
        m._disp_base = {(a, b, c): _dec_counts(v) for a, b, c, v in state["disp_base"]}
        seq, change = m._per_feature.alert_settings()
        m._alerts = {(a, b): AlertCondition.from_state(x, seq, change) for a, b, x in state.get("alerts", [])}
        return m


def _enc_counts(counts: dict[str, tuple[int, int]]) -> dict[str, list[int]]:
    return {g: list(v) for g, v in counts.items()}


def _dec_counts(counts: dict[str, list[int]]) -> dict[str, tuple[int, int]]:
    return {g: (int(v[0]), int(v[1])) for g, v in counts.items()}
