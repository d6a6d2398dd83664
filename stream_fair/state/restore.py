"""Rebuilding a partition's local state from its changelog records (pure: no Kafka here).

The changelog protocol (``docs/state.md`` has the full argument):

* A checkpoint of partition *p* writes its changed records to changelog partition *p*, then, alone
  in its own batch, the partition's **meta** record: the commit marker, carrying the next input
  offsets. Records between two metas belong to the later one; records after the last meta were
  never committed (the writer died mid-checkpoint) and are ignored.
* Every record carries the writer's **epoch** (header ``sf.epoch``). A new owner restores, then
  claims the partition with epoch + 1 in its first checkpoint; records of a lower epoch that
  appear after a higher one are a fenced-off previous owner's and are ignored.
* The claim checkpoint rewrites the committed value (or a tombstone) of every key of an ignored
  tail, so the newest record of every key in the log is a committed one, which is what
  compaction keeps.

:class:`PartitionRestore` is fed the records in log order and writes the committed state to the
local store in batches. A *full* restore (empty local partition) skips the index bookkeeping and
rebuilds both indexes in one scan at the end; a *tail* restore (the local store is current up to
an offset) updates them record by record.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from stream_fair.config import fingerprint_difference, fingerprint_unknown
from stream_fair.errors import StateError
from stream_fair.state.codec import (
    FORMAT_VERSION,
    SPACE_COUNTS,
    SPACE_DEADLINE,
    SPACE_FORGET,
    SPACE_HIST,
    SPACE_ID,
    SPACE_INCREMENT,
    SPACE_META,
    PendingOutcome,
    PendingPrediction,
    Remembered,
    deadline_key,
    decode_id,
    decode_json,
    decode_record,
    encode_json,
    forget_key,
    prefix,
)

EPOCH_HEADER = "sf.epoch"
_FLUSH_EVERY = 20_000
# A partition's key spaces in the local store (its keys are one range per space, codec.py)
PARTITION_SPACES = (SPACE_ID, SPACE_DEADLINE, SPACE_FORGET, SPACE_COUNTS, SPACE_HIST, SPACE_META)


def delete_partition(backend: Any, partition: int) -> None:
    """Remove a partition's keys from the local store: every key space of it (``codec.py``)."""
    for space in PARTITION_SPACES:
        backend.delete_range(prefix(space, partition), prefix(space, partition + 1))


def index_entries(
    partition: int, event_id: str, value: bytes, ttl: float, outcome_ttl: float
) -> tuple[bytes, bytes]:
    """The index key and value an id record needs."""
    rec = decode_record(value)
    if rec.__class__ is Remembered:
        return forget_key(partition, rec.forget_at, event_id), b""  # type: ignore[union-attr]
    deadline = rec.ts + (ttl if rec.__class__ is PendingPrediction else outcome_ttl)  # type: ignore[union-attr]
    return deadline_key(partition, deadline, rec.kind, event_id), b""  # type: ignore[union-attr]


log = logging.getLogger(__name__)

ERR_CONFIG = (
    "state error: the changelog {topic} holds partition {partition}'s state written with another "
    "configuration ({keys} differ): run every replica with the same configuration, or start over "
    "with a new kafka.group_id, an empty state.path (and a new state.changelog_topic if you set "
    "one; docs/state.md, 'Configuration changes')"
)


