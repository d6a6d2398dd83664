"""The transport contract (``stream_fair/transport/base.py``) on the real broker, for each client.

Every test marked ``transports`` runs once with kafka-python and once with confluent-kafka; the
run loop's own tests (pipeline, crash, replicas, faults) run on both as well. These pin down the
semantics the run loop relies on and that the two clients do not share by themselves: paused
partitions return nothing and resume exactly where they stopped, positions are known right after
a seek and reach the high-water mark at the end, members get co-partitioned inputs, the changelog
reader stops at the end offsets taken at start, a changelog flush never passes over a failure.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from stream_fair import transport
from stream_fair.config import Config
from stream_fair.dev.broker import create_topics, produce_events
from stream_fair.errors import BrokerError
from stream_fair.transport import ClientError, GroupConsumer, ShardListener, TopicPartition
from stream_fair.transport.changelog import changelog_topic
from tests.conftest import TopicNames
from tests.faults.netfault import ProxiedBroker
from tests.helpers import detector_config, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.transports]


def _config(bootstrap: str, topics: TopicNames, group_id: str, tmp_path: Path, **kafka: Any) -> Config:
    return Config.model_validate(
        detector_config(bootstrap, topics, group_id, tmp_path / "state", kafka=kafka)
    )


def _fill(bootstrap: str, topics: TopicNames, partitions: int, n: int) -> None:
    create_topics(bootstrap, [topics.predictions, topics.outcomes], partitions=partitions)
    events: list[tuple[str, Any]] = []
    for i in range(n):
        events.append(("prediction", {"id": f"id-{i}", "ts": 1_000 + i}))
        if i % 2 == 0:
            events.append(("outcome", {"id": f"id-{i}", "ts": 1_000 + i, "label": 1}))
    produce_events(bootstrap, topics.predictions, topics.outcomes, events)


class Member:
    """One group consumer with the run loop's listener, recording what moves and what is read."""

    def __init__(self, config: Config) -> None:
        self.consumer: GroupConsumer = transport.make_consumer(config)
        self.topics = (config.topics.predictions, config.topics.outcomes)
        self.assigned: list[set[int]] = []
        self.revoked: list[set[int]] = []
        self.read: list[tuple[str, int, int]] = []
        self.closed = False
        listener = ShardListener(self.consumer, self.topics, self.revoked.append, self.assigned.append)
        self.consumer.subscribe(list(self.topics), listener)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.consumer.close()

    def poll(self, timeout_ms: int = 100) -> int:
        n = 0
        for tp, records in self.consumer.poll(timeout_ms, 500).items():
            offsets = [r.offset for r in records]
            assert offsets == sorted(offsets), tp
            assert all((r.topic, r.partition) == (tp.topic, tp.partition) for r in records)
            self.read += [(tp.topic, tp.partition, o) for o in offsets]
            n += len(records)
        return n

    def wait_assigned(self, timeout: float = 60) -> set[int]:
        wait_for(lambda: self.poll() >= 0 and self.assigned, timeout, "the first assignment")
        return self.assigned[-1]


@pytest.fixture
def member_factory() -> Iterator[Any]:
    members: list[Member] = []

    def make(config: Config) -> Member:
        members.append(Member(config))
        return members[-1]

    yield make
    for m in members:
        m.close()


def _exactly_once(read: Sequence[tuple[str, int, int]], ends: dict[tuple[str, int], int]) -> None:
    seen = Counter(read)
    assert max(seen.values(), default=1) == 1, [k for k, n in seen.items() if n > 1][:5]
    want = {(t, p, o) for (t, p), end in ends.items() for o in range(end)}
    assert set(seen) == want, (len(seen), len(want))


def _ends(bootstrap: str, topics: Sequence[str]) -> dict[tuple[str, int], int]:
    from kafka import KafkaConsumer
    from kafka import TopicPartition as KTP

    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    try:
        tps = [KTP(t, p) for t in topics for p in sorted(c.partitions_for_topic(t) or ())]
        return {(tp.topic, tp.partition): int(o) for tp, o in c.end_offsets(tps).items()}
    finally:
        c.close()


