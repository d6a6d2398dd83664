"""Kafka I/O with kafka-python: the consumer, the rebalance listener, the changelog, dead letters.

The only module that imports ``kafka``. Offsets live in the state store next to the counts they
produced (see :mod:`stream_fair.state`); on assignment each partition's state is restored (from the
local store, then the changelog tail) and the partition is sought to the offsets that state
recorded, so a restart or a move neither skips nor recounts a record. Offsets are also committed to
Kafka after each checkpoint, for lag tooling only.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.coordinator.assignors.range import RangePartitionAssignor
from kafka.errors import (
    KafkaConnectionError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
)
from kafka.structs import MemberState, OffsetAndMetadata

from stream_fair.config import Config, KafkaConfig
from stream_fair.errors import BrokerError
from stream_fair.state.identity import FIX, mark
from stream_fair.state.restore import EPOCH_HEADER

log = logging.getLogger(__name__)


def client_options(k: KafkaConfig) -> dict[str, Any]:
    """kafka-python connection options shared by consumer, producer and admin client."""
    opts: dict[str, Any] = {
        "bootstrap_servers": [s.strip() for s in k.bootstrap_servers.split(",") if s.strip()],
        "client_id": k.client_id,
        "security_protocol": k.security_protocol,
        "request_timeout_ms": k.request_timeout_ms,
    }
    if k.sasl_mechanism:
        opts["sasl_mechanism"] = k.sasl_mechanism
    if k.sasl_username is not None:
        opts["sasl_plain_username"] = k.sasl_username
    if k.sasl_password is not None:
        opts["sasl_plain_password"] = k.sasl_password.get_secret_value()
    if k.security_protocol in ("SSL", "SASL_SSL"):
        opts["ssl_check_hostname"] = k.ssl_check_hostname
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            if getattr(k, name):
                opts[name] = getattr(k, name)
        if k.ssl_password is not None:
            opts["ssl_password"] = k.ssl_password.get_secret_value()
    return opts


@contextlib.contextmanager
def _quiet_kafka_logs() -> Iterator[None]:
    """Silence kafka-python while connecting: a failure is reported once, as a BrokerError.

    Its own log would add a line per failed attempt (ERROR, then WARNING with backoff).
    """
    kafka_log = logging.getLogger("kafka")
    level = kafka_log.level
    kafka_log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        kafka_log.setLevel(level)


def never_create_topics(consumer: KafkaConsumer) -> KafkaConsumer:
    """Make the consumer's metadata requests say ``allow_auto_topic_creation=False``.

    A consumer must not create a missing input topic (the broker would use its default partition
    count, and the detector would read an empty topic as if nothing had happened). kafka-python
    3.0.12 accepts ``allow_auto_create_topics=False`` but does not hand it to the cluster metadata
    that builds the requests (they still say True), so it is also set there.
    """
    cluster = getattr(consumer, "_cluster", None)
    config = getattr(cluster, "config", None)
    if isinstance(config, dict) and "allow_auto_create_topics" in config:
        config["allow_auto_create_topics"] = False
    return consumer


def _no_auto_create() -> dict[str, Any]:
    known = "allow_auto_create_topics" in KafkaConsumer.DEFAULT_CONFIG  # kafka-python >= 2.0.2
    return {"allow_auto_create_topics": False} if known else {}


def make_consumer(config: Config) -> KafkaConsumer:
    k = config.kafka
    extra: dict[str, Any] = _no_auto_create()
    if "bootstrap_timeout_ms" in KafkaConsumer.DEFAULT_CONFIG:  # kafka-python >= 2.1
        # Otherwise an unreachable cluster takes 30 s to report, whatever request_timeout_ms says.
        extra["bootstrap_timeout_ms"] = k.request_timeout_ms
    try:
        with _quiet_kafka_logs():
            consumer = KafkaConsumer(
                group_id=k.group_id,
                enable_auto_commit=False,
                auto_offset_reset=k.auto_offset_reset,
                session_timeout_ms=k.session_timeout_ms,
                heartbeat_interval_ms=k.heartbeat_interval_ms,
                max_poll_interval_ms=k.max_poll_interval_ms,
                max_poll_records=k.max_poll_records,
                fetch_max_bytes=k.fetch_max_bytes,
                metadata_max_age_ms=k.metadata_max_age_ms,
                # The range assignor gives partition p of both topics to the same member: the
                # join needs a prediction and its outcome (same key) in the same shard.
                partition_assignment_strategy=(RangePartitionAssignor,),
                **client_options(k),
                **extra,
            )
    except KafkaError as exc:
        raise BrokerError(
            f"kafka error: cannot connect to kafka.bootstrap_servers={k.bootstrap_servers!r} "
            f"({type(exc).__name__}): check the address, security_protocol and credentials"
        ) from None
    return never_create_topics(consumer)


ERR_REPARTITIONED = (
    "kafka error: topics.predictions and topics.outcomes now have {now} partitions, {was} when "
    "stream-fair started: keys moved to other partitions, the state no longer matches them; " + FIX
)


def check_copartitioned(consumer: KafkaConsumer, config: Config, expected: int | None = None) -> int:
    """Both input topics must exist with the same partition count (keys = ids); returns it.

    Checked at start and again after every assignment, then with the count at start as
    ``expected``: the run loop stops when a topic went missing or its partition count changed.
    """
    t = config.topics
    counts: dict[str, int] = {}
    for role, name in (("predictions", t.predictions), ("outcomes", t.outcomes)):
        try:
            parts = consumer.partitions_for_topic(name)
        except KafkaError as exc:
            raise BrokerError(
                f"kafka error: cannot read metadata from kafka.bootstrap_servers="
                f"{config.kafka.bootstrap_servers!r} ({type(exc).__name__}): check the address, "
                "security_protocol and credentials"
            ) from None
        if not parts:
            raise BrokerError(
                f"kafka error: topics.{role}={name!r} does not exist: create it or fix topics.{role}"
            )
        counts[role] = len(parts)
    if counts["predictions"] != counts["outcomes"]:
        raise BrokerError(
            f"kafka error: topics.predictions has {counts['predictions']} partitions but "
            f"topics.outcomes has {counts['outcomes']}: co-partition them (same count, key = id)"
        )
    if expected is not None and counts["predictions"] != expected:
        raise BrokerError(ERR_REPARTITIONED.format(now=counts["predictions"], was=expected))
    return counts["predictions"]


class ShardListener(ConsumerRebalanceListener):  # type: ignore[misc]
    """Moves shard state with partitions: checkpoint on revoke; on assign, pause until restored.

    Restoring can take longer than ``max_poll_interval_ms``, so it does not run inside the
    callback: the assigned input partitions are paused, the run loop restores them while it keeps
    polling (which keeps the membership alive), then seeks and resumes them (:func:`resume_at`).
    """

    def __init__(
        self,
        consumer: KafkaConsumer,
        topics: tuple[str, str],
        on_revoke: Callable[[set[int]], None],
        on_assign: Callable[[set[int]], None],
        leader: tuple[str, Callable[[bool], None]] | None = None,
    ) -> None:
        self.consumer = consumer
        self.topics = topics
        self._on_revoke = on_revoke
        self._on_assign = on_assign
        # (leader topic, callback): owning its partition 0 makes this replica the leader
        # (stream_fair.leader); the partition stays paused, it is never read through the group
        self._leader = leader
        # set on every assignment, cleared by the run loop once it has re-checked the input
        # topics (outside this callback: the check may need a metadata request)
        self.assigned = False

    def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        revoked = list(revoked)
        shards = {tp.partition for tp in revoked if tp.topic in self.topics}
        if shards:
            self._on_revoke(shards)
        if self._leader is not None and any(tp.topic == self._leader[0] for tp in revoked):
            self._leader[1](False)

    def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        self.assigned = True
        assigned = list(assigned)
        inputs = [tp for tp in assigned if tp.topic in self.topics]
        if inputs:
            self.consumer.pause(*inputs)
            self._on_assign({tp.partition for tp in inputs})
        if self._leader is not None:
            lead = [tp for tp in assigned if tp.topic == self._leader[0]]
            if lead:
                self.consumer.pause(*lead)
                self._leader[1](True)


def resume_at(
    consumer: KafkaConsumer, topics: tuple[str, str], shard: int, offsets: list[int | None]
) -> None:
    """Seek both input partitions of a restored shard to its offsets and resume them.

    Without a checkpoint, ``auto_offset_reset`` decides: the retained history (``earliest``) or
    only new records (``latest``).
    """
    tps = [TopicPartition(t, shard) for t in topics]
    owned = consumer.assignment()
    for tp, position in zip(tps, offsets, strict=True):
        if tp not in owned:
            continue
        if position is not None:
            consumer.seek(tp, position)
        elif consumer.config["auto_offset_reset"] == "latest":
            consumer.seek_to_end(tp)
        else:
            consumer.seek_to_beginning(tp)
    consumer.resume(*[tp for tp in tps if tp in owned])


def topic_ids(consumer: KafkaConsumer, topics: Iterable[str]) -> list[str | None]:
    """The topics' ids in the consumer's metadata (Kafka 2.8+, metadata v10+), as strings.

    None where the broker sends none or this kafka-python does not expose them.
    """
    lookup = getattr(getattr(consumer, "_cluster", None), "topic_id", None)
    out: list[str | None] = []
    for topic in topics:
        tid = lookup(topic) if lookup is not None else None
        out.append(None if tid is None or getattr(tid, "int", 1) == 0 else str(tid))
    return out


class InputReader:
    """Reads the record at one offset of an input partition: the topic identity check on assignment.

    No consumer group (manual assignment, nothing committed), and it never creates a topic.
    """

    def __init__(self, config: Config) -> None:
        k = config.kafka
        self.timeout = min(10.0, k.request_timeout_ms / 1000)
        try:
            with _quiet_kafka_logs():
                consumer = KafkaConsumer(
                    group_id=None,
                    enable_auto_commit=False,
                    auto_offset_reset="none",  # an offset past the end is an answer, not a reset
                    max_poll_records=10,
                    **_no_auto_create(),
                    **client_options(k),
                )
        except KafkaError as exc:
            raise BrokerError(
                f"kafka error: cannot connect to kafka.bootstrap_servers={k.bootstrap_servers!r} "
                f"({type(exc).__name__}): check the address, security_protocol and credentials"
            ) from None
        self._consumer = never_create_topics(consumer)

    def bounds(self, topic: str, partition: int) -> tuple[int, int]:
        """The partition's beginning and (reported) end offsets."""
        tp = TopicPartition(topic, partition)
        try:
            return int(self._consumer.beginning_offsets([tp])[tp]), int(self._consumer.end_offsets([tp])[tp])
        except KafkaError as exc:
            raise BrokerError(
                f"kafka error: cannot read the offsets of {topic!r} partition {partition} "
                f"({type(exc).__name__}): check that the topic exists and the broker answers"
            ) from None

    def mark_at(self, topic: str, partition: int, offset: int) -> list[int] | None:
        """The mark (:func:`stream_fair.state.identity.mark`) of the record at ``offset``, or of the
        first one after it when compaction removed it; None when the partition has none there."""
        tp = TopicPartition(topic, partition)
        consumer = self._consumer
        consumer.assign([tp])
        consumer.seek(tp, offset)
        deadline = time.monotonic() + self.timeout
        try:
            while time.monotonic() < deadline:
                for r in consumer.poll(timeout_ms=200).get(tp, ()):
                    if r.offset >= offset:
                        return mark(r.offset, r.timestamp, r.key, r.value)
        except KafkaError:  # out of range: the partition ends before the offset
            return None
        finally:
            consumer.assign([])
        return None  # at the end (or past it, on a broker that does not say so)

    def close(self) -> None:
        self._consumer.close(autocommit=False)


