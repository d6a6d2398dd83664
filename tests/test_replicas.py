"""Several ``stream-fair run`` processes in one consumer group on the real broker.

Each replica is a subprocess with its own state directory (a pod with its own volume) and port.
Partitions move between them as they start, die and stop; at the end the counters summed over the
live replicas must equal an independent recount exactly, and a replica that starts on an empty
disk must take its partitions over from the changelog instead of replaying the input topics.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from stream_fair.dev import simulate
from stream_fair.dev.broker import create_topics, produce_events
from tests.helpers import (
    Expected,
    Scrape,
    assert_accounting,
    cli_env,
    detector_config,
    free_port,
    full_confusion,
    full_predictions,
    paced,
    recount,
    scrape,
    start_cli,
    stop_process,
    wait_for,
    write_config,
)

pytestmark = [pytest.mark.integration, pytest.mark.transports]

PARTITIONS = 6
FATES = ("joined", "expired", "orphan", "duplicate", "late", "rejected")
# short group timings so that a dead member's partitions move within seconds
GROUP = {"session_timeout_ms": 3000, "heartbeat_interval_ms": 1000, "max_poll_interval_ms": 6000}


def events(n: int, seed: int) -> list[tuple[str, Any]]:
    scenario = simulate.SCENARIOS["lending"](label_delay_mean_s=30.0)
    return list(
        simulate.messy(
            simulate.generate(scenario, n, seed=seed), seed=seed, duplicate_rate=0.05, malformed_rate=0.005
        )
    )


class Replica:
    """One ``stream-fair run`` process with its own state directory and exporter port."""

    def __init__(self, config: Path, name: str, state: Path, **overrides: str) -> None:
        self.config, self.name, self.state = config, name, state
        self.port = free_port()
        self.log = config.parent / f"{name}.log"
        env = cli_env(
            STREAM_FAIR_EXPORTER__PORT=str(self.port), STREAM_FAIR_STATE__PATH=str(state), **overrides
        )
        self.proc: subprocess.Popen[bytes] = start_cli("run", "--config", str(config), log=self.log, env=env)
        wait_for(lambda: self.proc.poll() is not None or scrape(self.port), 30, f"{name}'s exporter")
        assert self.proc.poll() is None, f"{name} exited:\n{self.tail()}"

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""

    def scrape(self) -> Scrape:
        assert self.proc.poll() is None, f"{self.name} died:\n{self.tail()}"
        return scrape(self.port)

    def owned(self) -> set[str]:
        s = self.scrape()
        return {p for (p,) in s.by("stream_fair_events_consumed_total", ["partition"])}

    def kill(self) -> None:
        self.proc.kill()
        assert self.proc.wait(timeout=10) == -signal.SIGKILL

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(timeout=60) == 0, self.tail()


class Producer(threading.Thread):
    def __init__(self, bootstrap: str, topics: Any, evs: list[Any], per_second: float) -> None:
        super().__init__(daemon=True)
        self.args = (bootstrap, topics.predictions, topics.outcomes, paced(evs, per_second))
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            produce_events(*self.args)
        except BaseException as exc:
            self.error = exc


def merged(replicas: list[Replica]) -> Scrape:
    """One scrape per live replica, merged; each partition must be exported by exactly one."""
    samples: dict[str, dict[Any, float]] = {}
    seen: dict[str, str] = {}
    for r in replicas:
        s = r.scrape()
        assert_accounting(s)
        for p in r.owned():
            assert p not in seen, f"partition {p} exported by {seen[p]} and {r.name}"
            seen[p] = r.name
        for name, by_labels in s.samples.items():
            if name.startswith("stream_fair_") and name.endswith("_total"):
                dest = samples.setdefault(name, {})
                for labels, v in by_labels.items():
                    dest[labels] = dest.get(labels, 0.0) + v
            elif name == "stream_fair_pending_events":
                samples.setdefault(name, {}).update(by_labels)
    return Scrape(samples)


def consumed_total(s: Scrape) -> tuple[int, int]:
    return (
        int(sum(s.by("stream_fair_events_consumed_total", ["partition"], topic="predictions").values())),
        int(sum(s.by("stream_fair_events_consumed_total", ["partition"], topic="outcomes").values())),
    )


def assert_exact(s: Scrape, exp: Expected) -> None:
    for topic in ("predictions", "outcomes"):
        fates = s.by("stream_fair_event_fates_total", ["fate"], topic=topic)
        assert fates == {(f,): float(exp.fates[topic].get(f, 0)) for f in FATES}, topic
        assert s.get("stream_fair_pending_events", topic=topic) == exp.pending[topic]
        assert s.by("stream_fair_rejected_events_total", ["reason"], topic=topic) == {
            (r,): float(n) for r, n in exp.rejected[topic].items()
        }
    got = s.by("stream_fair_confusion_total", ["model", "feature", "group", "actual", "predicted"])
    assert got == {k: float(n) for k, n in full_confusion(exp).items()}
    preds = s.by("stream_fair_predictions_total", ["model", "feature", "group", "predicted"])
    assert preds == {k: float(n) for k, n in full_predictions(exp).items()}


def wait_all(replicas: list[Replica], exp: Expected, timeout: float) -> Scrape:
    want = (exp.consumed["predictions"], exp.consumed["outcomes"])

    def done() -> Scrape | None:
        s = merged(replicas)
        owned = {p for r in replicas for p in r.owned()}
        return s if consumed_total(s) == want and len(owned) == PARTITIONS else None

    return wait_for(done, timeout, f"all {PARTITIONS} partitions owned and {want} consumed", interval=0.5)


def setup(bootstrap: str, topics: Any, group_id: str, tmp_path: Path) -> Path:
    create_topics(bootstrap, [topics.predictions, topics.outcomes], partitions=PARTITIONS)
    create_topics(bootstrap, [topics.dead_letters], partitions=1)
    cfg = detector_config(
        bootstrap,
        topics,
        group_id,
        tmp_path / "unused",
        kafka=GROUP,
        state={"checkpoint_interval": "500ms", "checkpoint_events": 2000},
        log_level="INFO",
    )
    return write_config(tmp_path / "stream-fair.yaml", cfg)


def until(replicas: list[Replica], at_least: int, timeout: float = 90) -> None:
    wait_for(lambda: sum(consumed_total(merged(replicas))) >= at_least, timeout, f"{at_least} consumed")


def settled(replicas: list[Replica], timeout: float = 60) -> None:
    """Every partition owned by exactly one live replica, and each live replica owning some (a
    rebalance completed: there are fewer replicas than partitions)."""

    def check() -> bool:
        owned = [r.owned() for r in replicas]
        # a replica that just joined owns nothing until the rebalance it asked for completes
        return (
            sum(len(o) for o in owned) == PARTITIONS and len(set().union(*owned)) == PARTITIONS and all(owned)
        )

    wait_for(check, timeout, "the partitions settled on the live replicas", interval=0.5)


def test_scale_up_kill_replace_scale_down_exact_counts(
    kafka_bootstrap: str, topic_names: Any, group_id: str, tmp_path: Path
) -> None:
    evs = events(15_000, seed=21)
    exp = recount(evs)
    total = len(evs)
    config = setup(kafka_bootstrap, topic_names, group_id, tmp_path)
    producer = Producer(kafka_bootstrap, topic_names, evs, per_second=700)
    live: list[Replica] = []
    try:
        live.append(Replica(config, "a", tmp_path / "a"))
        settled(live)
        producer.start()
        until(live, total // 6)
        live += [Replica(config, "b", tmp_path / "b"), Replica(config, "c", tmp_path / "c")]
        settled(live)
        assert all(r.owned() for r in live), "scaled to 3: every replica owns partitions"
        until(live, total // 3)
        b = live.pop(1)
        b.kill()  # SIGKILL mid-stream: its partitions move after the session times out
        settled(live)
        # the pod comes back elsewhere, on an empty disk: its state comes from the changelog
        live.append(Replica(config, "b2", tmp_path / "b2"))
        settled(live)
        until(live, 2 * total // 3)
        c = next(r for r in live if r.name == "c")
        live.remove(c)
        c.terminate()  # scale down to 2: a graceful handover
        settled(live)
        producer.join(timeout=120)
        assert producer.error is None, producer.error
        s = wait_all(live, exp, timeout=120)
        assert_exact(s, exp)
    finally:
        for r in live:
            stop_process(r.proc)


def test_a_replica_on_an_empty_disk_restores_from_the_changelog_not_the_inputs(
    kafka_bootstrap: str, topic_names: Any, group_id: str, tmp_path: Path
) -> None:
    first, more = events(6_000, seed=31), events(400, seed=32)
    more = [(k, {**p, "id": f"m-{p['id']}"} if isinstance(p, dict) and "id" in p else p) for k, p in more]
    config = setup(kafka_bootstrap, topic_names, group_id, tmp_path)
    produce_events(kafka_bootstrap, topic_names.predictions, topic_names.outcomes, first)
    exp = recount(first)
    a = Replica(config, "a", tmp_path / "a")
    try:
        s = wait_all([a], exp, timeout=120)
        assert_exact(s, exp)
        a.terminate()
        # a new pod, an empty disk
        b = Replica(config, "b", tmp_path / "b")
        s = wait_all([b], exp, timeout=120)
        assert_exact(s, exp)  # the same counts, pending predictions included
        read = sum(s.by("stream_fair_records_read_total", ["topic"]).values())
        assert read == 0, f"the new replica read {read} input records instead of restoring"
        assert "restored from the changelog" in b.log.read_text()
        produce_events(kafka_bootstrap, topic_names.predictions, topic_names.outcomes, more)
        exp2 = recount(first + more)
        s = wait_all([b], exp2, timeout=120)
        assert_exact(s, exp2)
        read = sum(s.by("stream_fair_records_read_total", ["topic"]).values())
        assert read == len(more), (read, len(more))
        b.terminate()
    finally:
        stop_process(a.proc)
        if "b" in locals():
            stop_process(b.proc)


@pytest.mark.parametrize("step", ["changelog_data", "changelog_meta", "local"])
def test_a_crash_at_each_checkpoint_step_loses_and_doubles_nothing(
    kafka_bootstrap: str, topic_names: Any, group_id: str, tmp_path: Path, step: str
) -> None:
    evs = events(6_000, seed=41)
    exp = recount(evs)
    config = setup(kafka_bootstrap, topic_names, group_id, tmp_path)
    producer = Producer(kafka_bootstrap, topic_names, evs, per_second=1500)
    env_crash = {"STREAM_FAIR_TEST_CRASH": f"{step}:8"}
    state = tmp_path / "state"
    port = free_port()
    log = tmp_path / "crash.log"
    env = cli_env(STREAM_FAIR_EXPORTER__PORT=str(port), STREAM_FAIR_STATE__PATH=str(state), **env_crash)
    proc = start_cli("run", "--config", str(config), log=log, env=env)
    replica = None
    try:
        producer.start()
        assert proc.wait(timeout=120) == -signal.SIGKILL, log.read_text()[-3000:]
        assert f"test crash injected at {step}" in log.read_text()
        replica = Replica(config, "after", state)  # the same disk, no crash this time
        producer.join(timeout=60)
        assert producer.error is None, producer.error
        s = wait_all([replica], exp, timeout=120)
        assert_exact(s, exp)
    finally:
        stop_process(proc)
        if replica is not None:
            stop_process(replica.proc)


def test_a_crash_during_a_restore_then_a_complete_restore(
    kafka_bootstrap: str, topic_names: Any, group_id: str, tmp_path: Path
) -> None:
    evs = events(6_000, seed=51)
    exp = recount(evs)
    config = setup(kafka_bootstrap, topic_names, group_id, tmp_path)
    produce_events(kafka_bootstrap, topic_names.predictions, topic_names.outcomes, evs)
    a = Replica(config, "a", tmp_path / "a")
    wait_all([a], exp, timeout=120)
    a.terminate()
    state, log = tmp_path / "b", tmp_path / "b-crash.log"
    env = cli_env(
        STREAM_FAIR_EXPORTER__PORT=str(free_port()),
        STREAM_FAIR_STATE__PATH=str(state),
        STREAM_FAIR_TEST_CRASH="restore:1",
    )
    proc = start_cli("run", "--config", str(config), log=log, env=env)
    b = None
    try:
        assert proc.wait(timeout=120) == -signal.SIGKILL, log.read_text()[-3000:]
        b = Replica(config, "b", state)  # its half-restored disk is restored again, completely
        s = wait_all([b], exp, timeout=120)
        assert_exact(s, exp)
        assert "local state is incomplete" in b.log.read_text()
    finally:
        stop_process(proc)
        if b is not None:
            stop_process(b.proc)
        time.sleep(0)


def _late_writes(bootstrap: str, topic: str) -> list[tuple[int, int, int, int]]:
    """``(partition, offset, epoch, highest epoch before it)`` of every changelog record written
    with a lower epoch than one already in its partition: a previous owner's late write."""
    from kafka import KafkaConsumer, TopicPartition

    from stream_fair.state.restore import EPOCH_HEADER

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        ends = consumer.end_offsets(parts)
        highest = dict.fromkeys(parts, 0)
        late = []
        deadline = time.monotonic() + 60
        while any(consumer.position(tp) < ends[tp] for tp in parts):
            assert time.monotonic() < deadline, "the changelog could not be read to its end"
            for tp, records in consumer.poll(timeout_ms=500).items():
                for r in records:
                    epoch = int(dict(r.headers).get(EPOCH_HEADER, b"0"))
                    if epoch < highest[tp]:
                        late.append((tp.partition, r.offset, epoch, highest[tp]))
                    highest[tp] = max(highest[tp], epoch)
        return late
    finally:
        consumer.close()


