"""Transport benchmark: ``stream-fair run`` on each Kafka transport against bare consumers, same run.

One topic pair is filled once (the lending stream, numeric timestamps); then, alternating in every
round and reading the same records:

* a bare kafka-python consumer (with the ``crc32c`` package, a dependency) reads both topics to the
  end by manual assignment, touching each value;
* a bare confluent-kafka consumer does the same;
* ``Detector.run`` (what ``stream-fair run`` calls) consumes them with ``kafka.transport:
  kafka-python``, then with ``kafka.transport: confluent``: a consumer group, assignment callbacks,
  per-poll lag work, dead letters on, the changelog, checkpoints and a ``/metrics`` scrape every
  second from another thread.

Rates count from the first record read to the last (a consumer group's join is not timed). Printed:
each rate in records/s (one replica reads everything), the ratios stream-fair / bare kafka-python
and confluent / kafka-python, and the machine's load. Timings on shared machines are noisy: compare
the ratios, measured in one run.

    python bench/transport.py                  # embedded broker, 100k predictions + outcomes
    python bench/transport.py --predictions 200000 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from contextlib import ExitStack
from pathlib import Path

from stream_fair.app import Detector
from stream_fair.config import Config
from stream_fair.dev import simulate
from stream_fair.dev.broker import FAST_GROUP_CONFIG, EmbeddedBroker, create_topics, produce_events

FEATURES = [{"name": "sex", "reference": "Male"}, {"name": "race", "reference": "White"}, {"name": "age"}]


def config(bootstrap: str, topics: tuple[str, str, str], state_dir: Path, transport: str) -> Config:
    return Config.model_validate(
        {
            "kafka": {
                "bootstrap_servers": bootstrap,
                "group_id": f"bench-{uuid.uuid4().hex[:8]}",
                "transport": transport,
                **FAST_GROUP_CONFIG,
            },
            "topics": {"predictions": topics[0], "outcomes": topics[1], "dead_letters": topics[2]},
            "fairness": {"features": FEATURES, "intersections": [["race", "sex"]]},
            "windows": ["1h", "1d"],
            "join": {"ttl": "7d"},
            "state": {"path": str(state_dir / uuid.uuid4().hex)},
            "exporter": {"host": "127.0.0.1", "port": 0},
        }
    )


def bare_kafka_python(bootstrap: str, topics: tuple[str, str], total: int) -> float:
    from kafka import KafkaConsumer, TopicPartition

    c = KafkaConsumer(
        bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False, max_poll_records=2000
    )
    tps = [TopicPartition(t, p) for t in topics for p in sorted(c.partitions_for_topic(t) or ())]
    c.assign(tps)
    c.seek_to_beginning(*tps)
    seen, first = 0, None
    deadline = time.monotonic() + 600
    while seen < total and time.monotonic() < deadline:
        for records in c.poll(timeout_ms=500, max_records=2000).values():
            first = first or time.perf_counter()
            for r in records:
                _ = r.value
            seen += len(records)
    elapsed = time.perf_counter() - (first or 0.0)
    c.close()
    if seen < total:
        raise RuntimeError(f"kafka-python read {seen} of {total} records")
    return seen / elapsed


def bare_confluent(bootstrap: str, topics: tuple[str, str], total: int, partitions: int) -> float:
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": f"bench-bare-{uuid.uuid4().hex[:6]}",
         "enable.auto.commit": False}
    )  # fmt: skip
    c.assign([TopicPartition(t, p, 0) for t in topics for p in range(partitions)])
    seen, first = 0, None
    deadline = time.monotonic() + 600
    while seen < total and time.monotonic() < deadline:
        messages = c.consume(2000, 0.5)
        if messages:
            first = first or time.perf_counter()
        for m in messages:
            if m.error() is None:
                _ = m.value()
                seen += 1
    elapsed = time.perf_counter() - (first or 0.0)
    c.close()
    if seen < total:
        raise RuntimeError(f"confluent-kafka read {seen} of {total} records")
    return seen / elapsed


def pipeline(cfg: Config, total: int) -> float:
    """Records/s of ``Detector.run`` reading ``total`` records, scraped every second."""
    d = Detector(cfg, exporter_port=0)
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            d.run(stop)
        except BaseException as exc:  # reported below
            errors.append(exc)

    def scrape() -> None:
        while not stop.wait(1.0):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{d.port}/metrics", timeout=10) as r:
                    r.read()
            except OSError:
                pass  # not up yet

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    threading.Thread(target=scrape, daemon=True).start()
    first = last = None
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and not errors:
        n = sum(d.stats.records_read.values())
        if n and first is None:
            first = time.perf_counter()
        if n >= total:
            last = time.perf_counter()
            break
        time.sleep(0.005)
    stop.set()
    thread.join(120)
    if errors:
        raise errors[0]
    if first is None or last is None:
        raise RuntimeError(f"{cfg.kafka.transport}: read {sum(d.stats.records_read.values())} of {total}")
    return total / (last - first)


def load() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bootstrap-servers", help="an existing cluster (default: embedded Tansu)")
    ap.add_argument("--predictions", type=int, default=100_000)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    kinds = ("bare kafka-python", "bare confluent-kafka", "stream-fair kafka-python", "stream-fair confluent")
    rates: dict[str, list[float]] = {k: [] for k in kinds}
    with ExitStack() as stack:
        bootstrap = args.bootstrap_servers or stack.enter_context(EmbeddedBroker()).bootstrap_servers
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        run = uuid.uuid4().hex[:8]
        topics = (f"bench-predictions-{run}", f"bench-outcomes-{run}", f"bench-dead-{run}")
        create_topics(bootstrap, list(topics[:2]), partitions=args.partitions)
        create_topics(bootstrap, [topics[2]], partitions=1)
        events = list(simulate.generate(simulate.SCENARIOS["lending"](), args.predictions, seed=1))
        total = produce_events(bootstrap, topics[0], topics[1], events)
        print(f"filled {topics[0]} / {topics[1]}: {total} records, {args.partitions} partitions")
        print(f"load before: {load()}")
        for i in range(args.rounds):
            rates["bare kafka-python"].append(bare_kafka_python(bootstrap, topics[:2], total))
            rates["bare confluent-kafka"].append(
                bare_confluent(bootstrap, topics[:2], total, args.partitions)
            )
            for name in ("kafka-python", "confluent"):
                rates[f"stream-fair {name}"].append(pipeline(config(bootstrap, topics, tmp, name), total))
            print(f"round {i + 1}: " + "  ".join(f"{k} {v[-1]:,.0f}/s" for k, v in rates.items()), flush=True)
    print()
    for k in kinds:
        print(f"{k:26s}: {statistics.median(rates[k]):>10,.0f} records/s (median of {args.rounds})")

    def ratio(a: str, b: str) -> None:
        per = [x / y for x, y in zip(rates[a], rates[b], strict=True)]
        print(
            f"ratio {a} / {b}: {statistics.median(per):.2f} (per round: {', '.join(f'{r:.2f}' for r in per)})"
        )

    ratio("stream-fair kafka-python", "bare kafka-python")
    ratio("stream-fair confluent", "bare kafka-python")
    ratio("stream-fair confluent", "stream-fair kafka-python")
    ratio("stream-fair confluent", "bare confluent-kafka")
    print(f"load after: {load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
