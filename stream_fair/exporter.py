"""Prometheus exporter: a custom collector over one consistent report, and the HTTP endpoints.

Every scrape builds fresh metric families from a single :class:`~stream_fair.report.Report` (the
Prometheus "writing exporters" pattern): no shared gauges mutated per event, no stale label values,
no torn reads. ``collect()`` never raises: a failure is logged, counted in
``stream_fair_errors_total{kind="snapshot"}`` and the scrape still answers.

Endpoints: ``/metrics``, ``/`` (status page), ``/alarms`` (alarms and their event log, JSON),
``/report.json`` (the stakeholder report's document for a period, :mod:`stream_fair.stakeholder_report`),
``/whatif`` (threshold what-ifs, JSON: :mod:`stream_fair.whatif_query`),
``/explain?model=&feature=&disparity=[&group=&rate=&split=]`` (why a disparity, JSON,
:mod:`stream_fair.explain`), ``/search`` (unconfigured intersections found, JSON),
``/healthz`` (the run loop is alive), ``/readyz`` (partitions assigned and state loaded).
"""

from __future__ import annotations

import json
import logging
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector

from stream_fair import __version__
from stream_fair.counts import ACTUAL_PREDICTED, EXPIRED, FN, FP, PRED0, PRED1, TN, TP
from stream_fair.estimates import ESTIMATED_RATES
from stream_fair.exposition import Exposition, Prerendered, counter, gauge
from stream_fair.fairness import DISPARITIES, RATES
from stream_fair.histograms import OUT_OF_RANGE
from stream_fair.missing import report_missing
from stream_fair.report import CUMULATIVE, Report
from stream_fair.tracker import TOPICS, Snapshot
from stream_fair.web import UNPROTECTED, BoundedHTTPServer, WebConfig

log = logging.getLogger(__name__)

EXPLAIN_PARAMS = ("model", "feature", "disparity", "group", "rate", "split")
EXPLAIN_USAGE = "/explain?model=M&feature=F&disparity=D[&group=G][&rate=R][&split=EVENT_TS]"

P = "stream_fair_"
_GROUP = ["model", "feature", "group"]
_GROUP_W = ["model", "feature", "group", "window"]
_FEATURE_W = ["model", "feature", "window", "method"]
_ACTUAL_PREDICTED = tuple((str(a), str(p)) for a, p in ACTUAL_PREDICTED)  # CONFUSION order


@dataclass
class PipelineStats:
    """Run-loop facts the tracker does not own (Kafka positions, side effects, health)."""

    lag: dict[tuple[str, int], int] = field(default_factory=dict)  # (role, partition) -> lag
    dead_letters: dict[str, int] = field(default_factory=dict)
    dead_letter_errors: dict[str, int] = field(default_factory=dict)
    dead_letters_pending: int = 0
    # per owned partition: {"sent": [predictions, outcomes], "errors": [...]}, live
    dead_letter_partitions: dict[int, Any] = field(default_factory=dict)
    kafka_connected: Callable[[], bool] | None = None  # asked at each scrape; None before the run loop
    errors: dict[str, int] = field(default_factory=dict)
    last_checkpoint: float | None = None
    # records this process read, checkpointed or not (re-reads after a restart included)
    records_read: dict[str, int] = field(default_factory=lambda: {"predictions": 0, "outcomes": 0})
    state_disk_bytes: int = 0
    # the model-wide verdict (stream_fair.leader): None when this process does not take part
    leader: bool | None = None
    increments_published: int = 0


Source = Callable[[], tuple[Report, PipelineStats]]
# the report worker's text of a snapshot, with that snapshot and the live stats (app.Detector._rendered)
RenderedSource = Callable[[], tuple[Snapshot, str, PipelineStats] | None]
#: The kinds of ``stream_fair_errors_total`` (docs/metrics.md, docs/runbooks.md#streamfairinternalerrors).
ERROR_KINDS = ("checkpoint", "fenced", "increments", "leader", "report_worker", "restore", "snapshot")
# the last published snapshot and the live stats, without a report (the pipeline's families when
# building the report fails: lag, fates and connectivity must not vanish with the fairness ones)
LiveSource = Callable[[], tuple[Snapshot, PipelineStats]]


