"""Whether stored offsets still belong to the input topic that is there now (pure: no Kafka here).

A partition's meta records, per input topic, what identifies the topic its offsets were read
from: the **topic id** (Kafka 2.8+ gives every topic a UUID, in metadata v10+), the **partition
count**, and the **mark** of the last record read before the stored offset: its offset, Kafka
timestamp and CRC-32 of key and value. A topic deleted and re-created under the same name starts
again at offset 0 with other records, so on assignment (:meth:`Detector._finish`) the run loop
compares:

* the topic ids, when both the state and the broker have one (they decide on their own);
* otherwise the record at the stored offset − 1, read now: missing (the partition is shorter than
  the state says) or with another mark (other records at the same offsets) means another topic.

Kafka's reported end offset is not enough on its own: some brokers (Tansu) report the base offset
of the last batch + 1, below the true end, so a record past it is looked for before a refusal.

>>> m = mark(41, 1_700_000_000_000, b"id-1", b'{"id": "id-1"}')
>>> seen = Seen(topic_id=None, partitions=1, end=42, read=True, record=m)
>>> problem("predictions", "p", 0, 42, Stored(mark=m, partitions=1), seen) is None
True
>>> other = mark(41, 1_800_000_000_000, b"id-9", b'{"id": "id-9"}')
>>> problem("predictions", "p", 0, 42, Stored(mark=m), Seen(None, 1, 42, True, other))[:90]
"kafka error: the topic 'p' (topics.predictions) was re-created: the record at offset 41 of"
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

FIX = (
    "start over with a new kafka.group_id and an empty state.path (the state counts the old topic), "
    "or restore the old topic"
)
ERR_TOPIC_ID = (
    "kafka error: the topic {topic!r} (topics.{role}) was re-created: its topic id is {now}, the "
    "state of its partition {partition} was written for {was}; " + FIX
)
ERR_SHORTER = (
    "kafka error: the topic {topic!r} (topics.{role}) was re-created: its partition {partition} "
    "ends at offset {end} but the state says {offset}; " + FIX
)
ERR_OTHER_RECORD = (
    "kafka error: the topic {topic!r} (topics.{role}) was re-created: the record at offset {at} of "
    "its partition {partition} is not the one the state last read there; " + FIX
)
ERR_PARTITIONS = (
    "kafka error: the topic {topic!r} (topics.{role}) has {now} partitions but the state of its "
    "partition {partition} was written when it had {was} (keys moved to other partitions); " + FIX
)


def mark(offset: int, timestamp: int | None, key: bytes | None, value: bytes | None) -> list[int]:
    """``[offset, timestamp, crc]`` of one record (timestamp in ms, -1 when unknown).

    CRC-32 over the key, then the value: one call per poll and partition, not per record.
    """
    crc = zlib.crc32(value or b"", zlib.crc32(key or b""))
    return [int(offset), -1 if timestamp is None else int(timestamp), crc]


@dataclass(frozen=True)
class Stored:
    """What the state says about the topic one input partition's offsets were read from."""

    mark: list[int] | None = None  # of the last record read (offset, timestamp, crc)
    topic_id: str | None = None
    partitions: int | None = None  # the topic's partition count then


@dataclass(frozen=True)
class Seen:
    """What the broker shows now for that partition."""

    topic_id: str | None
    partitions: int
    end: int  # the reported end offset (below the true end on some brokers)
    read: bool = False  # whether the record at the stored offset - 1 was looked for
    record: list[int] | None = None  # its mark; None: no record there
    begin: int = 0


def to_read(offset: int | None, stored: Stored, topic_id: str | None, begin: int) -> int | None:
    """The offset whose record must be read to decide, or None when the ids decide (or nothing can).

    >>> to_read(42, Stored(topic_id="a"), "a", 0), to_read(42, Stored(), None, 0)
    (None, 41)
    >>> to_read(42, Stored(), None, begin=50)  # removed by retention

    """
    if not offset:
        return None
    if stored.topic_id is not None and topic_id is not None:
        return None
    if offset - 1 < begin:  # retention removed it: only the end offset can be compared
        return None
    return offset - 1


def problem(
    role: str, topic: str, partition: int, offset: int | None, stored: Stored, seen: Seen
) -> str | None:
    """None when the stored offset belongs to the topic there now, else the one-line refusal.

    ``offset`` is the stored next offset (None: nothing read yet, nothing to verify).
    """
    where = {"topic": topic, "role": role, "partition": partition}
    if stored.partitions is not None and stored.partitions != seen.partitions:
        return ERR_PARTITIONS.format(**where, now=seen.partitions, was=stored.partitions)
    if stored.topic_id is not None and seen.topic_id is not None:
        if stored.topic_id != seen.topic_id:
            return ERR_TOPIC_ID.format(**where, now=seen.topic_id, was=stored.topic_id)
        return None
    if not offset:
        return None
    if not seen.read:  # the record is gone (retention): the end offset is all there is
        return ERR_SHORTER.format(**where, end=seen.end, offset=offset) if offset > seen.end else None
    if seen.record is None:
        return ERR_SHORTER.format(**where, end=max(seen.end, seen.begin), offset=offset)
    at = offset - 1
    m = stored.mark
    if seen.record[0] == at and m is not None and m[0] == at and seen.record[1:] != m[1:]:
        return ERR_OTHER_RECORD.format(**where, at=at)
    # the same record, or one that cannot be compared: a meta written before marks existed, or a
    # compacted topic whose record at that offset is gone (the next one was read instead)
    return None
