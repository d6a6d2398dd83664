"""The run loop: poll → decode → track → persist → commit. Wiring only.

One thread polls Kafka and updates the tracker under a lock; the exporter's scrape threads take a
snapshot under the same lock and do the fairness math outside it. Checkpoints (every
``state.checkpoint_interval`` seconds or ``state.checkpoint_events`` records, on rebalance and on
shutdown) flush the dead-letter producer and then save every shard's state with its next offsets in
one transaction, so a crash at any point resumes exactly after the last checkpoint.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from stream_fair.config import Config
from stream_fair.exporter import ExporterServer, Health, PipelineStats, registry_for
from stream_fair.missing import MissingFeatureLog
from stream_fair.report import Report, build_report
from stream_fair.state import SqliteStore, StateStore
from stream_fair.tracker import Feedback, Tracker

log = logging.getLogger("stream_fair")


def fingerprint(config: Config) -> dict[str, Any]:
    """What the stored counts depend on: changing any of it needs a new state file."""
    return {
        "features": [f.name for f in config.fairness.features],
        "intersections": config.fairness.intersections,
        "windows": config.windows,
        "window_resolution": config.window_resolution,
    }


class Detector:
    """stream-fair as a running service."""

    def __init__(
        self,
        config: Config,
        *,
        feedback: Feedback | None = None,
        store: StateStore | None = None,
        exporter_port: int | None = None,
    ) -> None:
        self.config = config
        if feedback is None:
            feedback = _default_feedback(config)
        self.tracker = Tracker(config, feedback)
        self.store: StateStore = store or SqliteStore(config.state.path, fingerprint(config))
        stored = self.store.load_global()
        if stored is not None:
            self.tracker.load_global(stored)
        self.lock = threading.Lock()
        self.health = Health(unavailable_after=config.kafka.unavailable_after)
        self.stats = PipelineStats()
        self._report: tuple[float, Report] | None = None
        self._report_lock = threading.Lock()
        self._events_since_checkpoint = 0
        self._last_checkpoint_mono = time.monotonic()
        self.missing_log = MissingFeatureLog({f.name: str(f.path) for f in config.fairness.features})
        self._checkpoint_failures = 0  # consecutive: the retry backs off
        self._retry_at = 0.0
        self._held_back = False
        registry = registry_for(self.current)
        from stream_fair.status_page import History, render

        self.history = History()  # the status page's sparklines
        port = config.exporter.port if exporter_port is None else exporter_port
        self.server = ExporterServer(
            config.exporter.host,
            port,
            registry,
            self.health,
            page=lambda: render(*self.current(), history=self.history),
            **server_options(config.exporter),
        )

    @property
    def port(self) -> int:
        return self.server.port

    # -- the exporter's view ----------------------------------------------------------------
    def current(self) -> tuple[Report, PipelineStats]:
        """The latest report, recomputed at most every ``exporter.snapshot_max_age`` seconds."""
        with self._report_lock:
            now = time.monotonic()
            cached = self._report
            if cached is None or now - cached[0] >= self.config.exporter.snapshot_max_age:
                with self.lock:
                    snap = self.tracker.snapshot()
                cached = self._report = (now, build_report(snap, self.config))
                self.history.record(cached[1])
            return cached[1], self.stats

    # -- the loop ---------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Consume until ``stop`` is set, then checkpoint and close everything."""
        from stream_fair import kafka_io

        cfg = self.config
        topics = (cfg.topics.predictions, cfg.topics.outcomes)
        self.server.start()
        self.health.heartbeat = time.monotonic()
        consumer = kafka_io.make_consumer(cfg)
        try:
            kafka_io.check_copartitioned(consumer, cfg)
        except Exception:
            consumer.close(autocommit=False)
            self.server.stop()
            raise
        # after the broker checks, so a broker error stays the only line on stderr
        log.info("exporter on %s://%s:%d/metrics", self.server.scheme, cfg.exporter.host, self.port)
        dead = kafka_io.DeadLetters(cfg)
        self.attach(consumer, dead)
        self.stats.kafka_connected = lambda: self.health.connected(time.monotonic())
        listener = kafka_io.ShardListener(consumer, topics, self._on_revoke, self._on_assign)
        consumer.subscribe(list(topics), listener=listener)
        try:
            while not stop.is_set():
                self._backpressure(consumer, dead)
                batches = consumer.poll(timeout_ms=200, max_records=cfg.kafka.max_poll_records)
                self.health.heartbeat = time.monotonic()
                self.health.heard(kafka_io.last_heard(consumer))
                self.process(batches)
                self.maybe_checkpoint(time.monotonic())
                self.missing_log.maybe_warn(time.monotonic(), lambda: self.current()[0].snapshot.predictions)
                self._dead_letter_stats()
        finally:
            try:
                # at shutdown, wait longer for unsent dead letters before giving up on them
                clean = self.checkpoint(settle=max(10.0, cfg.kafka.request_timeout_ms / 1000))
            finally:
                consumer.close(autocommit=False)
                dead.close()
                self.store.close()
                self.server.stop()
            if clean:
                log.info("stopped cleanly")
            else:
                log.error("stopped; the last checkpoint is older than the last record read (see above)")

    def _dead_letter_stats(self) -> None:
        dead = self._dead
        self.stats.dead_letters = dead.sent
        self.stats.dead_letter_errors = dead.errors
        self.stats.dead_letters_pending = dead.pending

    def _backpressure(self, consumer: Any, dead: Any) -> None:
        """Stop reading while too many dead letters are unsent (the broker refuses them)."""
        if dead.backlogged:
            consumer.pause(*consumer.assignment())
            dead.settle(1.0)
            self._dead_letter_stats()
        elif consumer.paused():
            consumer.resume(*consumer.paused())

    def process(self, batches: dict[Any, list[Any]]) -> int:
        """Account for one poll's records (kafka-python ``{TopicPartition: [ConsumerRecord]}``)."""
        predictions = self._topics[0]
        update_p, update_o = self.tracker.update_prediction, self.tracker.update_outcome
        dead = self._dead
        n = 0
        with self.lock:
            for tp, records in batches.items():
                update = update_p if tp.topic == predictions else update_o
                part = tp.partition
                for r in records:
                    rejection = update(part, r.value, r.offset, r.timestamp)
                    if rejection is not None:
                        role = "predictions" if tp.topic == predictions else "outcomes"
                        dead.send(
                            role, tp.topic, part, r.offset, r.key, r.value,
                            rejection.reason, rejection.detail,
                        )  # fmt: skip
                n += len(records)
            self._mark_behind()
        self._events_since_checkpoint += n
        return n

    def _mark_behind(self) -> None:
        """Partitions with unread records hold event time back (see ``Tracker.set_behind``).

        The same high-water marks give the exported consumer lag.
        """
        from stream_fair import kafka_io

        consumer = self._consumer
        if not hasattr(consumer, "assignment"):
            return
        predictions = self._topics[0]
        lags = kafka_io.lag(consumer)
        for (topic, partition), n in lags.items():
            self.tracker.set_behind(partition, 0 if topic == predictions else 1, n is None or n > 0)
        self.stats.lag = {
            ("predictions" if topic == predictions else "outcomes", partition): n
            for (topic, partition), n in lags.items()
            if n is not None
        }

    def maybe_checkpoint(self, now: float) -> None:
        state = self.config.state
        if now < self._retry_at:
            return
        if (
            self._events_since_checkpoint >= state.checkpoint_events
            or now - self._last_checkpoint_mono >= state.checkpoint_interval
        ):
            self.checkpoint()

    def attach(self, consumer: Any, dead_letters: Any) -> None:
        """Use this consumer and dead-letter writer (the run loop, or a benchmark's manual assignment)."""
        cfg = self.config
        self._consumer, self._dead = consumer, dead_letters
        self._topics = (cfg.topics.predictions, cfg.topics.outcomes)

    def checkpoint(self, shards: set[int] | None = None, settle: float | None = None) -> bool:
        """Persist shard states and offsets atomically, then mirror offsets into Kafka.

        Dead letters are written first: a shard with a rejected record whose dead letter is not
        yet acknowledged is not saved, so its offsets never pass that record. A failure (a full
        disk, a store that refuses the write) is counted in ``errors_total{kind="checkpoint"}``,
        logged in one line and retried with a growing pause; the previous checkpoint stays valid.
        Returns whether every requested shard was saved.
        """
        from stream_fair import kafka_io

        cfg = self.config
        if settle is None:  # short, so the poll loop stays within max_poll_interval_ms
            settle = min(5.0, cfg.kafka.max_poll_interval_ms / 4000)
        unsent = self._dead.settle(settle)
        ids = set(self.tracker.shards) if shards is None else shards & set(self.tracker.shards)
        saved = ids - unsent
        states = {i: self.tracker.shard_state(i) for i in saved}
        for i, st in states.items():  # dead-letter counts travel with the shard
            st["dead_letters"] = self._dead.state(i)
        try:
            self.store.save(states, self.tracker.global_state())
        except Exception as exc:
            self._checkpoint_failed(exc)
            return False
        self._dead_letter_stats()
        offsets = {i: self.tracker.shards[i].offsets for i in saved}
        if unsent & ids:
            self._retry_at = time.monotonic() + 1.0
            if not self._held_back:  # once per episode; the dead-letter errors log on their own
                log.warning(
                    "checkpoint of partitions %s held back: dead letters unsent", sorted(unsent & ids)
                )
            self._held_back = True
        else:
            self._held_back = False
            self._checkpoint_failures = 0
            self._retry_at = 0.0
            self._events_since_checkpoint = 0
            self._last_checkpoint_mono = time.monotonic()
            self.stats.last_checkpoint = time.time()
        try:
            kafka_io.commit_offsets(self._consumer, self._topics, offsets)
        except Exception as exc:  # mirror only: the state store is the source of truth
            log.warning("offset commit to Kafka failed: %s", exc)
        return not (unsent & ids)

    def _checkpoint_failed(self, exc: Exception) -> None:
        self.stats.errors["checkpoint"] = self.stats.errors.get("checkpoint", 0) + 1
        self._checkpoint_failures += 1
        pause = min(60.0, 2.0 ** (self._checkpoint_failures - 1))
        self._retry_at = time.monotonic() + pause
        log.error("checkpoint failed, retrying in %.0f s (the previous one stays valid): %s", pause, exc)

    def _on_revoke(self, shards: set[int]) -> None:
        self.checkpoint(shards)
        with self.lock:
            for s in shards:
                self.tracker.drop(s)
                self._dead.drop(s)
        log.info("partitions revoked: %s", sorted(shards))

    def _on_assign(self, shards: set[int]) -> dict[int, list[int | None]]:
        with self.lock:
            for s in shards:
                if s in self.tracker.shards:
                    continue
                state = self.store.load(s)
                if state is not None:
                    self.tracker.load_shard(s, state)
                else:
                    self.tracker.shard(s)
                self._dead.load(s, (state or {}).get("dead_letters"))
            offsets = {s: list(self.tracker.shards[s].offsets) for s in shards}
        self.health.ready = True
        log.info("partitions assigned: %s (resuming at %s)", sorted(shards), offsets)
        return offsets


def server_options(exporter: Any) -> dict[str, Any]:
    """ExporterServer keyword arguments from the ``exporter`` section (web config read and checked)."""
    from stream_fair.web import load_web_config

    web = None if exporter.web_config_file is None else load_web_config(exporter.web_config_file)
    return {
        "read_timeout": exporter.read_timeout,
        "workers": exporter.workers,
        "max_connections": exporter.max_connections,
        "web": web,
    }


def _default_feedback(config: Config) -> Feedback:
    from stream_fair.config import feedback_settings
    from stream_fair.feedback import FeedbackMonitor
    from stream_fair.groups import feature_keys

    fc = config.fairness
    keys = feature_keys([f.name for f in fc.features], fc.intersections)
    return FeedbackMonitor(keys, feedback_settings(config.feedback))
