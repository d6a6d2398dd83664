"""The feedback monitor: the tracker's per-event hooks and the snapshot the exporter reads.

Hot path: each hook touches one row of plain ints per (model, cell) and, for joined pairs,
appends the delay to that row's buffer; nothing per feature. Everything per feature happens
lazily:

* every ``flush_every`` hook calls (and at every snapshot) the delay buffers are binned and the
  drift detectors are fed batch rates (:mod:`.drift`);
* when a prediction's event time crosses a period boundary, the period is closed: traffic shares,
  exposure, reference shares, trends and the loop history are updated from the period's counts;
* the default alarm is the verdict engine (:mod:`stream_fair.verdict`): the hooks count into an
  :class:`~stream_fair.verdict.IncrementBuilder` (one row per model, cell, cohort and slot) and
  every flush hands the rows to the engine as one increment, the monitor's watermark (largest
  event time seen) closing slots; new alarm events are logged.

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

import logging
import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import orjson

from stream_fair.counts import EXPIRED, FN, FP, PRED0, PRED1, SLOT, TN, TP, PartitionCounts, add_rows
from stream_fair.disparity import DISPARITY_RATES
from stream_fair.fairness import rate_parts
from stream_fair.feedback.alarms import Alarm, ChangeAlarm
from stream_fair.feedback.coverage import CoverageGap, arrival_ratios, coverage, coverage_gap
from stream_fair.feedback.delay import DelayHistogram
from stream_fair.feedback.drift import BatchedDetector, make_detector
from stream_fair.feedback.loop import LoopEstimate, loop_indicator
from stream_fair.feedback.traffic import ReferenceShares, exposure_ratios, shares
from stream_fair.feedback.trends import Trend
from stream_fair.groups import Cell, FeatureKey
from stream_fair.verdict import (
    AlarmEvent,
    DisparityStatus,
    IncrementBuilder,
    ScoreBins,
    VerdictEngine,
    VerdictSettings,
)
from stream_fair.verdict.settings import RATES_WATCHED

log = logging.getLogger(__name__)

GROUP_SIGNALS = RATES_WATCHED
"""Per-group signals watched by drift detectors (fairlearn names; the verdict's rates)."""

DISPARITY_SIGNALS = ("demographic_parity_difference", "equal_opportunity_difference")
"""Per-feature disparities watched by drift detectors and trends (their rates:
:data:`stream_fair.disparity.DISPARITY_RATES`)."""

# the monitor's own row per (model, cell): the open period's predictions, positive predictions and
# confusion counts (stream_fair.counts.CONFUSION order). The cumulative counts are not here: they
# are the tracker's count rows (stream_fair.counts.PartitionCounts), read at flush and snapshot time
_PN, _PPOS, _PTP, _PFP, _PTN, _PFN = range(6)
_WIDTH = 6
_QUAD = SLOT  # (label, predicted) -> offset of its confusion count
STATE_VERSION = 2
"""Version of :meth:`FeedbackMonitor.to_state` / the per-key entries. 2: cumulative counts read from
the tracker's count store (not in the monitor's state when attached), one entry per detector, trend,
row and (model, feature) so a checkpoint writes only what changed."""
VERSION_ERROR = (
    "feedback state version {got} is not {want} (a state written by an older stream-fair): "
    "start on a new state directory"
)


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
    min_effect, clear_effect, alarm_alpha, alarm_clear_alpha, alarm_horizon, cohort_period,
    alarm_slot, open_cohorts, score_range, score_bins, use_scores, alarm_weighting
        The default alarm (:class:`~stream_fair.verdict.VerdictSettings`: ``min_effect``,
        ``clear_effect``, ``alpha``, ``clear_alpha``, ``horizon``, ``period``, ``slot``,
        ``open_cohorts``, ``bins = ScoreBins(*score_range, score_bins)``, ``use_scores``,
        ``weighting``); see :meth:`verdict_settings`.

    ``loop_alpha`` and ``alarm_alpha`` hold for *all* the monitor's feature keys together
    (marginals and intersections): the loop test gives each (model, feature)
    ``loop_alpha / n_features`` (Bonferroni, :meth:`per_feature`), the verdict engine spreads
    ``alarm_alpha`` over the features itself. They are not split over models, which are
    discovered from the stream: divide them by the number of models yourself.
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
    clear_effect: float = 0.05
    alarm_alpha: float = 0.05
    alarm_clear_alpha: float = 0.05
    alarm_horizon: float = 365 * 86400.0
    cohort_period: float = 3600.0
    alarm_slot: float = 600.0
    open_cohorts: int = 24
    score_range: tuple[float, float] = (0.0, 1.0)
    score_bins: int = 20
    use_scores: bool = True
    alarm_weighting: Literal["traffic", "uniform"] = "traffic"

    def __post_init__(self) -> None:
        """Fail at construction, naming the setting, on what would fail or mislead later.

        >>> FeedbackSettings(loop_window=6)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: loop_min_periods 8 exceeds the 7 periods loop_window 6 keeps: ...
        """
        self.verdict_settings()  # the alarm's settings
        Trend(self.fast_alpha, self.slow_alpha)  # 0 < slow_alpha < fast_alpha <= 1
        try:
            make_detector(self.detector, **dict(self.detector_params))
        except TypeError as exc:
            params = dict(self.detector_params)
            raise ValueError(
                f"detector_params {params} do not fit detector {self.detector!r}: {exc}"
            ) from None
        if not self.delay_quantiles or not all(0.0 < q < 1.0 for q in self.delay_quantiles):
            raise ValueError(
                "delay_quantiles are fractions in (0, 1), e.g. [0.5, 0.9, 0.99]; "
                f"got {list(self.delay_quantiles)}"
            )
        if not self.period > 0:
            raise ValueError(f"period must be positive, e.g. 3600 (1h); got {self.period!r}")
        for name in ("reference_periods", "min_samples", "drift_batch", "flush_every", "loop_horizon"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1; got {getattr(self, name)!r}")
        if self.loop_min_periods < 3:
            raise ValueError(
                f"loop_min_periods must be at least 3 (a trend test); got {self.loop_min_periods!r}"
            )
        if self.loop_min_periods > self.loop_window + 1:
            raise ValueError(
                f"loop_min_periods {self.loop_min_periods} exceeds the {self.loop_window + 1} periods "
                f"loop_window {self.loop_window} keeps: the feedback-loop test could never flag; set "
                f"loop_window to at least {self.loop_min_periods - 1} or lower loop_min_periods"
            )
        for name in ("coverage_alpha", "loop_alpha"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"{name} must lie in (0, 1), e.g. 0.01; got {getattr(self, name)!r}")
        if not 0.0 < self.arrival_ratio_threshold <= 1.0:
            raise ValueError(
                f"arrival_ratio_threshold must lie in (0, 1], e.g. 0.8; got {self.arrival_ratio_threshold!r}"
            )
        if not 0.0 <= self.coverage_gap_threshold < 1.0:
            raise ValueError(
                f"coverage_gap_threshold must lie in [0, 1), e.g. 0.05; got {self.coverage_gap_threshold!r}"
            )

    def per_feature(self, n_features: int) -> FeedbackSettings:
        """The settings one of ``n_features`` feature keys gets: ``loop_alpha`` divided.

        >>> FeedbackSettings(loop_alpha=0.02).per_feature(4).loop_alpha
        0.005
        """
        return replace(self, loop_alpha=self.loop_alpha / max(1, n_features))

    def loop_test(self, periods: Sequence[Mapping[str, tuple[int, int]]]) -> LoopEstimate | None:
        """The feedback-loop test (:func:`~stream_fair.feedback.loop.loop_indicator`) over closed
        periods, with these settings: for one feature key, call it on :meth:`per_feature`'s."""
        return loop_indicator(
            periods, self.min_samples, self.loop_min_periods, self.loop_alpha, self.loop_horizon
        )

    def verdict_settings(self) -> VerdictSettings:
        """Settings of the default alarm, the verdict engine.

        >>> FeedbackSettings(alarm_slot=300.0).verdict_settings().slot
        300.0
        """
        return VerdictSettings(
            period=self.cohort_period,
            slot=self.alarm_slot,
            min_effect=self.min_effect,
            clear_effect=self.clear_effect,
            alpha=self.alarm_alpha,
            clear_alpha=self.alarm_clear_alpha,
            horizon=self.alarm_horizon,
            open_cohorts=self.open_cohorts,
            bins=ScoreBins(self.score_range[0], self.score_range[1], self.score_bins),
            use_scores=self.use_scores,
            weighting=self.alarm_weighting,
        )


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
    alarm_events: tuple[AlarmEvent, ...] = ()


class FeedbackMonitor:
    """Coverage, delay, traffic, exposure, trends, loop indicator and drift detectors.

    The cumulative counts (predictions, positives, joined, expired, confusion counts per cell) are
    read from a count store (:class:`~stream_fair.counts.PartitionCounts`) at flush and snapshot
    time, never kept twice: a monitor used alone counts into its own store from the hooks; in the
    pipeline the tracker calls :meth:`attach` with its owned shards' stores, and the hooks then
    count only what those stores do not have (the open period's counts, delays).
    """

    def __init__(self, features: Sequence[FeatureKey], settings: FeedbackSettings) -> None:
        self.features = list(features)
        self.settings = settings
        # Bonferroni over the feature keys: what each (model, feature) gets (see FeedbackSettings)
        self._per_feature = settings.per_feature(len(self.features))
        self._rows: dict[tuple[str, Cell], list[int]] = {}
        self._delays: dict[tuple[str, Cell], list[float]] = {}
        self._hist: dict[tuple[str, Cell], DelayHistogram] = {}
        # the cumulative counts: its own store until attach() gives it the tracker's
        self._own: PartitionCounts | None = PartitionCounts(math.inf)
        own = self._own
        self._source: Callable[[], Mapping[int, PartitionCounts]] = lambda: {-1: own}
        # the partitions whose counts the detectors' bases cover: partition -> its store (None:
        # restored from a checkpoint, adopted without a rebase when its store, from the same
        # checkpoint, is loaded)
        self._covered: dict[int, PartitionCounts | None] = {-1: own}
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
        verdict = settings.verdict_settings()
        self._builder = IncrementBuilder(verdict.period, verdict.slot, verdict.bins)
        self.verdict = VerdictEngine(self.features, verdict)
        self._logged = 0  # sequence number of the last alarm event logged
        # False when the alarm is the model-wide one (stream_fair.leader): the run loop then sets
        # ``verdict`` to the leader's engine (or an empty one) and the hooks do not count for it
        self.local_verdict = True
        # what changed since the last checkpoint (entry keys, see changes()); _writing: the keys of
        # a checkpoint not yet committed (back into _dirty if it fails)
        self._dirty: set[tuple[Any, ...]] = set()
        self._writing: set[tuple[Any, ...]] = set()
        self._verdict_written = False
        self._vdet_written: set[tuple[Any, ...]] = set()
        self._restored_partitions: list[int] = []  # covered when the restored state was written
        self._rebase_due = False

    def __repr__(self) -> str:
        return f"FeedbackMonitor(cells={len(self._rows)}, periods_closed={self.periods_closed})"

    def attach(self, source: Callable[[], Mapping[int, PartitionCounts]]) -> None:
        """Read the cumulative counts from ``source()`` (the owned partitions' count stores) instead
        of counting them: the hooks then keep only the open period's counts and the delays.

        When the stores ``source()`` returns change (a partition gained or lost, restored), the
        drift detectors' and disparity bases are reset to the new cumulative counts at the next
        flush, so a rebalance never reaches a detector as a jump in a rate.
        """
        self._own = None
        self._source = source
        self._covered = {p: None for p in self._restored_partitions}
        self._dirty.discard(("counts",))

    # -- hot path ------------------------------------------------------------------------------
    def on_prediction(self, model: str, cell: Cell, predicted: int, ts: float) -> None:
        if ts >= self._period_end:
            self._roll(ts)
        key = (model, cell)
        row = self._rows.get(key)
        if row is None:
            row = self._row(key)
        row[_PN] += 1
        if predicted:
            row[_PPOS] += 1
        own = self._own
        if own is not None:
            own.rows[own.cell(model, cell)][PRED1 if predicted else PRED0] += 1
        self._dirty.add(key)
        if self.local_verdict:
            self._builder.add_prediction(model, cell, predicted, ts)
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
        score: float | None = None,
    ) -> None:
        key = (model, cell)
        row = self._rows.get(key)
        if row is None:
            row = self._row(key)
        q = _QUAD[1 if label else 0, 1 if predicted else 0]
        row[_PTP + q] += 1
        own = self._own
        if own is not None:
            own.rows[own.cell(model, cell)][TP + q] += 1
        self._dirty.add(key)
        self._delays[key].append(outcome_ts - prediction_ts)
        if self.local_verdict:
            self._builder.add_labelled(model, cell, predicted, label, prediction_ts, outcome_ts, score)
        if outcome_ts > self._watermark:
            self._watermark = outcome_ts
        self._ticks += 1
        if self._ticks >= self.settings.flush_every:
            self._flush()

    def on_expired(self, model: str, cell: Cell, prediction_ts: float) -> None:
        own = self._own
        if own is not None:
            key = (model, cell)
            if key not in self._rows:
                self._row(key)
            own.rows[own.cell(model, cell)][EXPIRED] += 1
            self._dirty.add(key)
        self._ticks += 1
        if self._ticks >= self.settings.flush_every:
            self._flush()

    def _row(self, key: tuple[str, Cell]) -> list[int]:
        row = self._rows[key] = [0] * _WIDTH
        self._delays[key] = []
        self._hist[key] = DelayHistogram()
        self._dirty.add(key)
        return row

    # -- aggregation ---------------------------------------------------------------------------
    def _cumulative(self, sources: Iterable[PartitionCounts]) -> dict[tuple[str, Cell], list[int]]:
        """The cumulative count rows (:data:`stream_fair.counts.ROW` layout) summed over the
        stores, fresh lists (a copy: the stores may move on)."""
        out: dict[tuple[str, Cell], list[int]] = {}
        for pc in sources:
            for key, row in zip(pc.keys, pc.rows, strict=True):
                acc = out.get(key)
                if acc is None:
                    if any(row):
                        out[key] = list(row)
                else:
                    add_rows(acc, row)
        return out

    def _by_group(
        self, rows: Mapping[tuple[str, Cell], Sequence[int]], cols: Sequence[int]
    ) -> dict[tuple[str, str], dict[str, list[int]]]:
        """Sum the given row columns over cells into ``{(model, feature): {group: [...]}}``."""
        return _by_group(self.features, rows, cols)

    def _totals(self, sources: Iterable[PartitionCounts]) -> dict[tuple[str, str], dict[str, list[int]]]:
        """``{(model, feature): {group: [n, pos, joined, expired, tp, fp, tn, fn]}}`` (cumulative)."""
        return _totals(self.features, self._cumulative(sources))

    def _roll(self, ts: float) -> None:
        if self._period_end != -math.inf:
            self._close_period()
        start = math.floor(ts / self.settings.period) * self.settings.period
        self._period_end = start + self.settings.period

    def _close_period(self) -> None:
        s = self.settings
        per = self._by_group(self._rows, range(_WIDTH))
        if not any(v[0] for groups in per.values() for v in groups.values()):
            return
        self.periods_closed += 1
        dirty = self._dirty
        for (model, fname), groups in per.items():
            mf = (model, fname)
            dirty.add(("mf", model, fname))
            counts = {g: (v[0], v[1]) for g, v in groups.items()}
            self._reference.setdefault(mf, ReferenceShares(s.reference_periods)).add(counts)
            self._last_period[mf] = counts
            hist = self._history.setdefault(mf, deque(maxlen=s.loop_window + 1))
            hist.append(counts)
            for g, (n, pos) in counts.items():
                if n:
                    self._trend(self._sr_trend, "srt", (model, fname, g)).update(pos / n)
            sr = [pos / n for n, pos in counts.values() if n >= s.min_samples]
            if len(sr) >= 2:
                self._trend(self._disp_trend, "dt", (*mf, DISPARITY_SIGNALS[0])).update(max(sr) - min(sr))
            tpr = [
                num / den
                for v in groups.values()
                for num, den in (rate_parts("true_positive_rate", v[2:]),)
                if den >= s.min_samples
            ]
            if len(tpr) >= 2:
                eo = self._trend(self._disp_trend, "dt", (*mf, DISPARITY_SIGNALS[1]))
                eo.update(max(tpr) - min(tpr))
        for key, row in self._rows.items():
            if any(row):
                row[:] = [0] * _WIDTH
                dirty.add(key)

    def _trend(self, store: dict[tuple[str, str, str], Trend], tag: str, key: tuple[str, str, str]) -> Trend:
        t = store.get(key)
        if t is None:
            t = store[key] = Trend(self.settings.fast_alpha, self.settings.slow_alpha)
        self._dirty.add((tag, *key))
        return t

    def _detector(self, store: dict[Any, BatchedDetector], tag: str, key: Any) -> BatchedDetector:
        d = store.get(key)
        if d is None:
            s = self.settings
            d = store[key] = BatchedDetector(s.detector, s.drift_batch, **dict(s.detector_params))
            self._dirty.add((tag, *key))
        return d

    def flush(self) -> None:
        """Bin the delays, feed the drift detectors and the verdict engine now (the hooks do it
        every ``flush_every`` calls; the tracker calls it around a change of owned partitions)."""
        self._flush()

    def _flush(self) -> None:
        self._ticks = 0
        for key, buf in self._delays.items():
            if buf:
                self._hist[key].add(buf)
                buf.clear()
        ts = self._watermark
        sources = self._source()
        totals = self._totals(sources.values())
        ratios_by_mf: dict[tuple[str, str], dict[str, dict[str, tuple[int, int]]]] = {}
        for mf, groups in totals.items():
            ratios = ratios_by_mf[mf] = {}
            for g, (n, pos, _, _, *quad) in groups.items():
                # the selection rate over every prediction (labelled or not), the others over the
                # labelled pairs
                ratios[g] = {
                    signal: (pos, n) if signal == "selection_rate" else rate_parts(signal, quad)
                    for signal in GROUP_SIGNALS
                }
        if self._ownership_changed(sources):
            self._rebase(ratios_by_mf)
            self._covered = dict(sources)
        dirty = self._dirty
        for (model, fname), ratios in ratios_by_mf.items():
            for g, by_signal in ratios.items():
                for signal, (num, den) in by_signal.items():
                    dkey = (model, fname, g, signal)
                    d = self._detector(self._detectors, "det", dkey)
                    den0 = d.den
                    d.feed(num, den, ts)
                    if d.den != den0:
                        dirty.add(("det", *dkey))
            for name in DISPARITY_SIGNALS:
                (rate,) = DISPARITY_RATES[name]
                cum = {g: r[rate] for g, r in ratios.items()}
                self._feed_disparity((model, fname, name), cum, ts)
        if not self.local_verdict:
            return
        if len(self._builder):
            watermark = None if self._watermark == -math.inf else self._watermark
            self.verdict.update(self._builder.build("local", watermark))
            dirty.add(("verdict",))
            dirty.update(("vdet", *k) for k in self.verdict.touched)
            self.verdict.touched.clear()
        for event in self.verdict.events_after(self._logged):
            log.warning("%s", event.message())
            self._logged = event.seq
            dirty.add(("verdict",))

    def _ownership_changed(self, sources: Mapping[int, PartitionCounts]) -> bool:
        """Whether the stores differ from those the bases cover (identity: a partition gained,
        lost or loaded again); a restored partition's store is adopted as it is."""
        covered = self._covered
        changed, self._rebase_due = self._rebase_due, False
        for p, pc in sources.items():
            c = covered.get(p, False)
            if c is pc:
                continue
            if c is None:
                covered[p] = pc  # the checkpoint the monitor was restored from: already covered
            else:
                changed = True
        return changed or any(c is not None and p not in sources for p, c in covered.items())

    def settle(self) -> None:
        """Every partition of this replica's assignment is loaded: partitions the restored state
        covered that did not come back are dropped from the bases (a rebase, as on a rebalance)."""
        if any(c is None for c in self._covered.values()):
            self._flush()  # adopts what is loaded
            if any(c is None for c in self._covered.values()):
                self._covered = {p: c for p, c in self._covered.items() if c is not None}
                self._rebase_due = True
                self._flush()

    def _rebase(self, ratios_by_mf: dict[tuple[str, str], dict[str, dict[str, tuple[int, int]]]]) -> None:
        """The counts now cover other partitions: detectors and disparity bases start from them."""
        for key, d in self._detectors.items():
            model, fname, g, signal = key
            d.num, d.den = ratios_by_mf.get((model, fname), {}).get(g, {}).get(signal, (0, 0))
            self._dirty.add(("det", *key))
        for bkey in list(self._disp_base):
            model, fname, name = bkey
            (rate,) = DISPARITY_RATES[name]
            self._disp_base[bkey] = {g: r[rate] for g, r in ratios_by_mf.get((model, fname), {}).items()}
            self._dirty.add(("ddet", *bkey))

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
        self._detector(self._disp_detectors, "ddet", key).feed_value(max(rates) - min(rates), ts)
        self._disp_base[key] = dict(cum)
        self._dirty.add(("ddet", *key))

    # -- snapshot ------------------------------------------------------------------------------
    def snapshot(self) -> FeedbackSnapshot:
        """Flush, then read every indicator into plain frozen data."""
        return self.capture().compute()

    def capture(self) -> FeedbackCapture:
        """Flush and copy what the snapshot needs, in O(cells + detectors) (call it where the
        monitor and the count stores cannot change, e.g. under the consumer lock); the math runs
        in :meth:`FeedbackCapture.compute`, which touches nothing shared and can run outside it."""
        sources = self._source()
        if self._ticks or any(self._covered.get(p, False) is not pc for p, pc in sources.items()):
            self._flush()  # else nothing arrived since the last flush
        verdict_alarms = self.verdict.alarms()
        change: dict[tuple[str, str, str], dict[str, ChangeAlarm]] = {}
        for (model, fname, g, rate), d in self.verdict.detectors().items():
            change.setdefault((model, fname, g), {})[rate] = ChangeAlarm(
                d.flagged, d.statistic, d.threshold, d.raised_total, d.last_raised_ts
            )
        return FeedbackCapture(
            features=self.features,
            settings=self.settings,
            cumulative=self._cumulative(sources.values()),
            hists={k: h.counts.copy() for k, h in self._hist.items()},
            last_period=dict(self._last_period),
            reference={mf: r.shares() for mf, r in self._reference.items()},
            history={mf: list(h) for mf, h in self._history.items()},
            sr_trend={k: t.get() for k, t in self._sr_trend.items()},
            disp_trend={k: t.get() for k, t in self._disp_trend.items()},
            detectors={k: (d.detections, d.last_ts) for k, d in self._detectors.items()},
            disp_detectors={k: (d.detections, d.last_ts) for k, d in self._disp_detectors.items()},
            verdict_alarms=verdict_alarms,
            change=change,
            local_verdict=self.local_verdict,
            watermark=self._watermark if self._watermark != -math.inf else None,
            periods_closed=self.periods_closed,
            events=self.verdict.events,
        )

    # -- persistence ---------------------------------------------------------------------------
    def to_state(self) -> dict:
        """JSON-serialisable state, plain data only (never a pickle: loading runs no code).

        The same content as the entries :meth:`changes` writes one by one; attached to the
        tracker's count stores, the cumulative counts are theirs and not in it."""
        self._flush()
        entries = self._entries(None)
        return _state_from_entries({k: entries[k] for k in sorted(entries, key=orjson.dumps)})

    def changes(self) -> dict[tuple[Any, ...], Any]:
        """The entries that changed since the last :meth:`committed` (``None``: delete the key),
        each a plain JSON-able value under a tuple key: ``("meta",)``, ``("verdict",)``,
        ``("counts",)`` (a monitor alone), ``("row", model, cell)``, ``("mf", model, feature)``,
        ``("srt" | "dt", model, feature, group | disparity)``,
        ``("det", model, feature, group, signal)``, ``("ddet", model, feature, disparity)``,
        ``("vdet", model, feature, group, rate)`` (a detector of the local verdict engine).
        Until :meth:`committed`, a new call writes them again (a failed checkpoint loses nothing)."""
        self._flush()
        self._dirty |= self._writing
        self._writing, self._dirty = self._dirty, set()
        if not self._verdict_written:
            self._writing.add(("verdict",))  # a new monitor's engine is written once, even idle
        out = self._entries(self._writing)
        self._verdict_written = self.local_verdict
        if self.local_verdict:
            self._vdet_written.update(k for k in out if k[0] == "vdet")
        else:
            self._vdet_written = set()
        return out

    def committed(self) -> None:
        """The entries of the last :meth:`changes` are durable."""
        self._writing = set()

    def _entries(self, keys: set[tuple[Any, ...]] | None) -> dict[tuple[Any, ...], Any]:
        """Entries for ``keys`` (every entry when None), in a deterministic order."""

        def enc(x: float) -> float | None:
            return None if math.isinf(x) else x

        out: dict[tuple[Any, ...], Any] = {
            ("meta",): {
                "version": STATE_VERSION,
                "watermark": enc(self._watermark),
                "period_end": enc(self._period_end),
                "periods_closed": self.periods_closed,
                "partitions": sorted(p for p in self._covered if p >= 0),
            }
        }
        want = (lambda k: True) if keys is None else keys.__contains__
        if self.local_verdict:
            if want(("verdict",)):
                out[("verdict",)] = {"state": self.verdict.to_state(detectors=False), "logged": self._logged}
            for vk in self.verdict.detector_keys():
                if want(("vdet", *vk)):
                    out[("vdet", *vk)] = self.verdict.detector_state(vk)
        elif keys is not None:  # the model-wide engine is the leader's: drop the local one
            if self._verdict_written:
                out[("verdict",)] = None
            for vk in self._vdet_written:
                out[vk] = None
        own = self._own
        if own is not None and (keys is None or any(k in self._rows for k in keys)):
            out[("counts",)] = [own.row_document(i) for i in range(len(own.rows))]
        for seq, (key, row) in enumerate(self._rows.items()):  # seq: restored in this order
            if want(key):
                out[("row", key[0], key[1])] = [row, self._hist[key].to_state(), seq]
        for mf in self._reference:
            if want(("mf", *mf)):
                out[("mf", *mf)] = {
                    "reference": self._reference[mf].to_state(),
                    "last_period": _enc_counts(self._last_period.get(mf, {})),
                    "history": [_enc_counts(p) for p in self._history.get(mf, ())],
                }
        for tag, store in (("srt", self._sr_trend), ("dt", self._disp_trend)):
            for k, t in store.items():
                if want((tag, *k)):
                    out[(tag, *k)] = t.to_state()
        for dk, d in self._detectors.items():
            if want(("det", *dk)):
                out[("det", *dk)] = d.to_state()
        for bk in self._disp_base.keys() | self._disp_detectors.keys():
            if want(("ddet", *bk)):
                dd = self._disp_detectors.get(bk)
                out[("ddet", *bk)] = {
                    "detector": None if dd is None else dd.to_state(),
                    "base": _enc_counts(self._disp_base[bk]) if bk in self._disp_base else None,
                }
        return out

    @classmethod
    def from_entries(
        cls, entries: dict[tuple[Any, ...], Any], features: Sequence[FeatureKey], settings: FeedbackSettings
    ) -> FeedbackMonitor:
        """Restore the entries :meth:`changes` wrote (all of them, as read back from the store)."""
        return cls.from_state(_state_from_entries(entries), features, settings)

    @classmethod
    def from_state(
        cls, state: dict, features: Sequence[FeatureKey], settings: FeedbackSettings
    ) -> FeedbackMonitor:
        """Restore :meth:`to_state` output."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(VERSION_ERROR.format(got=state.get("version"), want=STATE_VERSION))
        m = cls(features, settings)
        for model, cell, row, hist, _ in state["rows"]:
            key = (model, tuple(cell))
            m._rows[key] = [int(x) for x in row]
            m._delays[key] = []
            m._hist[key] = DelayHistogram.from_state(hist)
        if state.get("counts") is not None and m._own is not None:
            for i, doc in enumerate(state["counts"]):
                m._own.load_row(i, doc)
        m._watermark = -math.inf if state["watermark"] is None else float(state["watermark"])
        m._period_end = -math.inf if state["period_end"] is None else float(state["period_end"])
        m.periods_closed = int(state["periods_closed"])
        m._restored_partitions = [int(p) for p in state.get("partitions", [])]
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
        if state.get("verdict") is not None:
            m.verdict = VerdictEngine.from_state(state["verdict"], features, settings.verdict_settings())
            m._logged = int(state["logged"])
            m._verdict_written = True
            m._vdet_written = {("vdet", *k) for k in m.verdict.detector_keys()}
        return m


def _state_from_entries(entries: dict[tuple[Any, ...], Any]) -> dict[str, Any]:
    """The :meth:`FeedbackMonitor.to_state` document of a set of entries."""
    meta = entries.get(("meta",))
    if meta is None:
        raise ValueError(VERSION_ERROR.format(got=None, want=STATE_VERSION))
    state: dict[str, Any] = {
        **meta,
        "rows": [],
        "counts": entries.get(("counts",)),
        "reference": [],
        "last_period": [],
        "history": [],
        "sr_trend": [],
        "disp_trend": [],
        "detectors": [],
        "disp_detectors": [],
        "disp_base": [],
    }
    vdets = []
    for key, v in entries.items():
        tag, rest = key[0], list(key[1:])
        if v is None:
            continue
        if tag == "vdet":
            vdets.append((rest, v))
        elif tag == "verdict":
            state["verdict"], state["logged"] = v["state"], v["logged"]
        elif tag == "row":
            state["rows"].append([*rest, *v])  # model, cell, row, hist, seq
        elif tag == "mf":
            state["reference"].append([*rest, v["reference"]])
            state["last_period"].append([*rest, v["last_period"]])
            state["history"].append([*rest, v["history"]])
        elif tag == "srt":
            state["sr_trend"].append([*rest, v])
        elif tag == "dt":
            state["disp_trend"].append([*rest, v])
        elif tag == "det":
            state["detectors"].append([*rest, v])
        elif tag == "ddet":
            if v["detector"] is not None:
                state["disp_detectors"].append([*rest, v["detector"]])
            if v["base"] is not None:
                state["disp_base"].append([*rest, v["base"]])
    state["rows"].sort(key=lambda r: r[4])  # the monitor's order (its period counts sum in it)
    if "verdict" in state:  # the engine's detectors, stored one by one
        models = state["verdict"]["models"]
        for (model, *k), v in vdets:
            models[model]["detectors"].append([*k, v])
    return state


def _by_group(
    features: Sequence[FeatureKey], rows: Mapping[tuple[str, Cell], Sequence[int]], cols: Sequence[int]
) -> dict[tuple[str, str], dict[str, list[int]]]:
    """Sum the given row columns over cells into ``{(model, feature): {group: [...]}}``."""
    out: dict[tuple[str, str], dict[str, list[int]]] = {}
    width = len(cols)
    for (model, cell), row in rows.items():
        vals = [row[c] for c in cols]
        for f in features:
            acc = out.setdefault((model, f.name), {}).setdefault(f.group(cell), [0] * width)
            for i, v in enumerate(vals):
                acc[i] += v
    return out


def _totals(
    features: Sequence[FeatureKey], cumulative: dict[tuple[str, Cell], list[int]]
) -> dict[tuple[str, str], dict[str, list[int]]]:
    """``{(model, feature): {group: [n, pos, joined, expired, tp, fp, tn, fn]}}`` of count rows."""
    wide = {
        k: (
            r[PRED0] + r[PRED1],
            r[PRED1],
            r[TP] + r[FP] + r[TN] + r[FN],
            r[EXPIRED],
            r[TP],
            r[FP],
            r[TN],
            r[FN],
        )
        for k, r in cumulative.items()
    }
    return _by_group(features, wide, range(8))


@dataclass
class FeedbackCapture:
    """What :meth:`FeedbackMonitor.capture` copied: plain data no one else holds."""

    features: Sequence[FeatureKey]
    settings: FeedbackSettings
    cumulative: dict[tuple[str, Cell], list[int]]
    hists: dict[tuple[str, Cell], Any]
    last_period: dict[tuple[str, str], dict[str, tuple[int, int]]]
    reference: dict[tuple[str, str], dict[str, float]]
    history: dict[tuple[str, str], list[dict[str, tuple[int, int]]]]
    sr_trend: dict[tuple[str, str, str], float]
    disp_trend: dict[tuple[str, str, str], float]
    detectors: dict[tuple[str, str, str, str], tuple[int, float | None]]
    disp_detectors: dict[tuple[str, str, str], tuple[int, float | None]]
    verdict_alarms: dict[tuple[str, str, str], DisparityStatus]
    change: dict[tuple[str, str, str], dict[str, ChangeAlarm]]
    local_verdict: bool
    watermark: float | None
    periods_closed: int
    events: tuple[AlarmEvent, ...]
    loop_history: dict[tuple[str, str], list[dict[str, tuple[int, int]]]] | None = None
    """The model-wide feedback-loop test's closed periods (the leader's fold, from every partition;
    ``{}`` on the other replicas): when set, the loop test runs on them instead of this replica's
    own :attr:`history`, per (model, feature)."""

    @property
    def alarm_events(self) -> tuple[AlarmEvent, ...]:
        """The alarm log, as :attr:`FeedbackSnapshot.alarm_events` (read without computing)."""
        return self.events

    def compute(self) -> FeedbackSnapshot:
        """Every indicator, as plain frozen data."""
        s = self.settings
        totals = _totals(self.features, self.cumulative)
        change = self.change
        verdict_alarms = self.verdict_alarms
        hists: dict[tuple[str, str, str], DelayHistogram] = {}
        for (model, cell), counts in self.hists.items():
            for f in self.features:
                key = (model, f.name, f.group(cell))
                h = hists.get(key)
                if h is None:
                    h = hists[key] = DelayHistogram()
                h.counts += counts
        groups: dict[tuple[str, str, str], GroupFeedback] = {}
        features: dict[tuple[str, str], FeatureFeedback] = {}
        history = self.history if self.loop_history is None else self.loop_history

        per_feature = s.per_feature(len(self.features))

        def loop_test(mf: tuple[str, str]) -> LoopEstimate | None:
            return per_feature.loop_test(history.get(mf, []))

        for (model, fname), by_group in totals.items():
            mf = (model, fname)
            last = self.last_period.get(mf, {})
            share_now = shares(last)
            ref = self.reference.get(mf, {})
            exposure = exposure_ratios(last)
            alarms = {name: _alarm(st) for (m, f, name), st in verdict_alarms.items() if (m, f) == mf}
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
                dets = {
                    sig: self.detectors[(*key, sig)] for sig in GROUP_SIGNALS if (*key, sig) in self.detectors
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
                    selection_rate_trend=self.sr_trend.get(key),
                    drift_detections={sig: d[0] for sig, d in dets.items()},
                    last_drift_timestamp_seconds={sig: d[1] for sig, d in dets.items() if d[1] is not None},
                    change_alarms=change.get(key, {}),
                    label_arrival_ratio=arrival.ratios.get(g),
                )
            resolved = {g: (v[2], v[3]) for g, v in by_group.items()}
            ddets = {
                name: self.disp_detectors[(*mf, name)]
                for name in DISPARITY_SIGNALS
                if (*mf, name) in self.disp_detectors
            }
            gap = coverage_gap(resolved, s.min_samples, s.coverage_gap_threshold, s.coverage_alpha)
            features[mf] = FeatureFeedback(
                label_coverage_gap=gap,
                disparity_trend={
                    name: self.disp_trend[(*mf, name)]
                    for name in DISPARITY_SIGNALS
                    if (*mf, name) in self.disp_trend
                },
                feedback_loop=loop_test(mf),
                disparity_drift_detections={n: d[0] for n, d in ddets.items()},
                last_disparity_drift_timestamp_seconds={
                    n: d[1] for n, d in ddets.items() if d[1] is not None
                },
                alarms=alarms,
                label_coverage_flagged=bool((gap is not None and gap.flagged) or arrival.flagged),
            )
        if not self.local_verdict:  # the leader's engine saw groups and models this replica did not
            for (model, fname, name), st in verdict_alarms.items():
                if (model, fname) not in features:
                    features[(model, fname)] = FeatureFeedback(None, {}, loop_test((model, fname)), {}, {})
                features[(model, fname)].alarms[name] = _alarm(st)
            for key, alarms_by_rate in change.items():
                if key not in groups:
                    groups[key] = GroupFeedback(0, 0, 0, 0, None, {}, None, None, None, None, {}, {})
                groups[key].change_alarms.update(alarms_by_rate)
        return FeedbackSnapshot(groups, features, self.watermark, self.periods_closed, self.events)


def _alarm(status: DisparityStatus) -> Alarm:
    """The exporter's record of one verdict-engine alarm."""
    last = status.last_event
    return Alarm(
        flagged=status.flagged,
        raised_total=status.raised_total,
        last_raised_ts=status.last_raised_ts,
        reason="; ".join(f"{g} {r}" for g, r in status.raised_by),
        group=last.group if last else None,
        rate=last.rate if last else None,
        statistic=last.statistic if last else None,
        threshold=last.threshold if last else None,
        change_point_ts=last.change_point_ts if last else None,
    )


def _enc_counts(counts: dict[str, tuple[int, int]]) -> dict[str, list[int]]:
    return {g: list(v) for g, v in counts.items()}


def _dec_counts(counts: dict[str, list[int]]) -> dict[str, tuple[int, int]]:
    return {g: (int(v[0]), int(v[1])) for g, v in counts.items()}
