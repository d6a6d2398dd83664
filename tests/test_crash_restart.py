"""Crash and restart ``stream-fair run`` mid-stream: nothing lost, nothing counted twice.

The detector runs as a subprocess (``python -m stream_fair run --config FILE``) while the test
produces a messy lending stream at a steady pace. It is killed with SIGKILL at about 20 %, 50 %
and 80 % of the stream and restarted each time on the same state file; at the end every counter
on /metrics must equal the recount from the produced events. A second case stops it with
SIGTERM: status 0, a final checkpoint, and an exact resume.
"""

from __future__ import annotations

import ast
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from kafka import KafkaConsumer, TopicPartition

from stream_fair.app import fingerprint
from stream_fair.config import load
from stream_fair.dev import simulate
from stream_fair.dev.broker import create_topics, produce_events
from stream_fair.state.codec import decode_json, meta_key
from stream_fair.state.rocks import RocksBackend
from stream_fair.transport.changelog import changelog_topic
from tests.helpers import (
    Expected,
    Scrape,
    assert_accounting,
    cli_env,
    consumed,
    detector_config,
    free_port,
    full_confusion,
    full_predictions,
    paced,
    recount,
    scrape,
    start_cli,
    stop_process,
    wait_consumed,
    wait_for,
    write_config,
)

pytestmark = [pytest.mark.integration, pytest.mark.transports]

FATES = ("joined", "expired", "orphan", "duplicate", "late", "rejected")


def _events(n: int, seed: int) -> list[tuple[str, Any]]:
    scenario = simulate.SCENARIOS["lending"](label_delay_mean_s=60.0)
    return list(
        simulate.messy(
            simulate.generate(scenario, n, seed=seed), seed=seed, duplicate_rate=0.05, malformed_rate=0.005
        )
    )


class Producer(threading.Thread):
    """Produces the events at a steady pace in the background; pauses while told to."""

    def __init__(self, bootstrap: str, topics: Any, events: list[Any], per_second: float) -> None:
        super().__init__(name="producer", daemon=True)
        self.running = threading.Event()  # cleared: the producer pauses
        self.running.set()
        stream = paced(events, per_second, gate=self.running)
        self.args = (bootstrap, topics.predictions, topics.outcomes, stream)
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            produce_events(*self.args)
        except BaseException as exc:  # reported by the test
            self.error = exc


class Service:
    """Starts ``stream-fair run`` subprocesses on one config file, each on a fresh port."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.procs: list[subprocess.Popen[bytes]] = []
        self.port = 0

    @property
    def log(self) -> Path:
        """The current run's log (stderr and stdout)."""
        return self.config.parent / f"run-{len(self.procs)}.log"

    def start(self) -> subprocess.Popen[bytes]:
        self.port = free_port()
        env = cli_env(STREAM_FAIR_EXPORTER__PORT=str(self.port))
        log = self.config.parent / f"run-{len(self.procs) + 1}.log"
        proc = start_cli("run", "--config", str(self.config), log=log, env=env)
        self.procs.append(proc)
        wait_for(
            lambda: proc.poll() is not None or scrape(self.port),
            30,
            f"the exporter of run #{len(self.procs)}",
        )
        assert proc.poll() is None, f"stream-fair run exited {proc.returncode}:\n{self.tail()}"
        return proc

    def scrape_until_read_ahead(
        self, proc: subprocess.Popen[bytes], started_at: int, timeout: float
    ) -> Scrape:
        """Scrape until this run (resumed at ``started_at`` records) has read more than its last
        published checkpoint covers, in two scrapes 0.3 s apart with no checkpoint published in
        between: a checkpoint being written at the first scrape (it would cover those reads)
        has almost always been published by the second."""
        deadline = time.monotonic() + timeout
        before: tuple[int, int] | None = None
        while True:
            assert proc.poll() is None, f"stream-fair run died:\n{self.tail()}"
            s = scrape(self.port)
            read = sum(s.by("stream_fair_records_read_total", ["topic"]).values())
            ahead = read > sum(consumed(s)) - started_at
            if ahead and before == consumed(s):
                return s
            before = consumed(s) if ahead else None
            assert time.monotonic() < deadline, "this run never read past its last checkpoint"
            time.sleep(0.3 if ahead else 0.005)

    def scrape_until(
        self, proc: subprocess.Popen[bytes], at_least: int, timeout: float, read: bool = False
    ) -> Scrape:
        """Scrape (checking the accounting identity each time) until ``at_least`` are consumed
        (checkpointed), or only read when ``read``."""
        deadline = time.monotonic() + timeout
        while True:
            assert proc.poll() is None, f"stream-fair run died:\n{self.tail()}"
            s = scrape(self.port)
            assert_accounting(s)
            n = sum(s.by("stream_fair_records_read_total", ["topic"]).values()) if read else sum(consumed(s))
            if n >= at_least:
                return s
            assert time.monotonic() < deadline, f"consumed {consumed(s)}, wanted {at_least}"
            time.sleep(0.05)

    def resumed_at(self, timeout: float = 30) -> dict[int, list[int | None]]:
        """Per shard, the offsets this run's first assignment resumed at (from its INFO log)."""

        def parse() -> dict[int, list[int | None]] | None:
            found: dict[int, list[int | None]] = {}
            for m in re.finditer(
                r"partition (\d+) claimed \(epoch \d+\), resuming at (\[.*?\])", self.tail()
            ):
                found.setdefault(int(m.group(1)), ast.literal_eval(m.group(2)))
            return found if len(found) == 2 else None

        return wait_for(parse, timeout, "both partitions assigned in the log")

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    def close(self) -> None:
        for proc in self.procs:
            stop_process(proc)


