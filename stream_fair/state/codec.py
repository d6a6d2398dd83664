"""The on-disk and changelog format: keys and values, explicit and versioned (never pickle).

Every key starts with a one-byte *space* and the partition (big-endian u16), so one embedded
database holds all partitions of a replica and a partition's keys form one contiguous range::

    space  partition  rest
    0x01   u16        id                                -> id record (see below)
    0x02   u16        deadline f64-BE, kind u8, id      -> b""  (expiry index, derived)
    0x03   u16        forget_at f64-BE, id              -> b""  (forget index, derived)
    0x04   u16        cell index u32-BE                 -> counts row (JSON)
    0x05   u16        (nothing)                         -> increment (JSON; changelog only)
    0x06   u16        (nothing)                         -> partition meta (JSON; the commit marker)
    0x07   u16        cell index u32-BE                 -> score histogram row (JSON)
    0x00   0xFFFF     b"format"                         -> store format (JSON; local only)

An id is stored as its UTF-8 bytes, except a UUID in its canonical text form (36 characters, lower
case, hyphens at 8-13-18-23: what ``str(uuid.uuid4())`` gives): ``0xFF`` and its 16 bytes. No UTF-8
text contains the byte 0xFF, so the two forms cannot collide, and ``decode_id`` gives back the same
string. The short form halves the id's share of every key (an id appears in the record's key and
in an index key): measured with ``bench/state.py``, ~40% fewer bytes on disk and flushed per
pending prediction, and as much less for compaction to rewrite.

Big-endian IEEE-754 bytes of non-negative doubles sort like the numbers, so an index range scan
visits entries in deadline order. Only spaces 0x01, 0x04, 0x05, 0x06 and 0x07 go to the changelog: the
two indexes are rebuilt from the id records on restore.

Id records (first byte = kind, little-endian fields):

=====  =====================================================  =======
kind   fields                                                 bytes
=====  =====================================================  =======
``P``  pending prediction: ts f64, cell u32, predicted u8,    22
       score f64 (NaN = no score)
``O``  pending outcome: ts f64, label u8                      10
``J``  joined id, remembered: forget_at f64                   9
``E``  expired id, remembered: forget_at f64                  9
=====  =====================================================  =======

>>> rec = PendingPrediction(ts=10.0, cell=3, predicted=1, score=None)
>>> decode_record(encode_record(rec)) == rec
True
>>> len(encode_record(rec)), len(id_key(7, "req-1"))
(22, 8)
>>> u = "1b4e28ba-2fa1-41d2-883f-0016d3cca427"
>>> len(encode_id(u)), decode_id(encode_id(u)) == u, encode_id(u.upper()) == u.upper().encode()
(17, True, True)
>>> a, b, c = (deadline_key(7, d, KIND_P, "a") for d in (5.0, 40.0, 300.0))
>>> a < b < c
True
"""

from __future__ import annotations

import math
import struct
from typing import Any, NamedTuple

import orjson

from stream_fair.errors import StateError

FORMAT_VERSION = 4
"""Version of this layout. A store or changelog written with another version is refused.

3: score histograms (space 0x07; a version-2 state has none, and histograms must cover every
pending prediction for the pending ones to be derived from them).
4: UUID ids in 17 bytes (``encode_id``) instead of 36 in every id and index key."""

STORE_FORMAT_VERSION = 5
"""Version of the local store's layout: the keys and values of ``FORMAT_VERSION`` plus where they
live. A local store of another version is refused (it is restored from the changelog instead, whose
records are those of ``FORMAT_VERSION``).

5: the expiry and forget index keys in their own column family (``rocks.INDEX_FAMILY``), without
bloom filters; before, every key was in the default column family."""

(
    SPACE_FORMAT,
    SPACE_ID,
    SPACE_DEADLINE,
    SPACE_FORGET,
    SPACE_COUNTS,
    SPACE_INCREMENT,
    SPACE_META,
    SPACE_HIST,
) = range(8)
KIND_P, KIND_O, KIND_J, KIND_E = b"P", b"O", b"J", b"E"
FORMAT_KEY = bytes([SPACE_FORMAT]) + b"\xff\xff" + b"format"
#: The replica-local parts of the store (never in the changelog): the feedback monitor's state and
#: the event-time window buckets (``WINDOWS_PREFIX + b"b" + i64-BE period``, ``+ b"m"`` their meta).
FEEDBACK_KEY = bytes([SPACE_FORMAT]) + b"\xff\xfe" + b"feedback"
#: The feedback monitor's state, one key per entry (``FEEDBACK_PREFIX`` + the entry's key as a JSON
#: array, see ``FeedbackMonitor.changes``): a checkpoint writes the entries that changed. A store
#: holding the older single ``FEEDBACK_KEY`` document is refused (``OLD_FEEDBACK_ERROR``).
FEEDBACK_PREFIX = FEEDBACK_KEY + b"/"
FEEDBACK_END = FEEDBACK_KEY + b"0"  # b"/" + 1: the end of the prefix's range
OLD_FEEDBACK_ERROR = (
    "state.path {path} holds the feedback monitor's state in the single-document form of an older "
    "stream-fair (it is now kept per entry): point state.path to a new directory"
)
WINDOWS_PREFIX = bytes([SPACE_FORMAT]) + b"\xff\xfd"


def feedback_key(key: tuple[Any, ...]) -> bytes:
    """The store key of a feedback-state entry.

    >>> k = feedback_key(("row", "m", ("F", "b")))
    >>> k.startswith(FEEDBACK_PREFIX), parse_feedback_key(k)
    (True, ('row', 'm', ('F', 'b')))
    """
    return FEEDBACK_PREFIX + orjson.dumps(key)