def last_heard(consumer: KafkaConsumer) -> float | None:
    """When (``time.monotonic()``) the group last showed it is healthy, or None while it is not.

    Healthy: a stable member of the group whose coordinator is known. The time is that of the last
    heartbeat answer (or of the last join): it stops moving while the broker is unreachable or
    hangs, even before kafka-python notices and drops the connection.
    """
    coordinator = getattr(consumer, "_coordinator", None)
    if coordinator is None or coordinator.state != MemberState.STABLE or coordinator.coordinator_unknown():
        return None
    beat = coordinator.heartbeat
    return float(max(beat.last_receive, beat.last_reset))


def commit_offsets(
    consumer: KafkaConsumer, topics: tuple[str, str], offsets: dict[int, list[int | None]]
) -> None:
    """Mirror checkpointed offsets into the group's Kafka offsets (for lag tools only)."""
    commit: dict[TopicPartition, OffsetAndMetadata] = {}
    for shard, pair in offsets.items():
        for topic, offset in zip(topics, pair, strict=True):
            if offset is not None:
                commit[TopicPartition(topic, shard)] = OffsetAndMetadata(offset, "", -1)
    if commit:
        consumer.commit_async(offsets=commit)


def lag(consumer: KafkaConsumer) -> dict[tuple[str, int], int | None]:
    """High-water mark minus position per assigned partition (from the last fetch responses).

    None where either is not known yet (right after an assignment, before the first fetch).
    """
    out: dict[tuple[str, int], int | None] = {}
    for tp in consumer.assignment():
        high = consumer.highwater(tp)
        try:
            pos = consumer.position(tp, timeout_ms=0)
        except (KafkaError, TypeError):
            pos = None
        out[(tp.topic, tp.partition)] = None if high is None or pos is None else max(0, high - pos)
    return out


