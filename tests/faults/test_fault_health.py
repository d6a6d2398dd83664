"""Health tells the truth during a broker outage (issue 9, item 7).

The broker process is frozen with SIGSTOP after the group is joined (a hang: connections stay
open, nothing answers). Before, /readyz stayed 200 for the whole hang, the lag read 0 and nothing
said Kafka was gone; readiness, once set, was never cleared.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stream_fair.dev import simulate
from stream_fair.dev.broker import produce_events
from tests.faults.netfault import ProxiedBroker
from tests.faults.proc import Run, consumed_all, setup
from tests.helpers import recount, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.transports]


@pytest.fixture
def broker() -> Iterator[ProxiedBroker]:
    b = ProxiedBroker().start()
    try:
        yield b
    finally:
        b.stop()


def test_readiness_and_kafka_connected_follow_a_broker_hang(
    broker: ProxiedBroker, topic_names: Any, group_id: str, tmp_path: Path
) -> None:
    config = setup(
        broker.bootstrap_servers, topic_names, group_id, tmp_path, kafka={"unavailable_after": "5s"}
    )
    events = list(simulate.generate(simulate.SCENARIOS["lending"](), 100, seed=5, start_ts=1_790_000_000.0))
    produce_events(broker.bootstrap_servers, topic_names.predictions, topic_names.outcomes, events)
    exp = recount(events)
    run = Run(config).start()
    try:
        consumed_all(run, exp.consumed["predictions"], exp.consumed["outcomes"])
        wait_for(lambda: run.status("/readyz") == 200, 60, "ready")
        assert run.scrape().get("stream_fair_kafka_connected") == 1.0
        broker.pause()
        wait_for(lambda: run.status("/readyz") == 503, 60, "/readyz to fail during the hang")
        s = run.scrape()
        assert s.get("stream_fair_kafka_connected") == 0.0
        assert not s.by("stream_fair_consumer_lag", ["topic", "partition"]), "lag is unknown, not 0"
        assert run.status("/healthz") == 200  # the process is fine: no restart would help
        broker.resume()
        wait_for(lambda: run.status("/readyz") == 200, 120, "ready again after the hang")
        assert run.scrape().get("stream_fair_kafka_connected") == 1.0
        assert run.stop() == 0, run.log
    finally:
        broker.resume()
        run.kill()


def test_sigterm_with_the_broker_gone_stops_within_a_grace_period(
    broker: ProxiedBroker, topic_names: Any, group_id: str, tmp_path: Path
) -> None:
    """A pod is stopped while its broker is down (a cluster outage, a node drain). Before, the
    shutdown waited for every request timeout in turn (80 s: past Kubernetes' 30 s grace period,
    so the pod was SIGKILLed) and ended on a traceback from kafka-python's producer close."""
    config = setup(
        broker.bootstrap_servers, topic_names, group_id, tmp_path, kafka={"unavailable_after": "5s"}
    )
    events = list(simulate.generate(simulate.SCENARIOS["lending"](), 100, seed=6, start_ts=1_790_000_000.0))
    produce_events(broker.bootstrap_servers, topic_names.predictions, topic_names.outcomes, events)
    exp = recount(events)
    run = Run(config).start()
    try:
        consumed_all(run, exp.consumed["predictions"], exp.consumed["outcomes"])
        wait_for(lambda: run.status("/readyz") == 200, 60, "ready")
        broker.stop()
        gone = "/readyz to fail once the broker is gone"
        wait_for(lambda: run.exited or run.status("/readyz") == 503, 60, gone)
        assert not run.exited, run.log  # a refused connection does not stop the detector
        assert run.stop(timeout=30) == 0, run.log  # within the grace period, a clean exit status
        assert "Traceback" not in run.log and "Exception ignored" not in run.log, run.log
        assert "stopping while the broker is unreachable" in run.log
        # the clients' reconnect errors are passed once per kind per 10 s (cli.ClientRepeats): a
        # log, not a flood (before: ~80 such lines from kafka-python, ~1,400 from librdkafka)
        refused = [line for line in run.log.splitlines() if "refused" in line.lower()]
        assert len(refused) <= 50, "\n".join(refused[:100])
    finally:
        run.kill()