def test_assigned_inputs_stay_paused_until_resumed_then_read_exactly_once(
    kafka_bootstrap: str, topic_names: TopicNames, group_id: str, tmp_path: Path, member_factory: Any
) -> None:
    _fill(kafka_bootstrap, topic_names, partitions=3, n=3_000)
    ends = _ends(kafka_bootstrap, topic_names[:2])
    cfg = _config(kafka_bootstrap, topic_names, group_id, tmp_path)
    a = member_factory(cfg)
    assert a.consumer.last_heard() is None  # not a member yet
    shards = a.wait_assigned()
    assert shards == {0, 1, 2}
    owned = a.consumer.assignment()
    assert owned == {TopicPartition(t, p) for t in topic_names[:2] for p in shards}
    assert a.consumer.paused() == owned  # the listener paused every input partition
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        assert a.poll() == 0, "a paused partition returned records"
    assert all(a.consumer.position(tp) is None or a.consumer.position(tp) == 0 for tp in owned)
    # a checkpoint for the predictions of shard 0 only; the rest starts by auto_offset_reset
    transport.resume_at(a.consumer, topic_names[:2], 0, [10, None])
    assert a.consumer.position(TopicPartition(topic_names.predictions, 0)) == 10  # known at once
    for s in (1, 2):
        transport.resume_at(a.consumer, topic_names[:2], s, [None, None])
    assert not a.consumer.paused()
    total = sum(ends.values()) - 10
    wait_for(lambda: a.poll(200) >= 0 and len(a.read) >= total, 60, f"{total} records read")
    skipped = {(topic_names.predictions, 0, o) for o in range(10)}
    _exactly_once([*a.read, *skipped], ends)
    # at the end: positions reach the high-water marks, so nothing counts as behind
    wait_for(lambda: a.poll() >= 0 and set(transport.lag(a.consumer).values()) == {0}, 30, "lag 0")
    assert {(tp.topic, tp.partition): a.consumer.position(tp) for tp in owned} == ends
    heard = a.consumer.last_heard()
    assert heard is not None and heard <= time.monotonic()
    wait_for(lambda: a.poll() >= 0 and (a.consumer.last_heard() or 0) > heard, 30, "a newer heartbeat")


def test_pause_holds_records_back_and_resume_continues_exactly(
    kafka_bootstrap: str, topic_names: TopicNames, group_id: str, tmp_path: Path, member_factory: Any
) -> None:
    _fill(kafka_bootstrap, topic_names, partitions=1, n=20_000)
    ends = _ends(kafka_bootstrap, topic_names[:2])
    a = member_factory(_config(kafka_bootstrap, topic_names, group_id, tmp_path))
    a.wait_assigned()
    transport.resume_at(a.consumer, topic_names[:2], 0, [0, 0])
    predictions = TopicPartition(topic_names.predictions, 0)

    def read() -> int:
        return sum(1 for r in a.read if r[0] == predictions.topic)

    for at_least in (2_000, 8_000, 14_000):  # pause mid-stream: the client has fetched ahead by now
        wait_for(lambda n=at_least: a.poll(200) >= 0 and read() >= n, 60, f"{at_least} predictions")
        a.consumer.pause(predictions)
        position, before = a.consumer.position(predictions), read()
        assert position == 1 + max(o for t, _, o in a.read if t == predictions.topic)
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            a.poll()
        assert read() == before, f"{read() - before} records of a paused partition were returned"
        assert a.consumer.position(predictions) == position
        assert a.consumer.paused() == {predictions}
        a.consumer.resume(predictions)
    wait_for(lambda: a.poll(200) >= 0 and len(a.read) >= sum(ends.values()), 60, "every record")
    _exactly_once(a.read, ends)


