"""Dead letters: rejected records, their original bytes and provenance, written at least once.

The client behind it is the configured transport's :class:`~stream_fair.transport.base.LetterProducer`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from stream_fair.config import Config
from stream_fair.transport.base import LetterProducer

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Letter:
    """One rejected record on its way to the dead-letter topic."""

    shard: int
    role: int  # 0 predictions, 1 outcomes
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]


TRUNCATED = "stream_fair.truncated"
_RECORD_OVERHEAD = 512  # record, batch and request framing beyond key, value and headers
_KEY_KEPT = 1024  # a key is an id: longer ones are cut to this much when a letter must shrink
_BACKLOG_LETTERS = 10_000  # beyond this many unsent letters the run loop stops reading


def build_letter(
    shard: int, role: int, topic: str, offset: int, key: bytes | None, value: bytes | None,
    reason: str, detail: str, max_bytes: int,
) -> Letter:  # fmt: skip
    """The dead letter of a rejected record: its original bytes and provenance headers.

    When key, value and headers together would exceed ``max_bytes``, the value (and a key longer
    than 1 KiB) is cut and the header ``stream_fair.truncated`` says how much was kept; the
    provenance headers always reference the original record by topic, partition and offset.

    >>> big = build_letter(0, 0, "p", 7, b"id", b"x" * 5000, "invalid_json", "bad", max_bytes=2000)
    >>> len(big.value) < 2000, dict(big.headers)[TRUNCATED].decode()
    (True, 'value of 5000 bytes cut to 1155 bytes; the original is predictions topic p/0/7')
    """
    headers = [
        ("stream_fair.reason", reason.encode()),
        ("stream_fair.detail", detail.encode("utf-8", "replace")[:1000]),
        ("stream_fair.source_topic", topic.encode()),
        ("stream_fair.source_partition", str(shard).encode()),
        ("stream_fair.source_offset", str(offset).encode()),
    ]
    size = _RECORD_OVERHEAD + sum(len(k) + len(v) for k, v in headers)
    if size + len(key or b"") + len(value or b"") > max_bytes:
        parts = []
        if key is not None and len(key) > _KEY_KEPT:
            parts.append(f"key of {len(key)} bytes cut to {_KEY_KEPT} bytes")
            key = key[:_KEY_KEPT]
        room = max(0, max_bytes - size - len(key or b"") - 200)  # 200: the truncation header
        if value is not None and len(value) > room:
            parts.append(f"value of {len(value)} bytes cut to {room} bytes")
            value = value[:room]
        where = f"{'predictions' if role == 0 else 'outcomes'} topic {topic}/{shard}/{offset}"
        headers.append((TRUNCATED, f"{'; '.join(parts)}; the original is {where}".encode()))
    return Letter(shard, role, key, value, headers)


class DeadLetters:
    """Writes rejected records to the dead-letter topic and never lets one go unrecorded.

    A letter stays in memory until the broker acknowledges it; a failed write (the producer gave
    up, the broker refused the size, no broker at all) is counted and retried by :meth:`settle`.
    The checkpoint calls :meth:`settle` first and saves no shard that still has an unsent letter,
    so its offsets never pass a rejected record that is not in the dead-letter topic. Counts
    (sent and failed writes) are kept per shard so they travel with the shard's checkpoint.
    """

    def __init__(self, config: Config, producer: Callable[[], LetterProducer] | None = None) -> None:
        self.topic = config.topics.dead_letters
        self.max_bytes = config.topics.dead_letter_max_bytes
        self._config = config
        self._new_producer = producer or self._transport_producer
        self._producer: LetterProducer | None = None
        self._lock = threading.Lock()
        self._unsent: dict[int, Letter] = {}  # sequence number -> letter, until acknowledged
        self._retry: set[int] = set()  # sequence numbers whose last write failed
        self._seq = 0
        self._sent_at: dict[int, float] = {}  # sequence number -> when it was last handed to the producer
        # a letter neither acknowledged nor failed this long after its send is treated as failed: a
        # producer can wedge on a connection the broker cut and then report nothing at all
        self._silent_after = 2 * config.kafka.request_timeout_ms / 1000 + 5.0
        self._counts: dict[int, list[int]] = {}  # shard -> [sent p, sent o, errors p, errors o]
        self._last_log = 0.0

    # -- counts, persisted with each shard --------------------------------------------------
    def load(self, shard: int, saved: dict[str, list[int]] | None) -> None:
        with self._lock:
            sent, errors = (saved or {}).get("sent", [0, 0]), (saved or {}).get("errors", [0, 0])
            self._counts[shard] = [int(sent[0]), int(sent[1]), int(errors[0]), int(errors[1])]

    def state(self, shard: int) -> dict[str, list[int]]:
        with self._lock:
            c = self._counts.get(shard, [0, 0, 0, 0])
            return {"sent": c[:2], "errors": c[2:]}

    def drop(self, shard: int) -> None:
        """The shard moved away: its counts go with its checkpoint (unsent letters are still sent)."""
        with self._lock:
            self._counts.pop(shard, None)

    def _count(self, shard: int, column: int) -> None:
        row = self._counts.get(shard)
        if row is not None:
            row[column] += 1

    @property
    def sent(self) -> dict[str, int]:
        with self._lock:
            return _by_role(self._counts.values(), 0)

    @property
    def errors(self) -> dict[str, int]:
        with self._lock:
            return _by_role(self._counts.values(), 2)

    @property
    def pending(self) -> int:
        """Letters not yet acknowledged by the broker."""
        return len(self._unsent)

    @property
    def backlogged(self) -> bool:
        """Too many unsent letters: stop reading until they are written."""
        return len(self._unsent) >= _BACKLOG_LETTERS

    def unsent_shards(self) -> set[int]:
        with self._lock:
            return {letter.shard for letter in self._unsent.values()}

    # -- writing ----------------------------------------------------------------------------
    def send(
        self, role: str, topic: str, partition: int, offset: int, key: bytes | None,
        value: bytes | None, reason: str, detail: str,
    ) -> None:  # fmt: skip
        if self.topic is None:
            return
        letter = build_letter(
            partition, 0 if role == "predictions" else 1, topic, offset, key, value, reason, detail,
            self.max_bytes,
        )  # fmt: skip
        with self._lock:
            self._counts.setdefault(partition, [0, 0, 0, 0])
            self._seq += 1
            seq = self._seq
            self._unsent[seq] = letter
        self._produce(seq, letter)

    def _transport_producer(self) -> LetterProducer:
        from stream_fair.transport import get

        return get(self._config.kafka).letter_producer(self._config, self.max_bytes)

    def _produce(self, seq: int, letter: Letter) -> None:
        assert self.topic is not None
        self._sent_at[seq] = time.monotonic()
        try:
            if self._producer is None:
                self._producer = self._new_producer()
            self._producer.send(
                self.topic,
                letter.key,
                letter.value,
                letter.headers,
                lambda: self._ok(seq),
                lambda exc, too_large: self._failed(seq, exc, too_large),
            )
        except Exception as exc:  # no broker, no client: retried by settle()
            self._failed(seq, exc)

    def _ok(self, seq: int) -> None:
        with self._lock:
            letter = self._unsent.pop(seq, None)
            self._sent_at.pop(seq, None)
            if letter is not None:
                self._count(letter.shard, letter.role)

    def _failed(self, seq: int, exc: BaseException, too_large: bool = False) -> None:
        with self._lock:
            letter = self._unsent.get(seq)
            if letter is None:
                return
            self._count(letter.shard, 2 + letter.role)
            self._retry.add(seq)
            if too_large:
                # the dead-letter topic refuses even the cut copy: keep the reference only
                letter.value = None
                letter.headers = [h for h in letter.headers if h[0] != TRUNCATED]
                letter.headers.append((TRUNCATED, b"value omitted: the dead-letter topic refused its size"))
            now = time.monotonic()
            quiet = now - self._last_log < 10.0
            self._last_log = self._last_log if quiet else now
        if not quiet:  # one line per 10 s at most, however many letters fail
            log.error(
                "dead-letter write to %s failed, retrying (%d unsent): %s: %s",
                self.topic, len(self._unsent), type(exc).__name__, exc,
            )  # fmt: skip

    def settle(self, timeout: float) -> set[int]:
        """Write and retry until every letter is acknowledged or ``timeout`` passes.

        Returns the shards that still have unsent letters (empty when all are written).
        """
        deadline = time.monotonic() + timeout
        pause = 0.1
        while True:
            silent = time.monotonic() - self._silent_after
            with self._lock:
                stuck = [
                    s for s in self._unsent if s not in self._retry and self._sent_at.get(s, 0.0) < silent
                ]
            for seq in stuck:
                self._failed(seq, TimeoutError("no answer from the producer"))
            with self._lock:
                retry, self._retry = self._retry, set()
                letters = [(seq, self._unsent[seq]) for seq in sorted(retry) if seq in self._unsent]
            if letters and self._producer is not None:
                # a producer that gave up on a batch can stay wedged on its connection: start afresh
                producer, self._producer = self._producer, None
                with contextlib.suppress(Exception):
                    producer.close(0)
            for seq, letter in letters:
                self._produce(seq, letter)
            remaining = deadline - time.monotonic()
            if self._producer is not None and remaining > 0:
                with contextlib.suppress(Exception):  # a timeout leaves letters unsent: see below
                    self._producer.flush(remaining)
            if not self._unsent or time.monotonic() >= deadline:
                return self.unsent_shards()
            time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(pause * 2, 2.0)

    def flush(self, timeout: float = 10.0) -> None:
        self.settle(timeout)

    def close(self, timeout: float = 5.0) -> None:
        if self._producer is not None:
            with contextlib.suppress(Exception):
                self._producer.close(timeout)


def _by_role(rows: Iterable[list[int]], column: int) -> dict[str, int]:
    out = {"predictions": 0, "outcomes": 0}
    for row in rows:
        out["predictions"] += row[column]
        out["outcomes"] += row[column + 1]
    return out
