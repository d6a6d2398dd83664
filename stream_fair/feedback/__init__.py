"""Feedback-loop indicators and drift detectors (one concept per module).

* :mod:`.coverage` — label coverage and the coverage gap (selective labels)
* :mod:`.delay` — label delay quantiles per group
* :mod:`.traffic` — traffic share against a reference, exposure ratio
* :mod:`.trends` — fast-minus-slow trends of selection rates and disparities
* :mod:`.loop` — the feedback-loop indicator
* :mod:`.drift` — river drift detectors fed batch rates
* :mod:`.monitor` — the tracker's hooks and the snapshot
"""

from __future__ import annotations

from stream_fair.feedback.monitor import (
    DISPARITY_SIGNALS,
    GROUP_SIGNALS,
    FeatureFeedback,
    FeedbackMonitor,
    FeedbackSettings,
    FeedbackSnapshot,
    GroupFeedback,
)

__all__ = [
    "DISPARITY_SIGNALS",
    "GROUP_SIGNALS",
    "FeatureFeedback",
    "FeedbackMonitor",
    "FeedbackSettings",
    "FeedbackSnapshot",
    "GroupFeedback",
]
