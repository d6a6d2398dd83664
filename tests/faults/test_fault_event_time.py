"""A far-future or wrong-unit timestamp must not poison a partition (issue 9, item 1).

Before the event-time guard, one prediction stamped 9999-12-31 (or in milliseconds where seconds
are configured) moved the watermark to the far future: every waiting prediction expired at once,
their outcomes were never joined, and the watermark survived a restart.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from stream_fair.dev import simulate
from stream_fair.dev.broker import consume_topic, produce_events
from tests.faults.proc import Run, consumed_all, headers, setup
from tests.helpers import assert_accounting, recount, wait_for

pytestmark = pytest.mark.integration


def test_far_future_and_millisecond_timestamps_are_rejected_not_believed(
    kafka_bootstrap: str, topic_names: Any, group_id: str, tmp_path: Path
) -> None:
    start = time.time() - 30 * 86400  # a backlog a month old, read in one go
    scenario = simulate.SCENARIOS["lending"](label_delay_mean_s=600.0)
    events: list[tuple[str, Any]] = list(simulate.generate(scenario, 1500, seed=3, start_ts=start))
    exp = recount(events)
    p_ts = next(e[1]["ts"] for e in events[len(events) // 2 :] if e[0] == "prediction")
    bad = [
        ("prediction", {"id": "y9999", "ts": "9999-12-31T23:59:59Z", "model": "credit-v3", "prediction": 1}),
        ("prediction", {"id": "ms", "ts": int(p_ts * 1000), "model": "credit-v3", "prediction": 0}),
        ("outcome", {"id": "ms-out", "ts": int(p_ts * 1000), "label": 1}),
    ]
    # processing time instead of event time: plausible on its own, a month ahead of the backlog
    jump = ("prediction", {"id": "now", "ts": time.time(), "model": "credit-v3", "prediction": 1})
    half = len(events) // 2
    stream = events[:half] + bad + [jump] + events[half:]
    config = setup(kafka_bootstrap, topic_names, group_id, tmp_path, join={"ttl": "1d"})
    produce_events(kafka_bootstrap, topic_names.predictions, topic_names.outcomes, stream)

    run = Run(config).start()
    try:
        n_p = exp.consumed["predictions"] + 3
        n_o = exp.consumed["outcomes"] + 1
        s = consumed_all(run, n_p, n_o)
        assert_accounting(s)
        for topic in ("predictions", "outcomes"):
            assert (
                s.get("stream_fair_event_fates_total", topic=topic, fate="joined")
                == exp.fates[topic]["joined"]
            )
            assert s.get("stream_fair_event_fates_total", topic=topic, fate="expired") in (None, 0.0)
            assert s.get("stream_fair_event_fates_total", topic=topic, fate="late") in (None, 0.0)
        rejected = s.by("stream_fair_rejected_events_total", ["topic", "reason"])
        assert rejected == {("predictions", "future_timestamp"): 2.0, ("outcomes", "future_timestamp"): 1.0}
        newest = max(e[1]["ts"] for e in events)
        watermark = s.get("stream_fair_watermark_timestamp_seconds")
        assert watermark is not None and watermark <= newest + 900  # allowed_skew, not a month
        keys = ["model", "group", "actual", "predicted"]
        in_window = sum(s.by("stream_fair_window_confusion", keys, window="1d", feature="sex").values())
        assert in_window == exp.fates["predictions"]["joined"], "the 1d window lost pairs"
        assert run.stop() == 0, run.log
    finally:
        run.kill()

    letters = consume_topic(kafka_bootstrap, topic_names.dead_letters)
    reasons = sorted(
        (headers(r)["stream_fair.reason"].decode(), headers(r)["stream_fair.detail"].decode())
        for r in letters
    )
    assert [r for r, _ in reasons] == ["future_timestamp"] * 3
    assert sum("looks like milliseconds" in d for _, d in reasons) == 2

    again = Run(config).start()  # the watermark that survives the restart is the sane one
    try:
        restored = wait_for(
            lambda: again.scrape().get("stream_fair_watermark_timestamp_seconds"), 60, "the restored shard"
        )
        assert restored == watermark
        assert again.stop() == 0, again.log
    finally:
        again.kill()