def test_a_poll_returns_a_record_when_it_arrives_not_at_the_timeout(
    kafka_bootstrap: str, topic_names: TopicNames, group_id: str, tmp_path: Path, member_factory: Any
) -> None:
    """The run loop's poll waits up to 200 ms; a record must not wait that long (nor for more
    records to fill ``max_records``: librdkafka's ``consume(n, timeout)`` alone does)."""
    create_topics(kafka_bootstrap, [topic_names.predictions, topic_names.outcomes], partitions=1)
    a = member_factory(_config(kafka_bootstrap, topic_names, group_id, tmp_path))
    a.wait_assigned()
    transport.resume_at(a.consumer, topic_names[:2], 0, [None, None])
    wait_for(lambda: a.poll() >= 0 and set(transport.lag(a.consumer).values()) == {0}, 30, "caught up")
    for i in range(3):
        event = [("prediction", {"id": f"r{i}"})]
        writer = threading.Timer(
            0.3, produce_events, (kafka_bootstrap, topic_names.predictions, topic_names.outcomes, event)
        )
        writer.start()
        t0 = time.monotonic()
        n = 0
        while not n and time.monotonic() - t0 < 30:  # a poll may also end with an empty fetch
            n = a.poll(10_000)  # far longer than the record takes to arrive
        took = time.monotonic() - t0
        writer.join()
        assert n == 1
        assert took < 5.0, f"polls held an arrived record for {took:.1f} s"


def test_members_get_co_partitioned_inputs_and_the_offset_mirror(
    kafka_bootstrap: str, topic_names: TopicNames, group_id: str, tmp_path: Path, member_factory: Any
) -> None:
    """Two members in one group, each polling in its own thread (as two processes would)."""
    _fill(kafka_bootstrap, topic_names, partitions=4, n=400)
    cfg = _config(kafka_bootstrap, topic_names, group_id, tmp_path)
    a = member_factory(cfg)
    a.wait_assigned()
    stop = threading.Event()
    b: list[Member] = []
    errors: list[BaseException] = []

    def run_b() -> None:
        try:
            b.append(member_factory(cfg))
            while not stop.is_set():
                b[0].poll()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run_b, daemon=True)
    thread.start()
    try:

        def split() -> bool:
            a.poll()
            assert not errors, errors
            if not b or not b[0].assigned or not a.revoked:
                return False
            return a.assigned[-1] | b[0].assigned[-1] == {0, 1, 2, 3} and len(a.assigned) >= 2

        wait_for(split, 90, "the partitions split over two members")
        assert a.revoked[0] == {0, 1, 2, 3}  # the first owner was told before the split
        assert a.assigned[-1] and b[0].assigned[-1] and not a.assigned[-1] & b[0].assigned[-1]
        for m in (a, b[0]):  # partition p of both topics: the same member
            owned = m.consumer.assignment()
            shards = m.assigned[-1]
            assert owned == {TopicPartition(t, p) for t in topic_names[:2] for p in shards}
        # the offset mirror: what a lag tool reads for the group
        mine = sorted(a.assigned[-1])
        transport.commit_offsets(a.consumer, topic_names[:2], {p: [p + 1, None] for p in mine})
        want = {(topic_names.predictions, p): p + 1 for p in mine}
        wait_for(
            lambda: a.poll() >= 0 and _committed(kafka_bootstrap, group_id, topic_names.predictions) == want,
            30,
            "the commit",
        )
    finally:
        stop.set()
        thread.join(timeout=30)
    # closing leaves the group without calling the listener
    revoked = list(a.revoked)
    a.close()
    assert a.revoked == revoked


def _committed(bootstrap: str, group_id: str, topic: str) -> dict[tuple[str, int], int]:
    """The group's committed offsets of ``topic``, read by a client that does not join the group."""
    from kafka import KafkaConsumer
    from kafka import TopicPartition as KTP

    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group_id, enable_auto_commit=False)
    try:
        found = {p: c.committed(KTP(topic, p)) for p in c.partitions_for_topic(topic) or ()}
    finally:
        c.close(autocommit=False)
    return {(topic, p): int(o) for p, o in found.items() if o is not None and o >= 0}


