"""Opening the local store: a corrupt one says what to do about it, in one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from stream_fair.errors import StateError
from stream_fair.state import rocks
from stream_fair.state.rocks import RocksBackend


def test_a_corrupt_store_says_to_use_a_new_empty_directory(tmp_path: Path) -> None:
    """A garbage CURRENT file used to be answered with 'set state.path to a writable directory'."""
    path = tmp_path / "state"
    RocksBackend(path, {}).close()
    (path / "CURRENT").write_text("garbage\n")
    with pytest.raises(StateError) as err:
        RocksBackend(path, {})
    message = str(err.value)
    assert "point state.path to a new, empty directory" in message and "\n" not in message
    assert "writable" not in message
    assert message == rocks.ERR_CORRUPT.format(path=path, reason="Corruption: CURRENT file corrupted")