def test_sigterm_while_a_checkpoint_waits_for_the_changelog_stops_within_a_grace_period(
    broker: ProxiedBroker, topic_names: Any, group_id: str, tmp_path: Path
) -> None:
    """The broker answers but does not acknowledge the changelog's writes (a partition without a
    leader, a full disk on the broker): a checkpoint waits up to kafka.request_timeout_ms for them.
    A SIGTERM during that wait used to wait it out first (here 60 s, past Kubernetes' 30 s grace
    period); now it ends the wait, the shutdown's own checkpoint waits a bounded time, and a
    restart loses nothing and counts nothing twice."""
    config = setup(
        broker.bootstrap_servers, topic_names, group_id, tmp_path, kafka={"request_timeout_ms": 60_000}
    )
    events = list(simulate.generate(simulate.SCENARIOS["lending"](), 200, seed=8, start_ts=1_790_000_000.0))
    first, second = events[: len(events) // 2], events[len(events) // 2 :]
    produce_events(broker.bootstrap_servers, topic_names.predictions, topic_names.outcomes, first)
    run = Run(config).start()
    try:
        part = recount(first)
        consumed_all(run, part.consumed["predictions"], part.consumed["outcomes"])
        broker.block_produce_topic = f"{group_id}-stream-fair-changelog"
        produce_events(broker.bootstrap_servers, topic_names.predictions, topic_names.outcomes, second)
        exp = recount(events)

        def read_past_the_checkpoint() -> bool:  # records the next checkpoint must write
            read = run.scrape().by("stream_fair_records_read_total", ["topic"])
            return sum(read.values()) > part.consumed["predictions"] + part.consumed["outcomes"]

        # not every record of the second half: with the loop held in a 60 s wait, the rest would
        # be read only after it (and the member could be out of the group by then)
        wait_for(read_past_the_checkpoint, 60, "records read past the last checkpoint")
        time.sleep(3.0)  # the next checkpoint has started and waits for the changelog
        started = time.monotonic()
        assert run.stop(timeout=90) == 0, run.log
        took = time.monotonic() - started
        assert took < 25.0, f"stopped {took:.0f} s after SIGTERM (grace period 30 s):\n{run.log[-3000:]}"
        assert "Traceback" not in run.log, run.log
        broker.block_produce_topic = None
        again = Run(config).start()
        try:  # the second half was never committed: read again, counted once
            consumed_all(again, exp.consumed["predictions"], exp.consumed["outcomes"])
            assert again.stop() == 0, again.log
        finally:
            again.kill()
    finally:
        broker.block_produce_topic = None
        run.kill()


def test_a_producer_closed_while_the_broker_does_not_acknowledge_leaves_no_traceback(
    broker: ProxiedBroker, topic_names: Any
) -> None:
    """``close_producer`` with writes the broker never acknowledges (the changelog at shutdown,
    above): kafka-python's close times out and the producer is closed by force. The unsent
    batches were aborted both by the caller and by the sender thread, which raised
    IllegalStateError on a batch aborted twice: a traceback in the log of a clean shutdown."""
    import threading

    from kafka import KafkaProducer

    from stream_fair.transport.kafka_python import close_producer

    broker.block_produce_topic = topic_names.predictions
    errors: list[BaseException] = []
    hook = threading.excepthook
    threading.excepthook = lambda args: errors.append(args.exc_value)  # type: ignore[arg-type,return-value]
    try:
        for _ in range(6):
            producer = KafkaProducer(
                bootstrap_servers=broker.bootstrap_servers,
                acks="all",
                linger_ms=5,
                batch_size=128,
                request_timeout_ms=30_000,
                max_in_flight_requests_per_connection=1_000,
            )
            # a batch per record: the abort loops are long enough to overlap
            futures = [producer.send(topic_names.predictions, b"x" * 100) for _ in range(3000)]
            time.sleep(0.3)  # the first batches are in flight, unacknowledged
            started = time.monotonic()
            close_producer(producer, 0.5)
            assert time.monotonic() - started < 5.0
            producer._sender.join(5.0)
            assert not producer._sender.is_alive()
            assert all(f.is_done for f in futures)  # every unsent record failed, none left waiting
    finally:
        threading.excepthook = hook
        broker.block_produce_topic = None
    assert not errors, repr(errors)
