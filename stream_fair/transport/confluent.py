"""The confluent-kafka (librdkafka) transport: ``kafka.transport: confluent``.

Needs the optional extra: ``pip install 'stream-fair[confluent]'``. It keeps the semantics of
:mod:`.base` where librdkafka's own differ:

* librdkafka's position is unknown after a seek until a record arrives, and does not move past a
  tail without records (compaction, transaction markers). The consumer keeps its own: the seek
  target, then the offset after the last record returned, or the end offset a partition-EOF
  event reports.
* librdkafka has no "last heartbeat" to read: the statistics (every second) say whether the
  member is in a steady group and how long ago the coordinator connection last received bytes.
* The assignment is applied inside the rebalance callback, so the listener can pause the new
  partitions before their first fetch. Closing does not call the listener.
* librdkafka reconnects on its own and reports an outage through its error callback (one warning
  per 10 s), so :meth:`ConfluentConsumer.poll` never raises
  :class:`~stream_fair.transport.base.BrokerDown`; ``/readyz`` still turns false through
  :meth:`ConfluentConsumer.last_heard`.
* Topic ids are not in librdkafka's metadata as the Python client exposes it: they are asked
  with a DescribeTopics request at most every ``kafka.metadata_max_age_ms``.
* Producers have no close: :meth:`ConfluentChangelogWriter.close` waits ``timeout`` for
  acknowledgements, then purges what is left (a restart re-sends anything uncommitted).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicCollection,
)
from confluent_kafka import TopicPartition as ConfluentTopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from stream_fair.config import Config, KafkaConfig
from stream_fair.errors import BrokerError
from stream_fair.state.restore import EPOCH_HEADER
from stream_fair.transport.base import (
    FETCH_WAIT_MS,
    ClientError,
    Listener,
    Message,
    Record,
    TopicPartition,
    epoch_of,
    never,
    wait_sliced,
)

log = logging.getLogger(__name__)
_LIBRDKAFKA = logging.getLogger("stream_fair.librdkafka")  # librdkafka's own log lines
_EOF = KafkaError._PARTITION_EOF
_NO_HEADERS: tuple[tuple[str, bytes], ...] = ()


def client_config(k: KafkaConfig, *, quiet: bool = False) -> dict[str, Any]:
    """librdkafka properties shared by consumer, producer and admin client.

    Logs go through Python logging (``stream_fair.librdkafka``), never straight to stderr;
    ``quiet`` drops them (connection probes report a failure once, as a :class:`BrokerError`).
    """
    conf: dict[str, Any] = {
        "bootstrap.servers": ",".join(s.strip() for s in k.bootstrap_servers.split(",") if s.strip()),
        "client.id": k.client_id,
        "security.protocol": k.security_protocol,
        "socket.timeout.ms": k.request_timeout_ms,
        "logger": _LIBRDKAFKA,
        "error_cb": _ErrorLog(quiet),
    }
    if quiet:
        conf["log_level"] = 0
    if k.sasl_mechanism:
        conf["sasl.mechanism"] = k.sasl_mechanism
    if k.sasl_username is not None:
        conf["sasl.username"] = k.sasl_username
    if k.sasl_password is not None:
        conf["sasl.password"] = k.sasl_password.get_secret_value()
    if k.security_protocol in ("SSL", "SASL_SSL"):
        conf["ssl.endpoint.identification.algorithm"] = "https" if k.ssl_check_hostname else "none"
        for key, prop in (
            ("ssl_cafile", "ssl.ca.location"),
            ("ssl_certfile", "ssl.certificate.location"),
            ("ssl_keyfile", "ssl.key.location"),
        ):
            if getattr(k, key):
                conf[prop] = getattr(k, key)
        if k.ssl_password is not None:
            conf["ssl.key.password"] = k.ssl_password.get_secret_value()
    return conf


class _ErrorLog:
    """librdkafka's error callback: one warning per 10 s at most (it retries by itself)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.last = 0.0

    def __call__(self, err: KafkaError) -> None:
        now = time.monotonic()
        if self.quiet or now - self.last < 10.0:
            return
        self.last = now
        log.warning("kafka client error: %s", err.str())