@dataclass(slots=True)
class Letter:
    """One rejected record on its way to the dead-letter topic."""

    shard: int
    role: int  # 0 predictions, 1 outcomes
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]


TRUNCATED = "stream_fair.truncated"
_RECORD_OVERHEAD = 512  # record, batch and request framing beyond key, value and headers
_KEY_KEPT = 1024  # a key is an id: longer ones are cut to this much when a letter must shrink
_BACKLOG_LETTERS = 10_000  # beyond this many unsent letters the run loop stops reading


def build_letter(
    shard: int, role: int, topic: str, offset: int, key: bytes | None, value: bytes | None,
    reason: str, detail: str, max_bytes: int,
) -> Letter:  # fmt: skip
    """The dead letter of a rejected record: its original bytes and provenance headers.

    When key, value and headers together would exceed ``max_bytes``, the value (and a key longer
    than 1 KiB) is cut and the header ``stream_fair.truncated`` says how much was kept; the
    provenance headers always reference the original record by topic, partition and offset.

    >>> big = build_letter(0, 0, "p", 7, b"id", b"x" * 5000, "invalid_json", "bad", max_bytes=2000)
    >>> len(big.value) < 2000, dict(big.headers)[TRUNCATED].decode()
    (True, 'value of 5000 bytes cut to 1155 bytes; the original is predictions topic p/0/7')
    """
    headers = [
        ("stream_fair.reason", reason.encode()),
        ("stream_fair.detail", detail.encode("utf-8", "replace")[:1000]),
        ("stream_fair.source_topic", topic.encode()),
        ("stream_fair.source_partition", str(shard).encode()),
        ("stream_fair.source_offset", str(offset).encode()),
    ]
    size = _RECORD_OVERHEAD + sum(len(k) + len(v) for k, v in headers)
    if size + len(key or b"") + len(value or b"") > max_bytes:
        parts = []
        if key is not None and len(key) > _KEY_KEPT:
            parts.append(f"key of {len(key)} bytes cut to {_KEY_KEPT} bytes")
            key = key[:_KEY_KEPT]
        room = max(0, max_bytes - size - len(key or b"") - 200)  # 200: the truncation header
        if value is not None and len(value) > room:
            parts.append(f"value of {len(value)} bytes cut to {room} bytes")
            value = value[:room]
        where = f"{'predictions' if role == 0 else 'outcomes'} topic {topic}/{shard}/{offset}"
        headers.append((TRUNCATED, f"{'; '.join(parts)}; the original is {where}".encode()))
    return Letter(shard, role, key, value, headers)


