"""The run loop: poll → decode → track → checkpoint (changelog, then local store) → publish. Wiring only.

One thread polls Kafka, updates the tracker and checkpoints; the exporter's scrape threads read the
snapshot published by the last checkpoint and do the fairness math outside the lock. A checkpoint
(every ``state.checkpoint_interval`` seconds or ``state.checkpoint_events`` records, on revoke and
on shutdown) flushes the dead letters, writes each changed partition's records to the changelog
and, once they are acknowledged, the partition's meta (the commit marker), then writes the same
changes to the local store in one batch. ``docs/state.md`` walks through every crash window.

On assignment a partition's input is paused while its state is restored (local store, then the
changelog tail it lacks) in steps between polls; the new owner then claims it (epoch + 1) with a
checkpoint and resumes at the offsets that state recorded.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import struct
import threading
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

from stream_fair.aggregate import ModelCounts
from stream_fair.config import Config, fingerprint, format_duration
from stream_fair.errors import BrokerError, StateError
from stream_fair.exporter import ExporterServer, Health, PipelineStats, registry_for
from stream_fair.missing import MissingFeatureLog
from stream_fair.report import Report, ReportCache, build_report
from stream_fair.report_worker import RENDER_WAIT, ReportWorker
from stream_fair.state import identity
from stream_fair.state.codec import (
    FEEDBACK_END,
    FEEDBACK_KEY,
    FEEDBACK_PREFIX,
    OLD_FEEDBACK_ERROR,
    SPACE_COUNTS,
    SPACE_HIST,
    SPACE_ID,
    SPACE_META,
    WINDOWS_PREFIX,
    decode_id,
    decode_json,
    encode_json,
    feedback_key,
    increment_key,
    meta_key,
    parse_cell,
    parse_feedback_key,
    prefix,
)
from stream_fair.state.restore import PartitionRestore, delete_partition
from stream_fair.tracker import TOPICS as TOPIC_NAMES
from stream_fair.tracker import Checkpoint, Feedback, Shard, Snapshot, Tracker
from stream_fair.transport.base import ClientError

log = logging.getLogger("stream_fair")

CRASH_ENV = "STREAM_FAIR_TEST_CRASH"
"""Tests only: ``step:n`` SIGKILLs the process at the n-th time it reaches a checkpoint step."""
CRASH_STEPS = ("changelog_data", "changelog_meta", "local", "restore")

_RESTORING = b"restoring"
EARLY_CHECKPOINT_GAP = 0.1  # seconds between the early checkpoints of a caught-up consumer, at least
EARLY_CHECKPOINT_SHARE = 0.25  # ... and at most this share of the loop's time spent in them
# The cyclic garbage collector during ``run``: young collections every GC_YOUNG container
# allocations instead of Python's 700 (the hot path allocates a few short-lived tuples per record;
# at 700 a young collection ran every ~100 records), and the long-lived heap (modules, the
# restored state) frozen out of full collections (see ``tuned_collector``).
GC_YOUNG = 10_000
LEAD_FAILING_AFTER = 60.0  # seconds of failed leader starts before they count as an error
LEAD_RETRY_FIRST, LEAD_RETRY_MAX = 0.5, 30.0  # seconds between failed leader starts, doubling
CHECKPOINT_RETRY_FIRST, CHECKPOINT_RETRY_MAX = 1.0, 60.0  # ... between failed checkpoints
FENCE_CHECK_INTERVAL = 10.0  # seconds between looks for other owners' records behind idle shards
RESTORE_RETRY_FIRST, RESTORE_RETRY_MAX = 1.0, 30.0  # ... between failed restores (broker errors)
MOVED_CHECK_EVERY = 60.0  # seconds between looks for local copies of partitions that moved away
# join.max_pending_bytes: the share of a partition's entries its pending events may take; the
# remembered ids get the rest, at least this complement (duplicates stay recognised)
BUDGET_PENDING_SHARE = 0.9
ENTRY_BYTES_WEIGHT = 0.1  # ... and the weight of a checkpoint's measure of the bytes per entry
MAX_OUTBOX = 64  # unacknowledged verdict messages of all owned partitions before input pauses
# The replica's own feedback monitor and event-time windows (until the model-wide aggregation
# takes them over): local only.
_FEEDBACK_KEY = FEEDBACK_KEY
_WINDOWS = WINDOWS_PREFIX


def retry_pause(failures: int, first: float, most: float) -> float:
    """Seconds before the next try after ``failures`` consecutive failures: doubling, capped."""
    return min(most, first * 2.0 ** (failures - 1))


class _Crash:
    """The fault-injection hook of the crash-window tests (inactive unless ``CRASH_ENV`` is set)."""

    def __init__(self) -> None:
        spec = os.environ.get(CRASH_ENV, "")
        step, _, n = spec.partition(":")
        self.step = step if step in CRASH_STEPS else None
        self.left = int(n or 1)

    def __call__(self, step: str) -> None:
        if step != self.step:
            return
        self.left -= 1
        if self.left <= 0:
            log.warning("test crash injected at %s", step)
            os.kill(os.getpid(), signal.SIGKILL)


_SHUTDOWN_WAIT = 10.0  # seconds a shutdown waits for dead letters and the changelog
_UNREACHABLE_WAIT = 1.0  # ... and for a broker that is already unreachable


def _closing(close: Any, **kwargs: Any) -> None:
    """Close a client at shutdown; one that cannot reach the broker is logged, never raised."""
    try:
        close(**kwargs)
    except Exception as exc:
        log.warning("at shutdown: %s", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)


PARTIAL_NOTE = (
    "this replica owns {owned} of {total} partitions: the what-if covers only their labelled pairs; "
    "ask each replica, or run one instance over all partitions"
)
EXPLAIN_PARTIAL_NOTE = (
    "this replica owns partitions {owned} of {total}: the explanation covers only their labelled "
    "pairs; a model-wide one: stream-fair report with one --url per replica (docs/report.md)"
)


@contextlib.contextmanager
def tuned_collector() -> Any:
    """The garbage collector as ``run`` wants it: objects alive now are moved out of its reach
    (``gc.freeze``; :func:`freeze_heap` again after a restore), young collections every
    ``GC_YOUNG`` allocations. Reference counting frees almost everything here; the cyclic
    collector only finds the rare cycle, yet with Python's defaults it cost 20-25 % of the hot
    path's CPU and a third of a large scrape's (it traversed the whole heap again and again).
    Restored on exit: frozen objects become collectable again."""
    old = gc.get_threshold()
    freeze_heap()
    gc.set_threshold(max(old[0], GC_YOUNG), *old[1:])
    try:
        yield
    finally:
        gc.set_threshold(*old)
        gc.unfreeze()


def freeze_heap() -> None:
    """Collect once, then keep what is alive out of later collections (``gc.freeze``)."""
    gc.collect()
    gc.freeze()


class Detector:
    """stream-fair as a running service."""

    def __init__(
        self,
        config: Config,
        *,
        feedback: Feedback | None = None,
        exporter_port: int | None = None,
    ) -> None:
        self.config = config
        self.feedback = feedback if feedback is not None else _default_feedback(config)
        self.backend: Any = None
        self.tracker: Tracker | None = None
        self.windows = ModelCounts(config.window_resolution, tuple(config.windows))
        self._window_labels = tuple(format_duration(w) for w in config.windows)
        self.lock = threading.Lock()
        self.health = Health()
        self.stats = PipelineStats()
        self._snapshot: Snapshot | None = None
        self._report: tuple[Snapshot, Report] | None = None
        self._report_cache = ReportCache()
        self._report_lock = threading.Lock()
        self._events_since_checkpoint = 0
        self._last_checkpoint_mono = time.monotonic()
        self._checkpoint_seconds = 0.0  # how long the last one took (early checkpoints' pace)
        self._crash = _Crash()
        self._consumer: Any = None
        self._dead: Any = None
        self._writer: Any = None
        self._reader: Any = None
        self._inputs: Any = None  # reads single input records: the topic identity check
        self._ids_seen: list[str | None] = [None, None]  # the input topics' ids, last loop
        self._topics = (config.topics.predictions, config.topics.outcomes)
        self._to_restore: set[int] = set()
        self._restores: dict[int, PartitionRestore] = {}
        # partitions another owner's changelog records showed this replica no longer owns: dropped
        # and paused until the group takes them away (docs/state.md, "Owners, epochs and the claim")
        self._fenced: set[int] = set()
        self._fence_reader: Any = None  # reads a changelog gap (created at the first one)
        self._fence_check_at = 0.0  # next look for another owner's records behind an idle shard
        self._restore_failures = 0  # consecutive broker errors during restores: the retry backs off
        self._restore_retry_at = 0.0  # no restore step before (time.monotonic())
        # partitions that moved away whose local copy is kept (state.local_max_age): their entries
        self._kept: dict[int, int] = {}
        self._kept_checked = float("-inf")  # time.monotonic() of the last look
        self._entry_bytes: float | None = None  # measured bytes on disk per stored entry (budget)
        self.missing_log = MissingFeatureLog({f.name: str(f.path) for f in config.fairness.features})
        self._checkpoint_failures = 0  # consecutive: the retry backs off
        self._retry_at = 0.0
        self._held_back = False
        # the model-wide verdict (stream_fair.leader): on in the run loop, off for manual use
        self.model_wide = False
        self._publisher: Any = None
        self.leader: Any = None
        self._lead_wanted = False
        self._stop: threading.Event | None = None  # set by run: its stop event
        self._draining = False  # run has reached its shutdown
        self._partitions = 0  # of each input topic
        self._published_mono = 0.0  # when the last snapshot was published (time.monotonic())
        self._leader_dirty = False  # the leader folded increments no published snapshot shows
        self._leader_errors = 0  # failed starts and the errors of leaders that stopped (errors_total)
        self._lead_failing_since: float | None = None  # the first failed start of this streak
        self._lead_failure_counted = False
        self._lead_failures = 0  # failed starts of this streak: the retry backs off
        self._lead_retry_at = 0.0  # no start before (time.monotonic())
        # the /metrics text of each snapshot, built in a child process while `run` runs
        # (exporter.report_process; stream_fair.report_worker)
        self.report_worker: ReportWorker | None = None
        registry = registry_for(self.current, rendered=self._rendered, live=self._live)
        from stream_fair.status_page import History, render

        self.history = History()  # the status page's sparklines
        self._explained: dict[int, dict[str, Any]] = {}  # alarm event seq -> its explanation
        self._down_since: float | None = None  # the broker refused connections since (monotonic)
        self._explained_seq = 0  # the newest alarm event looked at
        port = config.exporter.port if exporter_port is None else exporter_port
        self.server = ExporterServer(
            config.exporter.host,
            port,
            registry,
            self.health,
            page=lambda: render(*self.current(), history=self.history),
            alarms=self.alarms_document,
            report=self.report_document,
            explain=self.explain_document,
            search=self.search_document,
            whatif=self.whatif_document,
            **server_options(config.exporter),
        )

    @property
    def port(self) -> int:
        return self.server.port

    # -- state ------------------------------------------------------------------------------
    def open_state(self) -> Tracker:
        """Open the local store (after the broker checks, so a broker error creates no files)."""
        if self.tracker is None:
            from stream_fair.state.rocks import RocksBackend

            st = self.config.state
            self.backend = RocksBackend(
                st.path,
                fingerprint(self.config),
                cache_bytes=st.cache_bytes,
                write_buffer_bytes=st.write_buffer_bytes,
            )
            verdict = None
            if self.model_wide:
                from stream_fair.config import feedback_settings

                verdict = feedback_settings(self.config.feedback).verdict_settings()
            self.tracker = Tracker(self.config, self.backend, self.feedback, verdict=verdict)
            self._load_windows()
            if self.backend.get(_FEEDBACK_KEY) is not None:
                self.backend.close()
                self.backend, self.tracker = None, None
                raise StateError(OLD_FEEDBACK_ERROR.format(path=st.path))
            entries = {
                parse_feedback_key(k): decode_json(v)
                for k, v in self.backend.scan(FEEDBACK_PREFIX, FEEDBACK_END)
            }
            if entries and hasattr(self.feedback, "from_entries"):
                monitor = type(self.feedback)
                self.feedback = monitor.from_entries(  # type: ignore[attr-defined]
                    entries,
                    self.tracker.features,
                    self.feedback.settings,  # type: ignore[attr-defined]
                )
                self.tracker.feedback = self.feedback
            self._use_engine()
            self._publish()
        return self.tracker

    def _use_engine(self) -> None:
        """In model-wide mode the exported alarm is the leader's engine (none elsewhere)."""
        fb: Any = self.feedback
        if not self.model_wide or fb is None or not hasattr(fb, "local_verdict"):
            return
        from stream_fair.verdict import VerdictEngine

        fb.local_verdict = False
        fb.verdict = (
            self.leader.fold.engine
            if self.leader is not None
            else VerdictEngine(fb.features, fb.verdict.settings)
        )

    def _publish(self) -> None:
        """Make the committed state the one scrapes see (call with the lock held, or before threads)."""
        self._finish_publish(self._capture())

    def _capture(self) -> Snapshot:
        """Under the lock: the committed views and a copy of the feedback monitor's state, in
        O(cells + detectors). The feedback math runs where the snapshot is read
        (:attr:`Snapshot.feedback`: the report worker's process, or a scrape), not here."""
        assert self.tracker is not None
        fb: Any = self.feedback
        capture = fb.capture() if fb is not None and hasattr(fb, "capture") else None
        if self.leader is not None:
            self._leader_dirty = False  # this capture shows what it folded so far
        if self.model_wide and capture is not None:
            # the loop test is the leader's, on every partition's periods (none on the other replicas)
            capture.loop_history = self.leader.fold.loop_history() if self.leader is not None else {}
        return self.tracker.snapshot(self.windows.window_quads(self._window_labels), feedback=capture)

    def _finish_publish(self, snap: Snapshot) -> None:
        """Publish a captured snapshot (no lock needed)."""
        self._snapshot = snap
        self._published_mono = time.monotonic()

    def _rendered(self) -> tuple[Snapshot, str, PipelineStats] | None:
        """The report worker's text of the last published snapshot (or, if it takes longer than
        ``RENDER_WAIT``, of an older one), with that snapshot; None: build in process."""
        worker, snap = self.report_worker, self._snapshot
        if worker is None or snap is None:
            return None
        done = worker.render(snap, RENDER_WAIT)
        if worker.failures:
            self.stats.errors["report_worker"] = worker.failures
        return None if done is None else (done[0], done[1], self.stats)

    # -- the exporter's view ----------------------------------------------------------------
    def current(self) -> tuple[Report, PipelineStats]:
        """The report of the last published snapshot, recomputed only when a new one is published."""
        with self._report_lock:
            snap = self._snapshot
            if snap is None:
                snap = Snapshot(taken_at=time.time(), partitions={})
            cached = self._report
            if cached is None or cached[0] is not snap:
                cached = self._report = (snap, build_report(snap, self.config, self._report_cache))
                self.history.record(cached[1])
            return cached[1], self.stats

    def _live(self) -> tuple[Snapshot, PipelineStats]:
        """The last published snapshot and the live stats, without a report (the exporter's
        pipeline families when the report cannot be built)."""
        snap = self._snapshot
        return (Snapshot(taken_at=time.time(), partitions={}) if snap is None else snap), self.stats

    def _published_predictions(self) -> dict[Any, tuple[int, int]]:
        """Predictions per cell of the last published snapshot (no report built: the run loop's
        missing-attribute check reads it on the consumer thread)."""
        snap = self._snapshot
        return {} if snap is None else snap.predictions

    def alarms_document(self) -> dict[str, Any]:
        """``/alarms``: the calibrated alarms now and their event log (the leader's, model-wide)."""
        report, stats = self.current()
        fb = report.snapshot.feedback
        alarms = []
        if fb is not None:
            for (model, feature), ff in sorted(fb.features.items()):
                for disparity, a in sorted(ff.alarms.items()):
                    alarms.append(
                        {
                            "model": model,
                            "feature": feature,
                            "disparity": disparity,
                            "raised": a.flagged,
                            "raised_total": a.raised_total,
                            "last_raised_ts": a.last_raised_ts,
                            "raised_by": a.reason,
                            "group": a.group,
                            "rate": a.rate,
                            "statistic": a.statistic,
                            "threshold": a.threshold,
                            "change_point_ts": a.change_point_ts,
                        }
                    )
        events = [e.to_json() for e in fb.alarm_events] if fb is not None else []
        for ev in events:
            why = self._explained.get(ev["seq"])
            if why is not None:
                ev["explanation"] = why
        return {"leader": stats.leader, "alarms": alarms, "events": events}

    def report_document(self, query: dict[str, list[str]]) -> tuple[int, dict[str, Any]]:
        """``/report.json``: the stakeholder report's document (:mod:`stream_fair.stakeholder_report`)."""
        from stream_fair.report_sources import report_endpoint

        cfg = self.config
        source = (
            f"running detector {cfg.exporter.host}:{self.port} (group {cfg.kafka.group_id}, topics "
            f"{cfg.topics.predictions} / {cfg.topics.outcomes})"
        )
        return report_endpoint(self, query, source)

    def explain_new_alarms(self) -> None:
        """Explain each newly raised alarm once (stream_fair.explain, split at its change point):
        logged as one line and attached to its event in ``/alarms`` (the newest 100 are kept).

        Reads the events from the published snapshot: the report (the fairness math, the
        estimates' bootstraps) is built only when there is an alarm to explain, never in every
        turn of the consumer loop."""
        snap = self._snapshot
        # from the capture: reading it computes nothing (the feedback math stays off this thread)
        events = getattr(snap.feedback_source, "alarm_events", ()) if snap is not None else ()
        if not events or events[-1].seq <= self._explained_seq:
            return
        for ev in events:
            if ev.seq <= self._explained_seq:
                continue
            self._explained_seq = ev.seq
            if ev.kind != "alarm_raised":
                continue
            try:
                doc = self.explain_document(
                    ev.model, ev.feature, ev.disparity, ev.group, ev.rate, ev.change_point_ts, "alarm"
                )
            except Exception as exc:  # an explanation never stops the loop
                doc = {"error": f"{type(exc).__name__}: {exc}"}
            why = alarm_explanation(doc)
            self._explained[ev.seq] = why
            while len(self._explained) > 100:
                del self._explained[min(self._explained)]
            log.warning("explain %s %s %s: %s", ev.model, ev.feature, ev.disparity, why["summary"])

    def explain_document(
        self,
        model: str,
        feature: str,
        disparity: str,
        group: str | None = None,
        rate: str | None = None,
        split_ts: float | None = None,
        split_source: str = "request",
    ) -> dict[str, Any]:
        """``/explain``: why a disparity (stream_fair.explain) from this replica's event-time buckets.

        The periods are split at the raised alarm's change point (its group and rate too) unless
        the request names them; without an alarm, the two halves of the buckets held. Raises
        KeyError for an unknown model or feature, ValueError for a bad disparity or rate.
        """
        from stream_fair.explain import explain
        from stream_fair.groups import carried_attributes
        from stream_fair.report import config_keys

        fc = self.config.fairness
        keys = {k.name: k for k in config_keys(self.config)}
        if feature not in keys:
            raise KeyError(f"unknown feature {feature!r}; configured: {sorted(keys)}")
        report, _ = self.current()
        source = split_source
        named = frozenset(n for n, v in (("group", group), ("rate", rate)) if v is not None)
        fb = report.snapshot.feedback
        alarm = None
        if fb is not None and (model, feature) in fb.features:
            alarm = fb.features[model, feature].alarms.get(disparity)
        if alarm is not None and alarm.flagged and split_ts is None and alarm.change_point_ts is not None:
            split_ts, source = alarm.change_point_ts, "alarm"
            group = group or alarm.group
            rate = rate or alarm.rate
        with self.lock:  # the run loop folds into the buckets under this lock
            buckets = {b: dict(rows) for b, rows in self.windows.buckets.items()}
        if not any(m == model for rows in buckets.values() for m, _ in rows):
            raise KeyError(f"no labelled pairs of model {model!r} in the event-time windows")
        doc = explain(
            buckets,
            model=model,
            key=keys[feature],
            disparity=disparity,
            attributes=carried_attributes([f.name for f in fc.features], [f.name for f in fc.audit_only]),
            intersections=[k for k in keys.values() if k.is_intersection],
            resolution=self.config.window_resolution,
            split_ts=split_ts,
            split_source=source,
            group=group,
            rate=rate,
            min_samples=fc.min_samples,
            level=fc.credible_level,
            named=named if split_source == "request" else frozenset(),  # an alarm's: as they are
        )
        # say which pairs it covers: the buckets hold this replica's partitions only
        owned = sorted(report.snapshot.partitions)
        doc["partitions"] = owned
        doc["partitions_total"] = self._partitions or None
        if self._partitions and len(owned) < self._partitions:
            doc["coverage_note"] = EXPLAIN_PARTIAL_NOTE.format(
                owned=", ".join(map(str, owned)) or "none", total=self._partitions
            )
        return doc

    def search_document(self) -> dict[str, Any]:
        """``/search``: the last search of unconfigured intersections, per model."""
        report, _ = self.current()
        return {"models": {sv.model: {"window": sv.window, **sv.result.to_json()} for sv in report.searches}}

    def whatif_document(self, query: dict[str, list[str]]) -> tuple[int, dict[str, Any]]:
        """``/whatif``: threshold what-ifs over the labelled score histograms of this replica's
        partitions (:mod:`stream_fair.whatif_query`)."""
        from stream_fair.counts import FP, TP
        from stream_fair.report import fairness_settings
        from stream_fair.whatif_query import answer

        report, _ = self.current()

        def histograms(model: str, feature: str) -> Any:
            try:
                by_group = report.score_histograms(model, feature)
            except KeyError:  # not a configured feature or intersection
                return None
            if not by_group:
                return None
            edges = next(iter(by_group.values())).edges
            selected = {g: h.column(TP) + h.column(FP) for g, h in by_group.items()}
            return edges, {g: (h.positives, h.negatives, selected[g]) for g, h in by_group.items()}

        def known() -> list[tuple[str, str]]:
            return sorted({(v.model, v.feature.name) for v in report.views})

        settings = fairness_settings(self.config)
        code, doc = answer(query, histograms, settings, self.config.schema_.score_threshold, known)
        if code == 200:  # say which pairs the answer covers: this replica's partitions only
            owned = sorted(report.snapshot.partitions)
            doc["partitions"] = owned
            doc["partitions_total"] = self._partitions or None
            if self._partitions and len(owned) < self._partitions:
                doc["notes"].append(PARTIAL_NOTE.format(owned=len(owned), total=self._partitions))
        return code, doc

    # -- the loop ---------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Consume until ``stop`` is set, then checkpoint and close everything."""
        from stream_fair import transport

        cfg = self.config
        # a stop requested while the loop waits for the broker (a checkpoint's changelog write, the
        # leader's) ends that wait at once; the shutdown's own checkpoint then waits, bounded
        self._stop, self._draining = stop, False
        self.server.start()
        if cfg.exporter.report_process:
            self.report_worker = ReportWorker(cfg, on_points=self.history.add)
            self.report_worker.start()
        self.health.heartbeat = time.monotonic()
        consumer = transport.make_consumer(cfg)
        writer = reader = publisher = inputs = None
        self.model_wide = cfg.state.changelog
        try:
            partitions = self._partitions = transport.check_copartitioned(consumer, cfg)
            inputs = self._inputs = transport.InputReader(cfg)
            if cfg.state.changelog:
                transport.ensure_changelog(consumer, cfg, partitions)
                transport.ensure_internal_topics(consumer, cfg)
                writer, reader = transport.changelog_writer(cfg), transport.changelog_reader(cfg)
                writer.cancel = self._interrupted
                from stream_fair.leader import IncrementPublisher

                publisher = IncrementPublisher(cfg, cancel=self._interrupted)
            self.open_state()
        except Exception:
            consumer.close()
            for c in (writer, reader, publisher, inputs):
                if c is not None:
                    c.close()
            self.server.stop()
            self._stop_report_worker()
            raise
        # after the broker checks, so a broker error stays the only line on stderr
        log.info("exporter on %s://%s:%d/metrics", self.server.scheme, cfg.exporter.host, self.port)
        dead = transport.DeadLetters(cfg)
        self.attach(consumer, dead, writer, reader)
        self._publisher = publisher
        self.stats.kafka_connected = lambda: self.health.connected(time.monotonic())
        topics = list(self._topics)
        lead = None
        if self.model_wide:
            topics.append(transport.leader_topic(cfg))
            lead = (topics[-1], self._on_leader)
            self.stats.leader = False
        listener = transport.ShardListener(
            consumer, self._topics, self._on_revoke, self._on_assign, lead, on_lost=self._on_lost
        )
        consumer.subscribe(topics, listener=listener)
        clean = failed = False
        tuned = contextlib.ExitStack()
        try:
            tuned.enter_context(tuned_collector())
            while not stop.is_set():
                self._backpressure(consumer, dead)
                try:
                    batches = consumer.poll(
                        timeout_ms=self._poll_timeout_ms(time.monotonic()),
                        max_records=cfg.kafka.max_poll_records,
                    )
                except transport.BROKER_DOWN as exc:  # refused: /readyz says so; try again shortly
                    self.health.heartbeat = time.monotonic()  # the process is fine
                    self._broker_down(exc)
                    stop.wait(1.0)
                    continue
                if self._down_since is not None:
                    log.warning("the broker answers again after %.0f s", time.monotonic() - self._down_since)
                    self._down_since = None
                if listener.assigned:  # the join is right only while the inputs stay co-partitioned
                    listener.assigned = False
                    transport.check_copartitioned(consumer, cfg, expected=self._partitions)
                self._watch_topic_ids()
                self.health.heartbeat = time.monotonic()
                self.health.heard(consumer.last_heard())
                self.process(batches)
                if self._to_restore:
                    self.restore_step()
                    if not self._to_restore:
                        freeze_heap()  # the restored state is long-lived too
                self.maybe_checkpoint(time.monotonic())
                self.check_fences(time.monotonic())
                self.lead_step(time.monotonic())
                self.missing_log.maybe_warn(time.monotonic(), self._published_predictions)
                self.explain_new_alarms()
                self._dead_letter_stats()
        except BaseException:
            failed = True
            raise
        finally:
            # Bounded: a pod's grace period (30 s by default) must cover it. With the broker
            # reachable, wait up to _SHUTDOWN_WAIT for unsent dead letters and the changelog; if it
            # is already unreachable, barely at all. A final checkpoint that fails leaves the
            # previous one valid (a restart re-reads from its offsets), and then nothing else waits.
            self._draining = True
            reachable = self.health.connected(time.monotonic())
            wait = _SHUTDOWN_WAIT if reachable else _UNREACHABLE_WAIT
            if not reachable:
                log.warning("stopping while the broker is unreachable: not waiting for it")
            for c in (writer, publisher):
                if c is not None:
                    c.timeout = min(c.timeout, wait)
            try:
                # After an error nothing is checkpointed: it may have stopped a poll half applied
                # (counted, joined, but without its offsets), and a checkpoint would make that
                # durable: the restart would read those records again and count them twice. The
                # last checkpoint stays valid, as after a SIGKILL.
                clean = False if failed else self.checkpoint(settle=wait)
            finally:
                grace = 5.0 if clean else 0.0
                self._on_leader(False, wait)
                _closing(consumer.close)
                _closing(dead.close, timeout=grace)
                for c in (writer, publisher):
                    if c is not None:
                        _closing(c.close, timeout=grace)
                for c in (reader, inputs, self._fence_reader):
                    if c is not None:
                        _closing(c.close)
                self._fence_reader = None
                self.close()
                self.server.stop()
                self._stop_report_worker()
                tuned.close()
            # an error that stopped the loop is reported by the caller, in one line
            if clean and not failed:
                log.info("stopped cleanly")
            elif not failed:
                log.error("stopped; the last checkpoint is older than the last record read (see above)")

    def _stop_report_worker(self) -> None:
        worker, self.report_worker = self.report_worker, None
        if worker is not None:
            _closing(worker.close)

    def _dead_letter_stats(self) -> None:
        dead = self._dead
        self.stats.dead_letters = dead.sent
        self.stats.dead_letter_errors = dead.errors
        self.stats.dead_letters_pending = dead.pending
        if self.tracker is not None:
            self.stats.dead_letter_partitions = {i: dead.state(i) for i in list(self.tracker.shards)}

    def _outbox_backlogged(self) -> bool:
        """Too many committed verdict increments unacknowledged (the increments topic refuses them)."""
        if self._publisher is None or self.tracker is None:
            return False
        return sum(len(s.outbox) for s in self.tracker.shards.values()) > MAX_OUTBOX

    def _backpressure(self, consumer: Any, dead: Any) -> None:
        """Stop reading while too many dead letters or verdict increments are unsent (the broker
        refuses them): the backlog, and the partitions' metas that carry the outboxes, stay bounded."""
        if self._outbox_backlogged():
            consumer.pause(*[tp for tp in consumer.assignment() if tp.topic in self._topics])
            self._publish_outboxes()
        elif dead.backlogged:
            consumer.pause(*consumer.assignment())
            dead.settle(1.0)
            self._dead_letter_stats()
        else:  # resume what backpressure paused: never a partition still being restored, nor the
            # leader topic's (paused for good: read as input, its records counted as outcomes)
            paused = [
                tp
                for tp in consumer.paused()
                if tp.topic in self._topics and tp.partition not in self._to_restore
            ]
            if paused:
                consumer.resume(*paused)

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()

    def attach(self, consumer: Any, dead_letters: Any, writer: Any = None, reader: Any = None) -> None:
        """Use these Kafka clients (the run loop, or a benchmark's manual assignment)."""
        self._consumer, self._dead = consumer, dead_letters
        self._writer, self._reader = writer, reader
        self.open_state()

    def process(self, batches: Mapping[Any, Sequence[Any]]) -> int:
        """Account for one poll's records (``{TopicPartition: [Record]}``, see ``transport.base``)."""
        tracker = self.open_state()
        predictions = self._topics[0]
        dead = self._dead
        n = 0
        read = self.stats.records_read
        with self.lock:
            for tp, records in batches.items():
                if tp.topic not in self._topics:
                    continue  # never expected: the leader topic's partition stays paused
                if tp.partition in self._fenced:
                    continue  # fetched before the pause: its owner counts them
                role = 0 if tp.topic == predictions else 1
                read[TOPIC_NAMES[role]] += len(records)
                for r, rejection in tracker.process(tp.partition, role, records):
                    dead.send(
                        "predictions" if role == 0 else "outcomes", tp.topic, tp.partition, r.offset,
                        r.key, r.value, rejection.reason, rejection.detail,
                    )  # fmt: skip
                n += len(records)
            self._mark_behind()
        self._events_since_checkpoint += n
        return n

    def _mark_behind(self) -> None:
        """Partitions with unread records hold event time back (see ``Tracker.set_behind``).

        The same high-water marks give the exported consumer lag.
        """
        from stream_fair import transport

        consumer = self._consumer
        if not hasattr(consumer, "assignment"):
            return
        assert self.tracker is not None
        predictions = self._topics[0]
        lags = transport.lag(consumer)
        for (topic, partition), n in lags.items():
            if topic in self._topics:
                self.tracker.set_behind(partition, 0 if topic == predictions else 1, n is None or n > 0)
        self.stats.lag = {
            ("predictions" if topic == predictions else "outcomes", partition): n
            for (topic, partition), n in lags.items()
            if n is not None and topic in self._topics
        }

    def maybe_checkpoint(self, now: float) -> None:
        """Checkpoint every ``state.checkpoint_interval`` or ``state.checkpoint_events`` records;
        sooner while the consumer is caught up, so a new count reaches ``/metrics`` (which shows
        checkpointed counts only) in about a poll instead of up to an interval later."""
        if now >= self.checkpoint_due():
            t0 = time.monotonic()
            self.checkpoint()
            self._checkpoint_seconds = time.monotonic() - t0

    def checkpoint_due(self) -> float:
        """When (``time.monotonic()``) the next checkpoint is due: at once after
        ``state.checkpoint_events`` records, the early gap after the last one while caught up with
        records to count, else the interval; never before a failed one's retry time. The run loop
        polls no longer than until then, so an idle consumer takes its early checkpoint right when
        it is due, not after a poll's whole timeout."""
        state = self.config.state
        last = self._last_checkpoint_mono
        if self._events_since_checkpoint >= state.checkpoint_events:
            due = last
        elif state.checkpoint_when_caught_up and self._events_since_checkpoint and self._caught_up():
            due = last + self._early_gap()
        else:
            due = last + state.checkpoint_interval
        return max(due, self._retry_at)

    def _poll_timeout_ms(self, now: float) -> int:
        """A poll's wait when nothing arrives: 200 ms (100 ms while restoring), or less so the
        loop is back when a checkpoint falls due (at 0 a poll returns what is already fetched)."""
        wait = 0.1 if self._to_restore else 0.2
        return round(1000 * max(0.0, min(wait, self.checkpoint_due() - now)))  # to the ms: 99.99 is 100

    def _caught_up(self) -> bool:
        """Every assigned input partition read to its high-water mark at the last poll."""
        lag = self.stats.lag
        return bool(lag) and not self._to_restore and not any(lag.values())

    def _early_gap(self) -> float:
        """The least time between the early checkpoints of a caught-up consumer: at least
        ``EARLY_CHECKPOINT_GAP``, and long enough that they take at most ``EARLY_CHECKPOINT_SHARE``
        of the loop's time. A consumer that falls behind stops taking them (lag > 0)."""
        return max(EARLY_CHECKPOINT_GAP, self._checkpoint_seconds / EARLY_CHECKPOINT_SHARE)

    # -- checkpoints ------------------------------------------------------------------------
    def checkpoint(self, shards: set[int] | None = None, settle: float | None = None) -> bool:
        """Make every change durable: dead letters, changelog (data, then metas), local store.

        A shard with a rejected record whose dead letter is not yet acknowledged is not
        checkpointed, so its offsets never pass that record. A failure (a full disk, a broker
        that refuses the changelog) is counted in ``errors_total{kind="checkpoint"}``, logged in
        one line and retried with a growing pause; the previous checkpoint stays valid.
        Returns whether every requested shard was checkpointed.
        """
        from stream_fair import transport

        tracker = self.tracker
        if tracker is None:
            return True
        cfg = self.config
        if settle is None:  # short, so the poll loop stays within max_poll_interval_ms
            settle = min(5.0, cfg.kafka.max_poll_interval_ms / 4000)
        unsent = self._dead.settle(settle) if self._dead is not None else set()
        ids = set(tracker.shards) if shards is None else shards & set(tracker.shards)
        ids -= self._to_restore
        saved = ids - unsent
        if self._dead is not None:
            for i in saved:  # dead-letter counts travel with the shard
                tracker.shards[i].dead_letters = self._dead.state(i)
        if self.model_wide:
            tracker.heartbeat()
        cp = tracker.checkpoint(saved)
        try:
            if cp.shards:
                changelog_next = self._write_changelog(cp) if self._writer is not None else None
                fenced = {sc.partition for sc in cp.shards} & self._fenced
                if fenced:  # written behind another owner's claim: never committed here
                    cp.shards = [sc for sc in cp.shards if sc.partition not in fenced]
                    for p in fenced:
                        self._drop_fenced(p)
                fb: Any = self.feedback
                # the monitor's entries that changed since the last checkpoint, same atomic write
                feedback: dict[bytes, bytes | None] = (
                    {feedback_key(k): None if v is None else encode_json(v) for k, v in fb.changes().items()}
                    if fb is not None and hasattr(fb, "changes")
                    else {}
                )
                with self.lock:
                    tracker.commit(cp, changelog_next, extra=feedback)
                    if feedback:
                        fb.committed()
                    for sc in cp.shards:
                        if sc.increment is not None:
                            self.windows.fold_increment(sc.increment)
                    captured = self._capture()
                self._finish_publish(captured)
                self._save_windows()
                self._crash("local")
                self._drop_moved_copies(time.monotonic())
                self.stats.state_disk_bytes = self.backend.disk_bytes()
                self._apply_byte_budget()
            elif self.windows.unsaved_buckets:  # left by a failed write, on an idle stream too
                self._save_windows()
        except Exception as exc:  # the next attempt writes again what this one did not commit
            self._checkpoint_failed(exc)
            self._publish_outboxes()  # what earlier checkpoints committed can still go
            return False
        self._publish_outboxes()
        self._dead_letter_stats()
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
        offsets = {sc.partition: tracker.shards[sc.partition].offsets for sc in cp.shards}
        try:
            transport.commit_offsets(self._consumer, self._topics, offsets)
        except Exception as exc:  # mirror only: the state store is the source of truth
            log.warning("offset commit to Kafka failed: %s", exc)
        return not (unsent & ids)

    # -- the model-wide verdict (stream_fair.leader) ------------------------------------------------
    def _publish_outboxes(self) -> None:
        """Publish every owned partition's committed outbox; empty it once acknowledged."""
        if self._publisher is None or self.tracker is None:
            return
        shards = [s for i, s in sorted(self.tracker.shards.items()) if s.outbox and i not in self._to_restore]
        if not shards:
            return
        if self._publisher.publish([m for s in shards for m in s.outbox]):
            for s in shards:
                s.outbox = []  # the next checkpoint's meta says so; until then a re-publish is a no-op
        self.stats.increments_published = self._publisher.sent
        self.stats.errors["increments"] = self._publisher.errors

    def _broker_down(self, exc: Exception) -> None:
        """One warning per outage (kafka-python logs every attempt on its own)."""
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning("the broker refuses connections, retrying: %s", str(exc).splitlines()[0])

    def _interrupted(self) -> bool:
        """A stop was requested and the loop has not reached the shutdown yet (writers' ``cancel``)."""
        return self._stop is not None and self._stop.is_set() and not self._draining

    def _on_leader(self, lead: bool, wait: float | None = None) -> None:
        """Group assignment: this replica gained (start in the loop) or lost the leader partition."""
        self._lead_wanted = lead
        if not lead and self.leader is not None:
            leader, self.leader = self.leader, None
            leader.stop(wait)
            self._leader_errors += leader.errors
            if self._leader_errors:
                self.stats.errors["leader"] = self._leader_errors
        self._lead_retry_at = 0.0  # a new assignment is tried at once
        if not lead:  # a failing streak ends with the assignment; the next one is counted anew
            self._lead_failing_since, self._lead_failure_counted, self._lead_failures = None, False, 0
            with self.lock:
                self._use_engine()
                self._publish()  # stop exporting the alarms now, not at the next checkpoint
            self.stats.leader = False
            log.info("model-wide verdict: leadership moved away")

    def lead_step(self, now: float) -> None:
        """Start leading when elected; fold new increments, checkpoint, show the alarms."""
        if self._lead_wanted and self.leader is None and now >= self._lead_retry_at:
            from stream_fair.config import feedback_settings
            from stream_fair.leader import Leader

            assert self.tracker is not None
            fs = feedback_settings(self.config.feedback)
            settings = fs.verdict_settings()
            features = self.tracker.features
            leader = Leader(self.config, features, settings, self._partitions, fs, self._interrupted)
            try:
                leader.start()
            except StateError:  # a fold of another configuration: stop, as a restore would
                leader.stop()
                raise
            except Exception as exc:
                # retried with a doubling pause (a lead out of reach must not cost a connection
                # and an ERROR line at every poll); an error once the lead stays out of reach for a
                # minute (a start during a rebalance may fail and succeed at the next try): then
                # nobody raises the page
                if self._lead_failing_since is None:
                    self._lead_failing_since = now
                since = self._lead_failing_since
                self._lead_failures += 1
                pause = retry_pause(self._lead_failures, LEAD_RETRY_FIRST, LEAD_RETRY_MAX)
                self._lead_retry_at = now + pause
                log.error("model-wide verdict: cannot take the lead yet (retried in %.1f s): %s", pause, exc)
                leader.stop()
                if now - since >= LEAD_FAILING_AFTER and not self._lead_failure_counted:
                    self._lead_failure_counted = True
                    self._leader_errors += 1
                    self.stats.errors["leader"] = self._leader_errors
                return
            self._lead_failing_since, self._lead_failure_counted, self._lead_failures = None, False, 0
            self._lead_retry_at = 0.0
            self.leader = leader
            with self.lock:
                self._use_engine()
                self._publish()
            self.stats.leader = True
        leader = self.leader
        if leader is None:
            return
        if leader.step(now):
            self._leader_dirty = True
        # the leader's folds are shown at most once a second, and not when a checkpoint published
        # a snapshot (which shows them too) within that second: under a steady stream, never
        if self._leader_dirty and now - self._published_mono >= 1.0:
            with self.lock:
                captured = self._capture()
            self._finish_publish(captured)
        leader.maybe_checkpoint(now)
        if leader.errors:
            self.stats.errors["leader"] = self._leader_errors + leader.errors

    def _save_windows(self) -> None:
        """The windows' changed buckets, after the checkpoint they were folded from (a crash in
        between loses that checkpoint's rows from the windows only, never from the counters)."""
        _, buckets = self.windows.changes()
        writes: dict[bytes, bytes | None] = {
            _WINDOWS + b"b" + struct.pack(">q", b): None
            if rows is None
            else encode_json([[m, list(c), row] for (m, c), row in rows.items()])
            for b, rows in buckets.items()
        }
        if writes:
            writes[_WINDOWS + b"m"] = encode_json(self.windows.state_meta())
            try:
                self.backend.write(writes)
            except Exception:
                self.windows.unsaved(buckets)  # written with the next checkpoint's, not lost
                raise

    def _load_windows(self) -> None:
        from stream_fair.state.codec import decode_json

        meta = self.backend.get(_WINDOWS + b"m")
        if meta is None:
            return
        buckets = {}
        for key, value in self.backend.scan(_WINDOWS + b"b", _WINDOWS + b"c"):
            b = struct.unpack(">q", key[len(_WINDOWS) + 1 :])[0]
            buckets[b] = {(m, tuple(c)): row for m, c, row in decode_json(value)}
        self.windows.load({}, buckets, decode_json(meta)["last_bucket"])

    def _apply_byte_budget(self) -> None:
        """With ``join.max_pending_bytes``, turn the byte budget into each partition's count bounds.

        The budget bounds the owned partitions' entries, pending and remembered together: the
        allowed count is the budget over the measured bytes per stored entry (the store's bytes over
        every entry it holds, the kept copies of partitions that moved away included, whose bytes
        are not charged to the budget). Each owned partition gets an equal share: ids are hashed
        to partitions, so they fill alike, and a new or empty partition is never starved. Of a
        share its pending events may take ``BUDGET_PENDING_SHARE``; the remembered ids get what
        they leave. At a bound the events closest to their deadline expire early and the ids
        closest to being forgotten are forgotten early, exactly as with counts
        (``docs/state.md``).
        """
        budget = self.config.join.max_pending_bytes
        tracker = self.tracker
        if budget is None or tracker is None or not tracker.shards:
            return
        owned = sum(s.join.pending_predictions + s.join.pending_outcomes + s.join.remembered
                    for s in tracker.shards.values())  # fmt: skip
        total = owned + sum(self._kept.values())
        if total >= 10_000:  # below, too few to measure the cost per entry: the last measure holds
            # the store's bytes per entry, smoothed: memtables and files awaiting compaction swell
            # for a while after a burst of early expiries, and a bound that followed them would
            # expire more, swell them again and shrink to nothing
            measured = max(1.0, self.stats.state_disk_bytes / total)
            last = self._entry_bytes
            self._entry_bytes = measured if last is None else last + ENTRY_BYTES_WEIGHT * (measured - last)
        if self._entry_bytes is None:  # no bound yet
            return
        allowed = budget / self._entry_bytes
        share = allowed / len(tracker.shards)
        for s in tracker.shards.values():
            j = s.join
            j.max_pending = max(1, int(share * BUDGET_PENDING_SHARE))
            pending = min(j.max_pending, j.pending_predictions + j.pending_outcomes)
            j.max_remembered = max(1, int(share) - pending)

    def _drop_moved_copies(self, now: float) -> None:
        """Delete the local copies of partitions that moved away more than ``state.local_max_age``
        ago (at most every ``MOVED_CHECK_EVERY`` seconds, at a checkpoint).

        A revoked partition's keys stay for a while so that a partition coming back restores only
        the changelog tail; past ``local_max_age`` a returning copy is not trusted (a full restore
        replaces it), so keeping it only costs disk. Without the changelog the local copy is all
        there is, and it stays.
        """
        tracker = self.tracker
        if tracker is None or not self.config.state.changelog or now - self._kept_checked < MOVED_CHECK_EVERY:
            return
        self._kept_checked = now
        kept: dict[int, int] = {}
        for key, raw in self.backend.scan(prefix(SPACE_META, 0), prefix(SPACE_META + 1, 0)):
            p = int.from_bytes(key[1:3], "big")
            if len(key) != 3 or p in tracker.shards or p in self._to_restore:  # a meta is only its prefix
                continue
            meta = decode_json(raw)
            age = time.time() - float(meta.get("wall", 0.0))
            if age < self.config.state.local_max_age:
                j = meta.get("join") or {}
                kept[p] = sum(int(n) for n in j.get("pending", ())) + int(j.get("remembered", 0))
                continue
            delete_partition(self.backend, p)
            self.backend.write({prefix(0, p) + _RESTORING: None})
            log.info(
                "partition %d: local copy deleted, last written %.0f s ago (state.local_max_age %.0f s)",
                p, age, self.config.state.local_max_age,
            )  # fmt: skip
        self._kept = kept

    def _checkpoint_failed(self, exc: Exception) -> None:
        self.stats.errors["checkpoint"] = self.stats.errors.get("checkpoint", 0) + 1
        self._checkpoint_failures += 1
        pause = retry_pause(self._checkpoint_failures, CHECKPOINT_RETRY_FIRST, CHECKPOINT_RETRY_MAX)
        self._retry_at = time.monotonic() + pause
        log.error("checkpoint failed, retrying in %.0f s (the previous one stays valid): %s", pause, exc)

    def _write_changelog(self, cp: Checkpoint) -> dict[int, int]:
        assert self.tracker is not None
        writer = self._writer
        sent: dict[int, int] = {}
        for sc in cp.shards:
            epoch = self.tracker.shards[sc.partition].epoch
            records = list(sc.changelog)
            if sc.increment is not None:
                records.append((increment_key(sc.partition), encode_json(sc.increment)))
            writer.send(sc.partition, records, epoch)
            sent[sc.partition] = len(records)
        self._crash("changelog_data")
        writer.flush()
        futures = {
            sc.partition: writer.send_meta(
                sc.partition,
                meta_key(sc.partition),
                encode_json(sc.meta),
                self.tracker.shards[sc.partition].epoch,
            )
            for sc in cp.shards
        }
        writer.flush()
        out = {p: writer.offset(f) + 1 for p, f in futures.items()}
        self._crash("changelog_meta")
        for p, nxt in out.items():
            # this checkpoint's records follow the previous meta, unless someone else wrote between
            start = self.tracker.shards[p].changelog_next
            if start is not None and nxt != start + sent[p] + 1:
                self._examine_gap(p, start, nxt - 1)
        return out

    def _examine_gap(self, p: int, start: int, end: int) -> None:
        """Records in partition ``p``'s changelog ``[start, end)`` besides this checkpoint's own:
        another owner's, a previous owner's written late, or this replica's failed attempts.

        A higher epoch means the partition was claimed by another replica (this one was evicted
        from the group without knowing yet): it is fenced (:meth:`_fence`) and this checkpoint is
        not committed for it. Lower epochs are a previous owner's late writes: the reader ignores
        them, but compaction would keep them as the newest record of their keys, so their keys are
        rewritten by the next checkpoint.
        """
        from stream_fair import transport

        assert self.tracker is not None
        s = self.tracker.shards[p]
        if self._fence_reader is None:
            self._fence_reader = transport.changelog_reader(self.config)
        reader = self._fence_reader
        reader.start({p: start})
        found: list[tuple[bytes, int]] = []
        deadline = time.monotonic() + self.config.kafka.request_timeout_ms / 1000
        while not reader.done(p) and time.monotonic() < deadline:
            found += [(key, epoch) for q, off, key, _v, epoch in reader.poll(100) if q == p and off < end]
        complete = reader.done(p)
        reader.stop(p)
        if not complete:
            raise transport.ClientError(
                f"changelog partition {p}: could not read offsets {start}..{end} in time"
            )
        # records of this epoch are this replica's: this checkpoint's, or those of an attempt that
        # failed after sending its data (the retry re-sends them, so they are applied in order)
        if any(epoch > s.epoch for _k, epoch in found):
            self._fence(p, max(epoch for _k, epoch in found))
            return
        late = {key for key, epoch in found if epoch < s.epoch}
        if not late:  # offsets without records (compacted away, or a broker's control records)
            return
        log.warning(
            "partition %d: %d changelog records of a previous owner written after this replica's "
            "claim (an evicted replica that still wrote): ignored, their keys rewritten",
            p, len(late),
        )  # fmt: skip
        self.stats.errors["fenced"] = self.stats.errors.get("fenced", 0) + 1
        self._repair(s, late)

    def _repair(self, s: Shard, keys: set[bytes]) -> None:
        """Make the next checkpoint rewrite these keys' committed values (or tombstones)."""
        for key in keys:
            if key[0] == SPACE_ID:
                s.join.ids.touch(decode_id(key[3:]))
            elif key[0] == SPACE_COUNTS:
                ci = parse_cell(key[3:])
                if ci < len(s.counts.rows):
                    s.counts.dirty.add(ci)
            elif key[0] == SPACE_HIST:
                ci = parse_cell(key[3:])
                if ci < len(s.counts.rows):  # a zero row where none was committed
                    s.histograms.touch(ci)
        s.changed = True

    def _fence(self, p: int, epoch: int) -> None:
        """Another replica claimed partition ``p`` (epoch ``epoch``): stop counting it here. Its
        uncommitted changes are dropped (the owner reads those records again), the local copy is
        marked for a full restore, and the input stays paused until the group moves it."""
        assert self.tracker is not None
        log.warning(
            "partition %d was claimed by another replica (epoch %d, this one's %d): this replica was "
            "evicted from the group (a pause longer than kafka.max_poll_interval_ms or the session "
            "timeout); it stops counting the partition, whose owner reads its records again",
            p, epoch, self.tracker.shards[p].epoch,
        )  # fmt: skip
        self.stats.errors["fenced"] = self.stats.errors.get("fenced", 0) + 1
        self._fenced.add(p)
        self.backend.write({prefix(0, p) + _RESTORING: b"1"})  # its next restore is a full one
        consumer = self._consumer
        if consumer is not None and hasattr(consumer, "pause"):
            consumer.pause(
                *[tp for tp in consumer.assignment() if tp.topic in self._topics and tp.partition == p]
            )

    def check_fences(self, now: float) -> None:
        """Every ``FENCE_CHECK_INTERVAL``: an owned partition whose changelog grew without this
        replica writing (an idle one, which writes nothing that would show it) is examined too."""
        if self._fence_check_at == 0.0:  # the first look one interval after the start
            self._fence_check_at = now + FENCE_CHECK_INTERVAL
        if now < self._fence_check_at or self._reader is None or self.tracker is None:
            return
        self._fence_check_at = now + FENCE_CHECK_INTERVAL
        try:
            for p, s in sorted(self.tracker.shards.items()):
                if p in self._to_restore or p in self._fenced or s.changelog_next is None:
                    continue
                end = self._reader.end_offset(p)  # the restore's reader: no client of its own
                if end > s.changelog_next:
                    self._examine_gap(p, s.changelog_next, end)
                    if p in self._fenced:
                        self._drop_fenced(p)
                    else:  # examined: the next checkpoint's records follow them
                        s.changelog_next = end
        except Exception as exc:  # looked at again at the next interval
            log.warning(
                "changelog check failed: %s", str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            )

    def _drop_fenced(self, p: int) -> None:
        assert self.tracker is not None
        self.tracker.unannounce(p)
        self._drop({p})

    # -- rebalances -------------------------------------------------------------------------
    def _on_revoke(self, shards: set[int]) -> None:
        self._release(shards, lost=False)

    def _on_lost(self, shards: set[int]) -> None:
        self._release(shards, lost=True)

    def _release(self, shards: set[int], lost: bool) -> None:
        """Partitions moved away: checkpointed first when revoked; when lost (this replica was
        evicted, their new owner may have claimed them already) dropped with nothing written, so
        the new owner's state is never written behind (docs/state.md)."""
        assert self.tracker is not None
        if lost:
            owned = sorted(shards & set(self.tracker.shards))
            if owned:
                self.stats.errors["fenced"] = self.stats.errors.get("fenced", 0) + 1
                log.warning(
                    "partitions %s lost: this replica was evicted from the group (a pause longer than "
                    "kafka.max_poll_interval_ms or the session timeout); dropped without a checkpoint, "
                    "their new owner reads the uncounted records again", owned,
                )  # fmt: skip
        self._fenced -= shards
        for s in shards:
            self.tracker.unannounce(s)
        for s in shards & self._to_restore:  # restore not finished: drop it, a full one next time
            self._to_restore.discard(s)
            if s in self._restores:
                del self._restores[s]
                if self._reader is not None:
                    try:
                        self._reader.stop(s)
                    except ClientError as exc:  # the next start replaces the assignment anyway
                        log.warning("partition %d: stopping its restore: %s", s, exc)
        if not lost:
            self.checkpoint(shards)
        self._drop(shards)
        log.info("partitions %s: %s", "lost" if lost else "revoked", sorted(shards))

    def _drop(self, shards: set[int]) -> None:
        """Forget these shards in memory (their local copies stay, kept out of the byte budget)."""
        with self.lock:
            assert self.tracker is not None
            for s in shards:
                j = self.tracker.shards[s].join if s in self.tracker.shards else None
                if j is not None:  # its local copy stays (state.local_max_age), not in the budget
                    self._kept[s] = j.pending_predictions + j.pending_outcomes + j.remembered
                self.tracker.drop(s)
                if self._dead is not None:
                    self._dead.drop(s)
            self._publish()

    def _on_assign(self, shards: set[int]) -> None:
        assert self.tracker is not None
        self._fenced -= shards  # assigned again: restored in full (the marker), then claimed anew
        new = {s for s in shards if s not in self.tracker.shards}
        self._to_restore |= new
        for s in new:
            self._kept.pop(s, None)
        self.health.ready = not self._to_restore  # /readyz: ready again when none is restoring
        log.info("partitions assigned: %s (restoring %s)", sorted(shards), sorted(new))

    def restore_step(self, budget_s: float = 0.5) -> None:
        """Advance the restores of newly assigned partitions; claim and resume the finished ones.

        A broker error (a stall past ``kafka.request_timeout_ms``, a lost connection) drops the
        restores under way, counts an error of kind ``restore`` and retries them after a backoff
        (:func:`retry_pause`): their partitions stay paused and assigned, and a full restore's
        ``_RESTORING`` marker makes the retry start it over.
        """
        if time.monotonic() < self._restore_retry_at:
            return
        try:
            self._restore_step(budget_s)
        except ClientError as exc:
            self._restore_failed(exc)
        else:
            self._restore_failures = 0

    def _restore_failed(self, exc: ClientError) -> None:
        self.stats.errors["restore"] = self.stats.errors.get("restore", 0) + 1
        self._restore_failures += 1
        pause = retry_pause(self._restore_failures, RESTORE_RETRY_FIRST, RESTORE_RETRY_MAX)
        self._restore_retry_at = time.monotonic() + pause
        self._restores.clear()  # the next start assigns the reader anew
        assert self.tracker is not None
        with self.lock:  # a partition whose identity check failed was loaded: loaded again then
            for p in self._to_restore:
                self.tracker.drop(p)
        log.warning(
            "restore of partitions %s failed, retrying in %.0f s (they stay paused): %s",
            sorted(self._to_restore), pause, exc,
        )  # fmt: skip

    def _restore_step(self, budget_s: float) -> None:
        tracker = self.tracker
        assert tracker is not None
        reader = self._reader
        started = False
        for p in sorted(self._to_restore - set(self._restores)):
            if reader is None:
                self._finish(p, epoch=0, repair=set())
                continue
            self._restores[p] = self._plan(p)
            started = True
        if reader is None:
            return
        if started:
            reader.start({p: max(r.start, r.position) for p, r in self._restores.items()})
        deadline = time.monotonic() + budget_s
        while self._restores:
            for p, offset, key, value, epoch in reader.poll(100):
                r = self._restores.get(p)
                if r is not None:
                    r.feed(offset, key, value, epoch)
            self._crash("restore")
            for p in [p for p in self._restores if reader.done(p)]:
                r = self._restores.pop(p)
                repair = r.finish()
                self.backend.write({prefix(0, p) + _RESTORING: None})
                log.info(
                    "partition %d restored from the changelog: %d records (%d checkpoints, %d fenced)",
                    p, r.records, r.committed, r.fenced,
                )  # fmt: skip
                self._finish(p, epoch=r.epoch, repair=repair, read_to=r.position)
            if time.monotonic() >= deadline:
                break

    def _plan(self, p: int) -> PartitionRestore:
        """Restore only the changelog tail when the local copy is current, else everything."""
        from stream_fair.transport import changelog_topic

        assert self.tracker is not None and self._reader is not None
        reader, cfg = self._reader, self.config
        local = self.tracker.stored_meta(p)
        end = reader.end_offset(p)
        incomplete = self.backend.get(prefix(0, p) + _RESTORING) is not None
        nxt = None if local is None else local.get("changelog_next")
        fresh = local is not None and time.time() - float(local.get("wall", 0.0)) < cfg.state.local_max_age
        tail = nxt is not None and nxt <= end and fresh and not incomplete
        if (local is not None or incomplete) and not tail:
            log.warning(
                "partition %d: the local state is %s; restoring it from the changelog",
                p, "incomplete" if incomplete else "stale" if not fresh else "ahead of the changelog",
            )  # fmt: skip
        j = cfg.join
        outcome_ttl = j.ttl if j.outcome_ttl is None else j.outcome_ttl
        if not tail:
            self.backend.write({prefix(0, p) + _RESTORING: b"1"})
        r = PartitionRestore(
            self.backend,
            p,
            epoch=int(local["epoch"]) if tail and local is not None else 0,
            full=not tail,
            ttl=j.ttl,
            outcome_ttl=outcome_ttl,
            fingerprint=self.tracker.fingerprint,
            topic=changelog_topic(cfg),  # for the message
        )
        r.start = r.position = nxt if tail and nxt is not None else reader.beginning_offset(p)
        return r

    def _finish(self, p: int, epoch: int, repair: set[bytes], read_to: int | None = None) -> None:
        """Load a restored partition, check that its offsets belong to the input topics there now,
        claim it (epoch + 1, repairs) and resume its input. ``read_to``: the changelog offset the
        restore read to (past any ignored tail, whose keys the claim rewrites: the claim's own
        check for other writers starts there)."""
        from stream_fair import transport

        assert self.tracker is not None
        with self.lock:
            s = self.tracker.shard(p)
        self._check_identity(s)  # before the claim: a refused partition writes nothing
        with self.lock:
            if self._dead is not None:
                self._dead.load(p, s.dead_letters)
            s.epoch = max(epoch, s.epoch) + 1
            if read_to is not None:
                s.changelog_next = max(s.changelog_next or 0, read_to)
            self._repair(s, repair)
        self._to_restore.discard(p)
        self.checkpoint({p})  # the claim
        if self._consumer is not None and hasattr(self._consumer, "resume"):
            transport.resume_at(self._consumer, self._topics, p, list(s.offsets))
        if not self._to_restore:
            self.health.ready = True
            with self.lock:
                self.tracker.settled()
        log.info("partition %d claimed (epoch %d), resuming at %s", p, s.epoch, s.offsets)

    def _watch_topic_ids(self) -> None:
        """An input topic re-created under the running detector (same name, same partition count,
        a new topic id in the consumer's metadata) stops it, as it would at the next start."""
        from stream_fair import transport

        ids = self._consumer.topic_ids(self._topics)
        if ids == self._ids_seen or self.tracker is None:
            return
        self._ids_seen = ids
        # a topic gone or re-created with another partition count: say that first (as an
        # assignment would), whichever of the two the run loop sees first
        transport.check_copartitioned(self._consumer, self.config, expected=self._partitions)
        for p, s in sorted(self.tracker.shards.items()):
            for role, topic in enumerate(self._topics):
                was, now = s.topic_ids[role], ids[role]
                if p not in self._to_restore and was is not None and now is not None and was != now:
                    raise BrokerError(
                        identity.ERR_TOPIC_ID.format(
                            topic=topic, role=TOPIC_NAMES[role], partition=p, now=now, was=was
                        )
                    )

    def _check_identity(self, s: Shard) -> None:
        """Refuse offsets read from another topic than the one now there (``state/identity.py``).

        Raises :class:`BrokerError` with one line: the run loop stops (exit status 2).
        """

        inputs = self._inputs
        if inputs is None:  # manual use (benchmarks): no identity to check
            return
        ids = self._consumer.topic_ids(self._topics)
        for role, topic in enumerate(self._topics):
            offset = s.offsets[role]
            stored = identity.Stored(s.marks[role], s.topic_ids[role], s.partitions)
            begin = end = 0
            if offset and (stored.topic_id is None or ids[role] is None):
                begin, end = inputs.bounds(topic, s.index)
            at = identity.to_read(offset, stored, ids[role], begin)
            record = None if at is None else inputs.mark_at(topic, s.index, at)
            seen = identity.Seen(ids[role], self._partitions, end, at is not None, record, begin)
            why = identity.problem(TOPIC_NAMES[role], topic, s.index, offset, stored, seen)
            if why is not None:
                raise BrokerError(why)
        # kept where the metadata shows none (an older broker): the marks decide there
        s.topic_ids = [now if now is not None else was for now, was in zip(ids, s.topic_ids, strict=True)]
        s.partitions = self._partitions


