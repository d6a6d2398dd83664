"""The ``/metrics`` text of each published snapshot, built in a child process.

A scrape after a new snapshot used to build the report (rates, intervals, verdicts, label-free
estimates) and render its ~10k-45k series on a server thread of the consumer's own process:
100-500 ms of CPU holding the interpreter lock that the consumer needs, once per checkpoint. At
46k series the consumer read 0.74x as many records while scraped every second (0.99x with this
module), and under a steady stream the scrapes took half the process's CPU
(docs/performance.md).

:class:`ReportWorker` moves that work to a child process (the other core). A scrape that finds
the last published snapshot not rendered yet hands it over (pickled on this module's own thread:
~7 ms at 15k series, ~13 ms at 45k) and waits for the text (at most ``RENDER_WAIT``; concurrent
scrapes share one build); then it renders only the pipeline's live facts and appends that text.
Nothing is built while nobody scrapes: a snapshot is published every second, Prometheus scrapes
every 15-60 s.

Every number in one scrape comes from one snapshot: the collector renders the snapshot-derived
pipeline families (consumed, fates, pending, ...) from the snapshot the text was built from. A
build that takes longer than ``RENDER_WAIT`` leaves the scrape with the previous text, never a mix.

If the child fails (it died, or building a report raised), the scrape falls back to building the
report in process, as it did before (logged, and counted as ``errors{kind="report_worker"}``);
a dead child is started again after ``RESTART_AFTER`` seconds. ``exporter.report_process: false``
keeps everything in process.

The snapshot crosses a private pipe between this process and a child it started itself, so pickle
is safe here; nothing pickled is ever stored (the state format is explicit, docs/state.md).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger(__name__)

NICENESS = 10  # the child's scheduling priority below the consumer's (os.nice)
RENDER_WAIT = 5.0  # how long a scrape waits for the child's text of the newest snapshot
RESTART_AFTER = 30.0  # seconds between a child's failure and its replacement
START_TIMEOUT = 60.0  # a child that does not answer its first snapshot within this is replaced
BUILD_TIMEOUT = 120.0  # ... nor any later one (a 45k-series report takes ~0.5 s): never a stuck text

Rendered = tuple[Any, str]  # (the snapshot, the text of its report's families)
OnPoints = Callable[[float, Sequence[Any]], Any]  # History.add


class ReportWorker:
    """Renders snapshots in a child process when a scrape asks for them.

    :meth:`render` is what a scrape calls: the text of the snapshot it names, built by the child
    unless it is already there, waiting at most ``timeout``. Nothing is built while nobody scrapes
    (a snapshot every second, Prometheus every 15-60 s), and concurrent scrapes of one snapshot
    share one build.
    """

    def __init__(self, config: Any, on_points: OnPoints | None = None) -> None:
        self._config = config
        self._on_points = on_points
        self._cond = threading.Condition()
        self._pending: Any = None  # the snapshot a scrape asked for, not taken yet
        self._inflight: Any = None  # the one the child is rendering
        self._latest: Rendered | None = None
        self._outcomes = 0  # renders finished, failed or not: what a waiting scrape watches
        self._closed = False
        self._proc: Any = None
        self._conn: Any = None
        self._failed_at: float | None = None
        self.failures = 0  # children that died or reports that failed to build
        self.built = 0  # snapshots rendered by the child
        self._thread = threading.Thread(target=self._loop, name="stream-fair-report", daemon=True)

    # -- the scrape's side --------------------------------------------------------------------
    def start(self) -> None:
        """Start the child now (on this object's thread), so the first scrape finds it ready."""
        self._thread.start()

    def render(self, snapshot: Any, timeout: float) -> Rendered | None:
        """``(snapshot, text)`` once the child rendered ``snapshot``; after ``timeout`` the newest
        text there is (an older snapshot's); None after a failure, until the child is replaced (the
        caller then builds in process)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                latest = self._latest
                if latest is not None and latest[0] is snapshot:
                    return latest
                if self._closed or self._backing_off():
                    return None
                if self._pending is not snapshot and self._inflight is not snapshot:
                    self._pending = snapshot
                    self._cond.notify_all()
                seen = self._outcomes
                while self._outcomes == seen and not self._closed:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return self._latest
                    self._cond.wait(left)
                if self._latest is None:
                    return None  # it failed: in process until the replacement

    def latest(self) -> Rendered | None:
        """The newest snapshot the child rendered and its text (None after a failure)."""
        return self._latest

    def close(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)
        self._stop_child(timeout)

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return None if proc is None else proc.pid

    def _backing_off(self) -> bool:
        return self._failed_at is not None and time.monotonic() - self._failed_at < RESTART_AFTER

    # -- the hand-over thread -----------------------------------------------------------------
    def _loop(self) -> None:
        try:
            self._start_child()
        except Exception as e:
            self._fail(e)
        while True:
            with self._cond:
                while self._pending is None and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                snapshot, self._pending = self._pending, None
                self._inflight = snapshot
            try:
                if not self._backing_off():
                    self._render(snapshot)
            except Exception as e:  # the child died, hung or failed: the scrape builds in process
                self._fail(e)
            finally:
                self._inflight = None

    def _render(self, snapshot: Any) -> None:
        if self._proc is None:
            self._start_child()
        elif not self._proc.is_alive():
            raise RuntimeError(f"the report process exited (exit code {self._proc.exitcode})")
        self._conn.send(snapshot)
        timeout = START_TIMEOUT if self.built == 0 else BUILD_TIMEOUT
        if not self._conn.poll(timeout):
            raise TimeoutError(f"the report process did not answer within {timeout:.0f} s")
        ok, payload = self._conn.recv()
        if not ok:
            raise RuntimeError(f"the report process failed to build a report: {payload}")
        text, taken_at, points = payload
        with self._cond:
            self._latest = (snapshot, text)
            self._failed_at = None
            self.built += 1
            self._outcomes += 1
            self._cond.notify_all()
        if self._on_points is not None:
            self._on_points(taken_at, points)

    def _fail(self, error: BaseException) -> None:
        with self._cond:
            self.failures += 1
            self._latest = None
            self._failed_at = time.monotonic()
            self._outcomes += 1
            self._cond.notify_all()
            closing = self._closed
        if not closing:  # at shutdown the pipe is closed under a waiting read: not a failure
            log.error(
                "report process failed (%s); /metrics builds its report in process, retried in %.0f s",
                error,
                RESTART_AFTER,
            )
        self._stop_child(1.0)

    def _start_child(self) -> None:
        ctx = mp.get_context("spawn")  # never fork a process with client threads
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=serve, args=(child, self._config), name="stream-fair-report", daemon=True)
        proc.start()
        child.close()
        self._proc, self._conn = proc, parent

    def _stop_child(self, timeout: float) -> None:
        proc, conn, self._proc, self._conn = self._proc, self._conn, None, None
        if conn is not None:
            with contextlib.suppress(OSError, ValueError):
                conn.send(None)
            conn.close()
        if proc is not None:
            proc.join(timeout)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout)


def serve(conn: Any, config: Any) -> None:
    """The child: for each snapshot received, its report's families as ``/metrics`` text and the
    status page's history points; ``None`` ends it (so does the parent's end of the pipe)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when this process ends
    with contextlib.suppress(OSError):
        os.nice(NICENESS)  # where both want the CPU (one core, a CPU limit), the consumer goes first
    from stream_fair.app import tuned_collector
    from stream_fair.exporter import report_text_renderer
    from stream_fair.report import ReportCache, build_report
    from stream_fair.status_page import history_points

    cache = ReportCache()
    render = report_text_renderer()
    with tuned_collector():
        while True:
            try:
                snapshot = conn.recv()
            except EOFError:
                return
            if snapshot is None:
                return
            try:
                report = build_report(snapshot, config, cache)
                conn.send((True, (render(report), snapshot.taken_at, history_points(report))))
            except Exception as e:  # the parent counts it and builds this one in process
                log.exception("building the report failed")
                conn.send((False, f"{type(e).__name__}: {e}"))