BROKER_DOWN: tuple[type[Exception], ...] = (KafkaConnectionError,)
"""What kafka-python's ``poll`` raises while every broker refuses connections (an outage, a
restart): the run loop keeps trying, as it does during a hang, instead of dying."""


def close_producer(producer: Any, timeout: float) -> None:
    """Close a kafka-python producer within ``timeout`` seconds, dropping what it could not send.

    kafka-python's ``close()`` flushes first and raises when that times out (the broker is gone),
    before it force-closes; the producer then raises again from ``__del__``. Unsent records are
    never needed here: the checkpoint protocol re-sends anything uncommitted after a restart.
    """
    try:
        producer.close(timeout=timeout)
        return
    except Exception:  # KafkaTimeoutError with records still unsent
        pass
    with contextlib.suppress(Exception):  # the forced close that close() did not reach
        producer._sender.force_close()
        producer._accumulator.abort_incomplete_batches()
    with contextlib.suppress(Exception):
        producer.close(timeout=0)


class DeadLetters:
    """Writes rejected records to the dead-letter topic and never lets one go unrecorded.

    A letter stays in memory until the broker acknowledges it; a failed write (the producer gave
    up, the broker refused the size, no broker at all) is counted and retried by :meth:`settle`.
    The checkpoint calls :meth:`settle` first and saves no shard that still has an unsent letter,
    so its offsets never pass a rejected record that is not in the dead-letter topic. Counts
    (sent and failed writes) are kept per shard so they travel with the shard's checkpoint.
    """

    def __init__(self, config: Config) -> None:
        self.topic = config.topics.dead_letters
        self.max_bytes = config.topics.dead_letter_max_bytes
        self._config = config
        self._producer: KafkaProducer | None = None
        self._lock = threading.Lock()
        self._unsent: dict[int, Letter] = {}  # sequence number -> letter, until acknowledged
        self._retry: set[int] = set()  # sequence numbers whose last write failed
        self._seq = 0
        self._counts: dict[int, list[int]] = {}  # shard -> [sent p, sent o, errors p, errors o]
        self._last_log = 0.0

    # -- counts, persisted with each shard --------------------------------------------------
    def load(self, shard: int, saved: dict[str, list[int]] | None) -> None:
        with self._lock:
            sent, errors = (saved or {}).get("sent", [0, 0]), (saved or {}).get("errors", [0, 0])
            self._counts[shard] = [int(sent[0]), int(sent[1]), int(errors[0]), int(errors[1])]

    def state(self, shard: int) -> dict[str, list[int]]:
        with self._lock:
            c = self._counts.get(shard, [0, 0, 0, 0])
            return {"sent": c[:2], "errors": c[2:]}

    def drop(self, shard: int) -> None:
        """The shard moved away: its counts go with its checkpoint (unsent letters are still sent)."""
        with self._lock:
            self._counts.pop(shard, None)

    def _count(self, shard: int, column: int) -> None:
        row = self._counts.get(shard)
        if row is not None:
            row[column] += 1

    @property
    def sent(self) -> dict[str, int]:
        with self._lock:
            return _by_role(self._counts.values(), 0)

    @property
    def errors(self) -> dict[str, int]:
        with self._lock:
            return _by_role(self._counts.values(), 2)

    @property
    def pending(self) -> int:
        """Letters not yet acknowledged by the broker."""
        return len(self._unsent)

    @property
    def backlogged(self) -> bool:
        """Too many unsent letters: stop reading until they are written."""
        return len(self._unsent) >= _BACKLOG_LETTERS

    def unsent_shards(self) -> set[int]:
        with self._lock:
            return {letter.shard for letter in self._unsent.values()}

    # -- writing ----------------------------------------------------------------------------
    def send(
        self, role: str, topic: str, partition: int, offset: int, key: bytes | None,
        value: bytes | None, reason: str, detail: str,
    ) -> None:  # fmt: skip
        if self.topic is None:
            return
        letter = build_letter(
            partition, 0 if role == "predictions" else 1, topic, offset, key, value, reason, detail,
            self.max_bytes,
        )  # fmt: skip
        with self._lock:
            self._counts.setdefault(partition, [0, 0, 0, 0])
            self._seq += 1
            seq = self._seq
            self._unsent[seq] = letter
        self._produce(seq, letter)

    def _produce(self, seq: int, letter: Letter) -> None:
        try:
            if self._producer is None:
                k = self._config.kafka
                self._producer = KafkaProducer(
                    acks="all",
                    linger_ms=50,
                    max_request_size=self.max_bytes + 65536,
                    max_block_ms=min(5000, k.request_timeout_ms),  # never stall the poll loop long
                    delivery_timeout_ms=k.request_timeout_ms + 100,
                    **client_options(k),
                )
            future = self._producer.send(
                self.topic, value=letter.value, key=letter.key, headers=letter.headers
            )
        except Exception as exc:  # no broker, buffer full, too large: retried by settle()
            self._failed(seq, exc)
            return
        future.add_callback(self._ok, seq).add_errback(self._failed_async, seq)

    def _ok(self, seq: int, _metadata: Any) -> None:
        with self._lock:
            letter = self._unsent.pop(seq, None)
            if letter is not None:
                self._count(letter.shard, letter.role)

    def _failed_async(self, seq: int, exc: Exception) -> None:
        self._failed(seq, exc)

    def _failed(self, seq: int, exc: BaseException) -> None:
        with self._lock:
            letter = self._unsent.get(seq)
            if letter is None:
                return
            self._count(letter.shard, 2 + letter.role)
            self._retry.add(seq)
            if isinstance(exc, MessageSizeTooLargeError | RecordListTooLargeError):
                # the dead-letter topic refuses even the cut copy: keep the reference only
                letter.value = None
                letter.headers = [h for h in letter.headers if h[0] != TRUNCATED]
                letter.headers.append((TRUNCATED, b"value omitted: the dead-letter topic refused its size"))
            now = time.monotonic()
            quiet = now - self._last_log < 10.0
            self._last_log = self._last_log if quiet else now
        if not quiet:  # one line per 10 s at most, however many letters fail
            log.error(
                "dead-letter write to %s failed, retrying (%d unsent): %s: %s",
                self.topic, len(self._unsent), type(exc).__name__, exc,
            )  # fmt: skip

    def settle(self, timeout: float) -> set[int]:
        """Write and retry until every letter is acknowledged or ``timeout`` passes.

        Returns the shards that still have unsent letters (empty when all are written).
        """
        deadline = time.monotonic() + timeout
        pause = 0.1
        while True:
            with self._lock:
                retry, self._retry = self._retry, set()
                letters = [(seq, self._unsent[seq]) for seq in sorted(retry) if seq in self._unsent]
            if letters and self._producer is not None:
                # a producer that gave up on a batch can stay wedged on its connection: start afresh
                producer, self._producer = self._producer, None
                with contextlib.suppress(Exception):
                    close_producer(producer, 0.0)
            for seq, letter in letters:
                self._produce(seq, letter)
            remaining = deadline - time.monotonic()
            if self._producer is not None and remaining > 0:
                with contextlib.suppress(Exception):  # a timeout leaves letters unsent: see below
                    self._producer.flush(timeout=remaining)
            if not self._unsent or time.monotonic() >= deadline:
                return self.unsent_shards()
            time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(pause * 2, 2.0)

    def flush(self, timeout: float = 10.0) -> None:
        self.settle(timeout)

    def close(self, timeout: float = 5.0) -> None:
        if self._producer is not None:
            close_producer(self._producer, timeout)


