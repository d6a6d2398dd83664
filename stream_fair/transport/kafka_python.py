"""The kafka-python transport (the default): consumer, changelog, dead letters, admin.

kafka-python checks each record batch's CRC32C; with the ``crc32c`` package installed (a
dependency) it does so in C, which makes reading 2.5-3x faster than its pure-Python fallback.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, cast

from kafka import KafkaConsumer, KafkaProducer
from kafka import TopicPartition as KafkaTopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.coordinator.assignors.range import RangePartitionAssignor
from kafka.errors import (
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
)
from kafka.structs import MemberState, OffsetAndMetadata

from stream_fair.config import Config, KafkaConfig
from stream_fair.errors import BrokerError
from stream_fair.state.restore import EPOCH_HEADER
from stream_fair.transport.base import (
    FETCH_WAIT_MS,
    BrokerDown,
    ClientError,
    Listener,
    Record,
    TopicPartition,
    epoch_of,
    never,
    wait_sliced,
)


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


def _connect_error(k: KafkaConfig, exc: KafkaError) -> BrokerError:
    return BrokerError(
        f"kafka error: cannot connect to kafka.bootstrap_servers={k.bootstrap_servers!r} "
        f"({type(exc).__name__}): check the address, security_protocol and credentials"
    )


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
    # The forced close that close() did not reach: the sender thread fails what is unsent and
    # stops. Its batches are aborted by that thread alone: aborting them here too raced with it
    # (kafka-python raises IllegalStateError on a batch aborted twice, a traceback in the log).
    with contextlib.suppress(Exception):
        producer._sender.force_close()
        producer._sender.join(_FORCED_CLOSE_WAIT)
    with contextlib.suppress(Exception):
        producer.close(timeout=0)


_FORCED_CLOSE_WAIT = 1.0  # seconds for the sender thread to fail its batches and stop


def _ktp(tp: TopicPartition) -> KafkaTopicPartition:
    return KafkaTopicPartition(tp.topic, tp.partition)


def _tp(ktp: KafkaTopicPartition) -> TopicPartition:
    return TopicPartition(ktp.topic, ktp.partition)


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, listener: Listener) -> None:
        self.listener: Listener | None = listener

    def on_partitions_revoked(self, revoked: Any) -> None:
        if self.listener is not None:
            self.listener.on_partitions_revoked({_tp(tp) for tp in revoked})

    def on_partitions_assigned(self, assigned: Any) -> None:
        if self.listener is not None:
            self.listener.on_partitions_assigned({_tp(tp) for tp in assigned})

    def on_partitions_lost(self, lost: Any) -> None:
        # kafka-python's default calls on_partitions_revoked, which checkpoints: after an eviction
        # that would write the changelog behind the partition's new owner
        if self.listener is not None:
            self.listener.on_partitions_lost({_tp(tp) for tp in lost})


class KafkaPythonConsumer:
    """:class:`~stream_fair.transport.base.GroupConsumer` on a ``KafkaConsumer``."""

    def __init__(self, config: Config) -> None:
        k = config.kafka
        self.auto_offset_reset: str = k.auto_offset_reset
        self._rebalance: _Rebalance | None = None
        extra: dict[str, Any] = _no_auto_create()
        if "bootstrap_timeout_ms" in KafkaConsumer.DEFAULT_CONFIG:  # kafka-python >= 2.1
            # Otherwise an unreachable cluster takes 30 s to report, whatever request_timeout_ms says.
            extra["bootstrap_timeout_ms"] = k.request_timeout_ms
        try:
            with _quiet_kafka_logs():
                self._c = KafkaConsumer(
                    group_id=k.group_id,
                    enable_auto_commit=False,
                    auto_offset_reset=k.auto_offset_reset,
                    session_timeout_ms=k.session_timeout_ms,
                    heartbeat_interval_ms=k.heartbeat_interval_ms,
                    max_poll_interval_ms=k.max_poll_interval_ms,
                    max_poll_records=k.max_poll_records,
                    fetch_max_bytes=k.fetch_max_bytes,
                    metadata_max_age_ms=k.metadata_max_age_ms,
                    fetch_max_wait_ms=FETCH_WAIT_MS,
                    # The range assignor gives partition p of both topics to the same member: the
                    # join needs a prediction and its outcome (same key) in the same shard.
                    partition_assignment_strategy=(RangePartitionAssignor,),
                    **client_options(k),
                    **extra,
                )
        except KafkaError as exc:
            raise _connect_error(k, exc) from None
        never_create_topics(self._c)

    def subscribe(self, topics: Sequence[str], listener: Listener) -> None:
        self._rebalance = _Rebalance(listener)
        self._c.subscribe(list(topics), listener=self._rebalance)

    def poll(self, timeout_ms: int, max_records: int) -> Mapping[TopicPartition, Sequence[Record]]:
        # kafka-python's TopicPartition and ConsumerRecord are the protocol's shapes: no copy
        try:
            batches = self._c.poll(timeout_ms=timeout_ms, max_records=max_records)
        except KafkaConnectionError as exc:  # kafka-python 3 raises it from poll while refused
            raise BrokerDown(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
        return cast(Mapping[TopicPartition, Sequence[Record]], batches)

    def assignment(self) -> set[TopicPartition]:
        return {_tp(tp) for tp in self._c.assignment()}

    def pause(self, *partitions: TopicPartition) -> None:
        self._c.pause(*[_ktp(tp) for tp in partitions])

    def resume(self, *partitions: TopicPartition) -> None:
        ktps = [_ktp(tp) for tp in partitions]
        self._c.resume(*ktps)
        # kafka-python 3.0 parks what it fetched for a paused partition (KAFKA-7548) but puts it back
        # only while no other partition's records are in line, which after a poll they always are: the
        # partition would never be fetched again. Drop what it parked; it is fetched again from the
        # position, which a pause leaves where it was.
        fetcher = getattr(self._c, "_fetcher", None)
        parked_records = getattr(fetcher, "_paused_partition_records", {})
        parked_fetches = getattr(fetcher, "_paused_completed_fetches", {})
        for tp in ktps:
            records = parked_records.pop(tp, None)
            if records is not None:
                records.drain()
            parked_fetches.pop(tp, None)

    def paused(self) -> set[TopicPartition]:
        return {_tp(tp) for tp in self._c.paused()}

    def seek(self, partition: TopicPartition, offset: int) -> None:
        self._c.seek(_ktp(partition), offset)

    def seek_to_beginning(self, partition: TopicPartition) -> None:
        self._c.seek_to_beginning(_ktp(partition))

    def seek_to_end(self, partition: TopicPartition) -> None:
        self._c.seek_to_end(_ktp(partition))

    def position(self, partition: TopicPartition) -> int | None:
        try:
            pos = self._c.position(_ktp(partition), timeout_ms=0)
        except (KafkaError, TypeError):
            return None
        return None if pos is None else int(pos)

    def highwater(self, partition: TopicPartition) -> int | None:
        high = self._c.highwater(_ktp(partition))
        return None if high is None else int(high)

    def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        self._c.commit_async(offsets={_ktp(tp): OffsetAndMetadata(o, "", -1) for tp, o in offsets.items()})

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        try:
            parts = self._c.partitions_for_topic(topic)
        except KafkaError as exc:
            raise ClientError(type(exc).__name__) from None
        return set(parts) if parts else None

    def last_heard(self) -> float | None:
        """Healthy: a stable member of the group whose coordinator is known. The time is that of
        the last heartbeat answer (or of the last join): it stops moving while the broker is
        unreachable or hangs, even before kafka-python notices and drops the connection."""
        coordinator = getattr(self._c, "_coordinator", None)
        if (
            coordinator is None
            or coordinator.state != MemberState.STABLE
            or coordinator.coordinator_unknown()
        ):
            return None
        beat = coordinator.heartbeat
        return float(max(beat.last_receive, beat.last_reset))

    def topic_ids(self, topics: Sequence[str]) -> list[str | None]:
        """From the consumer's own metadata (refreshed every ``metadata_max_age_ms``)."""
        lookup = getattr(getattr(self._c, "_cluster", None), "topic_id", None)
        out: list[str | None] = []
        for topic in topics:
            tid = lookup(topic) if lookup is not None else None
            out.append(None if tid is None or getattr(tid, "int", 1) == 0 else str(tid))
        return out

    def close(self) -> None:
        if self._rebalance is not None:  # kafka-python 3 revokes on close: the caller has checkpointed
            self._rebalance.listener = None
        self._c.close(autocommit=False)