def report_text_renderer() -> Callable[[Report], str]:
    """What the report worker runs: a report's families as ``/metrics`` text, exactly what the
    in-process collector writes for them; label prefixes are reused from one report to the next."""
    current: list[Metric] = []

    class _Families:
        def collect(self) -> list[Metric]:
            return current

    exposition = Exposition(_Families())  # type: ignore[arg-type]

    def render(report: Report) -> str:
        current[:] = list(_families(report))
        return exposition.render().decode("utf-8")

    return render


class FairnessCollector:
    """Builds every ``stream_fair_*`` family from one report at each scrape."""

    def __init__(
        self, source: Source, rendered: RenderedSource | None = None, live: LiveSource | None = None
    ) -> None:
        self._source = source
        self._live = live
        # the report worker's newest (snapshot, text, stats), when one runs (stream_fair.report_worker)
        self._rendered = rendered
        self.failures = 0
        # the families of the last report: a scrape of the same report reuses them (and so does
        # the exposition's text, :mod:`stream_fair.exposition`); only the pipeline's are rebuilt
        self._built: tuple[Report, list[Metric]] | None = None

    def describe(self) -> list[Metric]:
        return []  # families depend on the data; skip the describe-time collect

    def _report_families(self, report: Report) -> list[Metric]:
        built = self._built
        if built is None or built[0] is not report:
            built = self._built = (report, list(_families(report)))
        return built[1]

    def collect(self) -> Iterator[Metric]:
        build = gauge(P + "build_info", "stream-fair build", labels=["version"])
        build.add_metric([__version__], 1.0)
        yield build
        stats = PipelineStats()
        try:
            done = self._rendered() if self._rendered is not None else None
            if done is not None:  # the report worker's text: no report built on this process
                snap, text, stats = done
                families = [*_pipeline(snap, stats), Prerendered(text)]
            else:
                report, stats = self._source()
                families = [*_pipeline(report.snapshot, stats), *self._report_families(report)]
        except Exception:  # a scrape must never fail because of one bad value
            log.exception("building the metrics snapshot failed")
            self.failures += 1
            families = []
            if self._live is not None:  # the pipeline's own families still tell what runs
                try:
                    snap, stats = self._live()
                    families = list(_pipeline(snap, stats))
                except Exception:
                    log.exception("building the pipeline metrics failed too")
        errors = counter(P + "errors", "Internal errors that did not stop the consumer", labels=["kind"])
        # every kind from 0, so the first error of one is an increase (a series that appears at 1
        # is none to increase(), and StreamFairInternalErrors would miss it)
        known = {kind: 0 for kind in ERROR_KINDS} | dict(stats.errors)
        known["snapshot"] += self.failures
        for kind, n in sorted(known.items()):
            errors.add_metric([kind], n)
        yield errors
        yield from families


