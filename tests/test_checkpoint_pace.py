"""When the run loop checkpoints (and so publishes what /metrics shows): every interval, and sooner
while the consumer is caught up, at a pace bounded by what checkpoints cost."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from stream_fair.app import EARLY_CHECKPOINT_GAP, EARLY_CHECKPOINT_SHARE, Detector
from stream_fair.config import Config
from stream_fair.kafka_io import DeadLetters


@dataclass(frozen=True)
class TP:
    topic: str
    partition: int


@dataclass
class Record:
    offset: int
    key: bytes
    value: bytes
    timestamp: int = 0


class NoGroup:
    """Manual use, as in the benchmarks: offsets are mirrored to no consumer group."""

    def commit_async(self, offsets: Any = None) -> None:
        pass


def detector(tmp_path: Path, **state: Any) -> Detector:
    cfg = Config.model_validate(
        {
            "topics": {"predictions": "p", "outcomes": "o", "dead_letters": None},
            "fairness": {"features": ["sex"]},
            "state": {
                "path": str(tmp_path / "state"),
                "checkpoint_interval": "30s",
                "changelog": False,
                **state,
            },
        }
    )
    d = Detector(cfg, exporter_port=0)
    d.attach(NoGroup(), DeadLetters(cfg))
    d.checkpoint()
    return d


def pair(d: Detector, i: int) -> None:
    """One prediction and its outcome, in one poll."""
    p = {"id": f"r{i}", "ts": 1000 + i, "model": "m", "prediction": 1, "attributes": {"sex": "F"}}
    o = {"id": f"r{i}", "ts": 1001 + i, "label": 1}
    d.process(
        {
            TP("p", 0): [Record(i, f"r{i}".encode(), orjson.dumps(p))],
            TP("o", 0): [Record(i, f"r{i}".encode(), orjson.dumps(o))],
        }
    )


def published(d: Detector) -> int:
    """Joined pairs in the snapshot /metrics reads."""
    snap = d._snapshot
    return 0 if snap is None else snap.fates["outcomes"]["joined"]


def test_a_caught_up_consumer_checkpoints_new_records_at_once_a_lagging_one_waits(tmp_path: Path) -> None:
    d = detector(tmp_path)
    try:
        pair(d, 0)
        d.stats.lag = {("predictions", 0): 0, ("outcomes", 0): 3}  # behind on outcomes
        d.maybe_checkpoint(time.monotonic() + EARLY_CHECKPOINT_GAP)
        assert published(d) == 0  # waits for the interval (30 s) or checkpoint_events
        d.stats.lag = {("predictions", 0): 0, ("outcomes", 0): 0}  # caught up
        d.maybe_checkpoint(time.monotonic() + EARLY_CHECKPOINT_GAP)
        assert published(d) == 1

        # nothing new: no checkpoint, however caught up
        last = d._last_checkpoint_mono
        d.maybe_checkpoint(last + 10.0)
        assert d._last_checkpoint_mono == last
    finally:
        d.close()
        d.server.stop()


def test_early_checkpoints_keep_their_pace_to_what_they_cost(tmp_path: Path) -> None:
    d = detector(tmp_path)
    try:
        d.stats.lag = {("predictions", 0): 0, ("outcomes", 0): 0}
        pair(d, 0)
        d._checkpoint_seconds = 0.5  # the last checkpoint took half a second
        gap = 0.5 / EARLY_CHECKPOINT_SHARE
        assert d._early_gap() == gap > EARLY_CHECKPOINT_GAP
        last = d._last_checkpoint_mono
        d.maybe_checkpoint(last + gap * 0.9)
        assert published(d) == 0
        d.maybe_checkpoint(last + gap)
        assert published(d) == 1
        # and the pace follows the measured cost of the checkpoint just taken
        assert 0.0 <= d._checkpoint_seconds < 0.5
    finally:
        d.close()
        d.server.stop()


def test_without_a_lag_measurement_the_interval_rules(tmp_path: Path) -> None:
    """Manual use (no consumer assignment, so no lag): checkpoints keep the configured cadence."""
    d = detector(tmp_path)
    try:
        pair(d, 0)
        assert d.stats.lag == {}
        d.maybe_checkpoint(time.monotonic() + 1.0)
        assert published(d) == 0
        d.maybe_checkpoint(time.monotonic() + 31.0)
        assert published(d) == 1
    finally:
        d.close()
        d.server.stop()


def test_checkpoint_when_caught_up_false_keeps_the_interval(tmp_path: Path) -> None:
    d = detector(tmp_path, checkpoint_when_caught_up=False)
    try:
        pair(d, 0)
        d.stats.lag = {("predictions", 0): 0, ("outcomes", 0): 0}
        d.maybe_checkpoint(time.monotonic() + 1.0)
        assert published(d) == 0
        d.maybe_checkpoint(time.monotonic() + 31.0)
        assert published(d) == 1
    finally:
        d.close()
        d.server.stop()


def test_the_loop_polls_no_longer_than_until_a_checkpoint_is_due(tmp_path: Path) -> None:
    """An idle consumer that just read a record is back from its poll when the early checkpoint
    falls due, not after the poll's whole timeout (measured: ~200 ms added to the latency)."""
    d = detector(tmp_path)
    try:
        now = time.monotonic()
        assert d._poll_timeout_ms(now) == 200  # nothing to count: the interval (30 s) is far
        d.stats.lag = {("predictions", 0): 0, ("outcomes", 0): 0}
        pair(d, 0)
        d._last_checkpoint_mono = now
        d._checkpoint_seconds = 0.0
        assert d.checkpoint_due() == now + EARLY_CHECKPOINT_GAP
        assert d._poll_timeout_ms(now) == int(1000 * EARLY_CHECKPOINT_GAP)
        assert d._poll_timeout_ms(now + EARLY_CHECKPOINT_GAP / 2) == int(500 * EARLY_CHECKPOINT_GAP)
        assert d._poll_timeout_ms(now + 5.0) == 0  # overdue: a poll returns what is fetched
        d.maybe_checkpoint(now + EARLY_CHECKPOINT_GAP)
        assert published(d) == 1
        assert d._poll_timeout_ms(time.monotonic()) == 200  # counted: nothing is due soon

        # behind: the interval rules, however much is unread
        pair(d, 1)
        d.stats.lag = {("predictions", 0): 5, ("outcomes", 0): 0}
        assert d.checkpoint_due() == d._last_checkpoint_mono + d.config.state.checkpoint_interval
        assert d._poll_timeout_ms(time.monotonic()) == 200

        # a failed checkpoint's retry time holds the next one back, and the poll waits for it
        d.stats.lag = {("predictions", 0): 0, ("outcomes", 0): 0}
        d._retry_at = d._last_checkpoint_mono + 0.15
        assert d.checkpoint_due() == d._retry_at
        d.maybe_checkpoint(d._retry_at - 0.01)
        assert published(d) == 1
        d.maybe_checkpoint(d._retry_at)
        assert published(d) == 2
    finally:
        d.close()
        d.server.stop()


def test_checkpoint_events_make_a_checkpoint_due_at_once(tmp_path: Path) -> None:
    d = detector(tmp_path, checkpoint_events=2)
    try:
        pair(d, 0)  # two records
        assert d.checkpoint_due() <= d._last_checkpoint_mono
        assert d._poll_timeout_ms(time.monotonic()) == 0
        d.maybe_checkpoint(time.monotonic())
        assert published(d) == 1
    finally:
        d.close()
        d.server.stop()