def _by_role(rows: Iterable[list[int]], column: int) -> dict[str, int]:
    out = {"predictions": 0, "outcomes": 0}
    for row in rows:
        out["predictions"] += row[column]
        out["outcomes"] += row[column + 1]
    return out


# -- the changelog ---------------------------------------------------------------------------------
CHANGELOG_CONFIGS = {
    "cleanup.policy": "compact",
    # an ignored (uncommitted) tail is rewritten by the next owner's claim within seconds;
    # compaction must not hide the committed value before that (docs/state.md)
    "min.compaction.lag.ms": str(3_600_000),
    "delete.retention.ms": str(7 * 86_400_000),
    "max.message.bytes": str(8 << 20),
}


def changelog_topic(config: Config) -> str:
    return config.state.changelog_topic or f"{config.kafka.group_id}-stream-fair-changelog"


def increments_topic(config: Config) -> str:
    """Partition owners publish each committed checkpoint's increment here; the leader folds them."""
    return f"{config.kafka.group_id}-stream-fair-increments"


def leader_topic(config: Config) -> str:
    """One partition: its owner (by the group's own assignment) is the leader, and the topic is the
    changelog of the leader's model-wide state."""
    return f"{config.kafka.group_id}-stream-fair-leader"


INCREMENTS_CONFIGS = {
    "cleanup.policy": "delete",
    "retention.ms": str(7 * 86_400_000),
    "max.message.bytes": str(8 << 20),
}