def _families(report: Report) -> Iterator[Metric]:
    """Every family that depends on the report alone (the pipeline's live facts: :func:`_pipeline`)."""
    snap = report.snapshot

    confusion = counter(
        P + "confusion",
        "Joined (prediction, outcome) pairs, per input partition",
        labels=[*_GROUP, "actual", "predicted", "partition"],
    )
    window_conf = gauge(
        P + "window_confusion",
        "Joined pairs whose prediction time lies in the event-time window",
        labels=[*_GROUP_W, "actual", "predicted"],
    )
    samples = gauge(P + "group_samples", "Joined pairs per group", labels=_GROUP_W)
    small = gauge(
        P + "group_below_min_samples",
        "1 when the group is below fairness.min_samples",
        labels=_GROUP_W,
    )
    eligible = gauge(
        P + "groups_eligible",
        "Groups taking part in disparity verdicts",
        labels=["model", "feature", "window"],
    )
    rates = {
        (r, suffix): gauge(P + r + suffix, f"{r.replace('_', ' ')}{suffix}", labels=_GROUP_W)
        for r in RATES
        for suffix in ("", "_lower", "_upper")
    }
    disparities = {
        (d, suffix): gauge(P + d + suffix, f"{d.replace('_', ' ')}{suffix}", labels=_FEATURE_W)
        for d in DISPARITIES
        for suffix in ("", "_lower", "_upper")
    }
    flagged = gauge(
        P + "disparity_flagged",
        "1 when the disparity's interval lies beyond its threshold",
        labels=[*_FEATURE_W, "disparity"],
    )
    for view in report.views:
        fname, fr = view.feature.name, view.report
        n_eligible = 0
        for g, gr in fr.groups.items():
            labels = [view.model, fname, g, view.window]
            c = gr.counts
            if view.window != CUMULATIVE:
                for (actual, predicted), n in zip(_ACTUAL_PREDICTED, (c.tp, c.fp, c.tn, c.fn), strict=True):
                    window_conf.add_metric([*labels, actual, predicted], n)
            samples.add_metric(labels, c.n)
            small.add_metric(labels, 0.0 if c.n >= report.settings.min_samples else 1.0)
            n_eligible += gr.eligible
            for r, est in gr.rates.items():
                rates[r, ""].add_metric(labels, est.value)
                rates[r, "_lower"].add_metric(labels, est.lower)
                rates[r, "_upper"].add_metric(labels, est.upper)
        eligible.add_metric([view.model, fname, view.window], n_eligible)
        for (d, method), est in fr.disparities.items():
            labels = [view.model, fname, view.window, method]
            disparities[d, ""].add_metric(labels, est.value)
            disparities[d, "_lower"].add_metric(labels, est.lower)
            disparities[d, "_upper"].add_metric(labels, est.upper)
        for (d, method), is_flagged in fr.flagged.items():
            flagged.add_metric([view.model, fname, view.window, method, d], float(is_flagged))
    threshold = gauge(P + "disparity_threshold", "Configured disparity threshold", labels=["disparity"])
    for d, t in sorted(report.settings.thresholds.items()):
        threshold.add_metric([d], t)
    yield window_conf
    yield samples
    yield small
    yield eligible
    yield from rates.values()
    yield from disparities.values()
    yield flagged
    yield threshold

    predictions = counter(
        P + "predictions",
        "Accepted prediction events, labelled or not, per input partition",
        labels=[*_GROUP, "predicted", "partition"],
    )
    expired = counter(
        P + "expired_predictions",
        "Predictions that never received an outcome, per input partition",
        labels=[*_GROUP, "partition"],
    )
    for pg in report.partitions:
        part = str(pg.partition)
        for (model, fname, g), row in sorted(pg.rows.items()):
            if row[PRED0] or row[PRED1]:
                predictions.add_metric([model, fname, g, "0", part], row[PRED0])
                predictions.add_metric([model, fname, g, "1", part], row[PRED1])
            if row[EXPIRED]:
                expired.add_metric([model, fname, g, part], row[EXPIRED])
            if any(row[TP : FN + 1]):
                for (actual, predicted), col in zip(_ACTUAL_PREDICTED, (TP, FP, TN, FN), strict=True):
                    confusion.add_metric([model, fname, g, actual, predicted, part], row[col])
    yield confusion
    yield predictions
    yield expired
    yield _out_of_range(report)
    yield from _estimate_families(report)
    missing = gauge(
        P + "feature_missing_ratio",
        "Share of accepted predictions with no value for the feature (group __missing__)",
        labels=["model", "feature"],
    )
    for m in report_missing(report):
        missing.add_metric([m.model, m.feature], m.share)
    yield missing
    yield from _search_families(report)
    if snap.feedback is not None:
        from stream_fair.feedback_metrics import feedback_families

        yield from feedback_families(snap.feedback)


