"""Dead letters never fail open (issue 9, item 2).

Before: a rejected record over ~1 MB crashed the process (the dead-letter copy exceeded the
producer's request limit), the restart skipped it and the dead-letter topic never got it; a failed
dead-letter write was counted but the checkpoint moved past the record anyway; dead_letters_total
restarted at 0 while the rejections were restored.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaProducer

from stream_fair.dev import simulate
from stream_fair.dev.broker import consume_topic, produce_events
from tests.faults.netfault import ProxiedBroker
from tests.faults.proc import Run, committed, consumed_all, headers, read_all, setup
from tests.helpers import assert_accounting, recount, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.transports]


def _send_raw(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, max_request_size=8_000_000, acks="all")
    try:
        for v in values:
            producer.send(topic, value=v).get(timeout=30)
    finally:
        producer.close()


def test_oversized_rejected_records_reach_the_dead_letters_truncated(
    kafka_bootstrap: str, topic_names: Any, group_id: str, tmp_path: Path
) -> None:
    config = setup(kafka_bootstrap, topic_names, group_id, tmp_path)
    events = list(
        simulate.generate(simulate.SCENARIOS["lending"](), 200, seed=1, start_ts=time.time() - 3600)
    )
    exp = recount(events)
    produce_events(kafka_bootstrap, topic_names.predictions, topic_names.outcomes, events)
    big_p = b"{" + b"x" * 2_500_000  # not JSON, 2.5 MB: the broker took it
    big_o = b'{"id": "big", "ts": 1, "label": "' + b"y" * 1_500_000 + b'"}'
    _send_raw(kafka_bootstrap, topic_names.predictions, [big_p])
    _send_raw(kafka_bootstrap, topic_names.outcomes, [big_o])
    run = Run(config).start()
    try:
        s = consumed_all(run, exp.consumed["predictions"] + 1, exp.consumed["outcomes"] + 1)
        assert_accounting(s)
        s = wait_for(
            lambda: (x := run.scrape()).get("stream_fair_dead_letters_total", topic="outcomes") and x,
            60,
            "both dead letters acknowledged",
        )
        assert s.by("stream_fair_dead_letters_total", ["topic"]) == {
            ("predictions",): 1.0,
            ("outcomes",): 1.0,
        }
        assert run.stop() == 0, run.log
        assert "Traceback" not in run.log, run.log
    finally:
        run.kill()
    letters = consume_topic(kafka_bootstrap, topic_names.dead_letters)
    assert len(letters) == 2
    for record, original in zip(
        sorted(letters, key=lambda r: headers(r)["stream_fair.source_topic"]), (big_o, big_p), strict=True
    ):
        h = headers(record)
        assert len(record.value) < 1_000_000 and original.startswith(record.value)
        note = h["stream_fair.truncated"].decode()
        assert f"value of {len(original)} bytes cut to {len(record.value)} bytes" in note
        assert h["stream_fair.source_offset"].decode() in note  # the reference to the original

    again = Run(config).start()  # the counters come back with the checkpoint
    try:
        s = wait_for(
            lambda: (x := again.scrape()).get("stream_fair_dead_letters_total", topic="outcomes") and x,
            60,
            "restored counters",
        )
        assert s.by("stream_fair_dead_letters_total", ["topic"]) == {
            ("predictions",): 1.0,
            ("outcomes",): 1.0,
        }
        assert again.stop() == 0, again.log
    finally:
        again.kill()


@pytest.fixture
def proxied() -> Iterator[ProxiedBroker]:
    broker = ProxiedBroker().start()
    try:
        yield broker
    finally:
        broker.stop()


def test_failed_dead_letter_writes_are_retried_counted_and_hold_the_checkpoint(
    proxied: ProxiedBroker, topic_names: Any, group_id: str, tmp_path: Path
) -> None:
    bootstrap = proxied.bootstrap_servers
    config = setup(
        bootstrap, topic_names, group_id, tmp_path,
        kafka={"request_timeout_ms": 3000}, state={"checkpoint_interval": "1s"},
    )  # fmt: skip
    events: list[tuple[str, Any]] = list(
        simulate.generate(simulate.SCENARIOS["lending"](), 100, seed=2, start_ts=time.time() - 3600)
    )
    bad = [("prediction", b"not json %d" % i) for i in range(5)]
    produce_events(bootstrap, topic_names.predictions, topic_names.outcomes, events + bad)
    exp = recount(events + bad)
    # from now on every produce request to the dead-letter topic is refused (the changelog's pass)
    proxied.block_produce_topic = topic_names.dead_letters
    run = Run(config).start()
    try:
        read_all(run, exp.consumed["predictions"], exp.consumed["outcomes"])
        s = wait_for(
            lambda: (
                (x := run.scrape()).get("stream_fair_dead_letter_errors_total", topic="predictions") and x
            ),
            60,
            "failed dead-letter writes counted",
        )
        assert s.get("stream_fair_dead_letters_pending") == 5.0
        assert s.get("stream_fair_dead_letters_total", topic="predictions") == 0.0
        time.sleep(3)  # several checkpoint intervals and write retries pass
        assert not run.exited, run.log
        saved = committed(run)  # one partition: the records checkpointed are its next offsets
        first_bad = exp.consumed["predictions"] - 5
        assert saved[0] <= first_bad, saved  # never past an unsent letter
        assert "dead-letter write" in run.log and "Traceback" not in run.log
        proxied.block_produce_topic = None
        s = wait_for(
            lambda: (
                (x := run.scrape()).get("stream_fair_dead_letters_total", topic="predictions") == 5.0 and x
            ),
            60,
            "the retried dead letters written",
        )
        assert s.get("stream_fair_dead_letters_pending") == 0.0
        errors = s.get("stream_fair_dead_letter_errors_total", topic="predictions")
        assert errors is not None and errors >= 5
        wait_for(lambda: committed(run)[0] == exp.consumed["predictions"], 30, "the checkpoint")
        assert run.stop() == 0, run.log
    finally:
        run.kill()
    letters = consume_topic(bootstrap, topic_names.dead_letters)
    assert sorted(r.value for r in letters) == sorted(v for _, v in bad)


def test_a_dead_letter_backlog_stops_reading_until_the_letters_are_written(
    proxied: ProxiedBroker, topic_names: Any, group_id: str, tmp_path: Path
) -> None:
    """Over 10,000 unsent letters the run loop pauses every partition; once the letters are written
    it resumes them, and each continues exactly where it stopped."""
    bootstrap = proxied.bootstrap_servers
    config = setup(
        bootstrap, topic_names, group_id, tmp_path, partitions=2,
        kafka={"request_timeout_ms": 3000}, state={"checkpoint_interval": "1s"},
    )  # fmt: skip
    bad = [("prediction", b"not json %d" % i) for i in range(12_000)]  # first in both partitions
    events = list(
        simulate.generate(simulate.SCENARIOS["lending"](), 3_000, seed=3, start_ts=time.time() - 3600)
    )
    produce_events(bootstrap, topic_names.predictions, topic_names.outcomes, bad + events)
    exp = recount(bad + events)
    total = exp.consumed["predictions"] + exp.consumed["outcomes"]
    proxied.block_produce_topic = topic_names.dead_letters
    run = Run(config).start()
    try:

        def read(s: Any) -> int:
            return int(sum(s.by("stream_fair_records_read_total", ["topic"]).values()))

        wait_for(
            lambda: (run.scrape().get("stream_fair_dead_letters_pending") or 0) >= 10_000, 60, "the backlog"
        )
        stalled: list[int] = []

        def stopped() -> bool:  # two scrapes a second apart read the same count: reading has stopped
            stalled.append(read(run.scrape()))
            return len(stalled) > 1 and stalled[-1] == stalled[-2]

        wait_for(stopped, 60, "reading to stop", interval=1.0)
        assert stalled[-1] < total, "everything was read despite the backlog"
        proxied.block_produce_topic = None
        s = consumed_all(run, exp.consumed["predictions"], exp.consumed["outcomes"], timeout=120)
        assert_accounting(s)
        wait_for(
            lambda: run.scrape().get("stream_fair_dead_letters_total", topic="predictions") == 12_000.0,
            60,
            "every letter written",
        )
        assert run.stop() == 0, run.log
    finally:
        run.kill()