def _refused(exc: BaseException) -> BrokerError:
    """A client that refused its configuration (a TLS file it cannot read, a bad value)."""
    err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
    text = err.str() if err is not None else str(exc)
    return BrokerError(
        f"kafka error: the confluent-kafka client refused the kafka settings ({text}): "
        "check kafka.security_protocol, the sasl_* and ssl_* keys"
    )


def _name(exc: BaseException) -> str:
    err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
    return err.name() if err is not None else type(exc).__name__


def _ctp(tp: TopicPartition, offset: int | None = None) -> ConfluentTopicPartition:
    if offset is None:
        return ConfluentTopicPartition(tp.topic, tp.partition)
    return ConfluentTopicPartition(tp.topic, tp.partition, offset)


class ConfluentConsumer:
    """:class:`~stream_fair.transport.base.GroupConsumer` on a librdkafka consumer."""

    def __init__(self, config: Config) -> None:
        k = config.kafka
        self.auto_offset_reset: str = k.auto_offset_reset
        self.timeout = k.request_timeout_ms / 1000
        conf = {
            **client_config(k),
            "group.id": k.group_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": k.auto_offset_reset,
            "session.timeout.ms": k.session_timeout_ms,
            "heartbeat.interval.ms": k.heartbeat_interval_ms,
            "max.poll.interval.ms": k.max_poll_interval_ms,
            # partition p of both input topics to the same member: the join needs a prediction
            # and its outcome (same key) in the same shard
            "partition.assignment.strategy": "range",
            "fetch.max.bytes": k.fetch_max_bytes,
            "fetch.wait.max.ms": FETCH_WAIT_MS,
            "receive.message.max.bytes": max(100_000_000, k.fetch_max_bytes + 512),
            # a consumer never creates a missing input topic (an empty topic read as a quiet one)
            "allow.auto.create.topics": False,
            "topic.metadata.refresh.interval.ms": k.metadata_max_age_ms,
            "enable.partition.eof": True,  # the end of a partition moves its position (see below)
            "statistics.interval.ms": 1000,
            "stats_cb": self._stats,
        }
        try:
            self._c = Consumer(conf)
        except KafkaException as exc:
            raise _refused(exc) from None
        self._listener: Listener | None = None
        self._assigned: set[TopicPartition] = set()
        self._paused: set[TopicPartition] = set()
        self._positions: dict[TopicPartition, int] = {}
        self._stale = 0  # records dropped as a stale fetch (behind the position)
        self._heard: float | None = None
        self._closing = False
        self._kafka = k
        self._ids: dict[str, str | None] = {}
        self._ids_at = -float("inf")
        self._admin: AdminClient | None = None

    # -- membership ---------------------------------------------------------------------------
    def subscribe(self, topics: Sequence[str], listener: Listener) -> None:
        self._listener = listener
        # Ask for each topic's metadata first: librdkafka subscribes from its metadata cache, and a
        # topic created a moment ago (the internal topics) would be left out of the first
        # assignment until the next refresh (kafka.metadata_max_age_ms), leaving no leader.
        for topic in topics:
            with contextlib.suppress(KafkaException):
                self._c.list_topics(topic, timeout=min(5.0, self.timeout))
        self._c.subscribe(
            list(topics), on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
        )

    def _on_assign(self, consumer: Consumer, partitions: list[ConfluentTopicPartition]) -> None:
        # assigned here (not after the callback) so the listener can pause them before any fetch;
        # the restore's seek bumps librdkafka's version of the partition, so the answer to the
        # committed-offset query this starts is ignored once it arrives late
        consumer.assign(partitions)
        tps = {TopicPartition(p.topic, p.partition) for p in partitions}
        self._assigned = tps
        if self._listener is not None and not self._closing:
            self._listener.on_partitions_assigned(tps)

    def _on_revoke(self, consumer: Consumer, partitions: list[ConfluentTopicPartition]) -> None:
        self._release(consumer, partitions, lost=False)

    def _on_lost(self, consumer: Consumer, partitions: list[ConfluentTopicPartition]) -> None:
        self._release(consumer, partitions, lost=True)

    def _release(self, consumer: Consumer, partitions: list[ConfluentTopicPartition], lost: bool) -> None:
        tps = {TopicPartition(p.topic, p.partition) for p in partitions}
        try:
            if self._listener is not None and not self._closing:
                if lost:
                    self._listener.on_partitions_lost(tps)
                else:
                    self._listener.on_partitions_revoked(tps)
        finally:
            consumer.unassign()
            self._assigned = set()
            self._paused.clear()
            self._positions.clear()

    def _stats(self, text: str) -> None:
        """Healthy: a member in a steady group whose coordinator connection is up; heard when
        that connection last received bytes (heartbeat answers every heartbeat_interval_ms)."""
        try:
            stats = json.loads(text)
            group = stats.get("cgrp") or {}
            coordinator = (stats.get("brokers") or {}).get("GroupCoordinator") or {}
            idle = coordinator.get("rxidle", -1)
            steady = group.get("state") == "up" and group.get("join_state") == "steady"
            if steady and coordinator.get("state") == "UP" and idle >= 0:
                self._heard = time.monotonic() - idle / 1e6
            else:
                self._heard = None
        except (ValueError, AttributeError, TypeError):  # never let a stats change break polling
            self._heard = None

    def last_heard(self) -> float | None:
        return self._heard

    # -- records ------------------------------------------------------------------------------
    def poll(self, timeout_ms: int, max_records: int) -> Mapping[TopicPartition, Sequence[Record]]:
        # What is already fetched, at once; else the first message as soon as it arrives and what
        # came with it. (``consume(n, timeout)`` alone waits for n messages or the whole timeout:
        # an idle consumer held each record for up to the poll's timeout.)
        c = self._c
        messages: list[Any] = c.consume(max_records, 0)
        if not messages and timeout_ms > 0:
            first = c.poll(timeout_ms / 1000)
            if first is not None:
                messages = [first, *c.consume(max_records - 1, 0)] if max_records > 1 else [first]
        out: dict[TopicPartition, list[Message]] = {}
        if not messages:
            return out
        positions = self._positions
        topic = ""
        partition = -1
        bucket: list[Message] = []
        tp = TopicPartition("", -1)
        for m in messages:
            err = m.error()
            if err is not None:
                self._event(m, err)
                continue
            if m.partition() != partition or m.topic() != topic:
                topic, partition = m.topic(), m.partition()
                tp = TopicPartition(topic, partition)
                bucket = out.setdefault(tp, [])
            offset = m.offset()
            position = positions.get(tp)
            if position is not None and offset < position:
                # a stale fetch: librdkafka delivered again offsets already delivered since the
                # last seek (a late answer to the assignment's offset query restarted the fetch
                # at the reset offset). Like the Java consumer, records behind the position are
                # dropped: the position only moves back by an explicit seek.
                self._stale += 1
                continue
            positions[tp] = offset + 1
            kind, ts = m.timestamp()
            bucket.append(
                Message(
                    topic,
                    partition,
                    offset,
                    m.key(),
                    m.value(),
                    None if kind == TIMESTAMP_NOT_AVAILABLE else ts,
                    m.headers() or _NO_HEADERS,
                )
            )
        return {k: v for k, v in out.items() if v}

    def _event(self, m: Any, err: KafkaError) -> None:
        if err.code() == _EOF:
            tp = TopicPartition(m.topic(), m.partition())
            if tp not in self._paused and tp in self._assigned:
                self._positions[tp] = m.offset()  # the end: past any tail without records
            return
        if err.fatal():
            raise BrokerError(f"kafka error: the consumer failed ({err.str()}): restart it")
        log.warning("kafka consumer error: %s", err.str())

    # -- positions ----------------------------------------------------------------------------
    def assignment(self) -> set[TopicPartition]:
        return set(self._assigned)

    def pause(self, *partitions: TopicPartition) -> None:
        if partitions:
            self._c.pause([_ctp(tp) for tp in partitions])
            self._paused.update(partitions)

    def resume(self, *partitions: TopicPartition) -> None:
        # librdkafka drops what it fetched for a paused partition and resumes at the position
        if partitions:
            self._c.resume([_ctp(tp) for tp in partitions])
            self._paused.difference_update(partitions)

    def paused(self) -> set[TopicPartition]:
        return set(self._paused)

    def seek(self, partition: TopicPartition, offset: int) -> None:
        self._c.seek(_ctp(partition, offset))
        self._positions[partition] = offset

    def _seek_to(self, partition: TopicPartition, end: bool) -> None:
        # a logical offset, never a watermark query here: on the consumer's connection that waits
        # behind the fetch in flight (up to fetch.wait.max.ms) for every partition being resumed.
        # The position is unknown (lag None, the partition counts as behind) until the first
        # record or the partition's EOF event.
        self._c.seek(_ctp(partition, OFFSET_END if end else OFFSET_BEGINNING))
        self._positions.pop(partition, None)

    def seek_to_beginning(self, partition: TopicPartition) -> None:
        self._seek_to(partition, end=False)

    def seek_to_end(self, partition: TopicPartition) -> None:
        self._seek_to(partition, end=True)

    def position(self, partition: TopicPartition) -> int | None:
        return self._positions.get(partition)

    def highwater(self, partition: TopicPartition) -> int | None:
        try:
            _, high = self._c.get_watermark_offsets(_ctp(partition), cached=True)
        except KafkaException:
            return None
        return None if high is None or high < 0 else int(high)

    def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        self._c.commit(offsets=[_ctp(tp, o) for tp, o in offsets.items()], asynchronous=True)

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        return _partitions(self._c, topic, self.timeout)

    def topic_ids(self, topics: Sequence[str]) -> list[str | None]:
        now = time.monotonic()
        if now - self._ids_at >= self._kafka.metadata_max_age_ms / 1000:
            self._ids_at = now  # also after a failure: the ids last seen stay, asked again later
            self._ids = _topic_ids(self._admin_client(), topics, min(5.0, self.timeout), self._ids)
        return [self._ids.get(t) for t in topics]

    def _admin_client(self) -> AdminClient:
        if self._admin is None:
            self._admin = AdminClient(client_config(self._kafka, quiet=True))
        return self._admin

    def close(self) -> None:
        self._closing = True
        self._c.close()