class KafkaPythonChangelogWriter:
    """Writes checkpoints to the changelog: data records, then each partition's meta alone.

    The meta goes in its own batch after the data is acknowledged, so it is the commit marker (a
    reader applies a checkpoint's records only once it reads the meta after them) and the last
    record of the partition (high-water marks stay exact even on brokers that report the base
    offset of the last batch + 1).
    """

    def __init__(self, config: Config, topic: str, ordered: bool = False) -> None:
        self.topic = topic
        self.timeout = config.kafka.request_timeout_ms / 1000
        self._producer = KafkaProducer(
            acks="all",
            linger_ms=5,
            batch_size=1 << 20,
            max_request_size=8 << 20,
            **({"max_in_flight_requests_per_connection": 1} if ordered else {}),
            **client_options(config.kafka),
        )
        self._sent: list[Any] = []  # futures since the last flush: any failure fails the flush
        self.cancel = never

    def send(self, partition: int, records: list[tuple[bytes, bytes | None]], epoch: int) -> None:
        headers = [(EPOCH_HEADER, str(epoch).encode())]
        send, sent = self._producer.send, self._sent.append
        for key, value in records:
            sent(send(self.topic, key=key, value=value, partition=partition, headers=headers))

    def flush(self, timeout: float | None = None) -> None:
        sent, self._sent = self._sent, []
        try:
            if not wait_sliced(self._flushed, self.timeout if timeout is None else timeout, self.cancel):
                raise KafkaTimeoutError("Timeout waiting for future")
        except KafkaError as exc:
            raise ClientError(f"changelog write failed: {type(exc).__name__}") from None
        failed = next((f for f in sent if f.failed()), None)
        if failed is not None:
            raise ClientError(f"changelog write failed: {type(failed.exception).__name__}")

    def send_meta(self, partition: int, key: bytes, value: bytes, epoch: int) -> Any:
        headers = [(EPOCH_HEADER, str(epoch).encode())]
        return self._producer.send(self.topic, key=key, value=value, partition=partition, headers=headers)

    def _flushed(self, seconds: float) -> bool:
        return _done(lambda: self._producer.flush(timeout=seconds))

    def offset(self, handle: Any) -> int:
        try:
            if not wait_sliced(lambda t: _done(lambda: handle.get(timeout=t)), self.timeout, self.cancel):
                raise KafkaTimeoutError("Timeout waiting for future")
            return int(handle.get(timeout=0).offset)
        except KafkaError as exc:
            raise ClientError(f"changelog write failed: {type(exc).__name__}") from None

    def close(self, timeout: float = 5.0) -> None:
        close_producer(self._producer, timeout)