def _estimate_families(report: Report) -> Iterator[Metric]:
    """Label-free estimates (``stream_fair_estimated_*``, never mixed with realized names) and
    calibration by group on matured labels (:mod:`stream_fair.estimates`)."""
    g_labels = ["model", "feature", "group"]
    gv_labels = [*g_labels, "view"]
    fv_labels = ["model", "feature", "view", "method"]
    rates = {
        (r, sfx): gauge(
            P + "estimated_" + r + sfx, f"Estimated {r.replace('_', ' ')}{sfx} (label-free)", labels=gv_labels
        )
        for r in ESTIMATED_RATES
        for sfx in ("", "_lower", "_upper")
    }
    expected = gauge(
        P + "estimated_confusion",
        "Expected confusion counts of the view's predictions (scores taken as P(label 1))",
        labels=[*gv_labels, "actual", "predicted"],
    )
    disparities = {
        (d, sfx): gauge(
            P + "estimated_" + d + sfx, f"Estimated {d.replace('_', ' ')}{sfx} (label-free)", labels=fv_labels
        )
        for d in DISPARITIES
        for sfx in ("", "_lower", "_upper")
    }
    flagged = gauge(
        P + "estimated_disparity_flagged",
        "1 when the estimated disparity's interval lies beyond its threshold (trusted groups only)",
        labels=[*fv_labels, "disparity"],
    )
    pending = gauge(
        P + "estimated_pending_predictions", "Scored predictions waiting for a label", labels=g_labels
    )
    trusted = gauge(
        P + "estimated_group_trusted",
        "1 when the group's calibration is checked and fine, so its estimates count",
        labels=g_labels,
    )
    ece = {
        sfx: gauge(
            P + "calibration_error" + sfx,
            f"Expected calibration error{sfx} of the group's scores on matured labels",
            labels=g_labels,
        )
        for sfx in ("", "_lower", "_upper")
    }
    cal_samples = gauge(P + "calibration_samples", "Matured labelled pairs with a score", labels=g_labels)
    cal_alarm = gauge(
        P + "calibration_alarm",
        "1 when the group's ECE interval lies above fairness.estimates.max_calibration_error",
        labels=g_labels,
    )
    w_labels = [*g_labels, "window"]
    w_ece = {
        sfx: gauge(
            P + "window_calibration_error" + sfx,
            f"Expected calibration error{sfx} of the group's scores on the labels of the event-time window",
            labels=w_labels,
        )
        for sfx in ("", "_lower", "_upper")
    }
    w_samples = gauge(
        P + "window_calibration_samples",
        "Labelled pairs with a score whose label's event time lies in the window",
        labels=w_labels,
    )
    w_alarm = gauge(
        P + "window_calibration_alarm",
        "1 when the group's window ECE interval lies above fairness.estimates.max_calibration_error "
        "(absent while the window holds too few of its labels to be checked)",
        labels=w_labels,
    )
    for ev in report.estimates:
        fe, model, fname = ev.estimates, ev.model, ev.feature.name
        for g, cal in fe.calibration.items():
            labels = [model, fname, g]
            cal_samples.add_metric(labels, cal.samples)
            cal_alarm.add_metric(labels, float(cal.alarm))
            trusted.add_metric(labels, float(fe.trust.get(g, (cal.trusted, ""))[0]))
            if cal.ece is not None:
                ece[""].add_metric(labels, cal.ece.value)
                ece["_lower"].add_metric(labels, cal.ece.lower)
                ece["_upper"].add_metric(labels, cal.ece.upper)
        for window, cals in fe.window_calibration.items():
            for g, cal in cals.items():
                labels = [model, fname, g, window]
                w_samples.add_metric(labels, cal.samples)
                if cal.reason != "too_few_labels":  # absent: not checked (the alert falls back)
                    w_alarm.add_metric(labels, float(cal.alarm))
                if cal.ece is not None:
                    w_ece[""].add_metric(labels, cal.ece.value)
                    w_ece["_lower"].add_metric(labels, cal.ece.lower)
                    w_ece["_upper"].add_metric(labels, cal.ece.upper)
        for g, n in fe.pending.items():
            pending.add_metric([model, fname, g], n)
        for view, groups in fe.groups.items():
            for g, ge in groups.items():
                labels = [model, fname, g, view]
                for (actual, predicted), x in zip(_ACTUAL_PREDICTED, ge.expected, strict=True):
                    expected.add_metric([*labels, actual, predicted], x)
                for r, e in ge.rates.items():
                    rates[r, ""].add_metric(labels, e.value)
                    rates[r, "_lower"].add_metric(labels, e.lower)
                    rates[r, "_upper"].add_metric(labels, e.upper)
            for (d, method), e in fe.disparities[view].items():
                labels = [model, fname, view, method]
                disparities[d, ""].add_metric(labels, e.value)
                disparities[d, "_lower"].add_metric(labels, e.lower)
                disparities[d, "_upper"].add_metric(labels, e.upper)
                flagged.add_metric([*labels, d], float(fe.flagged[view][d, method]))
    yield from rates.values()
    yield expected
    yield from disparities.values()
    yield flagged
    yield pending
    yield trusted
    yield from ece.values()
    yield cal_samples
    yield cal_alarm
    yield from w_ece.values()
    yield w_samples
    yield w_alarm


