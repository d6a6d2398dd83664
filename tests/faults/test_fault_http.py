"""The exporter survives idle connections (issue 9, item 8).

Before, every accepted connection got its own thread and none ever timed out: 1,000 idle
connections held 1,005 threads. Now they wait in one selector thread, are closed after
``exporter.read_timeout``, and a scrape still gets through a fixed pool of workers.
"""

from __future__ import annotations

import contextlib
import resource
import socket
from pathlib import Path
from typing import Any

import pytest

from tests.faults.proc import Run, setup
from tests.helpers import ready, wait_for

pytestmark = pytest.mark.integration


def _threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads: line")


def test_a_thousand_idle_connections_hold_no_threads(
    kafka_bootstrap: str, topic_names: Any, group_id: str, tmp_path: Path
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200:  # this test process holds the client ends of the connections
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    config = setup(
        kafka_bootstrap, topic_names, group_id, tmp_path,
        exporter={"read_timeout": "3s", "max_connections": 2000, "workers": 4},
    )  # fmt: skip
    run = Run(config).start()
    idle: list[socket.socket] = []
    try:
        # every thread the detector runs exists once it is ready (Kafka clients, the store's
        # background jobs); wait for the count to settle before opening the connections
        wait_for(lambda: ready(run.port), 60, "the detector ready")
        counts: list[int] = []
        wait_for(
            lambda: counts.append(_threads(run.pid)) or counts[-5:] == [counts[-1]] * 5, 30, "threads settled"
        )
        before = _threads(run.pid)
        for _ in range(1000):
            idle.append(socket.create_connection(("127.0.0.1", run.port), timeout=10))
        # the server has accepted them all (each one waits in the selector, none has a thread)
        wait_for(lambda: len(list(Path(f"/proc/{run.pid}/fd").iterdir())) >= 1000, 30, "1000 accepted")
        assert _threads(run.pid) <= before + 2, (before, _threads(run.pid))
        assert run.scrape().get("stream_fair_build_info", version="0.1.0") == 1.0  # a scrape gets through
        # idle connections are closed by the server after read_timeout
        idle[0].settimeout(30)
        assert idle[0].recv(1) == b""
        assert run.stop() == 0, run.log
    finally:
        for s in idle:
            with contextlib.suppress(OSError):
                s.close()
        run.kill()