def _done(wait: Callable[[], Any]) -> bool:
    """One bounded kafka-python wait: false if it timed out (any other error raises)."""
    try:
        wait()
    except KafkaTimeoutError:
        return False
    return True


class KafkaPythonChangelogReader:
    """Reads changelog partitions from given offsets up to their end (as of :meth:`start`).

    Every call that reaches the broker raises :class:`ClientError` on a client error (a broker
    that stalls past ``request_timeout_ms``, a lost connection): the restore drops and retries.
    """

    def __init__(self, config: Config, topic: str) -> None:
        self.topic = topic
        self._consumer = KafkaConsumer(
            enable_auto_commit=False,
            max_poll_records=50_000,
            fetch_max_bytes=64 << 20,
            max_partition_fetch_bytes=16 << 20,
            fetch_max_wait_ms=FETCH_WAIT_MS,
            **client_options(config.kafka),
        )
        self.ends: dict[int, int] = {}
        self.positions: dict[int, int] = {}

    def end_offset(self, partition: int) -> int:
        tp = KafkaTopicPartition(self.topic, partition)
        try:
            return int(self._consumer.end_offsets([tp])[tp])
        except KafkaError as exc:
            raise _changelog_error("offsets", exc) from None

    def beginning_offset(self, partition: int) -> int:
        tp = KafkaTopicPartition(self.topic, partition)
        try:
            return int(self._consumer.beginning_offsets([tp])[tp])
        except KafkaError as exc:
            raise _changelog_error("offsets", exc) from None

    def start(self, starts: dict[int, int]) -> None:
        tps = {p: KafkaTopicPartition(self.topic, p) for p in starts}
        try:
            ends = self._consumer.end_offsets(list(tps.values()))
            self._consumer.assign(list(tps.values()))
            for p, tp in tps.items():
                self._consumer.seek(tp, starts[p])
        except KafkaError as exc:
            raise _changelog_error("offsets", exc) from None
        self.ends = {p: int(ends[tp]) for p, tp in tps.items()}
        self.positions = dict(starts)

    def stop(self, partition: int) -> None:
        self.ends.pop(partition, None)
        self.positions.pop(partition, None)
        try:
            self._consumer.assign([KafkaTopicPartition(self.topic, p) for p in self.ends])
        except KafkaError as exc:
            raise _changelog_error("read", exc) from None

    def done(self, partition: int) -> bool:
        return self.positions.get(partition, 0) >= self.ends.get(partition, 0)

    def poll(self, timeout_ms: int = 200) -> list[tuple[int, int, bytes, bytes | None, int]]:
        out = []
        try:
            polled = self._consumer.poll(timeout_ms=timeout_ms)
        except KafkaError as exc:
            raise _changelog_error("read", exc) from None
        for tp, records in polled.items():
            end = self.ends.get(tp.partition)
            if end is None:
                continue
            for r in records:
                if r.offset >= end:
                    break
                out.append((tp.partition, r.offset, r.key, r.value, epoch_of(r.headers, EPOCH_HEADER)))
        try:
            for p in self.ends:
                # the fetch position, which also moves past offsets compaction removed
                self.positions[p] = int(self._consumer.position(KafkaTopicPartition(self.topic, p)))
        except KafkaError as exc:
            raise _changelog_error("read", exc) from None
        return out

    def close(self) -> None:
        self._consumer.close(autocommit=False)