def _out_of_range(report: Report) -> Metric:
    fam = counter(
        P + "scores_out_of_range",
        "Scored predictions whose score lies outside [0, 1] (counted in the edge histogram bin)",
        labels=["model", "partition"],
    )
    for p, view in sorted(report.snapshot.partitions.items()):
        per: dict[str, int] = {}
        for (model, _cell), row in view.histograms.items():
            if row[OUT_OF_RANGE]:
                per[model] = per.get(model, 0) + row[OUT_OF_RANGE]
        for model, n in sorted(per.items()):
            fam.add_metric([model, str(p)], n)
    return fam


def _search_families(report: Report) -> Iterator[Metric]:
    """The search of unconfigured intersections (stream_fair.search): size and findings."""
    tested = gauge(
        P + "search_hypotheses",
        "Hypotheses (cell x rate) the last search of unconfigured intersections tested (Holm family size)",
        labels=["model", "window"],
    )
    count = gauge(
        P + "search_findings",
        "Cells of unconfigured intersections whose rate differs from the rest after Holm's correction",
        labels=["model", "window"],
    )
    gap = gauge(
        P + "search_finding_gap",
        "A finding's rate minus the rest's (0..1 scale, negative below the rest)",
        labels=["model", "window", "intersection", "group", "rate"],
    )
    for sv in report.searches:
        r = sv.result
        tested.add_metric([sv.model, sv.window], r.tested)
        count.add_metric([sv.model, sv.window], len(r.findings))
        for f in r.findings:
            gap.add_metric([sv.model, sv.window, f.intersection, f.group, f.rate], f.gap)
    yield tested
    yield count
    yield gap


def _pipeline(snap: Snapshot, stats: PipelineStats) -> Iterator[Metric]:
    part = ["partition"]
    consumed = counter(P + "events_consumed", "Records accounted for (checkpointed)", labels=["topic", *part])
    fates = counter(P + "event_fates", "Final fate of each record", labels=["topic", "fate", *part])
    pending = gauge(P + "pending_events", "Records waiting for their partner", labels=["topic", *part])
    rejected = counter(P + "rejected_events", "Rejected records by reason", labels=["topic", "reason", *part])
    evictions = counter(
        P + "capacity_evictions",
        "Pending records expired early at join.max_pending",
        labels=["topic", *part],
    )
    dead = counter(P + "dead_letters", "Records written to the dead-letter topic", labels=["topic", *part])
    dead_errors = counter(
        P + "dead_letter_errors", "Failed dead-letter writes (each is retried)", labels=["topic", *part]
    )
    last = gauge(
        P + "last_event_timestamp_seconds", "Event time of the newest record", labels=["topic", *part]
    )
    overflow = counter(
        P + "cardinality_overflow", "Predictions folded into __other__", labels=["feature", *part]
    )
    watermark = gauge(P + "watermark_timestamp_seconds", "Event-time watermark of the partition", labels=part)
    capacity = gauge(
        P + "pending_capacity", "join.max_pending: the bound on waiting events of a partition", labels=part
    )
    remembered = gauge(
        P + "remembered_ids", "Joined or expired ids kept to classify later copies", labels=part
    )
    for p, v in sorted(snap.partitions.items()):
        ps = str(p)
        for i, t in enumerate(TOPICS):
            consumed.add_metric([t, ps], v.consumed[i])
            for fate, n in v.fates[i].items():
                fates.add_metric([t, fate, ps], n)
            pending.add_metric([t, ps], v.pending[i])
            for reason, n in sorted(v.rejected[i].items()):
                rejected.add_metric([t, reason, ps], n)
            evictions.add_metric([t, ps], v.capacity_evictions[i])
            # side effects, not counts of the stream: live (the checkpoint waits for unsent letters)
            letters = stats.dead_letter_partitions.get(p, v.dead_letters)
            dead.add_metric([t, ps], letters["sent"][i])
            dead_errors.add_metric([t, ps], letters["errors"][i])
            if v.last_ts[i] is not None:
                last.add_metric([t, ps], v.last_ts[i])  # type: ignore[arg-type]
        for f, n in v.overflow.items():
            overflow.add_metric([f, ps], n)
        if v.watermark is not None:
            watermark.add_metric([ps], v.watermark)
        capacity.add_metric([ps], v.capacity)
        remembered.add_metric([ps], v.remembered)
    lag = gauge(P + "consumer_lag", "High-water mark minus position", labels=["topic", "partition"])
    connected = None if stats.kafka_connected is None else stats.kafka_connected()
    if connected is not False:  # while disconnected the lag is unknown, not 0
        for (role, partition), n in sorted(stats.lag.items()):
            lag.add_metric([role, str(partition)], n)
    read = counter(
        P + "records_read",
        "Records this process read from Kafka (not durable: includes re-reads after a restart)",
        labels=["topic"],
    )
    for t, n in sorted(stats.records_read.items()):
        read.add_metric([t], n)
    owned = gauge(P + "partitions_owned", "Input partitions this replica owns and has restored", labels=[])
    owned.add_metric([], len(snap.partitions))
    disk = gauge(P + "state_disk_bytes", "Bytes of the local state store on disk", labels=[])
    disk.add_metric([], stats.state_disk_bytes)
    yield from (consumed, fates, pending, rejected, evictions, dead, dead_errors, last, overflow, lag)
    yield from (watermark, capacity, remembered, owned, read, disk)
    if stats.leader is not None:
        yield GaugeMetricFamily(
            P + "leader",
            "1 on the replica that folds every partition's increments and exports the model-wide alarm",
            value=float(stats.leader),
        )
        yield CounterMetricFamily(
            P + "increments_published",
            "Verdict increments this process published to the increments topic",
            value=stats.increments_published,
        )
    if connected is not None:
        yield GaugeMetricFamily(
            P + "kafka_connected",
            "1 while the consumer is a stable group member whose coordinator answers",
            value=float(connected),
        )
    yield GaugeMetricFamily(
        P + "dead_letters_pending",
        "Rejected records whose dead letter the broker has not acknowledged yet",
        value=stats.dead_letters_pending,
    )
    if stats.last_checkpoint is not None:
        yield GaugeMetricFamily(
            P + "last_checkpoint_timestamp_seconds",
            "Wall-clock time of the last durable checkpoint",
            value=stats.last_checkpoint,
        )


