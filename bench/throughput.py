"""Throughput benchmark: stream-fair's full pipeline against bare kafka-python consumption.

One topic pair is filled once with the same synthetic stream; then, in the same run and
alternating, (a) a bare kafka-python consumer reads both topics to the end, and (b) the same
consumer feeds every record through stream-fair's real processing path (``Detector.process``:
decode, join, count, dead letters) with checkpoints to the SQLite state store at the configured
cadence. The pure core (tracker only, records already in memory) is measured too. Printed: each
rate in records/s and the ratio pipeline / bare (the target is >= 0.8). Timings on shared machines
are noisy: compare the ratio, which is measured in one run.

    python bench/throughput.py                 # embedded broker, 100k predictions + outcomes
    python bench/throughput.py --predictions 200000 --partitions 4 --rounds 3
    python bench/throughput.py --bootstrap-servers kafka:9092
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from kafka import KafkaConsumer, TopicPartition

from stream_fair.app import Detector, _default_feedback
from stream_fair.config import Config
from stream_fair.dev import simulate
from stream_fair.dev.broker import EmbeddedBroker, create_topics, produce_events
from stream_fair.tracker import Tracker
from stream_fair.transport import DeadLetters

FEATURES = [
    {"name": "sex", "reference": "Male"},
    {"name": "race", "reference": "White"},
    {"name": "age"},
]


def config(bootstrap: str, topics: tuple[str, str], state_dir: Path) -> Config:
    return Config.model_validate(
        {
            "kafka": {"bootstrap_servers": bootstrap, "group_id": f"bench-{uuid.uuid4().hex[:6]}"},
            "topics": {"predictions": topics[0], "outcomes": topics[1], "dead_letters": None},
            "fairness": {"features": FEATURES, "intersections": [["race", "sex"]]},
            "windows": ["1h", "1d"],
            "join": {"ttl": "7d"},
            "state": {
                "path": str(state_dir / f"{uuid.uuid4().hex}.db"),
                "checkpoint_interval": "5s",
            },
            "exporter": {"host": "127.0.0.1", "port": 0},
        }
    )


def consume(bootstrap: str, topics: tuple[str, str], total: int, handle: Any = None) -> float:
    """Read ``total`` records from the start of both topics; return records per second."""
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        group_id=None,
        max_poll_records=2000,
        fetch_max_bytes=52428800,
    )
    tps = [TopicPartition(t, p) for t in topics for p in sorted(consumer.partitions_for_topic(t) or [])]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    seen = 0
    start = time.perf_counter()
    deadline = time.monotonic() + 600
    while seen < total and time.monotonic() < deadline:
        batches = consumer.poll(timeout_ms=500, max_records=2000)
        if handle is None:
            for records in batches.values():
                for r in records:
                    _ = r.value  # touch each record, as any consumer would
                seen += len(records)
        else:
            seen += handle(batches)
    elapsed = time.perf_counter() - start
    consumer.close()
    if seen < total:
        raise RuntimeError(f"read {seen} of {total} records")
    return seen / elapsed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bootstrap-servers", help="an existing cluster (default: embedded Tansu)")
    ap.add_argument("--predictions", type=int, default=100_000)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)

    with ExitStack() as stack:
        bootstrap = args.bootstrap_servers or stack.enter_context(EmbeddedBroker()).bootstrap_servers
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        run = uuid.uuid4().hex[:8]
        topics = (f"bench-predictions-{run}", f"bench-outcomes-{run}")
        create_topics(bootstrap, list(topics), partitions=args.partitions)
        scenario = simulate.SCENARIOS["lending"]()
        events = list(simulate.generate(scenario, args.predictions, seed=1))
        t0 = time.perf_counter()
        total = produce_events(bootstrap, *topics, events)
        print(
            f"filled {topics[0]} / {topics[1]}: {total} records, {args.partitions} partitions "
            f"({total / (time.perf_counter() - t0):,.0f} records/s produced)"
        )

        bare, full = [], []
        for i in range(args.rounds):
            bare.append(consume(bootstrap, topics, total))
            cfg = config(bootstrap, topics, tmp)
            detector = Detector(cfg, exporter_port=0)
            detector.attach(_NoCommit(), DeadLetters(cfg))

            def handle(batches: Any, d: Detector = detector) -> int:
                n = d.process(batches)
                d.maybe_checkpoint(time.monotonic())
                return n

            full.append(consume(bootstrap, topics, total, handle))
            detector.checkpoint()
            snap = detector.tracker.snapshot()
            assert snap.fates["outcomes"]["joined"] == args.predictions, snap.fates
            detector.server.stop()
            print(
                f"round {i + 1}: bare {bare[-1]:,.0f}/s  stream-fair {full[-1]:,.0f}/s  "
                f"ratio {full[-1] / bare[-1]:.2f}"
            )

        # the pure core, no Kafka: the same records, already in memory
        core_cfg = config(bootstrap, topics, tmp)
        tracker = Tracker(core_cfg, _default_feedback(core_cfg))
        raws = [(k, __import__("orjson").dumps(p)) for k, p in events]
        start = time.perf_counter()
        offsets = {"prediction": 0, "outcome": 0}
        for kind, raw in raws:
            if kind == "prediction":
                tracker.update_prediction(0, raw, offsets[kind])
            else:
                tracker.update_outcome(0, raw, offsets[kind])
            offsets[kind] += 1
        core = len(raws) / (time.perf_counter() - start)

    ratios = [f / b for f, b in zip(full, bare, strict=True)]
    print()
    print(f"bare kafka-python consumption : {statistics.median(bare):>10,.0f} records/s (median)")
    print(f"stream-fair full pipeline     : {statistics.median(full):>10,.0f} records/s (median)")
    print(f"pure core (no Kafka)          : {core:>10,.0f} records/s")
    print(
        f"ratio pipeline / bare         : {statistics.median(ratios):.2f} (per round: "
        + ", ".join(f"{r:.2f}" for r in ratios)
        + ")"
    )
    return 0


class _NoCommit:
    """The benchmark consumes by manual assignment; there is no group to commit offsets to."""

    def commit(self, offsets: Any = None) -> None:
        pass


if __name__ == "__main__":
    sys.exit(main())