def _changelog_error(what: str, exc: KafkaError) -> ClientError:
    """``changelog offsets: KafkaTimeoutError: Failed to get offsets ... in 6000 ms`` (one line)."""
    name, detail = type(exc).__name__, (str(exc).splitlines() or [""])[0]
    detail = detail.removeprefix(name).lstrip(": ")  # kafka-python's text starts with the name
    return ClientError(f"changelog {what}: {name}" + (f": {detail}" if detail else ""))


class KafkaPythonLetters:
    """:class:`~stream_fair.transport.base.LetterProducer` on a ``KafkaProducer``."""

    def __init__(self, config: Config, max_bytes: int) -> None:
        k = config.kafka
        block = min(5000, k.request_timeout_ms)  # never stall the poll loop (or a shutdown) long
        extra: dict[str, Any] = {}
        if "bootstrap_timeout_ms" in KafkaProducer.DEFAULT_CONFIG:  # kafka-python >= 2.1
            # rebuilt after failed writes: with the broker gone each rebuild waited 30 s for the
            # bootstrap, and the retries at shutdown outlasted the pod's grace period
            extra["bootstrap_timeout_ms"] = block
        self._producer = KafkaProducer(
            acks="all",
            linger_ms=50,
            max_request_size=max_bytes + 65536,
            max_block_ms=block,
            delivery_timeout_ms=k.request_timeout_ms + 100,
            **extra,
            **client_options(k),
        )

    def send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes]],
        on_ok: Callable[[], None],
        on_error: Callable[[BaseException, bool], None],
    ) -> None:
        try:
            future = self._producer.send(topic, value=value, key=key, headers=headers)
        except Exception as exc:  # no broker, buffer full, too large
            on_error(exc, _too_large(exc))
            return
        future.add_callback(lambda _metadata: on_ok()).add_errback(lambda exc: on_error(exc, _too_large(exc)))

    def flush(self, timeout: float) -> None:
        self._producer.flush(timeout=timeout)

    def close(self, timeout: float) -> None:
        close_producer(self._producer, timeout)


def _too_large(exc: BaseException) -> bool:
    return isinstance(exc, MessageSizeTooLargeError | RecordListTooLargeError)