def registry_for(
    source: Source, rendered: RenderedSource | None = None, live: LiveSource | None = None
) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FairnessCollector(source, rendered, live))  # type: ignore[arg-type]
    ProcessCollector(registry=registry)
    return registry


class Health:
    """Liveness (the loop ticks) and readiness (state loaded and Kafka reachable).

    ``ready`` is true once partitions are assigned and their state loaded, false again while a
    later assignment's partitions restore;
    :meth:`connected` turns false when the group has not been healthy (a stable member whose
    coordinator answers heartbeats) for ``unavailable_after`` seconds, and true again when it is.
    """

    def __init__(self, stale_after: float = 60.0, unavailable_after: float = 30.0) -> None:
        self.stale_after = stale_after
        self.unavailable_after = unavailable_after
        self.heartbeat = 0.0
        self.ready = False
        self.kafka_seen: float | None = None  # monotonic time the group was last healthy

    def heard(self, when: float | None) -> None:
        if when is not None and (self.kafka_seen is None or when > self.kafka_seen):
            self.kafka_seen = when

    def connected(self, now: float) -> bool:
        return self.kafka_seen is not None and now - self.kafka_seen <= self.unavailable_after

    def is_ready(self, now: float) -> bool:
        return self.ready and self.connected(now)


class ExporterServer:
    """The HTTP endpoints /metrics, /, /healthz, /readyz on a bounded server.

    A fixed pool of ``workers`` threads serves requests, each socket operation bounded by
    ``read_timeout``; two more serve /metrics alone and one the probes /healthz and /readyz. A
    connection waits without a thread until its request head has arrived and is closed if that
    takes more than ``read_timeout``; past ``max_connections`` held ones the oldest is closed
    (:class:`~.web.BoundedHTTPServer`). ``web`` adds TLS and basic auth (exporter-toolkit
    format, :mod:`stream_fair.web`); the probes /healthz and /readyz need no credentials.
    """

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        health: Health,
        page: Callable[[], str] | None = None,
        clock: Callable[[], float] | None = None,
        alarms: Callable[[], dict[str, Any]] | None = None,
        report: Callable[[dict[str, list[str]]], tuple[int, dict[str, Any]]] | None = None,
        whatif: Callable[[dict[str, list[str]]], tuple[int, dict[str, Any]]] | None = None,
        *,
        explain: Callable[..., dict[str, Any]] | None = None,
        search: Callable[[], dict[str, Any]] | None = None,
        read_timeout: float = 10.0,
        workers: int = 4,
        max_connections: int = 512,
        web: WebConfig | None = None,
    ) -> None:
        import time

        now: Callable[[], float] = clock or time.monotonic
        settings: WebConfig = web or WebConfig()
        exposition = self.exposition = Exposition(registry)

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server API)
                path = self.path.split("?", 1)[0]
                if path not in UNPROTECTED and not settings.authorized(self.headers.get("Authorization")):
                    self._send(401, b"unauthorized\n", auth=True)
                elif path == "/metrics":
                    self._send(200, exposition.render(), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    alive = now() - health.heartbeat < health.stale_after
                    self._send(200 if alive else 503, b"ok\n" if alive else b"run loop stalled\n")
                elif path == "/readyz":
                    t = now()
                    if health.is_ready(t):
                        self._send(200, b"ready\n")
                    elif health.ready:
                        self._send(503, b"not ready: kafka unreachable or group not joined\n")
                    else:
                        self._send(503, b"not ready: no partitions assigned yet, or restoring their state\n")
                elif path == "/alarms" and alarms is not None:
                    body = json.dumps(alarms(), indent=1).encode()
                    self._send(200, body, "application/json")
                elif path == "/report.json" and report is not None:
                    try:
                        code, doc = report(urllib.parse.parse_qs(self.path.partition("?")[2]))
                        self._send(code, json.dumps(doc).encode(), "application/json")
                    except Exception:
                        log.exception("report failed")
                        self._send(
                            500,
                            b'{"error": "report error: the report failed; see the detector log"}',
                            "application/json",
                        )
                elif path == "/explain" and explain is not None:
                    self._explain(explain)
                elif path == "/search" and search is not None:
                    self._send(200, json.dumps(search(), indent=1).encode(), "application/json")
                elif path == "/whatif" and whatif is not None:
                    query = urllib.parse.parse_qs(self.path.partition("?")[2], keep_blank_values=True)
                    try:
                        code, doc = whatif(query)
                    except Exception:
                        log.exception("what-if failed")
                        code, doc = 500, {"error": "what-if failed; see the detector's log"}
                    self._send(code, json.dumps(doc, indent=1).encode(), "application/json")
                elif path == "/" and page is not None:
                    try:
                        body = page().encode()
                        self._send(200, body, "text/html; charset=utf-8")
                    except Exception:
                        log.exception("status page failed")
                        self._send(500, b"status page failed; see /metrics\n")
                else:
                    self._send(
                        404,
                        b"not found: try /metrics, /, /alarms, /report.json, /explain, /search, /whatif, "
                        b"/healthz, /readyz\n",
                    )

            def _explain(self, explain: Callable[..., dict[str, Any]]) -> None:
                query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                args = {k: v[-1] for k, v in query.items() if k in EXPLAIN_PARAMS}
                missing = [k for k in ("model", "feature", "disparity") if k not in args]
                if missing:
                    self._send(400, f"/explain needs {', '.join(missing)}: {EXPLAIN_USAGE}\n".encode())
                    return
                try:
                    split = float(args.pop("split")) if "split" in args else None
                    if split is not None and not 0.0 <= split <= 253402300799.0:  # NaN and inf too
                        raise ValueError(f"split {split!r} is not a unix time between 1970 and 9999")
                    doc = explain(**args, split_ts=split)
                except KeyError as exc:
                    self._send(404, f"{exc.args[0]}\n".encode())
                    return
                except ValueError as exc:
                    self._send(400, f"{exc}: {EXPLAIN_USAGE}\n".encode())
                    return
                except Exception:  # never kill the server thread on one bad explanation
                    log.exception("/explain failed")
                    self._send(500, b"explain failed; see the log\n")
                    return
                self._send(200, json.dumps(doc, indent=1).encode(), "application/json")

            def _send(
                self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8", auth: bool = False
            ) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                if auth:
                    self.send_header("WWW-Authenticate", 'Basic realm="stream-fair"')
                for name, value in settings.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = BoundedHTTPServer(
            (host, port),
            Handler,
            workers=workers,
            max_connections=max_connections,
            read_timeout=read_timeout,
            tls=settings.tls,
        )
        self.port = self.httpd.server_address[1]
        self.scheme = "https" if settings.tls is not None else "http"
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="exporter", daemon=True)

    def start(self) -> ExporterServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():  # shutdown() would wait forever for a loop never started
            self.httpd.shutdown()
        self.httpd.server_close()
