"""``stream-fair run`` as a real subprocess for the fault suite, with its output kept in memory.

Output goes through a pipe, not a file: some faults (a file-size limit standing in for a full disk)
must not stop the process from logging.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from stream_fair.dev.broker import create_topics
from tests.helpers import Scrape, cli_env, detector_config, free_port, parse_metrics, wait_for, write_config


def setup(
    bootstrap: str,
    topics: Any,
    group_id: str,
    tmp_path: Path,
    partitions: int = 1,
    create_dead_letters: bool = True,
    **sections: Any,
) -> Path:
    """Create the topics and write a detector config (helpers.detector_config, ``sections`` override)."""
    create_topics(bootstrap, [topics.predictions, topics.outcomes], partitions=partitions)
    if create_dead_letters:
        create_topics(bootstrap, [topics.dead_letters], partitions=1)
    cfg = detector_config(bootstrap, topics, group_id, tmp_path / "state.db", **sections)
    return write_config(tmp_path / "stream-fair.yaml", cfg)


class Run:
    """One ``python -m stream_fair run --config FILE`` process on a free exporter port."""

    def __init__(self, config: Path, **env: str) -> None:
        self.config = config
        self.port = free_port()
        self.env = cli_env(STREAM_FAIR_EXPORTER__PORT=str(self.port), **env)
        self.lines: list[str] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None

    def start(self, timeout: float = 30) -> Run:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "stream_fair", "run", "--config", str(self.config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        wait_for(lambda: self.exited or self.text("/metrics"), timeout, "the exporter to answer")
        assert not self.exited, f"stream-fair run exited {self.proc.returncode}:\n{self.log}"
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.decode("utf-8", "replace"))

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def text(self, path: str, timeout: float = 10) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=timeout) as resp:
            return str(resp.read().decode())

    def status(self, path: str) -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)

    def scrape(self) -> Scrape:
        assert not self.exited, f"stream-fair run died:\n{self.log[-3000:]}"
        return parse_metrics(self.text("/metrics"))

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM and wait; the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout)
        if self._reader is not None:
            self._reader.join(timeout=5)
        return code

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)


def consumed_all(run: Run, predictions: int, outcomes: int, timeout: float = 90) -> Scrape:
    """The first scrape that has consumed exactly this many records of each topic."""

    def done() -> Scrape | None:
        s = run.scrape()
        p = s.get("stream_fair_events_consumed_total", topic="predictions") or 0
        o = s.get("stream_fair_events_consumed_total", topic="outcomes") or 0
        assert p <= predictions and o <= outcomes, (p, o)
        return s if (p, o) == (predictions, outcomes) else None

    return wait_for(done, timeout, f"{predictions} predictions and {outcomes} outcomes consumed")


def read_all(run: Run, predictions: int, outcomes: int, timeout: float = 90) -> Scrape:
    """The first scrape after the process *read* this many records of each topic (checkpointed
    or not: ``events_consumed_total`` only moves with a checkpoint)."""

    def done() -> Scrape | None:
        s = run.scrape()
        p = s.get("stream_fair_records_read_total", topic="predictions") or 0
        o = s.get("stream_fair_records_read_total", topic="outcomes") or 0
        return s if (p, o) == (predictions, outcomes) else None

    return wait_for(done, timeout, f"{predictions} predictions and {outcomes} outcomes read")


def committed(run: Run) -> list[int]:
    """Records accounted for by the last checkpoint, per topic (what a restart resumes after)."""
    s = run.scrape()
    return [
        int(s.get("stream_fair_events_consumed_total", topic=t) or 0) for t in ("predictions", "outcomes")
    ]


def headers(record: Any) -> dict[str, bytes]:
    return {k: v for k, v in (record.headers or [])}


__all__ = ["Run", "setup", "consumed_all", "headers"]


def run_to_exit(config: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``stream-fair run`` to its end (a refusal at start-up), with its output."""
    return subprocess.run(
        [sys.executable, "-m", "stream_fair", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=cli_env(STREAM_FAIR_EXPORTER__PORT=str(free_port())),
    )
