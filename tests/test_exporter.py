"""The custom collector over one report: names, values, identity, never failing a scrape; HTTP."""

from __future__ import annotations

import contextlib
import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from stream_fair.app import _default_feedback
from stream_fair.config import Config
from stream_fair.exporter import ExporterServer, Health, PipelineStats, registry_for
from stream_fair.report import build_report
from tests.helpers import LocalTracker as Tracker

ROOT = Path(__file__).resolve().parents[1]
CFG = Config.model_validate(
    {
        "fairness": {
            "features": [{"name": "sex", "reference": "M"}, "race"],
            "intersections": [["race", "sex"]],
            "min_samples": 5,
        },
        "windows": ["1h"],
    }
)
ROWS = [("F", "A", 1, 1), ("F", "B", 1, 0), ("M", "A", 0, 0), ("M", "B", 1, 1), ("F", "A", 0, 1)]


def tracker(n: int = 40) -> Tracker:
    t = Tracker(CFG)
    for i in range(n):
        sex, race, label, pred = ROWS[i % len(ROWS)]
        t.update_prediction(
            0,
            orjson.dumps(
                {
                    "id": f"r{i}",
                    "ts": 1000 + i,
                    "model": "m",
                    "prediction": pred,
                    "attributes": {"sex": sex, "race": race},
                }
            ),
            i,
        )
        t.update_outcome(0, orjson.dumps({"id": f"r{i}", "ts": 1000 + i, "label": label}), i)
    t.update_prediction(0, b"garbage", n)
    t.update_prediction(
        0,
        orjson.dumps({"id": "p", "ts": 2000, "prediction": 1, "attributes": {"sex": "F", "race": "A"}}),
        n + 1,
    )
    return t


def test_collector_exports_exact_counts_rates_and_identity() -> None:
    t = tracker()
    stats = PipelineStats(
        lag={("predictions", 0): 3}, dead_letter_partitions={0: {"sent": [1, 0], "errors": [0, 0]}}
    )
    reg = registry_for(lambda: (build_report(t.snapshot(), CFG), stats))
    get = reg.get_sample_value
    # F&A rows: (1,1) and (0,1) -> 8 each over 40 events
    assert (
        get(
            "stream_fair_confusion_total",
            {
                "model": "m",
                "feature": "race&sex",
                "group": "A&F",
                "actual": "1",
                "predicted": "1",
                "partition": "0",
            },
        )
        == 8
    )
    assert (
        get(
            "stream_fair_confusion_total",
            {
                "model": "m",
                "feature": "race&sex",
                "group": "A&F",
                "actual": "0",
                "predicted": "1",
                "partition": "0",
            },
        )
        == 8
    )
    assert (
        get(
            "stream_fair_confusion_total",
            {"model": "m", "feature": "sex", "group": "F", "actual": "1", "predicted": "0", "partition": "0"},
        )
        == 8
    )
    labels = {"model": "m", "feature": "sex", "group": "F", "window": "cumulative"}
    assert get("stream_fair_selection_rate", labels) == pytest.approx(16 / 24)
    assert get("stream_fair_true_positive_rate", labels) == pytest.approx(8 / 16)
    lower = get("stream_fair_true_positive_rate_lower", labels)
    upper = get("stream_fair_true_positive_rate_upper", labels)
    assert lower is not None and upper is not None and lower < 0.5 < upper
    assert (
        get(
            "stream_fair_window_confusion",
            {**labels, "window": "1h", "actual": "1", "predicted": "1"},
        )
        == 8
    )
    assert get("stream_fair_group_samples", labels) == 24
    assert get(
        "stream_fair_demographic_parity_difference",
        {"model": "m", "feature": "sex", "window": "cumulative", "method": "between_groups"},
    ) == pytest.approx(16 / 24 - 8 / 16)
    assert (
        get(
            "stream_fair_predictions_total",
            {"model": "default", "feature": "sex", "group": "F", "predicted": "1", "partition": "0"},
        )
        == 1
    )
    assert get("stream_fair_consumer_lag", {"topic": "predictions", "partition": "0"}) == 3
    assert get("stream_fair_dead_letters_total", {"topic": "predictions", "partition": "0"}) == 1
    part = {"partition": "0"}
    assert (
        get("stream_fair_rejected_events_total", {"topic": "predictions", "reason": "invalid_json", **part})
        == 1
    )
    assert get("stream_fair_pending_events", {"topic": "predictions", **part}) == 1
    assert get("stream_fair_build_info", {"version": __import__("stream_fair").__version__}) == 1
    for topic in ("predictions", "outcomes"):
        fates = sum(
            get("stream_fair_event_fates_total", {"topic": topic, "fate": f, **part}) or 0
            for f in ("joined", "expired", "orphan", "duplicate", "late", "rejected")
        )
        assert get("stream_fair_events_consumed_total", {"topic": topic, **part}) == fates + get(
            "stream_fair_pending_events", {"topic": topic, **part}
        )