def test_changelog_write_then_read_up_to_the_end_taken_at_start(
    kafka_bootstrap: str, topic_names: TopicNames, group_id: str, tmp_path: Path
) -> None:
    _fill(kafka_bootstrap, topic_names, partitions=2, n=10)
    cfg = _config(kafka_bootstrap, topic_names, group_id, tmp_path)
    consumer = transport.make_consumer(cfg)
    try:
        transport.ensure_changelog(consumer, cfg, 2)
        transport.ensure_changelog(consumer, cfg, 2)  # there already: nothing to do
        assert consumer.partitions_for_topic(changelog_topic(cfg)) == {0, 1}
        with pytest.raises(BrokerError, match="has 2 partitions but the input topics have 3"):
            transport.ensure_changelog(consumer, cfg, 3)
        assert consumer.partitions_for_topic(f"absent-{uuid.uuid4().hex}") is None
    finally:
        consumer.close()
    writer, reader = transport.changelog_writer(cfg), transport.changelog_reader(cfg)
    try:
        data = {
            p: [(f"k{p}-{i}".encode(), f"v{i}".encode() if i % 5 else None) for i in range(300)]
            for p in (0, 1)
        }
        for p, records in data.items():
            writer.send(p, records, epoch=3)
        writer.flush()
        metas = {p: writer.send_meta(p, b"meta", b"{}", epoch=4) for p in (0, 1)}
        writer.flush()
        assert {p: writer.offset(h) for p, h in metas.items()} == {0: 300, 1: 300}  # after the data
        assert (reader.beginning_offset(0), reader.end_offset(0), reader.end_offset(1)) == (0, 301, 301)
        reader.start({0: 0, 1: 250})
        writer.send(0, [(b"later", b"x")], epoch=5)  # after start: beyond the end taken then
        writer.flush()
        got: list[tuple[int, int, bytes, bytes | None, int]] = []
        wait_for(lambda: got.extend(reader.poll(200)) or (reader.done(0) and reader.done(1)), 60, "the ends")
        expected = [(0, i, k, v, 3) for i, (k, v) in enumerate(data[0])] + [(0, 300, b"meta", b"{}", 4)]
        expected += [(1, i, k, v, 3) for i, (k, v) in enumerate(data[1]) if i >= 250] + [
            (1, 300, b"meta", b"{}", 4)
        ]
        assert sorted(got) == sorted(expected)
        assert reader.positions[0] >= 301 and reader.positions[1] >= 301
        # a new start takes the ends again; a stopped partition is no longer read
        reader.start({0: 299, 1: 301})
        reader.stop(1)
        assert set(reader.ends) == {0} and not reader.done(0)
        got.clear()
        wait_for(lambda: got.extend(reader.poll(200)) or reader.done(0), 60, "partition 0's new end")
        later = [(0, 299, *data[0][299], 3), (0, 300, b"meta", b"{}", 4), (0, 301, b"later", b"x", 5)]
        assert sorted(got) == later
    finally:
        writer.close()
        reader.close()


def test_a_changelog_flush_never_passes_over_a_refused_write(
    topic_names: TopicNames, group_id: str, tmp_path: Path
) -> None:
    broker = ProxiedBroker().start()
    try:
        bootstrap = broker.bootstrap_servers
        cfg = _config(bootstrap, topic_names, group_id, tmp_path, request_timeout_ms=3000)
        create_topics(bootstrap, [changelog_topic(cfg)], partitions=1)
        writer = transport.changelog_writer(cfg)
        try:
            writer.send(0, [(b"k", b"v")], epoch=1)
            writer.flush()  # the broker takes writes
            broker.block_produce_topic = changelog_topic(cfg)
            writer.send(0, [(b"k2", b"v2")], epoch=1)
            with pytest.raises(ClientError, match="changelog write failed"):
                writer.flush(timeout=2.0)
            handle = writer.send_meta(0, b"meta", b"{}", epoch=1)
            with pytest.raises(ClientError, match="changelog write failed"):
                writer.offset(handle)
        finally:
            broker.block_produce_topic = None
            writer.close()
    finally:
        broker.stop()