def test_a_frozen_replica_is_evicted_and_writes_nothing_behind_the_new_owner(
    kafka_bootstrap: str, topic_names: Any, group_id: str, tmp_path: Path
) -> None:
    """A replica frozen (SIGSTOP: a long GC, a throttled or paused container) with records read
    but not yet checkpointed is evicted from the group; another replica restores and claims its
    partitions and counts those records. When the frozen one wakes, its partitions are *lost*:
    it must drop them without a checkpoint. It used to checkpoint them as if revoked, writing its
    stale state to the changelog behind the new owner's claim (ignored by readers, but kept by
    compaction as the newest record of those keys). The counts summed over both stay exact."""
    from stream_fair.transport.changelog import changelog_topic

    first, second = events(3_000, seed=41), events(1_500, seed=42)
    second = [(k, {**p, "id": f"s-{p['id']}"} if isinstance(p, dict) and "id" in p else p) for k, p in second]
    config = setup(kafka_bootstrap, topic_names, group_id, tmp_path)
    produce_events(kafka_bootstrap, topic_names.predictions, topic_names.outcomes, first)
    # a: checkpoints only after len(first) records (the first stream), then not for 10 minutes
    lazy = {
        "STREAM_FAIR_STATE__CHECKPOINT_EVENTS": str(len(first)),
        "STREAM_FAIR_STATE__CHECKPOINT_INTERVAL": "600s",
        "STREAM_FAIR_STATE__CHECKPOINT_WHEN_CAUGHT_UP": "false",
    }
    a = Replica(config, "a", tmp_path / "a", **lazy)
    b = None
    try:
        exp = recount(first)
        assert_exact(wait_all([a], exp, timeout=120), exp)
        produce_events(kafka_bootstrap, topic_names.predictions, topic_names.outcomes, second)
        read = lambda: sum(a.scrape().by("stream_fair_records_read_total", ["topic"]).values())  # noqa: E731
        wait_for(lambda: read() == len(first) + len(second), 60, "a to read the second stream")
        assert consumed_total(merged([a])) == (exp.consumed["predictions"], exp.consumed["outcomes"])
        a.proc.send_signal(signal.SIGSTOP)
        b = Replica(config, "b", tmp_path / "b")
        exp = recount(first + second)
        wait_for(lambda: len(b.owned()) == PARTITIONS, 90, "b to own every partition")
        assert_exact(wait_all([b], exp, timeout=120), exp)
        a.proc.send_signal(signal.SIGCONT)
        settled([a, b])  # a rejoined
        assert_exact(wait_all([a, b], exp, timeout=120), exp)
        assert _late_writes(kafka_bootstrap, changelog_topic(load_config(config))) == []
        # the group told it its partitions were lost (rule 3, the idle owner's look, may have
        # dropped them a moment before: then this line is the only trace of the lost path)
        assert "partitions lost: [" in a.log.read_text(errors="replace")
    finally:
        if a.proc.poll() is None:
            a.proc.send_signal(signal.SIGCONT)
        stop_process(a.proc)
        if b is not None:
            stop_process(b.proc)


def load_config(path: Path) -> Any:
    from stream_fair.config import load

    return load(path, environ={})