def _stored(config_path: Path) -> dict[int, dict[str, Any]]:
    """Each partition's last committed meta in the local store (the process has exited)."""
    config = load(config_path, environ={})
    store = RocksBackend(config.state.path, fingerprint(config))
    try:
        return {i: decode_json(raw) for i in range(8) if (raw := store.get(meta_key(i))) is not None}
    finally:
        store.close()


def _changelog_metas(config_path: Path) -> dict[int, dict[str, Any]]:
    """Each partition's last meta on the changelog topic: the commit marker of its last checkpoint."""
    config = load(config_path, environ={})
    topic = changelog_topic(config)
    consumer = KafkaConsumer(bootstrap_servers=config.kafka.bootstrap_servers, enable_auto_commit=False)
    try:
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        ends = consumer.end_offsets(parts)
        metas: dict[int, dict[str, Any]] = {}
        deadline = time.monotonic() + 30
        while any(consumer.position(tp) < ends[tp] for tp in parts):
            assert time.monotonic() < deadline, "the changelog could not be read to its end"
            for tp, records in consumer.poll(timeout_ms=500).items():
                for r in records:
                    if r.key == meta_key(tp.partition) and r.value is not None:
                        metas[tp.partition] = decode_json(r.value)
        return metas
    finally:
        consumer.close()


def _last_checkpoint(config_path: Path) -> dict[int, dict[str, Any]]:
    """Each partition's last committed checkpoint after a kill: the local store's meta, or the
    changelog's when a kill landed after the changelog commit and before the local write (step 3
    of the protocol in docs/state.md), in which case the restart restores it from the changelog."""
    local, logged = _stored(config_path), _changelog_metas(config_path)
    return {
        i: max((m for m in (local.get(i), logged.get(i)) if m is not None), key=lambda m: m["seq"])
        for i in sorted(set(local) | set(logged))
    }


def _assert_exact(s: Scrape, exp: Expected) -> None:
    assert_accounting(s)
    for topic in ("predictions", "outcomes"):
        fates = s.by("stream_fair_event_fates_total", ["fate"], topic=topic)
        want = {(f,): float(exp.fates[topic].get(f, 0)) for f in FATES}
        assert fates == want, topic
        assert s.get("stream_fair_pending_events", topic=topic) == exp.pending[topic]
        assert s.by("stream_fair_rejected_events_total", ["reason"], topic=topic) == {
            (r,): float(n) for r, n in exp.rejected[topic].items()
        }
    got = s.by("stream_fair_confusion_total", ["model", "feature", "group", "actual", "predicted"])
    assert got == {k: float(n) for k, n in full_confusion(exp).items()}
    preds = s.by("stream_fair_predictions_total", ["model", "feature", "group", "predicted"])
    assert preds == {k: float(n) for k, n in full_predictions(exp).items()}


def _setup(bootstrap: str, topics: Any, group_id: str, tmp_path: Path, **state: Any) -> Path:
    create_topics(bootstrap, [topics.predictions, topics.outcomes], partitions=2)
    create_topics(bootstrap, [topics.dead_letters], partitions=1)
    # A SIGKILLed member stays in the group until its session times out and the rebalance
    # (max_poll_interval_ms) completes: shorter timings keep each restart's join short.
    fast = {"session_timeout_ms": 3000, "heartbeat_interval_ms": 1000, "max_poll_interval_ms": 4000}
    cfg = detector_config(
        bootstrap, topics, group_id, tmp_path / "state", state=state, kafka=fast, log_level="INFO"
    )  # the log says where each run resumed
    return write_config(tmp_path / "stream-fair.yaml", cfg)