def _topic_ids(
    admin: AdminClient, topics: Sequence[str], timeout: float, known: dict[str, str | None]
) -> dict[str, str | None]:
    """The topics' ids by DescribeTopics; a topic the broker does not know has none (None), one
    that could not be asked keeps the id last seen."""
    out = dict(known)
    try:
        futures = admin.describe_topics(TopicCollection(list(topics)), request_timeout=timeout)
    except (KafkaException, ValueError):
        return out
    for topic, future in futures.items():
        try:
            tid = future.result(timeout)
        except KafkaException as exc:
            err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
            if err is not None and err.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                out[topic] = None
            continue
        except Exception:  # the future's own timeout
            continue
        out[topic] = _uuid_text(getattr(tid, "topic_id", None))
    return out


def _uuid_text(tid: Any) -> str | None:
    """A topic id as kafka-python writes it (``01a22bd7-e826-...``; librdkafka prints base64), so
    the ids stored in the state are the same whichever transport wrote them; None for the zero id.
    """
    if tid is None:
        return None
    msb, lsb = tid.get_most_significant_bits(), tid.get_least_significant_bits()
    value = ((msb & (2**64 - 1)) << 64) | (lsb & (2**64 - 1))
    return None if value == 0 else str(uuid.UUID(int=value))


def _partitions(client: Any, topic: str, timeout: float) -> set[int] | None:
    try:
        meta = client.list_topics(topic, timeout=timeout).topics.get(topic)
    except KafkaException as exc:
        raise ClientError(_name(exc)) from None
    if meta is None or (meta.error is not None and meta.error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART):
        return None
    if meta.error is not None:
        raise ClientError(meta.error.name())
    return set(meta.partitions) or None


