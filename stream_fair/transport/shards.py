"""Shards follow partitions: co-partitioning check, rebalance listener, resume, lag, offset mirror.

Written once against :class:`~stream_fair.transport.base.GroupConsumer`, so both transports move
state the same way. Offsets live in the state store next to the counts they produced (see
:mod:`stream_fair.state`); on assignment each partition's state is restored (from the local store,
then the changelog tail) and the partition is sought to the offsets that state recorded, so a
restart or a move neither skips nor recounts a record.
"""

from __future__ import annotations

from collections.abc import Callable

from stream_fair.config import Config
from stream_fair.errors import BrokerError
from stream_fair.state.identity import FIX
from stream_fair.transport.base import ClientError, GroupConsumer, TopicPartition

ERR_REPARTITIONED = (
    "kafka error: topics.predictions and topics.outcomes now have {now} partitions, {was} when "
    "stream-fair started: keys moved to other partitions, the state no longer matches them; " + FIX
)


def check_copartitioned(consumer: GroupConsumer, config: Config, expected: int | None = None) -> int:
    """Both input topics must exist with the same partition count (keys = ids); returns it.

    Checked at start and again after every assignment, then with the count at start as
    ``expected``: the run loop stops when a topic went missing or its partition count changed.
    """
    t = config.topics
    counts: dict[str, int] = {}
    for role, name in (("predictions", t.predictions), ("outcomes", t.outcomes)):
        try:
            parts = consumer.partitions_for_topic(name)
        except ClientError as exc:
            raise BrokerError(
                f"kafka error: cannot read metadata from kafka.bootstrap_servers="
                f"{config.kafka.bootstrap_servers!r} ({exc}): check the address, "
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


class ShardListener:
    """Moves shard state with partitions: checkpoint on revoke; on assign, pause until restored.

    Restoring can take longer than ``max_poll_interval_ms``, so it does not run inside the
    callback: the assigned input partitions are paused, the run loop restores them while it keeps
    polling (which keeps the membership alive), then seeks and resumes them (:func:`resume_at`).
    """

    def __init__(
        self,
        consumer: GroupConsumer,
        topics: tuple[str, str],
        on_revoke: Callable[[set[int]], None],
        on_assign: Callable[[set[int]], None],
        leader: tuple[str, Callable[[bool], None]] | None = None,
        on_lost: Callable[[set[int]], None] | None = None,
    ) -> None:
        self.consumer = consumer
        self.topics = topics
        self._on_revoke = on_revoke
        self._on_assign = on_assign
        self._on_lost = on_lost or on_revoke
        # (leader topic, callback): owning its partition 0 makes this replica the leader
        # (stream_fair.leader); the partition stays paused, it is never read through the group
        self._leader = leader
        # set on every assignment, cleared by the run loop once it has re-checked the input
        # topics (outside this callback: the check may need a metadata request)
        self.assigned = False

    def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self._release(revoked, self._on_revoke)

    def on_partitions_lost(self, lost: set[TopicPartition]) -> None:
        """Evicted from the group: the shards are dropped without a checkpoint (their new owner
        restores the last committed one and reads the rest again)."""
        self._release(lost, self._on_lost)

    def _release(self, tps: set[TopicPartition], release: Callable[[set[int]], None]) -> None:
        shards = {tp.partition for tp in tps if tp.topic in self.topics}
        if shards:
            release(shards)
        if self._leader is not None and any(tp.topic == self._leader[0] for tp in tps):
            self._leader[1](False)

    def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.assigned = True
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
    consumer: GroupConsumer, topics: tuple[str, str], shard: int, offsets: list[int | None]
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
        elif consumer.auto_offset_reset == "latest":
            consumer.seek_to_end(tp)
        else:
            consumer.seek_to_beginning(tp)
    consumer.resume(*[tp for tp in tps if tp in owned])


def commit_offsets(
    consumer: GroupConsumer, topics: tuple[str, str], offsets: dict[int, list[int | None]]
) -> None:
    """Mirror checkpointed offsets into the group's Kafka offsets (for lag tools only)."""
    commit = {
        TopicPartition(topic, shard): offset
        for shard, pair in offsets.items()
        for topic, offset in zip(topics, pair, strict=True)
        if offset is not None
    }
    if commit:
        consumer.commit(commit)


def lag(consumer: GroupConsumer) -> dict[tuple[str, int], int | None]:
    """High-water mark minus position per assigned partition (from the last fetch responses).

    None where either is not known yet (right after an assignment, before the first fetch).
    """
    out: dict[tuple[str, int], int | None] = {}
    for tp in consumer.assignment():
        high = consumer.highwater(tp)
        pos = consumer.position(tp)
        out[(tp.topic, tp.partition)] = None if high is None or pos is None else max(0, high - pos)
    return out
