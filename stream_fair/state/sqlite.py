"""The default state store: one SQLite file on local disk.

SQLite gives an atomic, crash-safe transaction for free (WAL journal, ``synchronous=FULL``), so a
``kill -9`` or a power cut in the middle of a checkpoint leaves the previous checkpoint intact.
Each shard is one row holding a zlib-compressed JSON document (no pickle: the file stays readable
by any version and cannot execute code).

>>> import tempfile, pathlib
>>> path = pathlib.Path(tempfile.mkdtemp()) / "state.db"
>>> store = SqliteStore(path, fingerprint={"features": ["sex"]})
>>> store.save({0: {"offsets": [5, 3]}}, {"guard": {}})
>>> store.load(0), store.load(1)
({'offsets': [5, 3]}, None)
>>> store.close()
>>> SqliteStore(path, fingerprint={"features": ["race"]})
Traceback (most recent call last):
...
stream_fair.errors.StateError: state error: ... was written for another configuration ...
"""

from __future__ import annotations

import sqlite3
import zlib
from pathlib import Path
from typing import Any

import orjson

from stream_fair.errors import StateError

_SCHEMA = "CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value BLOB NOT NULL)"
_GLOBAL = "global"
_META = "meta"
_VERSION = 1


def _encode(obj: Any) -> bytes:
    return zlib.compress(orjson.dumps(obj), 1)


def _decode(blob: bytes) -> Any:
    return orjson.loads(zlib.decompress(blob))


class SqliteStore:
    """Shard states in one SQLite file, checkpointed in one transaction."""

    def __init__(self, path: str | Path, fingerprint: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise StateError(
                f"state error: cannot open {self.path}: {exc}: set state.path to a writable file"
            ) from None
        meta = {"version": _VERSION, "fingerprint": fingerprint or {}}
        stored = self._get(_META)
        if stored is None:
            self._put_all({_META: meta})
        elif stored != meta:
            raise StateError(
                f"state error: {self.path} was written for another configuration "
                f"({stored.get('fingerprint')}): point state.path to a new file, or delete it to "
                "recount from the topics"
            )

    def __repr__(self) -> str:
        return f"SqliteStore({str(self.path)!r})"

    def _get(self, key: str) -> Any:
        try:
            row = self._db.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
            return None if row is None else _decode(row[0])
        except (sqlite3.Error, zlib.error, orjson.JSONDecodeError) as exc:
            raise StateError(f"state error: cannot read {key} from {self.path}: {exc}") from None

    def _put_all(self, items: dict[str, Any]) -> None:
        rows = [(k, _encode(v)) for k, v in items.items()]
        try:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)", rows)
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise StateError(f"state error: cannot write {self.path}: {exc}") from None

    def load(self, shard: int) -> dict[str, Any] | None:
        return self._get(f"shard:{shard}")  # type: ignore[no-any-return]

    def load_global(self) -> dict[str, Any] | None:
        return self._get(_GLOBAL)  # type: ignore[no-any-return]

    def save(self, shards: dict[int, dict[str, Any]], global_state: dict[str, Any]) -> None:
        items: dict[str, Any] = {f"shard:{k}": v for k, v in shards.items()}
        items[_GLOBAL] = global_state
        self._put_all(items)

    def close(self) -> None:
        self._db.close()
