"""The feedback metric families on a fresh registry: names, labels, values, zeros, omissions."""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric

from stream_fair.feedback import FeedbackMonitor, FeedbackSettings, FeedbackSnapshot
from stream_fair.feedback.alarms import Alarm, ChangeAlarm
from stream_fair.feedback.coverage import CoverageGap
from stream_fair.feedback.loop import LoopEstimate
from stream_fair.feedback.monitor import FeatureFeedback, GroupFeedback
from stream_fair.feedback_metrics import feedback_families
from stream_fair.groups import feature_keys

EO = "equal_opportunity_difference"
DP = "demographic_parity_difference"


class _Collector:
    def __init__(self, snap: FeedbackSnapshot) -> None:
        self.snap = snap

    def collect(self) -> Iterable[Metric]:
        return feedback_families(self.snap)


def _registry(snap: FeedbackSnapshot) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(_Collector(snap))
    return registry


def _group(**kw: object) -> GroupFeedback:
    base: dict[str, object] = dict(
        predictions=1000,
        positive_predictions=300,
        joined=700,
        expired=100,
        label_coverage=0.875,
        label_delay_seconds={0.5: 60.0, 0.9: 300.0},
        traffic_share=0.25,
        traffic_share_reference=0.3,
        exposure_ratio=0.9,
        selection_rate_trend=-0.01,
        drift_detections={"true_positive_rate": 2},
        last_drift_timestamp_seconds={"true_positive_rate": 1234.0},
    )
    base.update(kw)
    return GroupFeedback(**base)  # type: ignore[arg-type]


def _snapshot() -> FeedbackSnapshot:
    raised = ChangeAlarm(True, 15.2, 13.3, 1, 5000.0)
    quiet = ChangeAlarm(False, 0.4, 13.3, 0, None)
    groups = {
        ("m", "sex", "F"): _group(
            change_alarms={"true_positive_rate": raised, "selection_rate": quiet},
            label_arrival_ratio=0.5,
        ),
        # undefined values must be omitted, not exported as NaN
        ("m", "sex", "M"): _group(
            label_coverage=None,
            traffic_share=None,
            exposure_ratio=None,
            label_delay_seconds={0.5: float("nan")},
            drift_detections={},
            last_drift_timestamp_seconds={},
        ),
    }
    feature = FeatureFeedback(
        label_coverage_gap=CoverageGap(0.3, 0.2, 0.4, True, ("F", "M")),
        disparity_trend={DP: 0.02},
        feedback_loop=LoopEstimate(0.6, 40, True),
        disparity_drift_detections={DP: 1},
        last_disparity_drift_timestamp_seconds={DP: 99.0},
        alarms={
            EO: Alarm(True, 3, 5000.0, "F true_positive_rate", "F", "true_positive_rate", 15.2, 13.3, 3600.0),
            DP: Alarm(False, 0, None, ""),
        },
        label_coverage_flagged=True,
    )
    return FeedbackSnapshot(groups, {("m", "sex"): feature}, 5100.0, 7)