def test_a_failing_snapshot_never_fails_the_scrape() -> None:
    def broken() -> tuple[object, PipelineStats]:
        raise RuntimeError("boom")

    reg = registry_for(broken)  # type: ignore[arg-type]
    text = generate_latest(reg).decode()
    assert "stream_fair_build_info" in text
    # each collect() is a scrape: generate_latest, then get_sample_value's own collect
    assert reg.get_sample_value("stream_fair_errors_total", {"kind": "snapshot"}) == 2
    generate_latest(reg)
    assert reg.get_sample_value("stream_fair_errors_total", {"kind": "snapshot"}) == 4


def test_every_exported_metric_is_documented() -> None:
    doc = (ROOT / "docs" / "metrics.md").read_text()
    documented = set(re.findall(r"`(stream_fair_[a-z_]+)", doc))
    t = Tracker(CFG, feedback=_default_feedback(CFG))  # the feedback families must be documented too
    for i in range(400):
        sex, race, label, pred = ROWS[i % len(ROWS)]
        attrs = {"sex": sex, "race": race}
        p = {"id": f"r{i}", "ts": 1000 + 30 * i, "model": "m", "prediction": pred, "attributes": attrs}
        t.update_prediction(0, orjson.dumps(p), i)
        t.update_outcome(0, orjson.dumps({"id": f"r{i}", "ts": 1005 + 30 * i, "label": label}), i)
    reg = registry_for(lambda: (build_report(t.snapshot(), CFG), PipelineStats(last_checkpoint=1.0)))
    exported = set()
    for family in text_string_to_metric_families(generate_latest(reg).decode()):
        if family.name.startswith("stream_fair_"):
            name = family.name + ("_total" if family.type == "counter" else "")
            exported.add(name)

    def is_documented(name: str) -> bool:
        # rates and disparities are documented once by their fairlearn name, for the
        # `stream_fair_R`, `stream_fair_R_lower`, `stream_fair_R_upper` triple
        base = re.sub(r"_(lower|upper)$", "", name)
        return name in documented or f"`{base[len('stream_fair_') :]}`" in doc

    assert len(exported) > 40
    assert "stream_fair_disparity_alarm" in exported and "stream_fair_label_coverage" in exported
    undocumented = sorted(n for n in exported if not is_documented(n))
    assert not undocumented, undocumented


def test_http_endpoints() -> None:
    t = tracker()
    health = Health(stale_after=60)
    reg = registry_for(lambda: (build_report(t.snapshot(), CFG), PipelineStats()))
    server = ExporterServer("127.0.0.1", 0, reg, health, page=lambda: "<html>ok</html>").start()
    base = f"http://127.0.0.1:{server.port}"
    try:

        def status(path: str) -> int:
            try:
                with urllib.request.urlopen(base + path, timeout=5) as r:
                    return int(r.status)
            except urllib.error.HTTPError as e:
                return e.code

        assert status("/readyz") == 503 and status("/healthz") == 503
        health.ready, health.heartbeat = True, time.monotonic()
        assert status("/readyz") == 503  # partitions assigned, but Kafka never heard from
        health.heard(time.monotonic())
        assert status("/readyz") == 200 and status("/healthz") == 200
        health.kafka_seen = time.monotonic() - health.unavailable_after - 1  # silent too long
        assert status("/readyz") == 503 and status("/healthz") == 200
        assert status("/") == 200 and status("/nope") == 404
        with urllib.request.urlopen(base + "/metrics", timeout=5) as r:
            assert "stream_fair_confusion_total" in r.read().decode()
    finally:
        server.stop()


def test_when_the_report_fails_the_pipeline_families_stay() -> None:
    """A report that cannot be built (a bug, a bad value) costs the fairness families of that scrape,
    not consumption, lag and connectivity: the pipeline alerts keep their input."""
    t = tracker()
    stats = PipelineStats(kafka_connected=lambda: True)

    def broken() -> tuple[object, PipelineStats]:
        raise RuntimeError("boom")

    reg = registry_for(broken, live=lambda: (t.snapshot(), stats))  # type: ignore[arg-type]
    text = generate_latest(reg).decode()
    assert reg.get_sample_value("stream_fair_errors_total", {"kind": "snapshot"}) == 2
    part = {"partition": "0"}
    assert reg.get_sample_value("stream_fair_events_consumed_total", {"topic": "predictions", **part}) == 42
    assert reg.get_sample_value("stream_fair_kafka_connected", {}) == 1
    assert "stream_fair_true_positive_rate" not in text  # the report's families are what is lost


def test_every_error_kind_is_exported_from_zero() -> None:
    """A counter series that first appears at 1 is no increase() to Prometheus: every kind must be
    there at 0 before its first error, or StreamFairInternalErrors misses a lone failure."""
    from stream_fair.exporter import ERROR_KINDS

    t = tracker()
    reg = registry_for(lambda: (build_report(t.snapshot(), CFG), PipelineStats()))
    for kind in ERROR_KINDS:
        assert reg.get_sample_value("stream_fair_errors_total", {"kind": kind}) == 0, kind
    doc = (ROOT / "docs" / "metrics.md").read_text()
    row = next(line for line in doc.splitlines() if line.startswith("| `stream_fair_errors_total`"))
    assert all(f"`{kind}`" in row for kind in ERROR_KINDS), row