class ConfluentChangelogWriter:
    """Writes checkpoints to the changelog: data records, then each partition's meta alone.

    Idempotent (in order per partition, even across retries); every data record's delivery is
    checked at :meth:`flush`, so a meta record is never written after lost data.
    """

    def __init__(self, config: Config, topic: str) -> None:
        self.topic = topic
        self.timeout = config.kafka.request_timeout_ms / 1000
        conf = {
            **client_config(config.kafka),
            "acks": "all",
            "enable.idempotence": True,
            "linger.ms": 5,
            "batch.size": 1 << 20,
            "message.max.bytes": 8 << 20,
            "on_delivery": self._delivered,
        }
        try:
            self._producer = Producer(conf)
        except KafkaException as exc:
            raise _refused(exc) from None
        self._failed: KafkaError | None = None
        self.cancel = never

    def _acknowledged(self, timeout: float) -> int:
        """Wait for the acknowledgements (see :func:`~.base.wait_sliced`); how many are missing."""
        left = [len(self._producer)]

        def step(seconds: float) -> bool:
            left[0] = self._producer.flush(seconds)
            return not left[0]

        wait_sliced(step, timeout, self.cancel)
        return left[0]

    def _delivered(self, err: KafkaError | None, _msg: Any) -> None:
        if err is not None and self._failed is None:
            self._failed = err

    def _produce(self, partition: int, key: bytes, value: bytes | None, headers: Any, **kw: Any) -> None:
        deadline = None
        while True:
            try:
                self._producer.produce(self.topic, value, key, partition, headers=headers, **kw)
                return
            except BufferError:  # the local queue is full: let it drain
                deadline = deadline or time.monotonic() + self.timeout
                if time.monotonic() >= deadline or self.cancel():
                    raise ClientError("changelog write failed: the producer queue stayed full") from None
                self._producer.poll(0.05)

    def send(self, partition: int, records: list[tuple[bytes, bytes | None]], epoch: int) -> None:
        headers: list[Any] = [(EPOCH_HEADER, str(epoch).encode())]
        produce = self._producer.produce
        for key, value in records:
            try:
                produce(self.topic, value, key, partition, headers=headers)
            except BufferError:
                self._produce(partition, key, value, headers)

    def flush(self, timeout: float | None = None) -> None:
        left = self._acknowledged(self.timeout if timeout is None else timeout)
        failed, self._failed = self._failed, None
        if left:
            raise ClientError(f"changelog write failed: {left} records not acknowledged in time")
        if failed is not None:
            raise ClientError(f"changelog write failed: {failed.name()}")

    def send_meta(self, partition: int, key: bytes, value: bytes, epoch: int) -> Any:
        result: list[Any] = []
        self._produce(
            partition,
            key,
            value,
            [(EPOCH_HEADER, str(epoch).encode())],
            on_delivery=lambda err, msg: result.append(err if err is not None else msg.offset()),
        )
        return result

    def offset(self, handle: Any) -> int:
        if not handle:
            self._acknowledged(self.timeout)
        if not handle:
            raise ClientError("changelog write failed: the meta record was not acknowledged in time")
        if isinstance(handle[0], KafkaError):
            raise ClientError(f"changelog write failed: {handle[0].name()}")
        return int(handle[0])

    def close(self, timeout: float = 5.0) -> None:
        try:
            if timeout <= 0 or self._producer.flush(timeout):
                self._producer.purge()  # unsent: never needed, a restart re-sends the uncommitted
                self._producer.flush(0)
        except Exception:  # never raises: a shutdown continues
            pass