class PartitionRestore:
    """Applies one partition's changelog records, in log order, to the local store."""

    def __init__(
        self,
        backend: Any,
        partition: int,
        *,
        epoch: int,
        full: bool,
        ttl: float,
        outcome_ttl: float,
        fingerprint: Mapping[str, Any] | None = None,
        topic: str = "",
    ) -> None:
        self.backend = backend
        # this configuration's :func:`~stream_fair.config.fingerprint`: a commit marker written
        # with another one is refused (markers from before it was recorded carry none)
        self.fingerprint, self.topic = fingerprint, topic
        self.warned = False  # the warning about markers that predate the fingerprint, once
        self.partition = partition
        self.epoch = epoch  # the highest epoch seen so far
        self.full = full
        self.ttl, self.outcome_ttl = ttl, outcome_ttl
        self._pending: list[tuple[bytes, bytes | None]] = []  # records after the last meta
        self._aborted: set[bytes] = set()  # keys of ignored tails not yet repaired by a claim
        self._batch: dict[bytes, bytes | None] = {}
        self.records = 0
        self.committed = 0
        self.fenced = 0
        self.meta: dict[str, Any] | None = None
        self.start = 0  # the changelog offset the restore reads from
        self.position = 0  # the next offset to feed
        if full:
            delete_partition(self.backend, partition)

    def feed(self, offset: int, key: bytes, value: bytes | None, epoch: int) -> None:
        if offset < self.position:
            return  # read again after the reader was repositioned
        self.position = offset + 1
        self.records += 1
        if epoch < self.epoch:
            self.fenced += 1
            return
        if epoch > self.epoch:  # a new owner: the previous owner's unfinished tail is void
            self.epoch = epoch
            self._aborted.update(k for k, _ in self._pending)
            self._pending.clear()
        space = key[0]
        if space == SPACE_INCREMENT:
            return  # for the model-wide aggregator, not state
        if space != SPACE_META:
            self._pending.append((key, value))
            return
        for k, v in self._pending:
            self._apply(k, v)
        self._pending.clear()
        self._aborted.clear()  # a commit (a claim first of all) rewrote every ignored key
        assert value is not None
        meta = decode_json(value)
        if meta.get("v") != FORMAT_VERSION:
            raise StateError(
                f"state error: the changelog of partition {self.partition} holds state format "
                f"{meta.get('v')} at offset {offset}, this version reads {FORMAT_VERSION}: set "
                "state.changelog_topic to a new topic (pending predictions are then recounted from the "
                "inputs)"
            )
        stored = meta.get("config")
        if self.fingerprint is not None:
            keys = fingerprint_difference(stored or {}, self.fingerprint) if stored is not None else []
            if keys:
                where = {"topic": self.topic, "partition": self.partition}
                raise StateError(ERR_CONFIG.format(**where, keys=", ".join(keys)))
            unknown = ["all"] if stored is None else fingerprint_unknown(stored)
            if unknown and not self.warned:  # written by an earlier version: cannot be checked
                self.warned = True
                log.warning(
                    "partition %d: the changelog %s holds state written by an earlier stream-fair that "
                    "did not record %s of its configuration: taken as this configuration's; if you "
                    "changed them since, start over (docs/state.md, 'Configuration changes')",
                    self.partition, self.topic, "any" if stored is None else ", ".join(unknown),
                )  # fmt: skip
        meta["changelog_next"] = offset + 1
        self.meta = meta
        self._batch[key] = encode_json(meta)
        self.committed += 1
        if len(self._batch) >= _FLUSH_EVERY:
            self._flush()

    def _apply(self, key: bytes, value: bytes | None) -> None:
        if key[0] == SPACE_ID and not self.full:
            old = self._batch.get(key) if key in self._batch else self.backend.get(key)
            event_id = decode_id(key[3:])
            if old is not None:
                self._batch[index_entries(self.partition, event_id, old, self.ttl, self.outcome_ttl)[0]] = (
                    None
                )
            if value is not None:
                ik, iv = index_entries(self.partition, event_id, value, self.ttl, self.outcome_ttl)
                self._batch[ik] = iv
        self._batch[key] = value

    def _flush(self) -> None:
        if self._batch:
            self.backend.write(self._batch)
            self._batch = {}

    def finish(self) -> set[bytes]:
        """Write what is left; returns the keys of the ignored tail, which the claim must rewrite."""
        self._flush()
        if self.full:
            rebuild_indexes(self.backend, self.partition, self.ttl, self.outcome_ttl)
        return self._aborted | {k for k, _ in self._pending}


def rebuild_indexes(backend: Any, partition: int, ttl: float, outcome_ttl: float) -> int:
    """Drop and rebuild both indexes of a partition from its id records; returns the record count."""
    for space in (SPACE_DEADLINE, SPACE_FORGET):
        backend.delete_range(prefix(space, partition), prefix(space, partition + 1))
    start, end = prefix(SPACE_ID, partition), prefix(SPACE_ID, partition + 1)
    n = 0
    while True:
        rows = backend.scan(start, end, 50_000)
        if not rows:
            break
        batch: dict[bytes, bytes | None] = {}
        for key, value in rows:
            ik, iv = index_entries(partition, decode_id(key[3:]), value, ttl, outcome_ttl)
            batch[ik] = iv
        backend.write(batch)
        n += len(rows)
        start = rows[-1][0] + b"\x00"
    return n


__all__ = ["EPOCH_HEADER", "PartitionRestore", "PendingOutcome", "index_entries", "rebuild_indexes"]