def _timed_get(url: str, timeout: float) -> tuple[int, float]:
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            r.read()
            code = int(r.status)
    except urllib.error.HTTPError as e:
        code = e.code
    return code, time.monotonic() - t0


def test_trickling_clients_and_slow_requests_never_starve_the_probes_or_the_scrape() -> None:
    """Review finding: 4 clients sending a byte every few seconds held all 4 workers (the read
    timeout restarts at every byte), and 8 slow report requests queued /healthz behind them: the
    liveness probe (3 s timeout) failed and Kubernetes restarted the pod, consumer and all. Now a
    connection gets a worker only once its request head is complete (and is closed when that takes
    longer than read_timeout), and the probes and /metrics have workers of their own."""
    import socket
    import threading

    t = tracker()
    health = Health(stale_after=60)
    health.heartbeat = time.monotonic()
    reg = registry_for(lambda: (build_report(t.snapshot(), CFG), PipelineStats()))

    def slow_report(query: dict[str, list[str]]) -> tuple[int, dict[str, Any]]:
        time.sleep(3.0)
        return 200, {"ok": True}

    server = ExporterServer(
        "127.0.0.1", 0, reg, health, report=slow_report, workers=4, read_timeout=2.0
    ).start()
    base = f"http://127.0.0.1:{server.port}"
    tricklers: list[socket.socket] = []
    stop = threading.Event()
    try:
        for _ in range(8):  # twice the workers, each sending its request line a byte at a time
            c = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            c.sendall(b"G")
            tricklers.append(c)

        def trickle() -> None:
            while not stop.wait(0.3):
                for c in tricklers:
                    with contextlib.suppress(OSError):
                        c.send(b"E")

        threading.Thread(target=trickle, daemon=True).start()
        slow = [
            threading.Thread(target=_timed_get, args=(base + "/report.json", 30), daemon=True)
            for _ in range(8)
        ]
        for th in slow:
            th.start()
        time.sleep(0.5)  # the slow requests hold every general worker now
        for _ in range(5):
            assert _timed_get(base + "/healthz", 5)[0] == 200
            code, took = _timed_get(base + "/healthz", 5)
            assert code == 200 and took < 1.0, took
            code, took = _timed_get(base + "/metrics", 5)
            assert code == 200 and took < 2.0, took
            time.sleep(0.2)
        # a trickler is closed once read_timeout has passed since its accept, having held no worker
        tricklers[0].settimeout(10)
        t0 = time.monotonic()
        with contextlib.suppress(ConnectionResetError):
            assert tricklers[0].recv(1) == b""
        assert time.monotonic() - t0 < 3.0
        for th in slow:
            th.join(60)
        # the general pool still serves: a complete request gets an answer
        assert _timed_get(base + "/report.json", 10)[0] == 200
    finally:
        stop.set()
        for c in tricklers:
            with contextlib.suppress(OSError):
                c.close()
        server.stop()


def test_held_connections_beyond_the_limit_evict_the_oldest_and_probes_skip_slow_scrapes() -> None:
    """Review findings on the waiting room: (1) with ``max_connections`` held by half-sent requests
    the newest connection was the one closed, so every probe failed ("remote end closed") while the
    half-sent ones stayed; the oldest held connection goes now, sending or idle. (2) /metrics and
    the probes shared two threads, so two slow scrapes (a report being built) held the probe past
    its timeout; the probes have a thread of their own."""
    import socket
    import threading

    t = tracker()
    health = Health(stale_after=60)
    health.heartbeat = time.monotonic()
    slow = threading.Event()

    def report() -> Any:
        if slow.is_set():
            time.sleep(4.0)  # a scrape waiting for the report worker
        return build_report(t.snapshot(), CFG), PipelineStats()

    server = ExporterServer(
        "127.0.0.1", 0, registry_for(report), health, max_connections=8, read_timeout=5.0
    ).start()
    base = f"http://127.0.0.1:{server.port}"
    held: list[socket.socket] = []
    try:
        for _ in range(8):  # every slot held by a request that never completes its head
            c = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            c.sendall(b"GET /report.json HTTP/1.1\r\n")
            held.append(c)
        time.sleep(0.3)
        for _ in range(3):
            code, took = _timed_get(base + "/healthz", 3)
            assert code == 200 and took < 1.0, took
        held[0].settimeout(5)
        with contextlib.suppress(ConnectionResetError):
            assert held[0].recv(1) == b""  # the oldest was closed to make room

        slow.set()
        scrapes = [
            threading.Thread(target=_timed_get, args=(base + "/metrics", 30), daemon=True) for _ in range(3)
        ]
        for th in scrapes:
            th.start()
        time.sleep(0.5)  # both scrape threads are busy for seconds
        code, took = _timed_get(base + "/healthz", 3)
        assert code == 200 and took < 1.0, took
        for th in scrapes:
            th.join(30)
    finally:
        for c in held:
            with contextlib.suppress(OSError):
                c.close()
        server.stop()