class ConfluentChangelogReader:
    """Reads changelog partitions from given offsets up to their end (as of :meth:`start`).

    Positions move with the records read and, at the end of a partition, to the end offset its
    EOF event reports: past offsets compaction removed.
    """

    def __init__(self, config: Config, topic: str) -> None:
        self.topic = topic
        self.timeout = config.kafka.request_timeout_ms / 1000
        conf = {
            **client_config(config.kafka),
            "group.id": f"{config.kafka.group_id}-stream-fair-restore",  # never joined: assign() only
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "fetch.max.bytes": 64 << 20,
            "fetch.wait.max.ms": FETCH_WAIT_MS,
            "max.partition.fetch.bytes": 16 << 20,
            "receive.message.max.bytes": (64 << 20) + 512,
        }
        try:
            self._consumer = Consumer(conf)
        except KafkaException as exc:
            raise _refused(exc) from None
        self.ends: dict[int, int] = {}
        self.positions: dict[int, int] = {}

    def _watermarks(self, partition: int) -> tuple[int, int]:
        try:
            low, high = self._consumer.get_watermark_offsets(
                ConfluentTopicPartition(self.topic, partition), timeout=self.timeout
            )
        except KafkaException as exc:
            raise ClientError(f"changelog offsets: {_name(exc)}") from None
        return int(low), int(high)

    def end_offset(self, partition: int) -> int:
        return self._watermarks(partition)[1]

    def beginning_offset(self, partition: int) -> int:
        return self._watermarks(partition)[0]

    def start(self, starts: dict[int, int]) -> None:
        ends = {p: self.end_offset(p) for p in starts}
        try:
            self._consumer.assign([ConfluentTopicPartition(self.topic, p, o) for p, o in starts.items()])
        except KafkaException as exc:
            raise ClientError(f"changelog read: {_name(exc)}") from None
        self.ends, self.positions = ends, dict(starts)

    def stop(self, partition: int) -> None:
        self.ends.pop(partition, None)
        self.positions.pop(partition, None)
        try:
            self._consumer.assign(
                [ConfluentTopicPartition(self.topic, p, o) for p, o in self.positions.items()]
            )
        except KafkaException as exc:
            raise ClientError(f"changelog read: {_name(exc)}") from None

    def done(self, partition: int) -> bool:
        return self.positions.get(partition, 0) >= self.ends.get(partition, 0)

    def poll(self, timeout_ms: int = 200) -> list[tuple[int, int, bytes, bytes | None, int]]:
        out = []
        ends, positions = self.ends, self.positions
        try:
            messages: list[Any] = self._consumer.consume(10_000, timeout_ms / 1000)
        except KafkaException as exc:
            raise ClientError(f"changelog read: {_name(exc)}") from None
        for m in messages:
            p = m.partition()
            end = ends.get(p)
            if end is None:
                continue
            err = m.error()
            if err is not None:
                if err.code() == _EOF:
                    positions[p] = max(positions[p], m.offset())
                elif err.fatal():
                    raise ClientError(f"changelog read failed: {err.name()}")
                else:
                    log.warning("changelog read error: %s", err.str())
                continue
            offset = m.offset()
            positions[p] = max(positions[p], offset + 1)
            if offset < end:
                out.append((p, offset, m.key(), m.value(), epoch_of(m.headers(), EPOCH_HEADER)))
        return out

    def close(self) -> None:
        self._consumer.close()


