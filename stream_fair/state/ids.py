"""One partition's id records over the local store: an overlay of changes plus two ordered indexes.

Reads see the overlay first (changes since the last checkpoint), then the store. Writes go to the
overlay only; :meth:`IdTable.changes` turns them into one atomic batch (records, the index entries
they add and remove) and the changelog records, and :meth:`IdTable.committed` clears the overlay
once that batch is durable. The overlay therefore holds at most one checkpoint's worth of changes:
RAM does not grow with the number of pending ids.

Two indexes, kept exact (an entry exists iff its record does):

* the **expiry index** orders pending predictions and outcomes by deadline
  (``ts + ttl``); :meth:`IdTable.pop_due` hands out, in deadline order, those due before a
  watermark (one lookup by id each: expiring is rarer than joining, so the index carries no copy
  of the record).
* the **forget index** orders remembered (joined or expired) ids by ``forget_at``.

Both are read in chunks (``chunk`` entries per range scan) and merged with the entries created
since the last checkpoint (small heaps), so the per-event cost is a float comparison unless
something is due. Written by hand: no library offers an overlay with ordered secondary indexes
over RocksDB.

>>> import tempfile
>>> from stream_fair.state.rocks import RocksBackend
>>> backend = RocksBackend(tempfile.mkdtemp())
>>> table = IdTable(backend, partition=0, ttl=10.0, outcome_ttl=10.0)
>>> table.put("a", PendingPrediction(ts=1.0, cell=0, predicted=1, score=None))
>>> table.put("b", PendingPrediction(ts=5.0, cell=0, predicted=0, score=None))
>>> store, changelog = table.changes()
>>> backend.write(store); table.committed()
>>> table.get("a").ts, table.due_before(12.0), [i for i, _ in table.pop_due(12.0)]
(1.0, True, ['a'])
"""

from __future__ import annotations

import heapq
from typing import Any

from stream_fair.state.codec import (
    _F64,
    KIND_E,
    KIND_J,
    KIND_P,
    SPACE_DEADLINE,
    SPACE_FORGET,
    SPACE_ID,
    PendingOutcome,
    PendingPrediction,
    Record,
    Remembered,
    decode_record,
    encode_id,
    encode_record,
    parse_deadline,
    parse_forget,
    prefix,
)

_MISSING: Any = object()
_INF = float("inf")