def test_every_family_with_labels_and_values() -> None:
    r = _registry(_snapshot())
    F = {"model": "m", "feature": "sex", "group": "F"}
    M = {**F, "group": "M"}
    mf = {"model": "m", "feature": "sex"}
    get = r.get_sample_value
    assert get("stream_fair_label_coverage", F) == 0.875
    assert get("stream_fair_label_arrival_ratio", F) == 0.5
    assert get("stream_fair_label_delay_seconds", {**F, "quantile": "0.9"}) == 300.0
    assert get("stream_fair_traffic_share", F) == 0.25
    assert get("stream_fair_traffic_share_reference", F) == 0.3
    assert get("stream_fair_exposure_ratio", F) == 0.9
    assert get("stream_fair_selection_rate_trend", F) == -0.01
    tpr = {**F, "signal": "true_positive_rate"}
    assert get("stream_fair_drift_detections_total", tpr) == 2
    assert get("stream_fair_last_drift_timestamp_seconds", tpr) == 1234.0
    assert get("stream_fair_group_change_alarm", tpr) == 1.0
    assert get("stream_fair_group_change_alarms_total", tpr) == 1
    assert get("stream_fair_group_change_statistic", tpr) == 15.2
    assert get("stream_fair_group_change_threshold", tpr) == 13.3
    assert get("stream_fair_last_group_change_alarm_timestamp_seconds", tpr) == 5000.0
    sr = {**F, "signal": "selection_rate"}
    assert get("stream_fair_group_change_alarm", sr) == 0.0
    assert get("stream_fair_last_group_change_alarm_timestamp_seconds", sr) is None
    assert get("stream_fair_label_coverage_gap", mf) == 0.3
    assert get("stream_fair_label_coverage_gap_lower", mf) == 0.2
    assert get("stream_fair_label_coverage_gap_upper", mf) == 0.4
    assert get("stream_fair_label_coverage_gap_flagged", mf) == 1.0
    assert get("stream_fair_disparity_trend", {**mf, "disparity": DP}) == 0.02
    assert get("stream_fair_feedback_loop_indicator", mf) == 0.6
    assert get("stream_fair_feedback_loop_amplifying", mf) == 1.0
    assert get("stream_fair_feedback_loop_pairs", mf) == 40
    assert get("stream_fair_disparity_drift_detections_total", {**mf, "disparity": DP}) == 1
    assert get("stream_fair_last_disparity_drift_timestamp_seconds", {**mf, "disparity": DP}) == 99
    eo = {**mf, "disparity": EO}
    assert get("stream_fair_disparity_alarm", eo) == 1.0
    assert get("stream_fair_disparity_alarms_total", eo) == 3
    assert get("stream_fair_last_disparity_alarm_timestamp_seconds", eo) == 5000.0
    assert get("stream_fair_disparity_alarm_change_point_timestamp_seconds", eo) == 3600.0
    assert get("stream_fair_disparity_alarm", {**mf, "disparity": DP}) == 0.0
    assert get("stream_fair_disparity_alarm_change_point_timestamp_seconds", {**mf, "disparity": DP}) is None
    assert get("stream_fair_feedback_periods_closed_total") == 7
    assert get("stream_fair_feedback_watermark_timestamp_seconds") == 5100.0
    # counters start at 0 for every known label set; undefined gauges are omitted
    assert get("stream_fair_drift_detections_total", {**M, "signal": "selection_rate"}) == 0
    # alarm counters exist where a detector does (from 0); none elsewhere, e.g. on a replica that
    # is not the leader, whose zeros would look like counter resets when the lead moves
    assert get("stream_fair_group_change_alarms_total", {**M, "signal": "selection_rate"}) is None
    assert get("stream_fair_disparity_alarms_total", {**mf, "disparity": DP}) == 0
    eodds = {**mf, "disparity": "equalized_odds_difference"}
    assert get("stream_fair_disparity_alarms_total", eodds) is None  # no status: not exported
    assert get("stream_fair_group_change_alarm", {**M, "signal": "selection_rate"}) is None
    for name in ("label_coverage", "traffic_share", "exposure_ratio"):
        assert get(f"stream_fair_{name}", M) is None
    assert get("stream_fair_label_delay_seconds", {**M, "quantile": "0.5"}) is None
    assert get("stream_fair_traffic_share_reference", M) == 0.3


def test_empty_snapshot_never_raises() -> None:
    r = _registry(FeedbackSnapshot({}, {}, None, 0))
    assert r.get_sample_value("stream_fair_feedback_periods_closed_total") == 0
    assert r.get_sample_value("stream_fair_feedback_watermark_timestamp_seconds") is None


@pytest.mark.parametrize("bad", [float("nan"), None])
def test_undefined_trend_is_omitted(bad: float | None) -> None:
    snap = _snapshot()
    g = _group(selection_rate_trend=bad)
    r = _registry(FeedbackSnapshot({("m", "sex", "F"): g}, snap.features, None, 0))
    labels = {"model": "m", "feature": "sex", "group": "F"}
    assert r.get_sample_value("stream_fair_selection_rate_trend", labels) is None


def test_monitor_snapshot_exports_alarms_and_zero_counters() -> None:
    monitor = FeedbackMonitor(feature_keys(["sex"], []), FeedbackSettings(period=10.0))
    for i in range(6000):  # nine 10-minute slots close: detectors exist
        cell = ("F",) if i % 3 else ("M",)
        monitor.on_prediction("m", cell, i % 2, float(i))
        monitor.on_joined("m", cell, i % 2, (i // 2) % 2, float(i), i + 5.0)
    r = _registry(monitor.snapshot())
    mf = {"model": "m", "feature": "sex"}
    for name in (DP, EO, "equalized_odds_difference"):
        assert r.get_sample_value("stream_fair_disparity_alarm", {**mf, "disparity": name}) == 0.0
        assert r.get_sample_value("stream_fair_disparity_alarms_total", {**mf, "disparity": name}) == 0
    for signal in ("selection_rate", "true_positive_rate", "false_positive_rate"):
        labels = {**mf, "group": "F", "signal": signal}
        assert r.get_sample_value("stream_fair_group_change_alarms_total", labels) == 0
        assert r.get_sample_value("stream_fair_group_change_alarm", labels) == 0.0
    assert r.get_sample_value("stream_fair_label_coverage_gap_flagged", mf) == 0.0