def test_kill_9_three_times_then_exact_counts(
    kafka_bootstrap: str, topic_names: Any, group_id: str, tmp_path: Path
) -> None:
    events = _events(20_000, seed=5)
    exp = recount(events)
    total = len(events)
    assert total > 40_000 and exp.fates["predictions"]["duplicate"] > 500
    # Each kill must land while the run has read past its last checkpoint: a consumer that keeps
    # up and checkpoints right after each burst (state.checkpoint_when_caught_up) leaves such
    # moments too short for a scrape to find them reliably, so checkpoints keep the interval here,
    # a long one: a scrape under load takes a few hundred ms, and a checkpoint between the scrape
    # that saw the run read ahead and the kill would leave nothing to read again. The last 20 % of
    # the stream is longer than one checkpoint (6000 events), so the 80 % kill comes before the end.
    # A scrape can still see the run read ahead while a checkpoint is being written (under load
    # one takes a good part of a second), which then covers the reads before the kill: when no
    # kill so far has replayed anything, the last one is repeated (at most three more times).
    config = _setup(
        kafka_bootstrap,
        topic_names,
        group_id,
        tmp_path,
        checkpoint_interval="3s",
        checkpoint_events=6000,
        checkpoint_when_caught_up=False,
    )
    service = Service(config)
    producer = Producer(kafka_bootstrap, topic_names, events, per_second=2_500)
    replayed = []
    try:
        proc = service.start()
        producer.start()
        fractions = [0.2, 0.5, 0.8]
        while fractions:
            fraction = fractions.pop(0)
            service.scrape_until(proc, int(fraction * total), timeout=60)
            # kill while this run has read records its last checkpoint does not cover yet (a
            # consumer that keeps up reads in bursts and checkpoints right after them)
            started = sum(o or 0 for offs in service.resumed_at().values() for o in offs)
            s = service.scrape_until_read_ahead(proc, started, timeout=60)
            proc.kill()  # SIGKILL: no shutdown code runs
            # pause production while the service is down, so each kill lands mid-stream however
            # long the restart takes (the consumer still catches up with a backlog)
            producer.running.clear()
            assert proc.wait(timeout=10) == -signal.SIGKILL
            seen = consumed(s)
            assert sum(seen) < total, f"the stream was already consumed at the {fraction:.0%} kill"
            stored = _last_checkpoint(config)
            # this run read more than its last checkpoint covers: those records are read again
            read = sum(s.by("stream_fair_records_read_total", ["topic"]).values())
            started_at = sum(o or 0 for offs in service.resumed_at().values() for o in offs)
            replayed.append(read > sum(sum(st["consumed"]) for st in stored.values()) - started_at)
            proc = service.start()
            # the restart resumes exactly at the last checkpoint, not at the start of the topics
            assert service.resumed_at() == {i: st["offsets"] for i, st in stored.items()}
            producer.running.set()
            if not fractions and not any(replayed) and len(replayed) < 6:
                fractions.append(fraction)
        producer.join(timeout=60)
        assert producer.error is None, producer.error
        s = wait_consumed(service.port, (exp.consumed["predictions"], exp.consumed["outcomes"]), 60)
        _assert_exact(s, exp)
        # at least one kill landed between checkpoints, so some records really were read twice
        assert any(replayed), "every kill happened right after a checkpoint: nothing was replayed"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, service.tail()
    finally:
        producer.running.set()
        service.close()
        producer.join(timeout=5)


