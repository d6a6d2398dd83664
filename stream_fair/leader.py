"""One model-wide verdict from N replicas: partition owners publish increments, the leader folds them.

Each replica counts, per owned input partition, the verdict engine's input (predictions and
labelled pairs by prediction-time cohort and arrival slot, :mod:`stream_fair.verdict.increments`).
A checkpoint puts that partition's new counts in its *outbox*, which travels in the partition's
meta (so in the changelog and the local store, committed with the counts); once committed, the
outbox is published to the increments topic (``<group>-stream-fair-increments``, one partition)
and emptied when the broker acknowledges it. A new owner publishes the outbox it restored, so a
crash between the commit and the acknowledgement loses nothing; the leader applies each
``(partition, seq)`` once (:class:`~stream_fair.verdict.fold.ModelWide`).

The **leader** is the replica that owns partition 0 of ``<group>-stream-fair-leader``: the topic
is part of the group's subscription, so Kafka's own group assignment elects it (no other
coordination service). Its consumer never reads that partition; the topic is the compacted
changelog of the leader's state instead. On election the new leader reads the topic, keeps the
state of the highest epoch, writes it back with epoch + 1 (its claim) and reads the increments
topic from the offset that state recorded; every ``state.checkpoint_interval`` (at least 5 s) it
writes the fold (engine, applied sequences, offset) again, and at once after an alarm is raised or
cleared (so a successor restores that event rather than deriving it again). A leader that dies is
replaced with its
detectors' state as of its last checkpoint; the increments since are folded again in the same
order, so the same alarms are raised, once (``docs/feedback.md``, "One verdict per model").

Only the leader exports the model-wide alarm (``stream_fair_disparity_alarm`` and friends) and
``stream_fair_leader 1``; the alert rules take the maximum over replicas.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from stream_fair import transport
from stream_fair.config import Config, fingerprint, fingerprint_difference
from stream_fair.errors import StateError
from stream_fair.groups import FeatureKey
from stream_fair.transport import ChangelogWriter, Reader, TopicPartition, increments_topic, leader_topic
from stream_fair.transport.base import never
from stream_fair.verdict.fold import ModelWide
from stream_fair.verdict.settings import VerdictSettings

if TYPE_CHECKING:
    from stream_fair.feedback.monitor import FeedbackSettings

log = logging.getLogger("stream_fair")

STATE_KEY = b"model-wide/"  # + epoch: compaction keeps one record per epoch, never a zombie's over ours
MIN_CHECKPOINT_INTERVAL = 5.0


class IncrementPublisher:
    """Publishes committed outboxes to the increments topic (acks=all, in order)."""

    def __init__(self, config: Config, cancel: Callable[[], bool] = never) -> None:
        self.topic = increments_topic(config)
        # short: the poll loop waits for it (a refused write is retried at the next checkpoint)
        self.timeout = min(5.0, config.kafka.request_timeout_ms / 1000)
        self._writer = transport.changelog_writer(config, self.topic, ordered=True)
        self._writer.cancel = cancel  # a stop requested ends the wait (ChangelogWriter.flush)
        self.sent = 0
        self.errors = 0

    def publish(self, messages: Sequence[dict[str, Any]]) -> bool:
        """Send and wait for the acknowledgements; False (and nothing forgotten) on any failure."""
        try:
            records: list[tuple[bytes, bytes | None]] = [
                (str(m["partition"]).encode(), json.dumps(m, separators=(",", ":")).encode())
                for m in messages
            ]
            self._writer.send(0, records, 0)
            self._writer.flush(self.timeout)  # raises if any record failed
        except Exception as exc:  # the outbox stays; the next checkpoint publishes it again
            self.errors += 1
            log.warning("increments not published (kept in the outbox, retried): %s", exc)
            return False
        self.sent += len(messages)
        return True

    def close(self, timeout: float = 5.0) -> None:
        self._writer.close(timeout)


ERR_LEADER_CONFIG = (
    "state error: the leader topic {topic} holds the model-wide fold written with another "
    "configuration ({keys} differ): run every replica with the same configuration, or start over "
    "with a new kafka.group_id and an empty state.path (docs/state.md, 'Configuration changes')"
)


class Leader:
    """The model-wide fold while this replica owns the leader topic's partition (module docstring)."""

    def __init__(
        self,
        config: Config,
        features: Sequence[FeatureKey],
        settings: VerdictSettings,
        partitions: int,
        loop: FeedbackSettings | None = None,
        cancel: Callable[[], bool] = never,
    ) -> None:
        self.config = config
        self.cancel = cancel  # a stop requested ends a wait for the leader topic (ChangelogWriter.flush)
        self.partitions = partitions
        self.features = list(features)
        self.settings = settings
        self.loop = loop
        self.fold = ModelWide(self.features, settings, loop)
        self.epoch = 0
        self.errors = 0  # increments skipped as unreadable and failed checkpoints (errors_total)
        self.fingerprint = fingerprint(config)  # in the fold's checkpoints, checked when restored
        self.interval = max(MIN_CHECKPOINT_INTERVAL, config.state.checkpoint_interval)
        self._tp = TopicPartition(increments_topic(config), 0)
        self._consumer: Reader | None = None
        self._writer: ChangelogWriter | None = None
        self._dirty = False
        self._last = 0.0
        self._stale_keys: set[bytes] = set()

    def __repr__(self) -> str:
        return f"Leader(epoch={self.epoch}, fold={self.fold!r})"

    # -- election ------------------------------------------------------------------------------
    def start(self) -> None:
        """Restore the state of the highest epoch, claim it (epoch + 1), position the reader."""
        reader = transport.changelog_reader(self.config, leader_topic(self.config))
        best: tuple[int, int] | None = None
        state = None
        keys: set[bytes] = set()
        deadline = time.monotonic() + self.config.kafka.max_poll_interval_ms / 2000
        try:
            reader.start({0: reader.beginning_offset(0)})
            while not reader.done(0):
                if time.monotonic() > deadline:
                    raise TimeoutError("reading the leader topic took too long; retried")
                for _p, offset, key, value, epoch in reader.poll(200):
                    mine = key is not None and key.startswith(STATE_KEY)
                    if mine and value is not None:
                        keys.add(key)
                        if best is None or (epoch, offset) > best:
                            best, state = (epoch, offset), value
                    elif mine:
                        keys.discard(key)
        finally:
            reader.close()
        if state is not None:
            doc = json.loads(state)
            self.epoch = int(doc["epoch"])
            stored = doc.get("config")  # absent: written before the fingerprint was recorded
            differ = fingerprint_difference(stored, self.fingerprint) if stored is not None else []
            if differ:  # a fold counted in other units must not be led on (docs/state.md)
                where = leader_topic(self.config)
                raise StateError(ERR_LEADER_CONFIG.format(topic=where, keys=", ".join(differ)))
            try:
                self.fold = ModelWide.from_state(doc["fold"], self.features, self.settings, self.loop)
            except (ValueError, KeyError, TypeError) as exc:  # features or format changed
                log.error(
                    "model-wide verdict: the stored state does not fit this config (%s); starting fresh", exc
                )
        self.epoch += 1
        self._stale_keys = keys
        self.fold.expect(self.partitions)
        self._consumer = transport.reader(self.config, reset="earliest", max_records=2000)
        self._consumer.assign([self._tp])
        if self.fold.offset is None:
            self._consumer.seek_to_beginning(self._tp)
        else:
            self._consumer.seek(self._tp, self.fold.offset)
        self._writer = transport.changelog_writer(self.config, leader_topic(self.config))
        self._writer.cancel = self.cancel
        if not self.checkpoint(force=True):  # the claim: a zombie's later writes carry a lower epoch
            raise RuntimeError("the claim could not be written to the leader topic")
        self._drop_stale_keys()
        log.info(
            "model-wide verdict: this replica leads (epoch %d, %d partitions folded, increments from %s)",
            self.epoch, len(self.fold.applied), self.fold.offset,
        )  # fmt: skip

    # -- the loop ------------------------------------------------------------------------------
    def _drop_stale_keys(self) -> None:
        """Tombstone the states of older epochs (compaction then removes them)."""
        assert self._writer is not None
        mine = STATE_KEY + str(self.epoch).encode()
        stale: list[tuple[bytes, bytes | None]] = [(k, None) for k in self._stale_keys if k != mine]
        if stale:
            try:
                self._writer.send(0, stale, self.epoch)
                self._writer.flush()
            except Exception as exc:  # harmless: the next claim tries again
                log.warning("model-wide verdict: old states not removed from the leader topic: %s", exc)

    def step(self, now: float | None = None, max_records: int = 2000) -> int:
        """Fold the increments published since the last step; returns how many were applied."""
        assert self._consumer is not None
        n = 0
        for records in self._consumer.poll(0, max_records).values():
            for r in records:
                try:
                    if self.fold.update(json.loads(r.value or b""), now):
                        n += 1
                except Exception as exc:  # one bad record must not stop every leader in turn
                    self.errors += 1
                    log.error("increment at offset %d skipped (unreadable): %s", r.offset, exc)
                self.fold.offset = r.offset + 1
                self._dirty = True
        if now is not None:
            self.fold.release(now)  # a caught-up partition gone silent is held again
        events = self.fold.new_events()
        for event in events:
            log.warning("%s", event.message())
        if events:  # a raise or a clear is durable at once, not at the next interval: a successor
            self.checkpoint(force=True)  # restores it instead of deriving it again from a re-fold
        return n

    def maybe_checkpoint(self, now: float) -> None:
        if self._dirty and now - self._last >= self.interval:
            self._last = now  # also after a failure: retried one interval later
            self.checkpoint()

    def checkpoint(self, force: bool = False) -> bool:
        """Write the fold to the leader topic; a failure keeps the previous checkpoint valid."""
        if self._writer is None or not (self._dirty or force):
            return True
        document = {"epoch": self.epoch, "config": self.fingerprint, "fold": self.fold.to_state()}
        value = json.dumps(document, separators=(",", ":"))
        try:
            key = STATE_KEY + str(self.epoch).encode()
            future = self._writer.send_meta(0, key, value.encode(), self.epoch)
            self._writer.flush()
            self._writer.offset(future)
        except Exception as exc:
            self.errors += 1
            log.error("model-wide checkpoint failed (retried): %s", exc)
            return False
        self._dirty = False
        self._last = time.monotonic()
        return True

    def stop(self, wait: float | None = None) -> None:
        """Leadership moved away (or shutdown): checkpoint, close the clients.

        ``wait`` caps how long the checkpoint waits for the broker (a bounded shutdown); after a
        failed checkpoint nothing waits for unsent records (the previous checkpoint stays valid).
        """
        if wait is not None and self._writer is not None:
            self._writer.timeout = min(self._writer.timeout, wait)
        ok = self.checkpoint()
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close(timeout=5.0 if ok else 0.0)
        if self._consumer is not None:
            with contextlib.suppress(Exception):
                self._consumer.close()
        self._consumer = self._writer = None


__all__ = ["IncrementPublisher", "Leader", "STATE_KEY"]