def test_a_changelog_wait_ends_when_cancelled(topic_names: TopicNames, group_id: str, tmp_path: Path) -> None:
    """A stop requested while the run loop waits for acknowledgements ends the wait (a changelog
    flush or a meta's offset can otherwise wait kafka.request_timeout_ms, past a pod's grace
    period): the write fails as a timeout does, and the same writer still writes afterwards."""
    broker = ProxiedBroker().start()
    try:
        bootstrap = broker.bootstrap_servers
        cfg = _config(bootstrap, topic_names, group_id, tmp_path, request_timeout_ms=60_000)
        create_topics(bootstrap, [changelog_topic(cfg)], partitions=1)
        writer = transport.changelog_writer(cfg)
        stop = threading.Event()
        writer.cancel = stop.is_set
        try:
            writer.send(0, [(b"k", b"v")], epoch=1)
            writer.flush()
            broker.block_produce_topic = changelog_topic(cfg)
            for wait in (lambda: writer.flush(), lambda: writer.offset(writer.send_meta(0, b"m", b"{}", 1))):
                stop.clear()
                writer.send(0, [(b"k2", b"v2")], epoch=1)
                timer = threading.Timer(0.5, stop.set)
                timer.start()
                started = time.monotonic()
                with pytest.raises(ClientError, match="changelog write failed"):
                    wait()
                took = time.monotonic() - started
                timer.cancel()
                assert 0.4 < took < 5.0, f"the wait took {took:.1f} s, cancelled after 0.5 s (timeout 60 s)"
            stop.clear()
            broker.block_produce_topic = None
            writer.send(0, [(b"k3", b"v3")], epoch=1)
            writer.flush()  # not cancelled: waits for the broker again
            assert writer.offset(writer.send_meta(0, b"meta", b"{}", epoch=1)) >= 3
        finally:
            broker.block_produce_topic = None
            writer.close()
    finally:
        broker.stop()


def test_letters_report_success_and_refused_sizes(
    kafka_bootstrap: str, topic_names: TopicNames, group_id: str, tmp_path: Path
) -> None:
    create_topics(kafka_bootstrap, [topic_names.dead_letters], partitions=1)
    cfg = _config(kafka_bootstrap, topic_names, group_id, tmp_path)
    producer = transport.get(cfg.kafka).letter_producer(cfg, max_bytes=10_000)
    results: list[tuple[str, Any]] = []
    try:
        for value in (b"small", b"x" * 200_000):
            producer.send(
                topic_names.dead_letters, b"key", value, [("stream_fair.reason", b"invalid_json")],
                lambda v=value: results.append(("ok", len(v))),
                lambda exc, too_large, v=value: results.append(("error", (len(v), too_large))),
            )  # fmt: skip
        producer.flush(10)
        wait_for(lambda: len(results) == 2, 10, "both callbacks")
        assert sorted(results, key=str) == [("error", (200_000, True)), ("ok", 5)]
    finally:
        producer.close(5)


def test_a_topic_that_does_not_exist_is_one_line_for_a_probe(
    kafka_bootstrap: str, topic_names: TopicNames, group_id: str, tmp_path: Path
) -> None:
    cfg = _config(kafka_bootstrap, topic_names, group_id, tmp_path)
    with pytest.raises(BrokerError, match="does not exist: create it or fix topics"):
        transport.sample_records(cfg, f"absent-{uuid.uuid4().hex}", 10, timeout_s=5)


def _kafka_python_ids(bootstrap: str, topics: Sequence[str]) -> list[str | None]:
    """The topic ids kafka-python's own metadata holds: the reference both transports must match
    (the ids are stored in the state, so switching transports must not look like a new topic)."""
    from kafka import KafkaConsumer

    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    try:
        c._client.cluster.request_update()  # type: ignore[attr-defined]
        c.topics()  # a metadata request for every topic
        out = []
        for t in topics:
            tid = c._cluster.topic_id(t)  # type: ignore[attr-defined]
            out.append(None if tid is None or tid.int == 0 else str(tid))
        return out
    finally:
        c.close()