class IdTable:
    """Pending and remembered ids of one partition (see the module docstring)."""

    __slots__ = (
        "partition", "ttl", "outcome_ttl", "chunk", "_backend", "_dirty", "_orig", "_enc", "_id_prefix",
        "_due_heap", "_due_buf", "_due_cursor", "_due_done", "next_due",
        "_forget_heap", "_forget_buf", "_forget_cursor", "_forget_done", "next_forget",
    )  # fmt: skip

    def __init__(
        self, backend: Any, partition: int, ttl: float, outcome_ttl: float, chunk: int = 1024
    ) -> None:
        self.partition = partition
        self.ttl = ttl
        self.outcome_ttl = outcome_ttl
        self.chunk = chunk
        self._backend = backend
        self._dirty: dict[str, Record | None] = {}
        self._orig: dict[str, Record | None] = {}  # the stored record before this checkpoint's changes
        self._enc: dict[str, bytes] = {}  # key bytes of the ids read since the checkpoint (encode_id)
        self._id_prefix = prefix(SPACE_ID, partition)
        self._due_heap: list[tuple[float, bytes, str]] = []
        self._forget_heap: list[tuple[float, str]] = []
        self._reset_scans()

    def __repr__(self) -> str:
        return f"IdTable(partition={self.partition}, changed={len(self._dirty)})"

    def _reset_scans(self) -> None:
        self._due_buf: list[tuple[float, bytes, str]] = []  # reversed: next at the end
        self._due_cursor = prefix(SPACE_DEADLINE, self.partition)
        self._due_done = False
        self._forget_buf: list[tuple[float, str]] = []
        self._forget_cursor = prefix(SPACE_FORGET, self.partition)
        self._forget_done = False
        # -inf: unknown until the first check reads the index head
        self.next_due = -_INF
        self.next_forget = -_INF

    def deadline(self, rec: PendingPrediction | PendingOutcome) -> float:
        return rec.ts + (self.ttl if rec.__class__ is PendingPrediction else self.outcome_ttl)

    # -- point access ---------------------------------------------------------------------------
    def get(self, event_id: str) -> Record | None:
        rec = self._dirty.get(event_id, _MISSING)
        if rec is not _MISSING:
            return rec  # type: ignore[no-any-return]
        rec = self._orig.get(event_id, _MISSING)
        if rec is not _MISSING:
            return rec  # type: ignore[no-any-return]
        eid = self._enc[event_id] = encode_id(event_id)
        raw = self._backend.get(self._id_prefix + eid)
        rec = None if raw is None else decode_record(raw)
        self._orig[event_id] = rec
        return rec  # type: ignore[no-any-return]

    def prefetch(self, event_ids: list[str]) -> None:
        """Read the stored records of ``event_ids`` in one batched lookup, so the :meth:`get` calls
        that follow (one poll's records) find them in memory. Kept until the next checkpoint,
        like every record read."""
        dirty, orig = self._dirty, self._orig
        want = [e for e in event_ids if e not in dirty and e not in orig]
        if not want:
            return
        enc, p = self._enc, self._id_prefix
        keys = []
        for e in want:
            eid = enc[e] = encode_id(e)
            keys.append(p + eid)
        raws = self._backend.get_many(keys)
        for event_id, raw in zip(want, raws, strict=True):
            orig[event_id] = None if raw is None else decode_record(raw)

    def put(self, event_id: str, rec: Record) -> None:
        """Set the record of ``event_id`` (call :meth:`get` first, as the join always does)."""
        self._dirty[event_id] = rec
        cls = rec.__class__
        if cls is Remembered:
            at = rec.forget_at  # type: ignore[union-attr]
            heapq.heappush(self._forget_heap, (at, event_id))
            if at < self.next_forget:
                self.next_forget = at
        else:
            d = self.deadline(rec)  # type: ignore[arg-type]
            heapq.heappush(self._due_heap, (d, rec.kind, event_id))  # type: ignore[union-attr]
            if d < self.next_due:
                self.next_due = d

    def delete(self, event_id: str) -> None:
        self._dirty[event_id] = None

    # -- expiry index -----------------------------------------------------------------------------
    def due_before(self, until: float) -> bool:
        """Whether a pending record's deadline lies before ``until`` (cheap when nothing is due)."""
        if self.next_due >= until:
            return False
        self._fill_due()
        self.next_due = self._due_head()
        return self.next_due < until

    def _fill_due(self) -> None:
        if self._due_buf or self._due_done:
            return
        end = prefix(SPACE_DEADLINE, self.partition + 1)
        rows = self._backend.scan(self._due_cursor, end, self.chunk)
        if len(rows) < self.chunk:
            self._due_done = True
        if rows:
            self._due_cursor = rows[-1][0] + b"\x00"
        buf = [parse_deadline(key[3:]) for key, _ in rows]
        buf.reverse()
        self._due_buf = buf

    def _due_head(self) -> float:
        head = self._due_heap[0][0] if self._due_heap else _INF
        if self._due_buf and self._due_buf[-1][0] < head:
            head = self._due_buf[-1][0]
        return head

    def pop_due(self, until: float = _INF, limit: int | None = None) -> list[tuple[str, Record]]:
        """Pending records with deadline before ``until``, in deadline order (removed from the index).

        The caller gives each one its next record (expired or orphaned) with :meth:`put` or
        :meth:`delete`.
        """
        out: list[tuple[str, Record]] = []
        heap, dirty = self._due_heap, self._dirty
        while limit is None or len(out) < limit:
            self._fill_due()
            buf = self._due_buf
            h = heap[0][0] if heap else _INF
            b = buf[-1][0] if buf else _INF
            if h <= b:
                if h >= until:
                    break
                d, _, event_id = heapq.heappop(heap)
                cur = dirty.get(event_id)
                if cur is not None and cur.__class__ is not Remembered and self.deadline(cur) == d:  # type: ignore[arg-type]
                    out.append((event_id, cur))
            else:
                if b >= until:
                    break
                d, kind, event_id = buf.pop()
                if event_id in dirty:
                    continue  # changed since the checkpoint: its new record has its own entry
                rec = self._stored(event_id)
                if rec is not None and rec.__class__ is not Remembered:
                    out.append((event_id, rec))
        self._fill_due()
        self.next_due = self._due_head()
        return out

    # -- forget index ----------------------------------------------------------------------------
    def forget_before(self, until: float) -> bool:
        if self.next_forget >= until:
            return False
        self._fill_forget()
        self.next_forget = self._forget_head()
        return self.next_forget < until

    def _fill_forget(self) -> None:
        if self._forget_buf or self._forget_done:
            return
        end = prefix(SPACE_FORGET, self.partition + 1)
        rows = self._backend.scan(self._forget_cursor, end, self.chunk)
        if len(rows) < self.chunk:
            self._forget_done = True
        if rows:
            self._forget_cursor = rows[-1][0] + b"\x00"
        buf = [parse_forget(key[3:]) for key, _ in rows]
        buf.reverse()
        self._forget_buf = buf

    def _forget_head(self) -> float:
        head = self._forget_heap[0][0] if self._forget_heap else _INF
        if self._forget_buf and self._forget_buf[-1][0] < head:
            head = self._forget_buf[-1][0]
        return head

    def pop_forget(self, until: float = _INF, limit: int | None = None) -> list[tuple[str, Remembered]]:
        """Remembered ids whose ``forget_at`` lies before ``until``, in that order."""
        out: list[tuple[str, Remembered]] = []
        heap, dirty = self._forget_heap, self._dirty
        while limit is None or len(out) < limit:
            self._fill_forget()
            buf = self._forget_buf
            h = heap[0][0] if heap else _INF
            b = buf[-1][0] if buf else _INF
            if h <= b:
                if h >= until:
                    break
                at, event_id = heapq.heappop(heap)
                cur = dirty.get(event_id)
                if cur is not None and cur.__class__ is Remembered and cur.forget_at == at:  # type: ignore[union-attr]
                    out.append((event_id, cur))  # type: ignore[arg-type]
            else:
                if b >= until:
                    break
                at, event_id = buf.pop()
                if event_id in dirty:
                    continue
                rec = self._stored(event_id)
                if rec.__class__ is Remembered:
                    out.append((event_id, rec))  # type: ignore[arg-type]
        self._fill_forget()
        self.next_forget = self._forget_head()
        return out

    def _stored(self, event_id: str) -> Record | None:
        rec = self._orig.get(event_id, _MISSING)
        if rec is _MISSING:
            eid = self._enc[event_id] = encode_id(event_id)
            raw = self._backend.get(self._id_prefix + eid)
            rec = None if raw is None else decode_record(raw)
            self._orig[event_id] = rec
        return rec  # type: ignore[no-any-return]

    # -- checkpoint -------------------------------------------------------------------------------
    @property
    def changed(self) -> int:
        return len(self._dirty)

    def changes(self) -> tuple[dict[bytes, bytes | None], list[tuple[bytes, bytes | None]]]:
        """The store writes (records and index entries) and the changelog records of the overlay."""
        p = self.partition
        id_prefix = prefix(SPACE_ID, p)
        due_prefix = prefix(SPACE_DEADLINE, p)
        forget_prefix = prefix(SPACE_FORGET, p)
        f64 = _F64.pack
        ttl, outcome_ttl = self.ttl, self.outcome_ttl
        store: dict[bytes, bytes | None] = {}
        changelog: list[tuple[bytes, bytes | None]] = []
        orig, enc = self._orig, self._enc
        for event_id, new in self._dirty.items():
            old = orig.get(event_id, _MISSING)
            if old is _MISSING:  # written without a read (restore repairs): look it up
                old = self._stored(event_id)
            eid = enc[event_id]  # set by the read before every write
            if old is not None:
                cls = old.__class__
                if cls is Remembered:
                    store[forget_prefix + f64(old.forget_at) + eid] = None  # type: ignore[union-attr]
                else:
                    d = old.ts + (ttl if cls is PendingPrediction else outcome_ttl)  # type: ignore[union-attr]
                    store[due_prefix + f64(d) + old.kind + eid] = None  # type: ignore[union-attr]
            key = id_prefix + eid
            if new is None:
                value = None
            else:
                value = encode_record(new)
                cls = new.__class__
                if cls is Remembered:
                    store[forget_prefix + f64(new.forget_at) + eid] = b""  # type: ignore[union-attr]
                else:
                    d = new.ts + (ttl if cls is PendingPrediction else outcome_ttl)  # type: ignore[union-attr]
                    store[due_prefix + f64(d) + new.kind + eid] = b""  # type: ignore[union-attr]
            store[key] = value
            changelog.append((key, value))
        return store, changelog

    def committed(self) -> None:
        """The batch from :meth:`changes` is durable: start a new overlay.

        The scans start again from the head of each index (the store now holds this overlay's
        entries), but not at the next check: ``next_due`` and ``next_forget`` are lower bounds of
        the heads at all times (a scan sets them to the head, :meth:`put` lowers them, a delete
        only raises the true head), so the scan waits until something may be due. Rescanning at
        every checkpoint cost a seek over the deleted (joined) entries at the head of each index,
        per partition: ~10 % of the loop's time under a steady stream.
        """
        due, forget = self.next_due, self.next_forget
        self._dirty.clear()
        self._orig.clear()
        self._enc.clear()
        self._due_heap.clear()
        self._forget_heap.clear()
        self._reset_scans()
        self.next_due, self.next_forget = due, forget

    def touch(self, event_id: str) -> None:
        """Rewrite ``event_id``'s stored record (or its absence) in the next checkpoint.

        Used after a restore that dropped an aborted checkpoint's records from the changelog: the
        committed value is written again so it is the newest one there (see ``docs/state.md``).
        """
        if event_id in self._dirty:
            return
        rec = self._stored(event_id)
        if rec is None:
            self._dirty[event_id] = None
        else:
            self.put(event_id, rec)


def remembered(kind: bytes, forget_at: float) -> Remembered:
    """A joined (``J``) or expired (``E``) memory record."""
    assert kind in (KIND_J, KIND_E)
    return Remembered(kind, forget_at)


__all__ = ["IdTable", "KIND_P", "remembered"]
