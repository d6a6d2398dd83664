"""Prometheus metric families for the feedback monitor's snapshot (the Prometheus edge).

:func:`feedback_families` builds fresh families from one :class:`~stream_fair.feedback.
FeedbackSnapshot` on every scrape (custom-collector style, as the rest of the exporter): no
gauges are mutated per event and no stale label set survives. Counters are exported at 0 for every
label set the snapshot knows, so ``increase()`` sees the first detection; undefined values (None,
NaN) are omitted for their label set. ``docs/metrics.md`` ("Feedback loops and drift") lists every
family with its labels and meaning.

>>> from prometheus_client import CollectorRegistry
>>> from stream_fair.feedback import FeedbackSnapshot
>>> class _C:
...     def collect(self):
...         return feedback_families(FeedbackSnapshot({}, {}, None, 0))
>>> registry = CollectorRegistry()
>>> registry.register(_C())
>>> registry.get_sample_value("stream_fair_feedback_periods_closed_total")
0
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from prometheus_client.core import Metric

from stream_fair.exposition import Rows, counter, gauge
from stream_fair.feedback import DISPARITY_SIGNALS, GROUP_SIGNALS, FeedbackSnapshot
from stream_fair.sequential import DISPARITIES

__all__ = ["feedback_families"]

P = "stream_fair_"
_G = ["model", "feature", "group"]
_F = ["model", "feature"]


def _defined(value: float | None) -> bool:
    return value is not None and not math.isnan(value)


def _gauge(name: str, doc: str, labels: list[str]) -> Rows:
    return gauge(P + name, doc, labels=labels)


def _counter(name: str, doc: str, labels: list[str]) -> Rows:
    return counter(P + name, doc, labels=labels)  # the samples carry the _total suffix


def feedback_families(snapshot: FeedbackSnapshot) -> Iterator[Metric]:
    """Every feedback metric family of one snapshot (see ``docs/metrics.md``)."""
    yield from _group_families(snapshot)
    yield from _feature_families(snapshot)
    periods = _counter("feedback_periods_closed_total", "Feedback periods closed (traffic, trends, loop)", [])
    periods.add_metric([], snapshot.periods_closed)
    yield periods
    if snapshot.watermark is not None:
        wm = _gauge(
            "feedback_watermark_timestamp_seconds",
            "Largest event time the feedback monitor has seen",
            [],
        )
        wm.add_metric([], snapshot.watermark)
        yield wm


def _group_families(snapshot: FeedbackSnapshot) -> Iterator[Metric]:
    cov = _gauge("label_coverage", "Joined over resolved (joined + expired) predictions", _G)
    arrival = _gauge(
        "label_arrival_ratio",
        "Group's share of arrived labels over its share of predictions (1 = labels arrive like predictions)",
        _G,
    )
    delay = _gauge(
        "label_delay_seconds", "Quantile of outcome minus prediction event time", [*_G, "quantile"]
    )
    # quantiles of a distribution: typed as a summary (without _sum/_count), since promtool and
    # Prometheus accept a `quantile` label only there; names and labels are unchanged
    delay.type = "summary"
    share = _gauge("traffic_share", "Group's share of predictions in the last period", _G)
    share_ref = _gauge("traffic_share_reference", "Group's share of predictions in the reference periods", _G)
    exposure = _gauge("exposure_ratio", "Group's selection rate over the overall one, last period", _G)
    sr_trend = _gauge("selection_rate_trend", "Fast minus slow EW mean of the per-period selection rate", _G)
    drift = _counter("drift_detections_total", "River drift detections on a group signal", [*_G, "signal"])
    drift_ts = _gauge(
        "last_drift_timestamp_seconds",
        "Event time of the last drift detection on a group signal",
        [*_G, "signal"],
    )
    change = _gauge(
        "group_change_alarm",
        "1 while the calibrated change detector of a group signal (vs the rest) is raised",
        [*_G, "signal"],
    )
    change_total = _counter(
        "group_change_alarms_total",
        "Raises of the calibrated change detector of a group signal",
        [*_G, "signal"],
    )
    change_stat = _gauge(
        "group_change_statistic",
        "Change detector statistic (larger one-sided CUSUM log e-value, nats)",
        [*_G, "signal"],
    )
    change_thr = _gauge(
        "group_change_threshold",
        "Level at which the change detector raises (nats)",
        [*_G, "signal"],
    )
    change_ts = _gauge(
        "last_group_change_alarm_timestamp_seconds",
        "Event time (watermark) of the last raise of a group's change detector",
        [*_G, "signal"],
    )
    for (model, feature, group), g in sorted(snapshot.groups.items()):
        lab = [model, feature, group]
        if _defined(g.label_coverage):
            cov.add_metric(lab, g.label_coverage)  # type: ignore[arg-type]
        if _defined(g.label_arrival_ratio):
            arrival.add_metric(lab, g.label_arrival_ratio)  # type: ignore[arg-type]
        for q, v in sorted(g.label_delay_seconds.items()):
            if _defined(v):
                delay.add_metric([*lab, f"{q:g}"], v)
        for fam, value in (
            (share, g.traffic_share),
            (share_ref, g.traffic_share_reference),
            (exposure, g.exposure_ratio),
            (sr_trend, g.selection_rate_trend),
        ):
            if _defined(value):
                fam.add_metric(lab, value)  # type: ignore[arg-type]
        for signal in GROUP_SIGNALS:
            sl = [*lab, signal]
            drift.add_metric(sl, g.drift_detections.get(signal, 0))
            if signal in g.last_drift_timestamp_seconds:
                drift_ts.add_metric(sl, g.last_drift_timestamp_seconds[signal])
            alarm = g.change_alarms.get(signal)
            if alarm is None:  # no detector here (e.g. not the leader replica): no counter either
                continue
            change_total.add_metric(sl, alarm.raised_total)
            change.add_metric(sl, 1.0 if alarm.flagged else 0.0)
            change_stat.add_metric(sl, alarm.statistic)
            change_thr.add_metric(sl, alarm.threshold)
            if alarm.last_raised_ts is not None:
                change_ts.add_metric(sl, alarm.last_raised_ts)
    yield from (cov, arrival, delay, share, share_ref, exposure, sr_trend, drift, drift_ts)
    yield from (change, change_total, change_stat, change_thr, change_ts)


def _feature_families(snapshot: FeedbackSnapshot) -> Iterator[Metric]:
    gap = _gauge("label_coverage_gap", "Largest minus smallest group label coverage", _F)
    gap_lo = _gauge("label_coverage_gap_lower", "Time-uniform lower bound of the gap", _F)
    gap_hi = _gauge("label_coverage_gap_upper", "Time-uniform upper bound of the gap", _F)
    gap_flag = _gauge(
        "label_coverage_gap_flagged",
        "1 when labels are selective: the coverage gap or a label arrival ratio is flagged",
        _F,
    )
    d_trend = _gauge(
        "disparity_trend", "Fast minus slow EW mean of the per-period disparity", [*_F, "disparity"]
    )
    loop = _gauge(
        "feedback_loop_indicator",
        "Correlation of a group's selection with its next-period traffic change",
        _F,
    )
    loop_amp = _gauge("feedback_loop_amplifying", "1 when the loop indicator is significantly positive", _F)
    loop_pairs = _gauge("feedback_loop_pairs", "Pairs behind the loop indicator", _F)
    d_drift = _counter(
        "disparity_drift_detections_total",
        "River drift detections on a disparity",
        [*_F, "disparity"],
    )
    d_drift_ts = _gauge(
        "last_disparity_drift_timestamp_seconds",
        "Event time of the last drift detection on a disparity",
        [*_F, "disparity"],
    )
    alarm = _gauge(
        "disparity_alarm",
        "1 while the calibrated alarm (verdict engine) of the disparity is raised",
        [*_F, "disparity"],
    )
    alarm_total = _counter(
        "disparity_alarms_total", "Raises of the calibrated disparity alarm", [*_F, "disparity"]
    )
    alarm_ts = _gauge(
        "last_disparity_alarm_timestamp_seconds",
        "Event time (watermark) of the last raise of the disparity alarm",
        [*_F, "disparity"],
    )
    alarm_cp = _gauge(
        "disparity_alarm_change_point_timestamp_seconds",
        "Estimated change point (event time) of the disparity alarm's last raise or clear",
        [*_F, "disparity"],
    )
    for (model, feature), f in sorted(snapshot.features.items()):
        lab = [model, feature]
        cg = f.label_coverage_gap
        if cg is not None:
            gap.add_metric(lab, cg.value)
            gap_lo.add_metric(lab, cg.lower)
            gap_hi.add_metric(lab, cg.upper)
        gap_flag.add_metric(lab, 1.0 if f.label_coverage_flagged else 0.0)
        for name, value in sorted(f.disparity_trend.items()):
            if _defined(value):
                d_trend.add_metric([*lab, name], value)
        if f.feedback_loop is not None:
            loop.add_metric(lab, f.feedback_loop.value)
            loop_amp.add_metric(lab, 1.0 if f.feedback_loop.amplifying else 0.0)
            loop_pairs.add_metric(lab, f.feedback_loop.pairs)
        for name in DISPARITY_SIGNALS:
            d_drift.add_metric([*lab, name], f.disparity_drift_detections.get(name, 0))
            if name in f.last_disparity_drift_timestamp_seconds:
                d_drift_ts.add_metric([*lab, name], f.last_disparity_drift_timestamp_seconds[name])
        for name in DISPARITIES:
            dl = [*lab, name]
            a = f.alarms.get(name)
            if a is None:
                continue
            alarm_total.add_metric(dl, a.raised_total)
            alarm.add_metric(dl, 1.0 if a.flagged else 0.0)
            if a.last_raised_ts is not None:
                alarm_ts.add_metric(dl, a.last_raised_ts)
            if a.change_point_ts is not None:
                alarm_cp.add_metric(dl, a.change_point_ts)
    yield from (gap, gap_lo, gap_hi, gap_flag, d_trend, loop, loop_amp, loop_pairs)
    yield from (d_drift, d_drift_ts, alarm, alarm_total, alarm_ts, alarm_cp)