def parse_feedback_key(raw: bytes) -> tuple[Any, ...]:
    """The entry key of :func:`feedback_key` (JSON arrays back to tuples)."""

    def tup(x: Any) -> Any:
        return tuple(tup(v) for v in x) if isinstance(x, list) else x

    return tup(orjson.loads(raw[len(FEEDBACK_PREFIX) :]))  # type: ignore[no-any-return]


_PREFIX = struct.Struct(">BH")
_F64 = struct.Struct(">d")
_U32 = struct.Struct(">I")
_P = struct.Struct("<dIBd")
_O = struct.Struct("<dB")
_MEM = struct.Struct("<d")
_NAN = float("nan")


# Named tuples rather than frozen dataclasses: one of each is built per event on the hot path, and
# a frozen dataclass's __init__ (object.__setattr__ per field) costs ~5x a tuple's.
class PendingPrediction(NamedTuple):
    ts: float
    cell: int
    predicted: int
    score: float | None

    @property
    def kind(self) -> bytes:
        return KIND_P


class PendingOutcome(NamedTuple):
    ts: float
    label: int

    @property
    def kind(self) -> bytes:
        return KIND_O


class Remembered(NamedTuple):
    """A joined (``J``) or expired (``E``) id kept until ``forget_at`` to classify later copies."""

    kind: bytes
    forget_at: float


Record = PendingPrediction | PendingOutcome | Remembered


def prefix(space: int, partition: int) -> bytes:
    return _PREFIX.pack(space, partition)


_UUID_TAG = b"\xff"  # never a byte of UTF-8 text


def encode_id(event_id: str) -> bytes:
    """The bytes of an id in keys: 0xFF + 16 bytes for a canonical UUID, else its UTF-8."""
    if len(event_id) == 36 and event_id[8] == event_id[13] == event_id[18] == event_id[23] == "-":
        h = event_id.replace("-", "")
        if len(h) == 32:
            try:
                b = bytes.fromhex(h)
            except ValueError:
                return event_id.encode()
            if b.hex() == h:  # lower case, no spaces: exactly the canonical form
                return _UUID_TAG + b
    return event_id.encode()


def decode_id(raw: bytes) -> str:
    """The id of key bytes made by :func:`encode_id`."""
    if raw[:1] == _UUID_TAG:
        h = raw[1:].hex()
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
    return raw.decode()


def id_key(partition: int, event_id: str) -> bytes:
    return _PREFIX.pack(SPACE_ID, partition) + encode_id(event_id)


def deadline_key(partition: int, deadline: float, kind: bytes, event_id: str) -> bytes:
    return _PREFIX.pack(SPACE_DEADLINE, partition) + _F64.pack(deadline) + kind + encode_id(event_id)


def forget_key(partition: int, forget_at: float, event_id: str) -> bytes:
    return _PREFIX.pack(SPACE_FORGET, partition) + _F64.pack(forget_at) + encode_id(event_id)


def counts_key(partition: int, cell: int) -> bytes:
    return _PREFIX.pack(SPACE_COUNTS, partition) + _U32.pack(cell)


def histogram_key(partition: int, cell: int) -> bytes:
    return _PREFIX.pack(SPACE_HIST, partition) + _U32.pack(cell)


def meta_key(partition: int) -> bytes:
    return _PREFIX.pack(SPACE_META, partition)


def increment_key(partition: int) -> bytes:
    return _PREFIX.pack(SPACE_INCREMENT, partition)


def split_key(key: bytes) -> tuple[int, int, bytes]:
    """``(space, partition, rest)`` of a key."""
    space, partition = _PREFIX.unpack_from(key)
    return space, partition, key[3:]


def parse_deadline(rest: bytes) -> tuple[float, bytes, str]:
    """``(deadline, kind, id)`` from the rest of an expiry-index key."""
    return _F64.unpack_from(rest)[0], rest[8:9], decode_id(rest[9:])


def parse_forget(rest: bytes) -> tuple[float, str]:
    return _F64.unpack_from(rest)[0], decode_id(rest[8:])


def parse_cell(rest: bytes) -> int:
    return int(_U32.unpack(rest)[0])


def encode_record(rec: Record) -> bytes:
    if rec.__class__ is PendingPrediction:
        p: PendingPrediction = rec  # type: ignore[assignment]
        score = _NAN if p.score is None else p.score
        return KIND_P + _P.pack(p.ts, p.cell, p.predicted, score)
    if rec.__class__ is PendingOutcome:
        o: PendingOutcome = rec  # type: ignore[assignment]
        return KIND_O + _O.pack(o.ts, o.label)
    r: Remembered = rec  # type: ignore[assignment]
    return r.kind + _MEM.pack(r.forget_at)


def decode_record(value: bytes) -> Record:
    kind = value[:1]
    try:
        if kind == KIND_P:
            ts, cell, predicted, score = _P.unpack_from(value, 1)
            return PendingPrediction(ts, cell, predicted, None if math.isnan(score) else score)
        if kind == KIND_O:
            ts, label = _O.unpack_from(value, 1)
            return PendingOutcome(ts, label)
        if kind in (KIND_J, KIND_E):
            return Remembered(kind, _MEM.unpack_from(value, 1)[0])
    except struct.error:
        pass
    raise StateError(
        f"state error: unreadable id record {value[:16]!r}: the state is corrupt or of another version"
    )


def encode_json(obj: Any) -> bytes:
    return orjson.dumps(obj)


def decode_json(value: bytes) -> Any:
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise StateError(f"state error: unreadable state document: {exc}") from None