def ensure_internal_topics(consumer: KafkaConsumer, config: Config) -> None:
    """Create the increments topic and the leader topic (one partition each) when missing."""
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import TopicAlreadyExistsError

    wanted = {increments_topic(config): INCREMENTS_CONFIGS, leader_topic(config): CHANGELOG_CONFIGS}
    missing = {}
    for name, configs in wanted.items():
        try:
            parts = consumer.partitions_for_topic(name)
        except KafkaError:
            parts = None
        if parts and len(parts) != 1:
            raise BrokerError(
                f"kafka error: the internal topic {name!r} has {len(parts)} partitions, it needs 1: "
                "recreate it with one partition"
            )
        if not parts:
            missing[name] = configs
    if not missing:
        return
    admin = KafkaAdminClient(**client_options(config.kafka))
    try:
        for name, configs in missing.items():
            with contextlib.suppress(TopicAlreadyExistsError):
                admin.create_topics(
                    [NewTopic(name, 1, config.state.changelog_replication, topic_configs=configs)]
                )
    except KafkaError as exc:
        raise BrokerError(
            f"kafka error: cannot create the internal topics {sorted(missing)} ({type(exc).__name__}): "
            "create them yourself (one partition each) or grant the CreateTopics permission"
        ) from None
    finally:
        admin.close()


def ensure_changelog(consumer: KafkaConsumer, config: Config, partitions: int) -> None:
    """Create the changelog topic (compacted, co-partitioned with the inputs) or check it."""
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import TopicAlreadyExistsError

    name = changelog_topic(config)
    try:
        existing = consumer.partitions_for_topic(name)
    except KafkaError:
        existing = None
    if existing:
        if len(existing) != partitions:
            raise BrokerError(
                f"kafka error: the changelog topic {name!r} has {len(existing)} partitions but the input "
                f"topics have {partitions}: recreate it with {partitions} partitions (its state is lost: "
                "predictions still pending are then recounted from the input topics) or set "
                "state.changelog_topic to a new name"
            )
        return
    admin = KafkaAdminClient(**client_options(config.kafka))
    try:
        admin.create_topics(
            [NewTopic(name, partitions, config.state.changelog_replication, topic_configs=CHANGELOG_CONFIGS)]
        )
    except TopicAlreadyExistsError:
        pass
    except KafkaError as exc:
        raise BrokerError(
            f"kafka error: cannot create the changelog topic {name!r} ({type(exc).__name__}): create it "
            f"yourself (compacted, {partitions} partitions) or grant the CreateTopics permission"
        ) from None
    finally:
        admin.close()


