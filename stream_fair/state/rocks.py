"""The local store: one RocksDB database per replica (through ``rocksdict``, as quix-streams uses).

Why RocksDB: pending predictions must live on disk (months of labels at 100/s are hundreds of
millions of ids) with RAM bounded by a budget, point lookups by id, ordered range scans for the
expiry index, and atomic multi-key writes for checkpoints. Measured on the reference machine
(``bench/state.py`` has the numbers): RocksDB 0.9 us per missing-key lookup (bloom filter),
~4 us per hit, ~0.3 us per key in a write batch, and about a tenth of LMDB's bytes on disk per
pending id; LMDB reads are faster (1.4 us) but its memory map grows the process RSS with the data,
which breaks a memory budget.

Memory: the block cache (index and filter blocks included) and the memtables are bounded by
``cache_bytes`` and ``write_buffer_bytes``; nothing grows with the number of pending ids.
Durability: RocksDB's write-ahead log makes each :meth:`RocksBackend.write` atomic; with
``sync=False`` a process crash loses nothing (the OS has the log) and a power cut loses at most the
newest writes, which the changelog topic restores (see ``docs/state.md``).

RocksDB's own ``LOCK`` file keeps a second process out of a database that is in use.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

from rocksdict import (
    AccessType,
    BlockBasedIndexType,
    BlockBasedOptions,
    Cache,
    DBCompressionType,
    Options,
    Rdict,
    WriteBatch,
    WriteOptions,
)

from stream_fair.config import fingerprint_difference, fingerprint_unknown
from stream_fair.errors import StateError
from stream_fair.state.codec import (
    FORMAT_KEY,
    SPACE_DEADLINE,
    SPACE_FORGET,
    STORE_FORMAT_VERSION,
    decode_json,
    encode_json,
)

log = logging.getLogger(__name__)

#: Column family of the two time-ordered indexes (expiry and forget keys, format 5); everything
#: else (id records, counts, meta) is in the default one.
INDEX_FAMILY = "index"
INDEX_SPACES = frozenset({SPACE_DEADLINE, SPACE_FORGET})


def _table(cache: Cache, *, bloom: bool) -> BlockBasedOptions:
    """Table options of one column family (``bloom``: the id records, looked up by key)."""
    table = BlockBasedOptions()
    if bloom:
        # Only the id records are looked up by key (a new prediction's id is usually absent: the
        # filter answers without a read). The index keys are only range-scanned, so their column
        # family has no filter: half the filter memory and filter-building CPU of format 4.
        table.set_bloom_filter(10, False)
    table.set_block_cache(cache)
    # lookups by id read one random block each: 2 KiB blocks cost 25% less per hit than 4 KiB
    # (less to checksum and decompress) for a few more bytes of index
    table.set_block_size(2048)
    # Partitioned index and filter blocks live in the block cache (only their small top level
    # is pinned), so their memory stays within cache_bytes however many ids are stored.
    table.set_index_type(BlockBasedIndexType.two_level_index_search())
    table.set_partition_filters(True)
    table.set_metadata_block_size(4096)
    table.set_cache_index_and_filter_blocks(True)
    table.set_pin_top_level_index_and_filter(True)
    table.set_pin_l0_filter_and_index_blocks_in_cache(True)
    return table


def _common(opts: Options, write_buffer_bytes: int) -> None:
    """Options both column families share."""
    opts.set_write_buffer_size(write_buffer_bytes)
    opts.set_max_write_buffer_number(2)
    # Most data sits in the bottommost level: LZ4 there (measured: a lookup costs about the same
    # as uncompressed, ZSTD costs 3x); recent levels uncompressed.
    opts.set_compression_type(DBCompressionType.none())
    opts.set_bottommost_compression_type(DBCompressionType.lz4())
    opts.set_max_open_files(256)
    opts.set_keep_log_file_num(2)
    opts.set_max_background_jobs(2)
    # Ids are random, so every L0 file overlaps the whole next level and each L0 compaction
    # rewrites it: compacting 8 L0 files at once instead of 4 (RocksDB's default) halves those
    # rewrites (measured at 2M pending: compaction CPU 7.3 -> 2.6 s per 300k joined pairs). Point
    # lookups check every L0 file's (pinned) filter, a few more probes per miss.
    opts.set_level_zero_file_num_compaction_trigger(8)


ERR_LOCKED = (
    "state error: {path} is in use by another stream-fair process: give each replica its own "
    "state.path (a pod-local volume), or stop the other process"
)
ERR_OPEN = "state error: cannot open {path}: {reason}: set state.path to a writable directory"
ERR_CORRUPT = (
    "state error: cannot open {path}: {reason}: the store is corrupt; point state.path to a new, "
    "empty directory (with state.changelog on, the state is restored from the changelog)"
)
ERR_FINGERPRINT = (
    "state error: {path} was written for another configuration ({keys} differ): run with that "
    "configuration, or start over with an empty state.path and a new kafka.group_id (and a new "
    "state.changelog_topic if you set one; docs/state.md, 'Configuration changes')"
)
ERR_FORMAT = (
    "state error: {path} has state format {found}, this version reads {expected}: point state.path "
    "to a new directory (state is restored from the changelog)"
)


class RocksBackend:
    """Byte keys and values in one RocksDB database; atomic batch writes; ordered scans."""

    def __init__(
        self,
        path: str | Path,
        fingerprint: dict[str, Any] | None = None,
        *,
        cache_bytes: int = 64 << 20,
        write_buffer_bytes: int = 16 << 20,
    ) -> None:
        self.path = Path(path)
        cache = Cache(cache_bytes)  # one cache for both column families: cache_bytes bounds both
        opts = Options(raw_mode=True)
        opts.create_if_missing(True)
        opts.create_missing_column_families(True)
        opts.set_block_based_table_factory(_table(cache, bloom=True))
        _common(opts, write_buffer_bytes)
        # All memtables together (both column families) stay within two write buffers, the budget
        # a single column family had: RocksDB flushes the largest one when they would exceed it.
        opts.set_db_write_buffer_size(2 * write_buffer_bytes)
        index = Options(raw_mode=True)
        index.set_block_based_table_factory(_table(cache, bloom=False))
        _common(index, write_buffer_bytes)
        self._opts, self._index_opts = opts, index
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._db = self._open()
        except Exception as exc:  # rocksdict raises plain Exceptions with RocksDB's message
            text = str(exc)
            if "lock" in text.lower():
                raise StateError(ERR_LOCKED.format(path=self.path)) from None
            why = ERR_CORRUPT if "corruption" in text.lower() else ERR_OPEN
            raise StateError(why.format(path=self.path, reason=text.splitlines()[0])) from None
        self._async = WriteOptions()
        self._async.sync = False
        self._sync = WriteOptions()
        self._sync.sync = True
        self._check_format(fingerprint or {})

    def __repr__(self) -> str:
        return f"RocksBackend({str(self.path)!r})"

    def _open(self, read_only: bool = False) -> Rdict:
        # The column families' options are given explicitly: without them rocksdict reopens an
        # existing database with the options of its OPTIONS file, which drops the table options
        # (no bloom filters, no partitioned index, an 8 MB default cache; measured: every lookup of
        # a missing id then reads a data block). tests/test_tracker.py keeps this true.
        families = {"default": self._opts, INDEX_FAMILY: self._index_opts}
        if read_only:
            db = Rdict(
                str(self.path), self._opts, column_families=families, access_type=AccessType.read_only()
            )
        else:
            db = Rdict(str(self.path), self._opts, column_families=families)
        self._index = db.get_column_family(INDEX_FAMILY)
        self._index_handle = db.get_column_family_handle(INDEX_FAMILY)
        return db

    def _family(self, key: bytes) -> Rdict:
        return self._index if key[0] in INDEX_SPACES else self._db

    def _check_format(self, fingerprint: dict[str, Any]) -> None:
        raw = self._db.get(FORMAT_KEY)
        meta = {"version": STORE_FORMAT_VERSION, "fingerprint": fingerprint}
        if raw is None:
            self.write({FORMAT_KEY: encode_json(meta)}, sync=True)
            return
        stored = decode_json(raw)
        if stored.get("version") != STORE_FORMAT_VERSION:
            self.close()
            raise StateError(
                ERR_FORMAT.format(path=self.path, found=stored.get("version"), expected=STORE_FORMAT_VERSION)
            )
        old = stored.get("fingerprint") or {}
        if old != fingerprint:
            keys = fingerprint_difference(old, fingerprint)
            if keys:
                self.close()
                raise StateError(ERR_FINGERPRINT.format(path=self.path, keys=", ".join(keys)))
            # written before some keys were recorded: they cannot be checked; from now on they are
            log.warning(
                "%s was written by an earlier stream-fair that did not record %s: taken as this "
                "configuration's; if you changed them since, start over (docs/state.md, "
                "'Configuration changes')",
                self.path, ", ".join(fingerprint_unknown(old)),
            )  # fmt: skip
            self.write({FORMAT_KEY: encode_json(meta)}, sync=True)

    # -- reads ----------------------------------------------------------------------------------
    def get(self, key: bytes) -> bytes | None:
        return self._family(key).get(key)  # type: ignore[no-any-return]

    def get_many(self, keys: list[bytes]) -> list[bytes | None]:
        """Values of ``keys`` (None where absent) in one batched lookup (RocksDB's MultiGet)."""
        if not keys:
            return []
        return self._family(keys[0]).get(list(keys))  # type: ignore[arg-type,return-value]

    def scan(self, start: bytes, end: bytes, limit: int | None = None) -> list[tuple[bytes, bytes]]:
        """Up to ``limit`` ``(key, value)`` pairs with ``start <= key < end``, in key order (one key
        space: ``start``'s first byte chooses the column family)."""
        out: list[tuple[bytes, bytes]] = []
        it = self._family(start).iter()
        it.seek(start)
        while it.valid():
            key = it.key()
            if key >= end:
                break
            out.append((key, it.value()))
            if limit is not None and len(out) >= limit:
                break
            it.next()
        return out

    def first_key(self, start: bytes, end: bytes) -> bytes | None:
        it = self._family(start).iter()
        it.seek(start)
        if it.valid():
            key: bytes = it.key()
            if key < end:
                return key
        return None

    # -- writes ---------------------------------------------------------------------------------
    def write(self, items: dict[bytes, bytes | None], sync: bool = False) -> None:
        """Apply puts (bytes) and deletes (None) atomically."""
        if self._closed():
            self._reopen()
        batch = WriteBatch(raw_mode=True)
        index, spaces = self._index_handle, INDEX_SPACES
        # in key order: the memtable's skiplist inserts each key next to the previous one
        # (measured: 0.6 us per key against 2.9 in hash order)
        for key in sorted(items):
            value = items[key]
            if key[0] in spaces:
                if value is None:
                    batch.delete(key, index)
                else:
                    batch.put(key, value, index)
            elif value is None:
                batch.delete(key)
            else:
                batch.put(key, value)
        try:
            self._db.write(batch, self._sync if sync else self._async)
        except Exception as exc:
            # RocksDB turns read-only after a failed log write (a full disk): reopening recovers
            # the last good state, so the caller can simply retry the whole checkpoint later.
            self._reopen()
            raise StateError(f"state error: cannot write {self.path}: {exc}") from None

    def _release(self) -> None:
        # The column family's handles keep the database (and its LOCK) alive: drop them first.
        self._index_handle = self._index = None  # type: ignore[assignment]
        with contextlib.suppress(Exception):  # closing twice or after a failed open is harmless
            self._db.close()

    def _reopen(self) -> None:
        self._release()
        try:
            self._db = self._open()
        except Exception as exc:  # still failing (the disk is still full): retried at the next write
            log.warning("state store %s could not be reopened yet: %s", self.path, str(exc).splitlines()[0])
            # Meanwhile reads go on from a read-only handle (opening it writes nothing), so the run
            # loop keeps joining new records while its checkpoints wait; a closed handle would
            # fail the next lookup and stop the process.
            with contextlib.suppress(Exception):
                self._db = self._open(read_only=True)

    def delete_range(self, start: bytes, end: bytes) -> None:
        """Remove every key in ``[start, end)`` (a partition that moved away, or a stale copy)."""
        batch = WriteBatch(raw_mode=True)
        if start[0] in INDEX_SPACES:
            batch.delete_range(start, end, self._index_handle)
        else:
            batch.delete_range(start, end)
        self._db.write(batch, self._async)

    # -- facts ----------------------------------------------------------------------------------
    def disk_bytes(self) -> int:
        """Live SST files and memtables (the WAL holds the memtables' writes on disk too), by
        RocksDB's own estimate."""
        total = 0
        for db in (self._db, self._index):
            for name in ("rocksdb.total-sst-files-size", "rocksdb.cur-size-all-mem-tables"):
                value = db.property_int_value(name)
                total += int(value or 0)
        return total

    def flush(self) -> None:
        self._db.flush()
        self._index.flush()

    def compact(self) -> None:
        """Compact both column families fully (benchmarks measure the bytes on disk after it)."""
        self._db.compact_range(None, None)
        self._index.compact_range(None, None)

    def _closed(self) -> bool:
        try:
            self._db.get(FORMAT_KEY)
            return False
        except Exception:
            return True

    def close(self) -> None:
        self._release()
