"""Durable state: each shard's join state, counts and next offsets, saved together atomically."""

from __future__ import annotations

from stream_fair.state.base import StateStore
from stream_fair.state.sqlite import SqliteStore

__all__ = ["StateStore", "SqliteStore"]