class ConfluentLetters:
    """:class:`~stream_fair.transport.base.LetterProducer` on a librdkafka producer."""

    def __init__(self, config: Config, max_bytes: int) -> None:
        k = config.kafka
        conf = {
            **client_config(k),
            "acks": "all",
            "linger.ms": 50,
            "message.max.bytes": max_bytes + 65536,
            "message.timeout.ms": k.request_timeout_ms + 100,  # kafka-python's delivery_timeout_ms
        }
        try:
            self._producer = Producer(conf)
        except KafkaException as exc:
            raise _refused(exc) from None

    def send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes]],
        on_ok: Callable[[], None],
        on_error: Callable[[BaseException, bool], None],
    ) -> None:
        def delivered(err: KafkaError | None, _msg: Any) -> None:
            if err is None:
                on_ok()
            else:
                on_error(KafkaException(err), _too_large(err))

        try:
            self._producer.produce(topic, value, key, headers=headers, on_delivery=delivered)  # type: ignore[arg-type]
        except KafkaException as exc:  # refused locally, e.g. too large
            err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
            on_error(exc, err is not None and _too_large(err))
        except BufferError as exc:  # the local queue is full
            on_error(exc, False)
        self._producer.poll(0)  # serve delivery callbacks

    def flush(self, timeout: float) -> None:
        self._producer.flush(timeout)

    def close(self, timeout: float) -> None:
        try:  # unacknowledged letters fail at the end (their callbacks run), as kafka-python's
            if timeout <= 0 or self._producer.flush(timeout):
                self._producer.purge()
                self._producer.poll(0.1)  # serves the purged records' delivery reports
        except Exception:  # never raises: a shutdown continues
            pass