def test_sigterm_exits_0_with_final_checkpoint_and_resumes(
    kafka_bootstrap: str, topic_names: Any, group_id: str, tmp_path: Path
) -> None:
    events = _events(6_000, seed=8)
    exp = recount(events)
    total = len(events)
    # no periodic checkpoint can happen, nor an early one while the consumer is caught up between
    # two bursts of the producer: what the file holds after SIGTERM is the final one
    config = _setup(
        kafka_bootstrap,
        topic_names,
        group_id,
        tmp_path,
        checkpoint_interval="1h",
        checkpoint_events=10_000_000,
        checkpoint_when_caught_up=False,
    )
    service = Service(config)
    producer = Producer(kafka_bootstrap, topic_names, events, per_second=2_500)
    try:
        proc = service.start()
        producer.start()
        s = service.scrape_until(proc, total // 2, timeout=60, read=True)
        assert consumed(s) == (0, 0)  # nothing checkpointed yet, so nothing exported yet
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, service.tail()
        stored = _stored(config)
        assert stored, "no checkpoint written on SIGTERM"
        read = s.by("stream_fair_records_read_total", ["topic"])
        seen = (int(read[("predictions",)]), int(read[("outcomes",)]))
        saved = [sum(st["consumed"][i] for st in stored.values()) for i in (0, 1)]
        assert saved[0] >= seen[0] and saved[1] >= seen[1], (saved, seen)
        for shard, st in stored.items():  # offsets and counts were saved together
            next_offsets = [o or 0 for o in st["offsets"]]
            assert next_offsets == st["consumed"], shard
        # the second run checkpoints (and so publishes) as usual
        cfg = yaml.safe_load(config.read_text())
        cfg["state"].update(checkpoint_interval="1s", checkpoint_events=3000)
        write_config(config, cfg)
        proc = service.start()
        assert service.resumed_at() == {i: st["offsets"] for i, st in stored.items()}
        producer.join(timeout=60)
        assert producer.error is None, producer.error
        s = wait_consumed(service.port, (exp.consumed["predictions"], exp.consumed["outcomes"]), 60)
        _assert_exact(s, exp)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, service.tail()
    finally:
        producer.running.set()
        service.close()
        producer.join(timeout=5)


def test_a_failed_windows_write_is_written_with_the_next_checkpoint(tmp_path: Path) -> None:
    """The windows' buckets are written after the checkpoint they were folded from; a failed write
    (a full disk) used to drop their change marks, so a restart lost those rows from the windows
    (the counters kept them) until the buckets aged out. The next checkpoint writes them, also when
    no record arrived since."""
    from stream_fair.app import Detector
    from stream_fair.config import Config
    from stream_fair.counts import WIDTH
    from stream_fair.kafka_io import DeadLetters
    from tests.test_checkpoint_pace import NoGroup

    cfg = Config.model_validate(
        {
            "topics": {"predictions": "p", "outcomes": "o", "dead_letters": None},
            "fairness": {"features": ["sex"]},
            "state": {"path": str(tmp_path / "state"), "changelog": False},
        }
    )
    d = Detector(cfg, exporter_port=0)
    d.attach(NoGroup(), DeadLetters(cfg))  # no broker: an assignment of nothing, no letters
    row = [0] * WIDTH
    row[2] = 5  # some joined pairs
    d.windows.fold([(("m", ("F",)), 100, row)])
    write = d.backend.write

    def full_disk(*args: Any, **kwargs: Any) -> None:
        raise OSError("No space left on device")

    d.backend.write = full_disk
    with pytest.raises(OSError):
        d._save_windows()
    d.backend.write = write
    assert d.checkpoint()  # the next checkpoint, with no new record (an idle stream)
    d.close()

    again = Detector(cfg, exporter_port=0)
    again.open_state()
    assert again.windows.buckets == {100: {("m", ("F",)): row}}
    again.close()


def test_an_error_mid_poll_checkpoints_nothing_and_the_restart_counts_exactly(
    kafka_bootstrap: str, topic_names: Any, group_id: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception out of the tracker stops the loop with a poll half applied: some of its records
    counted and joined, its offsets and consumed counts not yet moved. The shutdown used to
    checkpoint anyway, so the restart read those records again: counted twice (as duplicates of
    themselves), and the accounting no longer added up. Now a failed loop checkpoints nothing, as
    after a SIGKILL, and the restart's counts are exact."""
    from stream_fair.app import Detector
    from stream_fair.config import Config
    from stream_fair.join import Join

    events = _events(2_000, seed=23)
    exp = recount(events)
    create_topics(kafka_bootstrap, [topic_names.predictions, topic_names.outcomes], partitions=2)
    create_topics(kafka_bootstrap, [topic_names.dead_letters], partitions=1)
    produce_events(kafka_bootstrap, topic_names.predictions, topic_names.outcomes, events)
    cfg = Config.model_validate(detector_config(kafka_bootstrap, topic_names, group_id, tmp_path / "state"))

    real, calls = Join.add_prediction, [0]

    def failing(self: Join, event_id: str, p: Any) -> Any:
        calls[0] += 1
        if calls[0] == 700:  # well inside a poll of up to 2,000 records (all were produced first)
            raise RuntimeError("a tracker bug mid-poll")
        return real(self, event_id, p)

    monkeypatch.setattr(Join, "add_prediction", failing)
    with pytest.raises(RuntimeError, match="a tracker bug mid-poll"):
        Detector(cfg).run(threading.Event())
    monkeypatch.undo()
    assert calls[0] == 700

    again = Detector(cfg)
    stop = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            again.run(stop)
        except BaseException as exc:  # noqa: BLE001 - asserted below
            failure.append(exc)

    thread = threading.Thread(target=run, name="detector", daemon=True)
    thread.start()
    try:
        wait_for(lambda: again.port and scrape(again.port) is not None, 30, "the restarted detector")
        total = (exp.consumed["predictions"], exp.consumed["outcomes"])
        _assert_exact(wait_consumed(again.port, total, 60), exp)
    finally:
        stop.set()
        thread.join(30)
    assert not failure, failure
