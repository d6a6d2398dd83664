"""The contract every state store keeps.

A store saves the state of several shards and the replica-wide state in **one transaction**: after
a crash either all of a checkpoint is there or none of it. Each shard's state carries the next
offsets to read for its partition of both topics, so counts and offsets can never disagree: a
restart resumes exactly after the last checkpointed record and replays the rest.

The local-disk default is :class:`~stream_fair.state.sqlite.SqliteStore`. A shared store (for a
partition that moves to another replica on rebalance) implements the same four methods.
"""

from __future__ import annotations

from typing import Any, Protocol


class StateStore(Protocol):
    def load(self, shard: int) -> dict[str, Any] | None:
        """The last checkpointed state of a shard, or None if it was never saved."""

    def load_global(self) -> dict[str, Any] | None:
        """The last checkpointed replica-wide state, or None."""

    def save(self, shards: dict[int, dict[str, Any]], global_state: dict[str, Any]) -> None:
        """Persist all of it atomically (all or nothing)."""

    def close(self) -> None:
        """Release the store."""
