"""A broker that stalls while a partition restores from the changelog: the restore is retried.

A first run consumes the stream and stops cleanly (its changelog holds the whole state). A second
one, on an empty disk, restores from the changelog in this process; the first time the restore asks
for the changelog's end offset the broker process is frozen (SIGSTOP) until the request times out
(``kafka.request_timeout_ms``), as in a broker hiccup during a rebalance. Before, the transport's
own error (kafka-python's ``KafkaTimeoutError``, librdkafka's ``_TIMED_OUT``) went up through
``run`` and killed the process with a traceback. Now it is one warning line, one
``errors_total{kind="restore"}``, and after the backoff the restore runs again, from the start,
and the counts equal the recount exactly.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stream_fair.app import Detector
from stream_fair.config import load
from stream_fair.dev.broker import EmbeddedBroker, produce_events
from stream_fair.transport import confluent, kafka_python
from tests.faults.proc import Run, consumed_all, setup
from tests.helpers import recount, scrape, wait_for
from tests.test_replicas import assert_exact, events

pytestmark = [pytest.mark.integration, pytest.mark.transports]

READERS = {
    "kafka-python": kafka_python.KafkaPythonChangelogReader,
    "confluent": confluent.ConfluentChangelogReader,
}


@pytest.fixture
def broker() -> Iterator[EmbeddedBroker]:
    """A broker of this test's own: it is frozen, which the session's shared one must not be."""
    b = EmbeddedBroker().start()
    try:
        yield b
    finally:
        b.stop()


def test_a_broker_stall_during_a_restore_is_retried_and_the_counts_are_exact(
    broker: EmbeddedBroker,
    topic_names: Any,
    group_id: str,
    tmp_path: Path,
    kafka_transport: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    evs = events(2_000, seed=71)
    exp = recount(evs)
    boot = broker.bootstrap_servers
    config = setup(boot, topic_names, group_id, tmp_path, kafka={"request_timeout_ms": 3000})
    produce_events(boot, topic_names.predictions, topic_names.outcomes, evs)
    first = Run(config).start()
    try:
        consumed_all(first, exp.consumed["predictions"], exp.consumed["outcomes"])
    finally:
        assert first.stop() == 0, first.log

    reader_class = READERS[kafka_transport]
    real = reader_class.end_offset
    stalls: list[int] = []

    def stalled(self: Any, partition: int) -> int:
        if stalls:
            return real(self, partition)  # type: ignore[no-any-return]
        stalls.append(partition)
        assert broker.pid is not None
        os.kill(broker.pid, signal.SIGSTOP)  # frozen: connections stay open, nothing answers
        try:
            return real(self, partition)  # type: ignore[no-any-return]
        finally:
            os.kill(broker.pid, signal.SIGCONT)

    monkeypatch.setattr(reader_class, "end_offset", stalled)
    # a new pod: an empty disk, everything comes from the changelog
    cfg = load(config, environ={"STREAM_FAIR_STATE__PATH": str(tmp_path / "empty-disk")})
    detector = Detector(cfg)
    stop = threading.Event()
    died: list[BaseException] = []

    def run() -> None:
        try:
            detector.run(stop)
        except BaseException as exc:  # reported by the test
            died.append(exc)

    loop = threading.Thread(target=run, name="detector", daemon=True)
    with caplog.at_level(logging.WARNING, logger="stream_fair"):
        loop.start()
        try:

            def restored() -> Any:
                assert not died, f"the run loop died: {died[0]!r}"
                s = scrape(detector.port)
                got = s.get("stream_fair_events_consumed_total", topic="predictions")
                return s if got == exp.consumed["predictions"] else None

            s = wait_for(restored, 90, "the partition restored after the stall")
        finally:
            stop.set()
            loop.join(timeout=60)
    assert not died, f"the run loop died: {died[0]!r}"
    assert stalls == [0]
    assert_exact(s, exp)
    read = sum(s.by("stream_fair_records_read_total", ["topic"]).values())
    assert read == 0, f"{read} input records read: the state did not come from the changelog"
    assert s.get("stream_fair_errors_total", kind="restore") == 1
    failed = [r.getMessage() for r in caplog.records if "restore of partitions" in r.getMessage()]
    assert len(failed) == 1 and "[0] failed, retrying in 1 s" in failed[0], failed
    assert "\n" not in failed[0]