class ChangelogWriter:
    """Writes checkpoints to the changelog: data records, then each partition's meta alone.

    The meta goes in its own batch after the data is acknowledged, so it is the commit marker (a
    reader applies a checkpoint's records only once it reads the meta after them) and the last
    record of the partition (high-water marks stay exact even on brokers that report the base
    offset of the last batch + 1).
    """

    def __init__(self, config: Config, topic: str | None = None) -> None:
        self.topic = topic or changelog_topic(config)
        self.timeout = config.kafka.request_timeout_ms / 1000
        self._producer = KafkaProducer(
            acks="all",
            linger_ms=5,
            batch_size=1 << 20,
            max_request_size=8 << 20,
            **client_options(config.kafka),
        )

    def send(self, partition: int, records: list[tuple[bytes, bytes | None]], epoch: int) -> None:
        headers = [(EPOCH_HEADER, str(epoch).encode())]
        send = self._producer.send
        for key, value in records:
            send(self.topic, key=key, value=value, partition=partition, headers=headers)

    def flush(self, timeout: float | None = None) -> None:
        self._producer.flush(timeout=self.timeout if timeout is None else timeout)

    def send_meta(self, partition: int, key: bytes, value: bytes, epoch: int) -> Any:
        headers = [(EPOCH_HEADER, str(epoch).encode())]
        return self._producer.send(self.topic, key=key, value=value, partition=partition, headers=headers)

    def offset(self, future: Any) -> int:
        return int(future.get(timeout=self.timeout).offset)

    def close(self, timeout: float = 5.0) -> None:
        close_producer(self._producer, timeout)


class ChangelogReader:
    """Reads changelog partitions from given offsets up to their end (as of :meth:`start`)."""

    def __init__(self, config: Config, topic: str | None = None) -> None:
        self.topic = topic or changelog_topic(config)
        self._consumer = KafkaConsumer(
            enable_auto_commit=False,
            max_poll_records=50_000,
            fetch_max_bytes=64 << 20,
            max_partition_fetch_bytes=16 << 20,
            **client_options(config.kafka),
        )
        self.ends: dict[int, int] = {}
        self.positions: dict[int, int] = {}

    def end_offset(self, partition: int) -> int:
        tp = TopicPartition(self.topic, partition)
        return int(self._consumer.end_offsets([tp])[tp])

    def beginning_offset(self, partition: int) -> int:
        tp = TopicPartition(self.topic, partition)
        return int(self._consumer.beginning_offsets([tp])[tp])

    def start(self, starts: dict[int, int]) -> None:
        """Read these partitions from these offsets (replaces any previous assignment)."""
        tps = {p: TopicPartition(self.topic, p) for p in starts}
        ends = self._consumer.end_offsets(list(tps.values()))
        self.ends = {p: int(ends[tp]) for p, tp in tps.items()}
        self.positions = dict(starts)
        self._consumer.assign(list(tps.values()))
        for p, tp in tps.items():
            self._consumer.seek(tp, starts[p])

    def stop(self, partition: int) -> None:
        self.ends.pop(partition, None)
        self.positions.pop(partition, None)
        self._consumer.assign([TopicPartition(self.topic, p) for p in self.ends])

    def done(self, partition: int) -> bool:
        return self.positions.get(partition, 0) >= self.ends.get(partition, 0)

    def poll(self, timeout_ms: int = 200) -> list[tuple[int, int, bytes, bytes | None, int]]:
        """``(partition, offset, key, value, epoch)`` of the next records, up to each end."""
        out = []
        for tp, records in self._consumer.poll(timeout_ms=timeout_ms).items():
            end = self.ends.get(tp.partition)
            if end is None:
                continue
            for r in records:
                if r.offset >= end:
                    break
                epoch = 0
                for name, value in r.headers or ():
                    if name == EPOCH_HEADER:
                        epoch = int(value)
                out.append((tp.partition, r.offset, r.key, r.value, epoch))
        for p in self.ends:
            # the fetch position, which also moves past offsets compaction removed
            self.positions[p] = int(self._consumer.position(TopicPartition(self.topic, p)))
        return out

    def close(self) -> None:
        self._consumer.close(autocommit=False)


# -- before the run loop: reach the cluster, read a sample (the CLI's run and check-config --probe) --
def _host_port(server: str) -> tuple[str, int]:
    host, _, port = server.strip().rpartition(":")
    if not host or not port.isdigit():
        raise BrokerError(
            f"kafka error: kafka.bootstrap_servers entry {server.strip()!r} is not host:port, e.g. kafka:9092"
        )
    return host.strip("[]"), int(port)