class KafkaPythonReader:
    """:class:`~stream_fair.transport.base.Reader` on a ``KafkaConsumer`` without a group."""

    def __init__(self, config: Config, reset: str, max_records: int) -> None:
        k = config.kafka
        try:
            with _quiet_kafka_logs():
                consumer = KafkaConsumer(
                    group_id=None,
                    enable_auto_commit=False,
                    auto_offset_reset=reset,
                    max_poll_records=max_records,
                    fetch_max_wait_ms=FETCH_WAIT_MS,
                    **_no_auto_create(),
                    **client_options(k),
                )
        except KafkaError as exc:
            raise _connect_error(k, exc) from None
        self._c = never_create_topics(consumer)

    def assign(self, partitions: Sequence[TopicPartition]) -> None:
        self._c.assign([_ktp(tp) for tp in partitions])

    def seek(self, partition: TopicPartition, offset: int) -> None:
        self._c.seek(_ktp(partition), offset)

    def seek_to_beginning(self, partition: TopicPartition) -> None:
        self._c.seek_to_beginning(_ktp(partition))

    def poll(self, timeout_ms: int, max_records: int) -> Mapping[TopicPartition, Sequence[Record]]:
        try:
            batches = self._c.poll(timeout_ms=timeout_ms, max_records=max_records)
        except KafkaError as exc:  # out of range under reset "none"; a refused connection
            raise ClientError(type(exc).__name__) from None
        return cast(Mapping[TopicPartition, Sequence[Record]], batches)

    def bounds(self, partition: TopicPartition) -> tuple[int, int]:
        tp = _ktp(partition)
        try:
            return int(self._c.beginning_offsets([tp])[tp]), int(self._c.end_offsets([tp])[tp])
        except KafkaError as exc:
            raise ClientError(type(exc).__name__) from None

    def close(self) -> None:
        self._c.close(autocommit=False)


class KafkaPythonTransport:
    name = "kafka-python"

    def consumer(self, config: Config) -> KafkaPythonConsumer:
        return KafkaPythonConsumer(config)

    def changelog_writer(
        self, config: Config, topic: str, ordered: bool = False
    ) -> KafkaPythonChangelogWriter:
        return KafkaPythonChangelogWriter(config, topic, ordered)

    def changelog_reader(self, config: Config, topic: str) -> KafkaPythonChangelogReader:
        return KafkaPythonChangelogReader(config, topic)

    def letter_producer(self, config: Config, max_bytes: int) -> KafkaPythonLetters:
        return KafkaPythonLetters(config, max_bytes)

    def reader(self, config: Config, reset: str = "earliest", max_records: int = 500) -> KafkaPythonReader:
        return KafkaPythonReader(config, reset, max_records)

    def create_topic(
        self, k: KafkaConfig, name: str, partitions: int, replication: int, configs: dict[str, str]
    ) -> str | None:
        from kafka.admin import KafkaAdminClient, NewTopic
        from kafka.errors import TopicAlreadyExistsError

        try:
            admin = KafkaAdminClient(**client_options(k))
        except KafkaError as exc:
            return type(exc).__name__
        try:
            admin.create_topics([NewTopic(name, partitions, replication, topic_configs=configs)])
        except TopicAlreadyExistsError:
            pass
        except KafkaError as exc:
            return type(exc).__name__
        finally:
            admin.close()
        return None

    def probe(self, k: KafkaConfig, timeout_s: float) -> str | None:
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

    def sample(self, config: Config, topic: str, limit: int, timeout_s: float) -> list[Record] | None:
        with _quiet_kafka_logs():
            consumer = KafkaConsumer(group_id=None, enable_auto_commit=False, **client_options(config.kafka))
        try:
            parts = consumer.partitions_for_topic(topic)
            if not parts:
                return None
            tps = [KafkaTopicPartition(topic, p) for p in sorted(parts)]
            consumer.assign(tps)
            begin, end = consumer.beginning_offsets(tps), consumer.end_offsets(tps)
            share = max(1, -(-limit // len(tps)))
            wanted = 0
            for tp in tps:
                start = max(begin[tp], end[tp] - share)
                consumer.seek(tp, start)
                wanted += end[tp] - start
            out: list[Record] = []
            deadline = time.monotonic() + timeout_s
            while len(out) < min(limit, wanted) and time.monotonic() < deadline:
                for batch in consumer.poll(timeout_ms=200).values():
                    out.extend(batch)
            return out[:limit]
        finally:
            consumer.close(autocommit=False)