def _too_large(err: KafkaError) -> bool:
    return err.code() in (KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE)


class ConfluentReader:
    """:class:`~stream_fair.transport.base.Reader` on a librdkafka consumer that never joins a group.

    Assignments and seeks are applied at the next :meth:`poll`, as one assign at concrete offsets
    (the beginning is asked for first): re-assigning a partition whose logical offset
    (``OFFSET_BEGINNING``) is still being queried lets the late answer move the fetch back there.
    """

    def __init__(self, config: Config, reset: str, max_records: int) -> None:
        k = config.kafka
        self.timeout = k.request_timeout_ms / 1000
        conf = {
            **client_config(k),
            "group.id": f"{k.group_id}-stream-fair-reader",  # never joined: assign() only
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "error" if reset == "none" else reset,
            "allow.auto.create.topics": False,
            "fetch.wait.max.ms": FETCH_WAIT_MS,
        }
        try:
            self._c = Consumer(conf)
        except KafkaException as exc:
            raise _refused(exc) from None
        self._starts: dict[TopicPartition, int | None] = {}
        self._dirty = False

    def assign(self, partitions: Sequence[TopicPartition]) -> None:
        self._starts = {tp: self._starts.get(tp) for tp in partitions}
        self._dirty = True  # applied at the next poll: an assign then a seek is one assign

    def seek(self, partition: TopicPartition, offset: int) -> None:
        self._starts[partition] = offset
        self._dirty = True

    def seek_to_beginning(self, partition: TopicPartition) -> None:
        self._starts[partition] = None
        self._dirty = True

    def _apply(self) -> None:
        for tp, offset in self._starts.items():
            if offset is None:
                self._starts[tp] = self.bounds(tp)[0]
        self._c.assign([_ctp(tp, o) for tp, o in self._starts.items()])
        self._dirty = False

    def poll(self, timeout_ms: int, max_records: int) -> Mapping[TopicPartition, Sequence[Record]]:
        if self._dirty:
            self._apply()
        out: dict[TopicPartition, list[Message]] = {}
        messages: list[Any] = self._c.consume(max_records, timeout_ms / 1000)
        for m in messages:
            err = m.error()
            if err is not None:
                if err.code() == KafkaError._AUTO_OFFSET_RESET or err.fatal():
                    raise ClientError(err.name())
                continue
            kind, ts = m.timestamp()
            tp = TopicPartition(m.topic(), m.partition())
            out.setdefault(tp, []).append(
                Message(
                    tp.topic,
                    tp.partition,
                    m.offset(),
                    m.key(),
                    m.value(),
                    None if kind == TIMESTAMP_NOT_AVAILABLE else ts,
                    m.headers() or _NO_HEADERS,
                )  # fmt: skip
            )
        for tp, records in out.items():  # later assigns start where the records end
            if tp in self._starts:
                self._starts[tp] = records[-1].offset + 1
        return out

    def bounds(self, partition: TopicPartition) -> tuple[int, int]:
        try:
            low, high = self._c.get_watermark_offsets(_ctp(partition), timeout=self.timeout)
        except KafkaException as exc:
            raise ClientError(_name(exc)) from None
        return int(low), int(high)

    def close(self) -> None:
        self._c.close()


