"""The report worker: each snapshot's ``/metrics`` text built in a child process.

In process: the text it returns is byte for byte what the in-process collector writes for the same
snapshot, no report is built on the scraping process while it works, its history points are the
in-process ones, and a dead child falls back to the in-process build and is replaced.
Real processes: ``stream-fair run`` serves ``/metrics`` through it; a SIGKILLed child leaves the
counts flowing (in process, ``errors{kind="report_worker"}`` counted); a SIGKILLed detector
leaves no child behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from stream_fair import report_worker
from stream_fair.exporter import FairnessCollector, PipelineStats
from stream_fair.exposition import Exposition
from stream_fair.report import build_report
from stream_fair.report_worker import ReportWorker
from stream_fair.status_page import history_points
from tests.helpers import (
    cli_env,
    detector_config,
    free_port,
    scrape,
    start_cli,
    stop_process,
    wait_consumed,
    wait_for,
    write_config,
)
from tests.test_exporter import CFG, tracker


class Scraper:
    """The scrape path of the detector: the collector over a source, with or without the worker."""

    def __init__(self, snap: Any, worker: ReportWorker | None = None) -> None:
        self.snap = snap
        self.stats = PipelineStats(last_checkpoint=1.0)
        self.built_in_process = 0
        rendered = None
        if worker is not None:

            def rendered() -> Any:
                done = worker.latest()
                return None if done is None else (done[0], done[1], self.stats)

        registry = CollectorRegistry(auto_describe=False)
        registry.register(FairnessCollector(self._source, rendered))  # type: ignore[arg-type]
        self.exposition = Exposition(registry)

    def _source(self) -> Any:
        self.built_in_process += 1
        return build_report(self.snap, CFG), self.stats

    def text(self) -> str:
        return self.exposition.render().decode()


@pytest.fixture
def worker() -> Any:
    points: list[tuple[float, Any]] = []
    w = ReportWorker(CFG, on_points=lambda t, p: points.append((t, list(p))))
    w.points = points  # type: ignore[attr-defined]
    w.start()
    yield w
    w.close()


def test_the_workers_text_is_the_in_process_text(worker: Any) -> None:
    snap = tracker(60).snapshot()
    expected = Scraper(snap).text()
    assert worker.render(snap, 60) is not None
    scraper = Scraper(snap, worker)
    assert scraper.text() == expected
    assert scraper.built_in_process == 0, "a scrape built a report although the worker had the text"
    assert "stream_fair_confusion_total{" in expected
    # the status page's sparklines get the in-process points
    assert worker.points == [(snap.taken_at, history_points(build_report(snap, CFG)))]
    assert worker.points[0][1], "the fixture has between-groups differences to draw"


def test_nothing_is_built_until_asked_and_one_build_serves_concurrent_scrapes(worker: Any) -> None:
    snaps = [tracker(n).snapshot() for n in (20, 30, 40)]
    assert worker.render(snaps[0], 60)[0] is snaps[0]
    time.sleep(0.5)
    assert worker.built == 1  # published snapshots nobody scraped are not built
    results: list[Any] = []
    threads = [threading.Thread(target=lambda: results.append(worker.render(snaps[2], 60))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [r[0] for r in results] == [snaps[2]] * 4
    assert worker.built == 2, "four concurrent scrapes of one snapshot share one build"
    assert results[0][1] in Scraper(snaps[2]).text()


def test_a_scrape_that_cannot_wait_gets_the_previous_text(worker: Any) -> None:
    first, second = tracker(20).snapshot(), tracker(30).snapshot()
    assert worker.render(first, 60)[0] is first
    done = worker.render(second, 0.0)  # the build has not finished: the older, consistent text
    assert done is not None and done[0] is first
    assert worker.render(second, 60)[0] is second


def test_a_killed_child_falls_back_in_process_then_is_replaced(
    worker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(report_worker, "RESTART_AFTER", 1.0)
    first, second = tracker(30).snapshot(), tracker(45).snapshot()
    assert worker.render(first, 60) is not None
    old_pid = worker.pid
    os.kill(old_pid, signal.SIGKILL)
    wait_for(lambda: not _alive(old_pid), 10, "the child to die")
    assert worker.render(second, 30) is None  # noticed: the caller builds in process
    assert worker.failures == 1
    assert worker.latest() is None  # no stale text
    scraper = Scraper(second, worker)
    assert scraper.text() == Scraper(second).text()
    assert scraper.built_in_process == 1
    time.sleep(1.2)  # RESTART_AFTER
    done = worker.render(second, 60)
    assert done is not None and done[0] is second
    assert worker.pid not in (None, old_pid)
    assert Scraper(second, worker).text() == Scraper(second).text()


def test_a_hung_child_is_replaced_not_waited_for_forever(
    worker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A child that stops answering (SIGSTOP here) is given up after BUILD_TIMEOUT: the scrape
    builds in process instead of serving the last text for ever."""
    monkeypatch.setattr(report_worker, "BUILD_TIMEOUT", 1.0)
    first, second = tracker(30).snapshot(), tracker(45).snapshot()
    assert worker.render(first, 60) is not None
    hung = worker.pid
    os.kill(hung, signal.SIGSTOP)
    try:
        done = worker.render(second, 0.3)  # meanwhile: the previous, consistent text
        assert done is not None and done[0] is first
        wait_for(lambda: worker.failures == 1, 30, "the hung child to be given up")
        assert worker.render(second, 1.0) is None  # in process until the replacement
        wait_for(lambda: not _alive(hung), 15, "the hung child to be killed")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(hung, signal.SIGCONT)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (not reaped yet) has exited too
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _children(pid: int) -> list[int]:
    """The report processes of ``pid`` (multiprocessing's spawned children, not its resource tracker)."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    found = []
    for child in (int(x) for x in out.split()):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmdline and _alive(child):
            found.append(child)
    return found


def _events(start: int, n: int) -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    for i in range(start, start + n):
        attrs = {"sex": "FM"[i % 2], "race": "ABC"[i % 3], "age": "young" if i % 5 else "old"}
        out.append(
            (
                "prediction",
                {
                    "id": f"w{i}",
                    "ts": 1_700_000_000 + i,
                    "model": "m",
                    "prediction": i % 2,
                    "attributes": attrs,
                },
            )
        )
        out.append(("outcome", {"id": f"w{i}", "ts": 1_700_000_100 + i, "label": (i // 2) % 2}))
    return out


@pytest.mark.integration
def test_run_serves_metrics_through_the_worker_and_survives_its_death(
    kafka_bootstrap: str, topic_names: Any, group_id: str, tmp_path: Path
) -> None:
    from stream_fair.dev.broker import create_topics, produce_events

    create_topics(kafka_bootstrap, [topic_names.predictions, topic_names.outcomes], partitions=2)
    create_topics(kafka_bootstrap, [topic_names.dead_letters], partitions=1)
    cfg = detector_config(kafka_bootstrap, topic_names, group_id, tmp_path / "state")
    config = write_config(tmp_path / "config.yaml", cfg)
    procs: list[subprocess.Popen[bytes]] = []

    def start() -> tuple[subprocess.Popen[bytes], int]:
        port = free_port()
        env = cli_env(STREAM_FAIR_EXPORTER__PORT=str(port))
        procs.append(start_cli("run", "--config", str(config), log=tmp_path / "run.log", env=env))
        return procs[-1], port

    def joined(s: Any) -> float:
        return sum(s.by("stream_fair_confusion_total", ["feature"], feature="sex").values())

    proc, port = start()
    try:
        produce_events(kafka_bootstrap, topic_names.predictions, topic_names.outcomes, _events(0, 300))
        s = wait_consumed(port, (300, 300), 90)
        assert joined(s) == 300
        children = _children(proc.pid)
        assert len(children) == 1, f"one report process, got {children}"
        assert s.get("stream_fair_errors_total", kind="report_worker") == 0  # exported from 0

        os.kill(children[0], signal.SIGKILL)  # the report process dies: counts keep flowing
        produce_events(kafka_bootstrap, topic_names.predictions, topic_names.outcomes, _events(300, 200))
        s = wait_consumed(port, (500, 500), 90)
        assert joined(s) == 500
        s = wait_for(
            lambda: (x := scrape(port)).get("stream_fair_errors_total", kind="report_worker") and x,
            30,
            "the report process's failure on /metrics",
        )
        assert s.get("stream_fair_errors_total", kind="report_worker") == 1
        assert proc.poll() is None
        proc.terminate()
        assert proc.wait(30) == 0

        # a SIGKILLed detector leaves no report process behind
        proc, port = start()
        s = wait_consumed(port, (500, 500), 90)
        assert joined(s) == 500
        children = wait_for(lambda: _children(proc.pid) or None, 30, "the report process")
        proc.kill()
        proc.wait(10)
        wait_for(
            lambda: not any(_alive(c) for c in children), 15, "the report process to exit with its detector"
        )
    finally:
        for p in procs:
            stop_process(p)