def test_topic_ids_are_the_brokers_and_the_same_on_every_transport(
    kafka_bootstrap: str, topic_names: TopicNames, group_id: str, tmp_path: Path, member_factory: Any
) -> None:
    _fill(kafka_bootstrap, topic_names, partitions=2, n=10)
    cfg = _config(kafka_bootstrap, topic_names, group_id, tmp_path, metadata_max_age_ms=1000)
    member = member_factory(cfg)
    member.wait_assigned()
    names = [topic_names.predictions, topic_names.outcomes, f"absent-{uuid.uuid4().hex}"]
    expected = _kafka_python_ids(kafka_bootstrap, names)
    assert expected[0] and expected[1] and expected[0] != expected[1] and expected[2] is None
    wait_for(lambda: member.poll() >= 0 and member.consumer.topic_ids(names) == expected, 30, "the ids")


def test_the_input_reader_reads_marks_and_bounds(
    kafka_bootstrap: str, topic_names: TopicNames, group_id: str, tmp_path: Path
) -> None:
    """The identity check's reads: a record's mark at an offset (the same as computed from the
    record kafka-python reads there), None past the end, the bounds, a missing topic in one line."""
    from kafka import KafkaConsumer
    from kafka import TopicPartition as KTP

    from stream_fair.state.identity import mark

    _fill(kafka_bootstrap, topic_names, partitions=2, n=40)
    cfg = _config(kafka_bootstrap, topic_names, group_id, tmp_path)
    ends = _ends(kafka_bootstrap, [topic_names.predictions])
    c = KafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=None, enable_auto_commit=False)
    try:
        tp = KTP(topic_names.predictions, 1)
        c.assign([tp])
        c.seek(tp, 7)
        r = next(r for _ in range(50) for r in c.poll(timeout_ms=200).get(tp, ()))
        expected = mark(r.offset, r.timestamp, r.key, r.value)
    finally:
        c.close()
    inputs = transport.InputReader(cfg)
    try:
        end = ends[(topic_names.predictions, 1)]
        assert inputs.bounds(topic_names.predictions, 1) == (0, end)
        assert inputs.mark_at(topic_names.predictions, 1, 7) == expected
        assert inputs.mark_at(topic_names.predictions, 1, 7) == expected  # again: a fresh seek
        assert inputs.mark_at(topic_names.predictions, 1, end) is None
        assert inputs.mark_at(topic_names.predictions, 1, end + 100) is None
        with pytest.raises(BrokerError, match="cannot read the offsets of 'absent"):
            inputs.bounds(f"absent-{uuid.uuid4().hex}", 0)
    finally:
        inputs.close()


def test_internal_topics_are_created_with_one_partition_and_checked(
    kafka_bootstrap: str, topic_names: TopicNames, group_id: str, tmp_path: Path
) -> None:
    _fill(kafka_bootstrap, topic_names, partitions=2, n=4)
    cfg = _config(kafka_bootstrap, topic_names, group_id, tmp_path)
    consumer = transport.make_consumer(cfg)
    try:
        transport.ensure_internal_topics(consumer, cfg)
        transport.ensure_internal_topics(consumer, cfg)  # there already
        for name in (transport.increments_topic(cfg), transport.leader_topic(cfg)):
            assert consumer.partitions_for_topic(name) == {0}
        other = _config(kafka_bootstrap, topic_names, f"{group_id}-2", tmp_path)
        create_topics(kafka_bootstrap, [transport.increments_topic(other)], partitions=2)
        with pytest.raises(BrokerError, match="has 2 partitions, it needs 1: recreate it"):
            transport.ensure_internal_topics(consumer, other)
    finally:
        consumer.close()


