"""Which input topic stored offsets belong to: the pure decision and the marks in the shard meta.

The broker side (re-created topics under a real ``stream-fair run``) is in
``tests/faults/test_fault_topic_identity.py``.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass

import pytest

from stream_fair.config import Config
from stream_fair.state.codec import decode_json, encode_json, meta_key
from stream_fair.state.identity import (
    ERR_OTHER_RECORD,
    ERR_PARTITIONS,
    ERR_SHORTER,
    ERR_TOPIC_ID,
    Seen,
    Stored,
    mark,
    problem,
    to_read,
)
from stream_fair.state.rocks import RocksBackend
from stream_fair.tracker import Tracker

M = mark(99, 1_700_000_000_000, b"id-7", b'{"id": "id-7"}')
WHERE = {"topic": "preds", "role": "predictions", "partition": 3}


def check(offset: int | None, stored: Stored, seen: Seen) -> str | None:
    return problem("predictions", "preds", 3, offset, stored, seen)


def test_a_mark_is_offset_timestamp_and_a_crc_of_key_and_value() -> None:
    assert M[:2] == [99, 1_700_000_000_000]
    assert mark(99, 1_700_000_000_000, b"id-7", b'{"id": "id-7"}') == M
    assert mark(99, 1_700_000_000_001, b"id-7", b'{"id": "id-7"}') != M  # produced at another time
    assert mark(99, 1_700_000_000_000, b"id-8", b'{"id": "id-7"}') != M  # another key
    assert mark(99, 1_700_000_000_000, b"id-7", b'{"id": "id-8"}') != M  # another value
    assert mark(5, None, None, None) == [5, -1, 0]


def test_topic_ids_decide_when_both_are_known() -> None:
    # no record is read, whatever the offsets say
    assert to_read(100, Stored(M, "id-a"), "id-a", 0) is None
    assert check(100, Stored(M, "id-a"), Seen("id-a", 4, end=0)) is None
    assert check(100, Stored(M, "id-a"), Seen("id-b", 4, end=500)) == ERR_TOPIC_ID.format(
        **WHERE, now="id-b", was="id-a"
    )


@pytest.mark.parametrize(("stored_id", "seen_id"), [(None, "id-b"), ("id-a", None), (None, None)])
def test_without_both_ids_the_record_before_the_offset_decides(
    stored_id: str | None, seen_id: str | None
) -> None:
    stored = Stored(M, stored_id)
    assert to_read(100, stored, seen_id, 0) == 99
    same = Seen(seen_id, 4, end=100, read=True, record=M)
    assert check(100, stored, same) is None
    other = Seen(seen_id, 4, end=100, read=True, record=mark(99, 1_800_000_000_000, b"x", b"y"))
    assert check(100, stored, other) == ERR_OTHER_RECORD.format(**WHERE, at=99)
    none = Seen(seen_id, 4, end=12, read=True, record=None)
    assert check(100, stored, none) == ERR_SHORTER.format(**WHERE, end=12, offset=100)


def test_a_record_past_the_reported_end_is_enough() -> None:
    """Tansu reports the base offset of the last batch + 1: the end can be below the stored offset
    while the record is there (the case that must not be refused)."""
    assert check(100, Stored(M), Seen(None, 4, end=60, read=True, record=M)) is None


def test_what_cannot_be_compared_is_not_refused() -> None:
    # compaction removed the record: the next one was read instead
    assert check(100, Stored(M), Seen(None, 4, end=200, read=True, record=mark(104, 1, b"k", b"v"))) is None
    # a meta from before marks existed: the record's existence is all there is
    assert check(100, Stored(), Seen(None, 4, end=200, read=True, record=mark(99, 1, b"k", b"v"))) is None
    assert check(100, Stored(), Seen(None, 4, end=12, read=True, record=None)) is not None
    # a mark of another offset than the one before the stored offset (the tracker fed directly)
    assert check(100, Stored(mark(50, 1, b"k", b"v")), Seen(None, 4, 200, True, M)) is None


def test_nothing_read_yet_has_nothing_to_verify() -> None:
    assert to_read(None, Stored(), None, 0) is None
    assert check(None, Stored(), Seen(None, 4, end=0)) is None
    assert check(0, Stored(), Seen(None, 4, end=0)) is None


def test_a_record_removed_by_retention_leaves_the_end_offset() -> None:
    assert to_read(100, Stored(M), None, begin=150) is None
    assert check(100, Stored(M), Seen(None, 4, end=300, begin=150)) is None
    assert check(100, Stored(M), Seen(None, 4, end=50, begin=150)) == ERR_SHORTER.format(
        **WHERE, end=50, offset=100
    )


def test_another_partition_count_is_refused_first() -> None:
    seen = Seen("id-a", 8, end=500, read=True, record=M)
    assert check(100, Stored(M, "id-a", partitions=4), seen) == ERR_PARTITIONS.format(**WHERE, now=8, was=4)
    assert check(100, Stored(M, "id-a", partitions=None), seen) is None  # an old meta


def test_every_refusal_names_the_topic_partition_and_the_fix() -> None:
    for msg in (
        check(100, Stored(M, "a"), Seen("b", 4, 0)),
        check(100, Stored(M), Seen(None, 4, 100, True, mark(99, 2, b"", b""))),
        check(100, Stored(M), Seen(None, 4, 12, True, None)),
        check(100, Stored(M, partitions=2), Seen(None, 4, 0)),
    ):
        assert msg is not None and "\n" not in msg
        assert msg.startswith("kafka error: the topic 'preds' (topics.predictions)"), msg
        assert "partition 3" in msg and "new kafka.group_id" in msg and "restore the old topic" in msg


@dataclass
class Record:
    offset: int
    value: bytes
    timestamp: int
    key: bytes | None = None


def _tracker(path: str) -> Tracker:
    cfg = Config.model_validate({"fairness": {"features": ["sex"]}})
    return Tracker(cfg, RocksBackend(path))


def test_marks_travel_in_the_meta_and_old_metas_still_load() -> None:
    path = tempfile.mkdtemp()
    t = _tracker(path)
    raw = b'{"id": "a", "ts": 1, "model": "m", "prediction": 1, "attributes": {"sex": "F"}}'
    t.process(0, 0, [Record(7, b"not json", 1_000, b"x"), Record(8, raw, 2_000, b"a")])
    t.process(0, 1, [Record(3, b'{"id": "a", "ts": 2, "label": 1}', 3_000, b"a")])
    s = t.shard(0)
    s.topic_ids, s.partitions = ["id-p", "id-o"], 4
    cp = t.checkpoint()
    assert cp.shards[0].meta["marks"] == [
        mark(8, 2_000, b"a", raw),  # the last record of the poll, rejected or not
        mark(3, 3_000, b"a", b'{"id": "a", "ts": 2, "label": 1}'),
    ]
    t.commit(cp)
    t.backend.close()

    t = _tracker(path)
    s = t.shard(0)
    assert s.marks[0] == mark(8, 2_000, b"a", raw) and s.offsets == [9, 4]
    assert s.topic_ids == ["id-p", "id-o"] and s.partitions == 4
    # a meta written before this change (no marks, ids or partition count) loads with None
    meta = decode_json(t.backend.get(meta_key(0)))
    for name in ("marks", "topic_ids", "partitions"):
        del meta[name]
    t.backend.write({meta_key(0): encode_json(meta)})
    t.drop(0)
    s = t.shard(0)
    assert s.marks == [None, None] and s.topic_ids == [None, None] and s.partitions is None
    assert s.offsets == [9, 4]
    t.backend.close()
