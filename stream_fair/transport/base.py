"""The transport contract: what the run loop, the changelog and the CLI need from a Kafka client.

Two implementations sit behind it, chosen by ``kafka.transport``: :mod:`.kafka_python` (the
default) and :mod:`.confluent` (librdkafka, the ``confluent`` extra). Nothing outside this
package names a client library; everything here is plain Python.

Semantics every implementation keeps (the tests run the broker-facing suite on each):

* **Group consumer.** Subscribes with the *range* assignor, so partition *p* of both input topics
  goes to the same member. Rebalance callbacks run inside :meth:`GroupConsumer.poll`, on the
  caller's thread; an assigned partition is fetched from nowhere until the listener (or the
  caller) seeks it. A paused partition returns no record until it is resumed, and resuming
  continues exactly at :meth:`GroupConsumer.position`. Positions and high-water marks never
  block. Offsets committed to Kafka are a mirror for lag tools only: the state store holds the
  offsets that count. Closing leaves the group without calling the listener.
* **Changelog writer.** Records of one partition are acknowledged in the order they were sent;
  :meth:`ChangelogWriter.flush` raises if any record sent before it failed, so a meta record
  (the commit marker, ``docs/state.md``) is never written after lost data.
* **Changelog reader.** Manual assignment, no group; positions move past offsets compaction
  removed, so :meth:`ChangelogReader.done` turns true at the end offset taken at ``start``.
* **Letter producer.** One callback per record, on success or on failure; failures say whether
  the broker (or the client) refused the record's size.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

if TYPE_CHECKING:
    from stream_fair.config import Config, KafkaConfig


class TopicPartition(NamedTuple):
    """One partition of one topic (equal to, and hashed like, the clients' own tuples)."""

    topic: str
    partition: int


class Record(Protocol):
    """A consumed record as the run loop reads it (kafka-python's ``ConsumerRecord`` is one)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def timestamp(self) -> int | None: ...  # milliseconds since the epoch
    @property
    def headers(self) -> Sequence[tuple[str, bytes]]: ...


class Message(NamedTuple):
    """A :class:`Record` for clients whose own record type has another shape."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: int | None
    headers: Sequence[tuple[str, bytes]]


class ClientError(Exception):
    """A client call failed; the message is short (the client's error name), for a one-line report."""


class BrokerDown(ClientError):
    """Raised by :meth:`GroupConsumer.poll` while every broker refuses connections (an outage, a
    restart): the run loop keeps polling, as it does during a hang, instead of dying."""


class Listener(Protocol):
    """Told of partitions moving (all called from inside :meth:`GroupConsumer.poll`)."""

    def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None: ...
    def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None: ...
    def on_partitions_lost(self, lost: set[TopicPartition]) -> None:
        """The member was evicted (session timeout, ``max_poll_interval_ms`` exceeded): the
        partitions may already belong to another member, so nothing may be committed for them."""
        ...


class GroupConsumer(Protocol):
    """A member of the detector's consumer group."""

    auto_offset_reset: str

    def subscribe(self, topics: Sequence[str], listener: Listener) -> None: ...
    def poll(self, timeout_ms: int, max_records: int) -> Mapping[TopicPartition, Sequence[Record]]:
        """Records by partition, each list in offset order; rebalance callbacks run in here.
        Raises :class:`BrokerDown` while no broker accepts a connection."""
        ...

    def assignment(self) -> set[TopicPartition]: ...
    def pause(self, *partitions: TopicPartition) -> None: ...
    def resume(self, *partitions: TopicPartition) -> None: ...
    def paused(self) -> set[TopicPartition]: ...
    def seek(self, partition: TopicPartition, offset: int) -> None: ...
    def seek_to_beginning(self, partition: TopicPartition) -> None: ...
    def seek_to_end(self, partition: TopicPartition) -> None: ...
    def position(self, partition: TopicPartition) -> int | None:
        """The offset of the next record :meth:`poll` returns; None while unknown. Never blocks."""
        ...

    def highwater(self, partition: TopicPartition) -> int | None:
        """The high-water mark from the last fetch; None before the first. Never blocks."""
        ...

    def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Mirror offsets into the group's committed offsets, asynchronously (lag tools only)."""
        ...

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        """The topic's partitions, None when it does not exist; :class:`ClientError` when the
        cluster cannot be read."""
        ...

    def last_heard(self) -> float | None:
        """When (``time.monotonic()``) the group coordinator was last heard from while this is a
        stable member; None while it is not one."""
        ...

    def topic_ids(self, topics: Sequence[str]) -> list[str | None]:
        """The topics' ids (Kafka 2.8+) as strings, from metadata at most ``kafka.metadata_max_age_ms``
        old; None where the broker sends none. Called on every poll: it must stay cheap."""
        ...

    def close(self) -> None: ...


class Reader(Protocol):
    """A consumer without a group (manual assignment, nothing committed, never creates a topic)."""

    def assign(self, partitions: Sequence[TopicPartition]) -> None: ...
    def seek(self, partition: TopicPartition, offset: int) -> None: ...
    def seek_to_beginning(self, partition: TopicPartition) -> None: ...
    def poll(self, timeout_ms: int, max_records: int) -> Mapping[TopicPartition, Sequence[Record]]:
        """Records by partition; :class:`ClientError` when a position is out of range and the
        reader was made with ``reset="none"``."""
        ...

    def bounds(self, partition: TopicPartition) -> tuple[int, int]:
        """The partition's beginning and (reported) end offsets; :class:`ClientError` on failure."""
        ...

    def close(self) -> None: ...


FETCH_WAIT_MS = 100
"""The longest a fetch waits on the broker for data on an idle partition, on both transports (the
clients' defaults are 500 ms). A record that arrives while a fetch waits may be returned only when
that wait ends (measured on the embedded broker: an idle detector counted an outcome after a median
of ~250 ms with 500 ms, ~90 ms with 100 ms; ``bench/latency.py``), and other requests on the
connection (offsets, metadata) wait behind it."""

WAIT_SLICE = 0.1
"""Seconds between checks of a writer's ``cancel`` while it waits for acknowledgements."""


def never() -> bool:
    """The default ``cancel``: a wait runs to its timeout."""
    return False


def wait_sliced(step: Callable[[float], bool], timeout: float, cancel: Callable[[], bool]) -> bool:
    """Call ``step(seconds)`` (one bounded wait; true when done) until it is done, ``timeout``
    seconds have passed or ``cancel()`` is true; returns whether it is done.

    A wait for the broker can be long (``kafka.request_timeout_ms``, 30 s by default): a stop
    requested meanwhile must not wait for it, or a pod outlives its grace period.
    """
    deadline = time.monotonic() + timeout
    while True:
        if step(max(0.0, min(WAIT_SLICE, deadline - time.monotonic()))):
            return True
        if time.monotonic() >= deadline or cancel():
            return False


class ChangelogWriter(Protocol):
    """Writes checkpoints to the changelog topic (``docs/state.md``, "The protocol").

    Also the writer of the other internal topics (increments, leader): records in order, every
    failure reported by :meth:`flush`.
    """

    topic: str
    timeout: float  # seconds a flush or a meta's offset waits by default (shutdown lowers it)
    cancel: Callable[[], bool]  # checked every WAIT_SLICE while waiting: true ends the wait

    def send(self, partition: int, records: list[tuple[bytes, bytes | None]], epoch: int) -> None: ...
    def flush(self, timeout: float | None = None) -> None:
        """Wait until everything sent is acknowledged; raise if anything failed or timed out, or
        if :attr:`cancel` turned true first (a stop was requested: the run loop's write fails like
        a timeout, the previous checkpoint stays valid, and the shutdown writes again with its
        own bounded wait)."""
        ...

    def send_meta(self, partition: int, key: bytes, value: bytes, epoch: int) -> Any: ...
    def offset(self, handle: Any) -> int:
        """The offset the broker gave a meta record (waits for it); raises if it failed."""
        ...

    def close(self, timeout: float = 5.0) -> None:
        """Within ``timeout`` seconds, dropping what is unsent (a restart re-sends what was not
        committed); never raises."""
        ...


class ChangelogReader(Protocol):
    """Reads changelog partitions from given offsets up to their end offsets as of :meth:`start`."""

    topic: str
    ends: dict[int, int]
    positions: dict[int, int]

    def end_offset(self, partition: int) -> int: ...
    def beginning_offset(self, partition: int) -> int: ...
    def start(self, starts: dict[int, int]) -> None:
        """Read these partitions from these offsets (replaces any previous assignment)."""
        ...

    def stop(self, partition: int) -> None: ...
    def done(self, partition: int) -> bool: ...
    def poll(self, timeout_ms: int = 200) -> list[tuple[int, int, bytes, bytes | None, int]]:
        """``(partition, offset, key, value, epoch)`` of the next records, up to each end."""
        ...

    def close(self) -> None: ...


class LetterProducer(Protocol):
    """Sends dead letters; exactly one of the callbacks runs for each record sent."""

    def send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes]],
        on_ok: Callable[[], None],
        on_error: Callable[[BaseException, bool], None],  # (error, the record was too large)
    ) -> None: ...
    def flush(self, timeout: float) -> None: ...
    def close(self, timeout: float) -> None:
        """Stop within ``timeout`` seconds, never raising; with 0, records not yet acknowledged
        fail at once (``on_error``)."""
        ...


