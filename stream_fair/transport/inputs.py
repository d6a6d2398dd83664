"""Reading one record of an input partition: the topic identity check on assignment.

Written once against :class:`~stream_fair.transport.base.Reader` (no consumer group, nothing
committed, never creates a topic); :mod:`stream_fair.state.identity` decides what the answers mean.
"""

from __future__ import annotations

import time

from stream_fair.config import Config
from stream_fair.errors import BrokerError
from stream_fair.state.identity import mark
from stream_fair.transport.base import ClientError, Reader, TopicPartition


class InputReader:
    """Reads the record at one offset of an input partition, and a partition's bounds."""

    def __init__(self, config: Config) -> None:
        from stream_fair.transport import get

        self.timeout = min(10.0, config.kafka.request_timeout_ms / 1000)
        # reset "none": an offset past the end is an answer, not a reset
        self._reader: Reader = get(config.kafka).reader(config, reset="none", max_records=10)

    def bounds(self, topic: str, partition: int) -> tuple[int, int]:
        """The partition's beginning and (reported) end offsets."""
        try:
            return self._reader.bounds(TopicPartition(topic, partition))
        except ClientError as exc:
            raise BrokerError(
                f"kafka error: cannot read the offsets of {topic!r} partition {partition} "
                f"({exc}): check that the topic exists and the broker answers"
            ) from None

    def mark_at(self, topic: str, partition: int, offset: int) -> list[int] | None:
        """The mark (:func:`stream_fair.state.identity.mark`) of the record at ``offset``, or of the
        first one after it when compaction removed it; None when the partition has none there."""
        tp = TopicPartition(topic, partition)
        reader = self._reader
        reader.assign([tp])
        reader.seek(tp, offset)
        deadline = time.monotonic() + self.timeout
        try:
            while time.monotonic() < deadline:
                for r in reader.poll(200, 10).get(tp, ()):
                    if r.offset >= offset:
                        return mark(r.offset, r.timestamp, r.key, r.value)
        except ClientError:  # out of range: the partition ends before the offset
            return None
        finally:
            reader.assign([])
        return None  # at the end (or past it, on a broker that does not say so)

    def close(self) -> None:
        self._reader.close()