class ConfluentTransport:
    name = "confluent"

    def consumer(self, config: Config) -> ConfluentConsumer:
        return ConfluentConsumer(config)

    def changelog_writer(self, config: Config, topic: str, ordered: bool = False) -> ConfluentChangelogWriter:
        return ConfluentChangelogWriter(config, topic)  # idempotent: always in order

    def changelog_reader(self, config: Config, topic: str) -> ConfluentChangelogReader:
        return ConfluentChangelogReader(config, topic)

    def letter_producer(self, config: Config, max_bytes: int) -> ConfluentLetters:
        return ConfluentLetters(config, max_bytes)

    def reader(self, config: Config, reset: str = "earliest", max_records: int = 500) -> ConfluentReader:
        return ConfluentReader(config, reset, max_records)

    def _admin(self, k: KafkaConfig, quiet: bool = False) -> AdminClient:
        try:
            return AdminClient(client_config(k, quiet=quiet))
        except KafkaException as exc:
            raise _refused(exc) from None

    def create_topic(
        self, k: KafkaConfig, name: str, partitions: int, replication: int, configs: dict[str, str]
    ) -> str | None:
        admin = self._admin(k)
        topic = NewTopic(name, partitions, replication, config=dict(configs))
        try:
            admin.create_topics([topic], request_timeout=k.request_timeout_ms / 1000)[name].result(
                k.request_timeout_ms / 1000
            )
        except KafkaException as exc:
            err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
            if err is not None and err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                return None
            return _name(exc)
        except Exception as exc:  # the future's own timeout
            return type(exc).__name__
        return None

    def probe(self, k: KafkaConfig, timeout_s: float) -> str | None:
        admin = self._admin(k, quiet=True)
        try:
            admin.list_topics(timeout=timeout_s)
        except KafkaException as exc:
            return f"the broker did not answer Kafka requests ({_name(exc)})"
        return None

    def sample(self, config: Config, topic: str, limit: int, timeout_s: float) -> list[Record] | None:
        k = config.kafka
        conf = {
            **client_config(k, quiet=True),
            "group.id": f"{k.group_id}-stream-fair-probe",  # never joined: assign() only
            "enable.auto.commit": False,
        }
        try:
            consumer = Consumer(conf)
        except KafkaException as exc:
            raise _refused(exc) from None
        try:
            parts = _partitions(consumer, topic, k.request_timeout_ms / 1000)
            if not parts:
                return None
            share = max(1, -(-limit // len(parts)))
            assign, wanted = [], 0
            for p in sorted(parts):
                low, high = consumer.get_watermark_offsets(
                    ConfluentTopicPartition(topic, p), timeout=k.request_timeout_ms / 1000
                )
                start = max(low, high - share)
                assign.append(ConfluentTopicPartition(topic, p, start))
                wanted += high - start
            consumer.assign(assign)
            out: list[Record] = []
            deadline = time.monotonic() + timeout_s
            while len(out) < min(limit, wanted) and time.monotonic() < deadline:
                messages: list[Any] = consumer.consume(500, 0.2)
                for m in messages:
                    if m.error() is None:
                        kind, ts = m.timestamp()
                        out.append(
                            Message(
                                m.topic(),
                                m.partition(),
                                m.offset(),
                                m.key(),
                                m.value(),
                                None if kind == TIMESTAMP_NOT_AVAILABLE else ts,
                                m.headers() or _NO_HEADERS,
                            )  # fmt: skip
                        )
            return out[:limit]
        except KafkaException as exc:
            raise BrokerError(f"kafka error: cannot read topic {topic!r} ({_name(exc)})") from None
        finally:
            consumer.close()