class Transport(Protocol):
    """One client library behind the contract above."""

    name: str

    def consumer(self, config: Config) -> GroupConsumer: ...
    def changelog_writer(self, config: Config, topic: str, ordered: bool = False) -> ChangelogWriter: ...
    def changelog_reader(self, config: Config, topic: str) -> ChangelogReader: ...
    def letter_producer(self, config: Config, max_bytes: int) -> LetterProducer: ...
    def reader(self, config: Config, reset: str = "earliest", max_records: int = 500) -> Reader:
        """A :class:`Reader`; ``reset`` is ``earliest`` or ``none`` (out of range is an error)."""
        ...

    def create_topic(
        self, k: KafkaConfig, name: str, partitions: int, replication: int, configs: dict[str, str]
    ) -> str | None:
        """Create a topic; None when created or already there, else why not (short)."""
        ...

    def probe(self, k: KafkaConfig, timeout_s: float) -> str | None:
        """None when the cluster answers a metadata request within ``timeout_s``, else why not."""
        ...

    def sample(self, config: Config, topic: str, limit: int, timeout_s: float) -> list[Record] | None:
        """Up to ``limit`` of the newest records, spread over the partitions, read without a
        group; None when the topic does not exist."""
        ...


def epoch_of(headers: Sequence[tuple[str, bytes]] | None, name: str) -> int:
    """The integer value of header ``name`` (the changelog's owner epoch), 0 when absent.

    >>> epoch_of([("x", b"1"), ("sf.epoch", b"7")], "sf.epoch"), epoch_of(None, "sf.epoch")
    (7, 0)
    """
    for key, value in headers or ():
        if key == name:
            return int(value)
    return 0
