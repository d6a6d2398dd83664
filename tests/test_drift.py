"""Drift detectors fire on onset scenarios and stay silent on the fair one (fixed seeds)."""

from __future__ import annotations

import numpy as np
import pytest

from stream_fair.feedback import FeedbackMonitor, FeedbackSettings
from stream_fair.groups import feature_keys

KEYS = feature_keys(["group"], [])
SHARES = [0.4, 0.3, 0.15, 0.1, 0.05]


def _monitor(detector: str, seed: int, onset: int | None, n: int = 200_000) -> FeedbackMonitor:
    rng = np.random.default_rng(seed)
    g = rng.choice(5, n, p=SHARES)
    y = rng.random(n) < 0.3
    tpr = np.where((g == 1) & (np.arange(n) >= (onset if onset is not None else n)), 0.5, 0.8)
    yhat = np.where(y, rng.random(n) < tpr, rng.random(n) < 0.1)
    params = (("threshold", 3.0), ("delta", 0.005)) if detector == "page_hinkley" else ()
    m = FeedbackMonitor(
        KEYS,
        FeedbackSettings(detector=detector, detector_params=params, flush_every=1000),  # type: ignore[arg-type]
    )
    cells = [("A",), ("B",), ("C",), ("D",), ("E",)]
    for i in range(n):
        cell, p = cells[g[i]], int(yhat[i])
        m.on_prediction("m", cell, p, float(i))
        m.on_joined("m", cell, p, int(y[i]), float(i), float(i) + 5.0)
    return m


@pytest.mark.parametrize("detector", ["adwin", "page_hinkley"])
def test_silent_on_fair_and_firing_after_onset(detector: str) -> None:
    fair = _monitor(detector, seed=11, onset=None).snapshot()
    assert all(n == 0 for g in fair.groups.values() for n in g.drift_detections.values())
    onset = 100_000
    snap = _monitor(detector, seed=12, onset=onset).snapshot()
    b = snap.groups[("m", "group", "B")]
    assert b.drift_detections["true_positive_rate"] >= 1
    assert b.last_drift_timestamp_seconds["true_positive_rate"] > onset
    assert b.drift_detections["false_positive_rate"] == 0
    others = [snap.groups[("m", "group", x)].drift_detections["true_positive_rate"] for x in "ACDE"]
    assert others == [0, 0, 0, 0]
    disparity = snap.features[("m", "group")].disparity_drift_detections
    if detector == "page_hinkley":
        # ADWIN pays for the [0, 1] range of a max-min of five noisy batch rates and does not
        # see this 0.3 shift of one group's TPR within 100k events; PageHinkley does.
        assert disparity["equal_opportunity_difference"] >= 1