def alarm_explanation(doc: dict[str, Any]) -> dict[str, Any]:
    """The part of an ``/explain`` document kept with an alarm event, with a one-line summary."""
    if "error" in doc:
        return {"summary": f"not explained: {doc['error']}", "url": None}
    comps = doc["decomposition"]["gap"]["components"]
    parts = ", ".join(
        f"{name} {c['value']:+.3f} [{c['lower']:+.3f}, {c['upper']:+.3f}]"
        for name, c in comps.items()
        if c["value"] is not None and c["lower"] is not None and c["upper"] is not None
    )
    drivers = doc["drivers"]["ranked"][:3]
    top = "; ".join(f"{d['by']}={d['value']} {d['contribution']:+.3f} (n={d['trials']})" for d in drivers)
    gap = doc["decomposition"]["gap"]

    def signed(v: float | None) -> str:
        return "n/a" if v is None else f"{v:+.3f}"

    split = doc["periods"]["split_source"]
    if gap["before"] is None or gap["after"] is None:  # one side of the split has nothing to compare
        empty = "before" if gap["before"] is None else "after"
        change = f"no change measured (too few labelled pairs {empty} the {split} split in the windows)"
    else:
        change = f"{signed(gap['before'])} -> {signed(gap['after'])} ({split} split): {parts}"
    summary = (
        f"{doc['group']} {doc['rate']} gap to the rest {signed(gap['after'])} now; {change}; "
        f"top drivers: {top or 'none'}"
    )
    url = "/explain?" + urllib.parse.urlencode(
        {"model": doc["model"], "feature": doc["feature"], "disparity": doc["disparity"]}
    )
    if doc.get("coverage_note"):
        summary += f" ({doc['coverage_note']})"
    return {
        "summary": summary,
        "url": url,
        "partitions": doc.get("partitions"),
        "partitions_total": doc.get("partitions_total"),
        "group": doc["group"],
        "rate": doc["rate"],
        "periods": doc["periods"],
        "gap": gap,
        "drivers": drivers,
    }


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
    from stream_fair.report import config_keys

    return FeedbackMonitor(config_keys(config), feedback_settings(config.feedback))