def test_a_reader_tails_a_partition_from_a_seek(
    kafka_bootstrap: str, topic_names: TopicNames, group_id: str, tmp_path: Path
) -> None:
    """The leader's increments reader: from an offset or the beginning, new records as they come."""
    cfg = _config(kafka_bootstrap, topic_names, group_id, tmp_path)
    topic = transport.increments_topic(cfg)
    create_topics(kafka_bootstrap, [topic], partitions=1)
    writer = transport.changelog_writer(cfg, topic, ordered=True)
    reader = transport.reader(cfg, reset="earliest", max_records=7)
    tp = TopicPartition(topic, 0)
    try:
        writer.send(0, [(b"k", b"%d" % i) for i in range(20)], epoch=0)
        writer.flush()
        reader.assign([tp])
        reader.seek(tp, 5)
        got: list[int] = []

        def read() -> bool:
            for records in reader.poll(200, 7).values():
                assert len(records) <= 7
                got.extend(int(r.value or b"-1") for r in records)
            return len(got) >= 15

        wait_for(read, 30, "the records from offset 5")
        writer.send(0, [(b"k", b"20")], epoch=0)
        writer.flush()
        wait_for(lambda: read() and len(got) >= 16, 30, "a record written later")
        assert got == list(range(5, 21))
        reader.seek_to_beginning(tp)
        got.clear()
        wait_for(lambda: read() and len(got) >= 21, 30, "the records from the beginning")
        assert got == list(range(21))
        assert reader.bounds(tp) == (0, 21)
    finally:
        writer.close()
        reader.close()


def test_closing_producers_is_bounded_with_the_broker_gone(
    topic_names: TopicNames, group_id: str, tmp_path: Path
) -> None:
    """Shutdown with the broker gone: writers and the letter producer close within their timeout,
    without raising, whatever they still hold (a restart re-sends anything uncommitted)."""
    broker = ProxiedBroker().start()
    try:
        bootstrap = broker.bootstrap_servers
        cfg = _config(bootstrap, topic_names, group_id, tmp_path, request_timeout_ms=20_000)
        create_topics(bootstrap, [changelog_topic(cfg), topic_names.dead_letters], partitions=1)
        writer = transport.changelog_writer(cfg)
        letters = transport.get(cfg.kafka).letter_producer(cfg, max_bytes=10_000)
        failed: list[bool] = []
        writer.send(0, [(b"k", b"v")], epoch=1)
        writer.flush()
        broker.block_produce = True  # writes hang, then the broker goes away
        writer.send(0, [(b"k2", b"v2")], epoch=1)
        letters.send(
            topic_names.dead_letters, b"k", b"v", [], lambda: None, lambda e, big: failed.append(big)
        )
        broker.stop()
        started = time.monotonic()
        writer.close(timeout=1.0)
        letters.close(0.0)
        assert time.monotonic() - started < 8.0
        wait_for(lambda: failed == [False], 10, "the unsent letter to fail at close")
    finally:
        broker.stop()


def test_a_letter_producer_built_with_the_broker_gone_gives_up_within_its_block_time(
    topic_names: TopicNames, group_id: str, tmp_path: Path
) -> None:
    """The dead letters' producer is rebuilt after failed writes, also while stopping. With the
    broker unreachable, kafka-python's bootstrap waited 30 s per rebuild (whatever
    request_timeout_ms said), so a SIGTERM with unsent letters outlasted the pod's 60 s grace
    period; a rebuild now gives up within the letters' block time (5 s)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        nobody = f"127.0.0.1:{s.getsockname()[1]}"  # bound, never listening: refused
    cfg = _config(nobody, topic_names, group_id, tmp_path, request_timeout_ms=20_000)
    started = time.monotonic()
    failed: list[BaseException] = []
    try:
        letters = transport.get(cfg.kafka).letter_producer(cfg, max_bytes=10_000)
        letters.send(topic_names.dead_letters, b"k", b"v", [], lambda: None, lambda e, big: failed.append(e))
        letters.close(0.0)
    except Exception as exc:  # kafka-python: cannot bootstrap; confluent: builds at once, fails the send
        failed.append(exc)
    assert time.monotonic() - started < 12.0
