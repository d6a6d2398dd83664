"""Stored offsets belong to one input topic; a re-created or re-partitioned topic is refused (issue 9).

Each test runs ``stream-fair run`` as a real process on the real broker, changes the input topics
under it (delete, re-create, more partitions), and checks that it stops with one line and exit
status 2 instead of reading the new topics at the old topics' offsets.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kafka.admin import KafkaAdminClient

from stream_fair import config as config_mod
from stream_fair.app import fingerprint
from stream_fair.dev import simulate
from stream_fair.dev.broker import create_topics, produce_events
from stream_fair.state import identity
from stream_fair.state.codec import decode_json, encode_json, meta_key
from stream_fair.state.rocks import RocksBackend
from tests.faults.proc import Run, consumed_all, run_to_exit, setup
from tests.helpers import recount, wait_for

pytestmark = pytest.mark.integration

RE_CREATED = "was re-created"


def _events(n: int, seed: int) -> list[tuple[str, Any]]:
    return list(simulate.generate(simulate.SCENARIOS["lending"](), n, seed=seed, start_ts=time.time() - 7200))


def _topics(bootstrap: str) -> set[str]:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        return set(admin.list_topics())
    finally:
        admin.close()


def _delete(bootstrap: str, names: list[str]) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.delete_topics(names)
    finally:
        admin.close()
    wait_for(lambda: not set(names) & _topics(bootstrap), 20, f"{names} deleted")


def _first_run(bootstrap: str, topics: Any, config: Path, events: list[tuple[str, Any]]) -> None:
    """Count ``events`` to a checkpoint and stop cleanly: the state now holds their offsets."""
    produce_events(bootstrap, topics.predictions, topics.outcomes, events)
    run = Run(config).start()
    try:
        exp = recount(events)
        consumed_all(run, exp.consumed["predictions"], exp.consumed["outcomes"])  # checkpointed
        assert run.stop() == 0, run.log
    finally:
        run.kill()


def _one_error(output: str) -> str:
    """The single ``kafka error`` line of a stopped process (and no traceback)."""
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if "kafka error" in line]
    assert len(errors) == 1, output
    return errors[0]


def test_recreated_input_topics_are_refused_by_topic_id(
    kafka_bootstrap: str, topic_names: Any, group_id: str, tmp_path: Path
) -> None:
    """The input topics deleted and re-created with new data while the detector was stopped.

    Before this check the restart resumed at the old offsets in the new topics and silently
    skipped every new record below them: here 400 of the 500 new predictions (4,988 of 5,000 new
    pairs in the issue's run), with exit status 0 and nothing in the log.
    """
    config = setup(kafka_bootstrap, topic_names, group_id, tmp_path, partitions=2)
    _first_run(kafka_bootstrap, topic_names, config, _events(400, seed=1))
    _delete(kafka_bootstrap, [topic_names.predictions, topic_names.outcomes])
    create_topics(kafka_bootstrap, [topic_names.predictions, topic_names.outcomes], partitions=2)
    produce_events(kafka_bootstrap, topic_names.predictions, topic_names.outcomes, _events(500, seed=2))

    done = run_to_exit(config)
    assert done.returncode == 2, done.stderr
    line = _one_error(done.stderr)
    assert line.startswith("stream-fair: kafka error: the topic "), line
    assert RE_CREATED in line and "topic id" in line and "partition " in line, line
    assert topic_names.predictions in line or topic_names.outcomes in line, line
    assert identity.FIX in line, line


def _strip(config: Path, partitions: int, fields: tuple[str, ...]) -> None:
    """Remove ``fields`` from every stored meta: a state written before they existed, or through a
    broker or client that shows no topic ids (kafka-python with Kafka before 2.8)."""
    cfg = config_mod.load(config)
    backend = RocksBackend(cfg.state.path, fingerprint(cfg))
    try:
        for p in range(partitions):
            raw = backend.get(meta_key(p))
            assert raw is not None
            meta = decode_json(raw)
            for name in fields:
                assert name in meta, meta
                del meta[name]
            backend.write({meta_key(p): encode_json(meta)})
    finally:
        backend.close()


@pytest.mark.parametrize(
    ("new_predictions", "stripped", "expected"),
    [
        # as many records as before: the same offsets hold other records (their marks differ)
        (400, ("topic_ids",), "is not the one the state last read there"),
        # fewer: the offsets lie past the new topic's end (a meta from before marks existed)
        (40, ("topic_ids", "marks", "partitions"), "but the state says"),
    ],
    ids=["other-records", "shorter"],
)
def test_recreated_input_topics_are_refused_without_topic_ids(
    kafka_bootstrap: str,
    topic_names: Any,
    group_id: str,
    tmp_path: Path,
    new_predictions: int,
    stripped: tuple[str, ...],
    expected: str,
) -> None:
    """Without topic ids the stored offsets are checked against the records there now.

    Local state only (``state.changelog: false``), so editing the local store is all it takes to
    make the state look as if no topic id had been known.
    """
    config = setup(kafka_bootstrap, topic_names, group_id, tmp_path, partitions=1, state={"changelog": False})
    _first_run(kafka_bootstrap, topic_names, config, _events(400, seed=3))
    _strip(config, 1, stripped)
    _delete(kafka_bootstrap, [topic_names.predictions, topic_names.outcomes])
    create_topics(kafka_bootstrap, [topic_names.predictions, topic_names.outcomes], partitions=1)
    produce_events(
        kafka_bootstrap, topic_names.predictions, topic_names.outcomes, _events(new_predictions, seed=4)
    )

    done = run_to_exit(config)
    assert done.returncode == 2, done.stderr
    line = _one_error(done.stderr)
    assert RE_CREATED in line and expected in line and "partition 0" in line, line


def test_an_unchanged_topic_resumes_without_topic_ids(
    kafka_bootstrap: str, topic_names: Any, group_id: str, tmp_path: Path
) -> None:
    """The other side of the marks: the same topics, state without topic ids, resume and count on."""
    config = setup(kafka_bootstrap, topic_names, group_id, tmp_path, partitions=1, state={"changelog": False})
    events = _events(600, seed=5)
    first, second = events[: len(events) // 2], events[len(events) // 2 :]
    _first_run(kafka_bootstrap, topic_names, config, first)
    _strip(config, 1, ("topic_ids",))
    produce_events(kafka_bootstrap, topic_names.predictions, topic_names.outcomes, second)
    run = Run(config).start()
    try:
        total = recount(events)
        consumed_all(run, total.consumed["predictions"], total.consumed["outcomes"])
        assert run.stop() == 0, run.log
    finally:
        run.kill()


def test_a_missing_input_topic_is_not_created_by_the_consumer(
    kafka_bootstrap: str, topic_names: Any, group_id: str, tmp_path: Path
) -> None:
    """The detector's group consumer subscribed to a topic that does not exist leaves it missing.

    Before: kafka-python 3.0.12 sent ``allow_auto_topic_creation=True`` in every metadata request
    whatever the consumer's option said, and the broker created the topic within a second.
    """
    from stream_fair import transport
    from stream_fair.dev.broker import FAST_GROUP_CONFIG

    config = setup(kafka_bootstrap, topic_names, group_id, tmp_path, partitions=1)
    missing = f"{topic_names.predictions}-missing"
    consumer = transport.make_consumer(config_mod.load(config))
    try:
        consumer.subscribe([missing], transport.ShardListener(consumer, (missing, missing), set, set))
        deadline = time.monotonic() + 2 * FAST_GROUP_CONFIG["heartbeat_interval_ms"] / 1000 + 3
        while time.monotonic() < deadline:
            consumer.poll(200, 500)
    finally:
        consumer.close()
    assert missing not in _topics(kafka_bootstrap)


FAST_METADATA = {"metadata_max_age_ms": 2000}  # topic changes are seen within 2 s


def _running(bootstrap: str, topics: Any, group_id: str, tmp_path: Path, seed: int) -> Run:
    """A detector on two-partition topics that has counted a few hundred events."""
    config = setup(bootstrap, topics, group_id, tmp_path, partitions=2, kafka=FAST_METADATA)
    events = _events(300, seed=seed)
    produce_events(bootstrap, topics.predictions, topics.outcomes, events)
    run = Run(config).start()
    exp = recount(events)
    consumed_all(run, exp.consumed["predictions"], exp.consumed["outcomes"])
    return run


def _frozen(run: Run, change: Callable[[], None]) -> None:
    """Make ``change`` while the detector is stopped (SIGSTOP), so that it sees the topics only
    before and after, never half-way (deleted, not yet re-created)."""
    os.kill(run.pid, signal.SIGSTOP)
    try:
        change()
    finally:
        os.kill(run.pid, signal.SIGCONT)


def _stopped_with(run: Run, timeout: float = 90) -> str:
    wait_for(lambda: run.exited, timeout, "the detector to stop")
    assert run.stop() == 2, run.log
    return _one_error(run.log)


def test_an_input_topic_deleted_while_running_stops_the_detector(
    kafka_bootstrap: str, topic_names: Any, group_id: str, tmp_path: Path
) -> None:
    """The outcomes topic deleted under a running detector: one line, exit 2, and the topic stays
    deleted. Before, the running consumer asked for topic auto-creation in every metadata
    request, so the broker (Tansu here, as Kafka with ``auto.create.topics.enable``) re-created
    the topic with its default partition count within seconds and the detector read on."""
    run = _running(kafka_bootstrap, topic_names, group_id, tmp_path, seed=6)
    try:
        _delete(kafka_bootstrap, [topic_names.outcomes])
        line = _stopped_with(run)
        assert f"topics.outcomes={topic_names.outcomes!r} does not exist" in line, line
        assert topic_names.outcomes not in _topics(kafka_bootstrap)
    finally:
        run.kill()


def test_an_input_topic_recreated_while_running_stops_the_detector(
    kafka_bootstrap: str, topic_names: Any, group_id: str, tmp_path: Path
) -> None:
    """Re-created with the same partition count: only the topic id tells; the detector stops
    instead of waiting for the new topic to pass the old offsets and reading on from there."""
    run = _running(kafka_bootstrap, topic_names, group_id, tmp_path, seed=8)
    try:

        def recreate() -> None:
            _delete(kafka_bootstrap, [topic_names.predictions])
            create_topics(kafka_bootstrap, [topic_names.predictions], partitions=2)

        _frozen(run, recreate)
        line = _stopped_with(run)
        assert RE_CREATED in line and "topic id" in line and topic_names.predictions in line, line
    finally:
        run.kill()


def test_more_partitions_in_one_input_topic_stop_the_detector(
    kafka_bootstrap: str, topic_names: Any, group_id: str, tmp_path: Path
) -> None:
    """One input topic gets more partitions while the detector runs: the join would pair the wrong
    partitions, so the assignment that follows stops it with one line.

    Tansu has no CreatePartitions: there the topic is re-created with more partitions instead
    (with ``STREAM_FAIR_TEST_BOOTSTRAP`` pointing at Kafka, partitions are added for real).
    """
    run = _running(kafka_bootstrap, topic_names, group_id, tmp_path, seed=7)
    try:
        _frozen(run, lambda: _add_partitions(kafka_bootstrap, topic_names.outcomes, 4))
        line = _stopped_with(run)
        assert "topics.predictions has 2 partitions but topics.outcomes has 4" in line, line
    finally:
        run.kill()


def _add_partitions(bootstrap: str, topic: str, total: int) -> None:
    from kafka.admin import NewPartitions
    from kafka.errors import IncompatibleBrokerVersion

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_partitions({topic: NewPartitions(total)})
        return
    except IncompatibleBrokerVersion:  # Tansu
        pass
    finally:
        admin.close()
    _delete(bootstrap, [topic])
    create_topics(bootstrap, [topic], partitions=total)