def wait_for_broker(
    k: KafkaConfig, progress: Callable[[str], None], *, attempt_timeout_s: float = 3.0
) -> None:
    """Return once a bootstrap server answers Kafka requests; report each failed attempt.

    Retries for ``kafka.request_timeout_ms`` in all, calling ``progress`` with one line per
    attempt (why it failed, time left), then raises :class:`BrokerError` with one line. A host
    name that does not resolve fails at once: retrying cannot fix a typo.
    """
    import socket
    import time

    servers = [_host_port(s) for s in k.bootstrap_servers.split(",") if s.strip()]
    unresolved = []
    for host, port in servers:
        try:
            socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError):
            unresolved.append(host)
    if len(unresolved) == len(servers):
        raise BrokerError(
            f"kafka error: cannot resolve host {unresolved[0]!r} of kafka.bootstrap_servers="
            f"{k.bootstrap_servers!r}: check the address (DNS name, or host:port)"
        )
    budget = k.request_timeout_ms / 1000
    start = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        left = budget - (time.monotonic() - start)
        why = _try_bootstrap(k, servers, max(0.5, min(attempt_timeout_s, left)))
        if why is None:
            return
        elapsed = time.monotonic() - start
        if elapsed >= budget:
            raise BrokerError(
                f"kafka error: cannot connect to kafka.bootstrap_servers={k.bootstrap_servers!r} "
                f"({why}) after {elapsed:.0f} s: check the address, security_protocol and credentials"
            )
        progress(
            f"waiting for Kafka at {k.bootstrap_servers}: {why} "
            f"(attempt {attempt}, {elapsed:.0f} s of {budget:.0f} s)"
        )
        time.sleep(min(float(attempt), 5.0, max(0.0, budget - elapsed)))  # back off: fewer lines


def _try_bootstrap(k: KafkaConfig, servers: list[tuple[str, int]], timeout_s: float) -> str | None:
    """None when the cluster answers a metadata request, else why not (short, for a log line)."""
    import socket

    reasons = []
    for host, port in servers:
        where = f"{host}:{port}: " if len(servers) > 1 else ""
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                break
        except (socket.gaierror, UnicodeError):
            reasons.append(f"{where}unknown host")
        except TimeoutError:
            reasons.append(f"{where}no answer in {timeout_s:.0f} s")
        except OSError as exc:
            reasons.append(f"{where}{exc.strerror or exc}".lower())
    else:
        return "; ".join(reasons)
    # TCP works: now the Kafka protocol (TLS, SASL and advertised listeners fail here).
    opts = {**client_options(k), "request_timeout_ms": max(1000, int(timeout_s * 1000))}
    if "bootstrap_timeout_ms" in KafkaConsumer.DEFAULT_CONFIG:
        opts["bootstrap_timeout_ms"] = int(timeout_s * 1000)
    try:
        with _quiet_kafka_logs():
            consumer = KafkaConsumer(group_id=None, enable_auto_commit=False, **opts)
            try:
                consumer.topics()
            finally:
                consumer.close(autocommit=False)
    except KafkaError as exc:
        return f"the broker did not answer Kafka requests ({type(exc).__name__})"
    return None


def sample_records(config: Config, topic: str, limit: int, timeout_s: float = 10.0) -> list[Any]:
    """Up to ``limit`` of the newest records of ``topic``, spread over its partitions.

    Reads without a consumer group (manual assignment, nothing committed), so it never moves the
    detector's offsets. Returns kafka-python ``ConsumerRecord`` objects; raises
    :class:`BrokerError` when the topic does not exist.
    """
    import time

    k = config.kafka
    with _quiet_kafka_logs():
        consumer = KafkaConsumer(group_id=None, enable_auto_commit=False, **client_options(k))
    try:
        parts = consumer.partitions_for_topic(topic)
        if not parts:
            raise BrokerError(f"kafka error: topic {topic!r} does not exist: create it or fix topics.*")
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        begin, end = consumer.beginning_offsets(tps), consumer.end_offsets(tps)
        share = max(1, -(-limit // len(tps)))
        wanted = 0
        for tp in tps:
            start = max(begin[tp], end[tp] - share)
            consumer.seek(tp, start)
            wanted += end[tp] - start
        out: list[Any] = []
        deadline = time.monotonic() + timeout_s
        while len(out) < min(limit, wanted) and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=200).values():
                out.extend(batch)
        return out[:limit]
    finally:
        consumer.close(autocommit=False)
