"""Millions of pending predictions in a real ``stream-fair run``: RSS stays put, then every one joins.

Before the state lived on disk each pending prediction cost 609-639 bytes of RAM (the default
``max_pending`` of 1,000,000 was reached after hours); now RAM is bounded by the store's cache and
memtables and the overlay of one checkpoint, whatever the pending count.
"""

from __future__ import annotations

import random
import threading
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaProducer

from tests.helpers import scrape, wait_for
from tests.test_replicas import Replica, setup

pytestmark = pytest.mark.integration

N = 2_000_000


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def produce(bootstrap: str, topic: str, kind: str, n: int, seed: int) -> None:
    """``n`` records with ids r0..r{n-1}, formatted directly as bytes (fast, little memory)."""
    rng = random.Random(seed)
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=20, batch_size=512 * 1024)
    try:
        for i in range(n):
            key = b"r%d" % i
            if kind == "p":
                value = (
                    b'{"id":"r%d","ts":%d,"model":"m","prediction":%d,'
                    b'"attributes":{"sex":"%s","race":"%s","age":"x"}}'
                    % (
                        i,
                        1_700_000_000 + i // 100,
                        rng.getrandbits(1),
                        b"FM"[i % 2 : i % 2 + 1],
                        b"AB"[i % 3 % 2 : i % 3 % 2 + 1],
                    )
                )
            else:
                value = b'{"id":"r%d","ts":%d,"label":%d}' % (i, 1_700_100_000 + i // 100, rng.getrandbits(1))
            producer.send(topic, key=key, value=value, partition=i % 2)
        producer.flush()
    finally:
        producer.close()


def test_two_million_pending_predictions_bounded_rss_then_all_join(
    kafka_bootstrap: str, topic_names: Any, group_id: str, tmp_path: Path
) -> None:
    config = setup(kafka_bootstrap, topic_names, group_id, tmp_path)
    replica = Replica(config, "big", tmp_path / "state")
    samples: list[tuple[float, float]] = []  # (pending, rss MB)
    try:
        producer = threading.Thread(
            target=produce, args=(kafka_bootstrap, topic_names.predictions, "p", N, 1)
        )
        producer.start()

        def pending() -> float:
            return scrape(replica.port).get("stream_fair_pending_events", topic="predictions") or 0.0

        def reached(n: int) -> bool:
            p = pending()
            samples.append((p, rss_mb(replica.proc.pid)))
            return p >= n

        wait_for(lambda: reached(N // 4), 600, f"{N // 4} pending", interval=1.0)
        rss_quarter = rss_mb(replica.proc.pid)
        wait_for(lambda: reached(N), 900, f"{N} pending", interval=1.0)
        producer.join()
        rss_full = max(r for _, r in samples)
        # dicts cost ~620 bytes per pending prediction: 1.5 million more would be ~900 MB more
        assert rss_full - rss_quarter < 150, (rss_quarter, rss_full, samples[-5:])
        assert rss_full < 600, rss_full
        assert (scrape(replica.port).get("stream_fair_state_disk_bytes") or 0) > 0
        produce(kafka_bootstrap, topic_names.outcomes, "o", N, 2)

        def all_joined() -> bool:
            s = scrape(replica.port)
            return s.get("stream_fair_event_fates_total", topic="outcomes", fate="joined") == N

        wait_for(all_joined, 900, f"{N} joined", interval=1.0)
        s = scrape(replica.port)
        assert s.get("stream_fair_pending_events", topic="predictions") == 0
        assert s.get("stream_fair_event_fates_total", topic="predictions", fate="expired") == 0
        joined = s.by("stream_fair_confusion_total", ["feature"], model="m")
        assert joined[("sex",)] == N
    finally:
        replica.proc.kill()


def test_a_byte_budget_bounds_the_pending_predictions(
    kafka_bootstrap: str, topic_names: Any, group_id: str, tmp_path: Path
) -> None:
    """``join.max_pending_bytes`` turns into per-partition counts; beyond them the oldest expire
    early and are counted, never dropped."""
    n = 100_000
    config = setup(kafka_bootstrap, topic_names, group_id, tmp_path)
    import yaml

    cfg = yaml.safe_load(config.read_text())
    cfg["join"]["max_pending_bytes"] = "1MB"
    config.write_text(yaml.safe_dump(cfg))
    replica = Replica(config, "budget", tmp_path / "state")
    try:
        produce(kafka_bootstrap, topic_names.predictions, "p", n, 3)

        def settled() -> Any:
            s = scrape(replica.port)
            consumed = s.get("stream_fair_events_consumed_total", topic="predictions") or 0
            return s if consumed == n else None

        s = wait_for(settled, 300, f"{n} predictions consumed", interval=1.0)
        evicted = s.get("stream_fair_capacity_evictions_total", topic="predictions") or 0
        pending = s.get("stream_fair_pending_events", topic="predictions") or 0
        # the records went to partitions 0 and 1: their bounds came from the budget
        capacity = s.by("stream_fair_pending_capacity", ["partition"])
        assert evicted > 0 and 0 < capacity[("0",)] + capacity[("1",)] < n, (evicted, capacity)
        # every prediction is accounted for: waiting, or expired early (counted)
        assert (
            pending + (s.get("stream_fair_event_fates_total", topic="predictions", fate="expired") or 0) == n
        )
        assert pending < n / 2, pending
    finally:
        replica.proc.kill()
