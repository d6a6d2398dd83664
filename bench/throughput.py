"""Throughput benchmark: the real ``stream-fair run`` path against bare Kafka consumers, same run.

Two modes:

``--core`` (no broker): the in-process core per record, timed through the run loop's own calls
(``Detector.process`` of kafka-python-shaped polls, ``Detector.maybe_checkpoint`` at the default
cadence with the RocksDB state, the feedback monitor, histograms, label windows, the model-wide
verdict's increments, dead letters handed to a sink). The Kafka writes of a checkpoint
(changelog, increments) go to sinks that acknowledge at once. Printed per timestamp format:
numeric, ISO-8601, and a messy mix (both formats, duplicates, early outcomes, malformed records).

default (end to end): one topic pair is filled once with the messy mix (half the timestamps
ISO-8601, malformed records that become dead letters); then, in the same run and alternating,

* bare kafka-python consumers read both topics to the end, with kafka-python's pure-Python
  CRC32C check and with the ``crc32c`` package (a dependency of stream-fair), each in a
  subprocess so the toggle is real;
* a bare confluent-kafka consumer reads them;
* ``Detector.run`` (what ``stream-fair run`` calls) consumes them by consumer group, with
  assignment callbacks, per-poll lag work, dead letters on, the changelog and checkpoints, and
  a ``/metrics`` scrape every second from another thread.

Rates count from the first record read to the last (a consumer group's join is not timed).
Printed: each rate, the ratios to each baseline, and the machine's load (``uptime``). Timings on
shared machines are noisy: compare the ratios, measured in one run.

    python bench/throughput.py                 # embedded broker, 100k predictions + outcomes
    python bench/throughput.py --core          # in-process core, no broker
    python bench/throughput.py --predictions 200000 --partitions 4 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
import zlib
from collections.abc import Iterator
from contextlib import ExitStack, nullcontext
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

import orjson

from stream_fair.app import Detector, tuned_collector
from stream_fair.config import Config
from stream_fair.dev import simulate

FEATURES = [
    {"name": "sex", "reference": "Male"},
    {"name": "race", "reference": "White"},
    {"name": "age"},
]
FORMATS = ("numeric", "iso", "mixed")
FAST_KAFKA = {"session_timeout_ms": 6000, "heartbeat_interval_ms": 2000, "max_poll_interval_ms": 10000}


# -- the stream ------------------------------------------------------------------------------------
def iso(ts: float) -> str:
    """``2026-09-21T14:13:20.474000Z``: the README's timestamp format."""
    return datetime.fromtimestamp(ts, timezone.utc).isoformat().replace("+00:00", "Z")


def stream(n: int, fmt: str, seed: int = 1) -> list[tuple[str, bytes, bytes | None]]:
    """``(kind, value, key)`` in arrival order. ``mixed``: :func:`simulate.messy` with half the
    timestamps ISO-8601 (chosen by id, so a duplicate repeats its original's format)."""
    events: Iterator[tuple[str, Any]] = simulate.generate(simulate.SCENARIOS["lending"](), n, seed=seed)
    if fmt == "mixed":
        events = simulate.messy(events, seed=seed)
    out = []
    for kind, payload in events:
        if isinstance(payload, bytes):
            out.append((kind, payload, None))
            continue
        eid = str(payload.get("id", ""))
        ts = payload.get("ts")
        if isinstance(ts, float | int) and (
            fmt == "iso" or (fmt == "mixed" and zlib.crc32(eid.encode()) & 1)
        ):
            payload = {**payload, "ts": iso(float(ts))}
        out.append((kind, orjson.dumps(payload), eid.encode() or None))
    return out


# -- the in-process core ---------------------------------------------------------------------------
class TP(NamedTuple):
    topic: str
    partition: int


class Record(NamedTuple):  # the fields of kafka-python's ConsumerRecord that stream-fair reads
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None


def polls(
    events: list[tuple[str, bytes, bytes | None]], topics: tuple[str, str], partitions: int, size: int
) -> list[dict[TP, list[Record]]]:
    """The events as kafka-python would hand them out: ``size`` records per poll, by partition."""
    offsets: dict[TP, int] = {}
    out: list[dict[TP, list[Record]]] = []
    batch: dict[TP, list[Record]] = {}
    n = 0
    now = int(time.time() * 1000)
    for i, (kind, value, key) in enumerate(events):
        p = zlib.crc32(key) % partitions if key is not None else i % partitions
        tp = TP(topics[0] if kind == "prediction" else topics[1], p)
        off = offsets.get(tp, 0)
        offsets[tp] = off + 1
        batch.setdefault(tp, []).append(Record(off, now, key, value))
        n += 1
        if n == size:
            out.append(batch)
            batch, n = {}, 0
    if batch:
        out.append(batch)
    return out


class _Sink:
    """Stands in for the Kafka writers of a checkpoint (changelog, increments, dead letters):
    everything is acknowledged at once, so the core's own work is what is timed."""

    sent: dict[str, int]
    errors: dict[str, int]
    pending = 0
    backlogged = False
    timeout = 5.0

    def __init__(self) -> None:
        self.sent, self.errors, self.letters, self._offset = {}, {}, 0, 0

    # dead letters
    def send(self, *args: Any) -> None:
        self.letters += 1

    def settle(self, timeout: float) -> set[int]:
        return set()

    def state(self, shard: int) -> dict[str, list[int]]:
        return {"sent": [0, 0], "errors": [0, 0]}

    # changelog writer
    def flush(self) -> None:
        pass

    def send_meta(self, *args: Any) -> int:
        self._offset += 1
        return self._offset

    def offset(self, future: int) -> int:
        return future

    # increments publisher
    def publish(self, messages: list[Any]) -> bool:
        return True

    # consumer
    def commit(self, offsets: Any = None) -> None:  # the transport protocol's offset mirror
        pass


class _ChangelogSink(_Sink):
    def send(self, *args: Any) -> None:  # (partition, records, epoch)
        pass


def core_config(
    state_dir: Path, topics: tuple[str, str] = ("p", "o"), changelog: bool = True, **kafka: Any
) -> Config:
    return Config.model_validate(
        {
            "kafka": {"group_id": f"bench-{uuid.uuid4().hex[:6]}", **kafka},
            "topics": {"predictions": topics[0], "outcomes": topics[1], "dead_letters": f"{topics[0]}-dlq"},
            "fairness": {"features": FEATURES, "intersections": [["race", "sex"]]},
            "windows": ["1h", "1d"],
            "join": {"ttl": "7d"},
            "state": {"path": str(state_dir / uuid.uuid4().hex), "changelog": changelog},
            "exporter": {"host": "127.0.0.1", "port": 0},
        }
    )


def core(n: int, partitions: int, poll_size: int, rounds: int, tuned_gc: bool = True) -> dict[str, float]:
    """Microseconds of CPU per record of the in-process core, per timestamp format: the best of
    ``rounds`` (as ``timeit`` reports; the process's CPU time, RocksDB's threads included, is what
    a shared machine's load distorts least, and the least disturbed round is the best estimate of
    the cost itself); the median and the wall time are printed too."""
    out = {}
    inputs = {fmt: polls(stream(n, fmt), ("p", "o"), partitions, poll_size) for fmt in FORMATS}
    times: dict[str, list[float]] = {fmt: [] for fmt in FORMATS}
    walls: dict[str, list[float]] = {fmt: [] for fmt in FORMATS}
    facts: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(rounds + 1):  # round 0 warms up (imports, caches); formats interleave
            for fmt in FORMATS:
                batches = inputs[fmt]
                d = Detector(core_config(Path(tmp)), exporter_port=0)
                d.model_wide = True  # as in the run loop: partitions count the model-wide verdict
                sink = _Sink()
                d.attach(sink, sink, _ChangelogSink())
                d._publisher = sink
                # as in the run loop: the garbage collector tuned (unless --python-gc)
                with tuned_collector() if tuned_gc else nullcontext():
                    start, cpu = time.perf_counter(), time.process_time()
                    for b in batches:
                        d.process(b)
                        d.maybe_checkpoint(time.monotonic())
                    d.checkpoint()
                    cpu_end, wall_end = time.process_time(), time.perf_counter()
                if i:
                    times[fmt].append(cpu_end - cpu)
                    walls[fmt].append(wall_end - start)
                assert d.tracker is not None
                f = d.tracker.snapshot().fates
                rejected = f["predictions"]["rejected"] + f["outcomes"]["rejected"]
                facts[fmt] = (
                    f"joined {f['outcomes']['joined']}, rejected {rejected}, dead letters {sink.letters}"
                )
                d.server.stop()
                d.close()
    for fmt in FORMATS:
        total = sum(len(r) for b in inputs[fmt] for r in b.values())
        out[fmt] = min(times[fmt]) / total * 1e6
        print(
            f"core {fmt:8s}: {out[fmt]:5.2f} us CPU/record (best of {rounds}; median "
            f"{statistics.median(times[fmt]) / total * 1e6:.2f}), "
            f"wall best {min(walls[fmt]) / total * 1e6:5.2f} us "
            f"({total} records; {facts[fmt]})"
        )
    return out


# -- end to end ------------------------------------------------------------------------------------
BARE = """
import sys, time
if sys.argv[1] == "kafka-python-nocrc":
    sys.modules["crc32c"] = None  # kafka-python then uses its pure-Python CRC32C
topics, total = sys.argv[3].split(","), int(sys.argv[4])
if sys.argv[1] == "confluent-kafka":
    from confluent_kafka import Consumer, TopicPartition
    c = Consumer({"bootstrap.servers": sys.argv[2], "group.id": "bare", "enable.auto.commit": False,
                  "auto.offset.reset": "earliest"})
    meta = c.list_topics(timeout=10)
    c.assign([TopicPartition(t, p, 0) for t in topics for p in meta.topics[t].partitions])
    seen, first = 0, None
    while seen < total:
        for m in c.consume(num_messages=2000, timeout=0.5):
            if m.error() is None:
                _ = m.value()
                seen += 1
        if first is None and seen:
            first, at = time.perf_counter(), seen
    end = time.perf_counter()
    c.close()
else:
    from kafka import KafkaConsumer, TopicPartition
    c = KafkaConsumer(bootstrap_servers=sys.argv[2], enable_auto_commit=False, group_id=None,
                      max_poll_records=2000, fetch_max_bytes=52428800)
    tps = [TopicPartition(t, p) for t in topics for p in sorted(c.partitions_for_topic(t) or [])]
    c.assign(tps)
    c.seek_to_beginning(*tps)
    seen, first = 0, None
    while seen < total:
        for records in c.poll(timeout_ms=500, max_records=2000).values():
            for r in records:
                _ = r.value
            seen += len(records)
        if first is None and seen:
            first, at = time.perf_counter(), seen
    end = time.perf_counter()
    c.close()
print((seen - at) / (end - first))
"""


def bare(kind: str, bootstrap: str, topics: tuple[str, str], total: int) -> float:
    """Records/s of a bare consumer reading both topics to the end (in its own process)."""
    res = subprocess.run(
        [sys.executable, "-c", BARE, kind, bootstrap, ",".join(topics), str(total)],
        capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    if res.returncode != 0:
        raise RuntimeError(f"{kind} baseline failed: {res.stderr.strip()[-400:]}")
    return float(res.stdout.strip().splitlines()[-1])


def pipeline(cfg: Config, total: int, scrape_every: float | None = 1.0) -> tuple[float, int]:
    """Records/s of ``Detector.run`` reading ``total`` records, scraped every ``scrape_every``
    seconds (None: never); and the number of scrapes."""
    d = Detector(cfg)
    stop = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            d.run(stop)
        except BaseException as exc:  # noqa: BLE001 - reported below
            failure.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    scrapes = [0]

    def scrape() -> None:
        while scrape_every is not None and not stop.is_set():
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{d.port}/metrics", timeout=30).read()
                scrapes[0] += 1
            except OSError:
                pass
            stop.wait(scrape_every)

    scraper = threading.Thread(target=scrape, daemon=True)
    scraper.start()
    read = d.stats.records_read
    deadline = time.monotonic() + 900
    first = None
    at = 0
    while time.monotonic() < deadline and not failure:
        seen = read["predictions"] + read["outcomes"]
        if first is None and seen:
            first, at = time.perf_counter(), seen
        if seen >= total:
            break
        time.sleep(0.002)
    end = time.perf_counter()
    stop.set()
    thread.join(60)
    scraper.join(60)
    if failure:
        raise failure[0]
    seen = read["predictions"] + read["outcomes"]
    if seen < total or first is None:
        raise RuntimeError(f"read {seen} of {total} records")
    return (total - at) / (end - first), scrapes[0]


def load() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "(uptime unavailable)"


def end_to_end(args: argparse.Namespace) -> None:
    from stream_fair.dev.broker import EmbeddedBroker, create_topics, produce_events

    with ExitStack() as stack:
        bootstrap = args.bootstrap_servers or stack.enter_context(EmbeddedBroker()).bootstrap_servers
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        run = uuid.uuid4().hex[:8]
        topics = (f"bench-predictions-{run}", f"bench-outcomes-{run}")
        create_topics(bootstrap, [*topics, f"{topics[0]}-dlq"], partitions=args.partitions)
        events = stream(args.predictions, "mixed")
        t0 = time.perf_counter()
        total = produce_events(
            bootstrap, *topics, [(k, orjson.loads(v) if key is not None else v) for k, v, key in events]
        )
        print(
            f"filled {topics[0]} / {topics[1]}: {total} records (half the timestamps ISO-8601, "
            f"duplicates, early outcomes, malformed records), {args.partitions} partitions "
            f"({total / (time.perf_counter() - t0):,.0f} records/s produced)"
        )
        kinds = ("kafka-python-nocrc", "kafka-python", "confluent-kafka")
        variants = {"stream-fair": (True, 1.0)}  # name: (changelog, scrape interval)
        if args.variants:
            variants |= {"stream-fair-unscraped": (True, None), "stream-fair-no-changelog": (False, 1.0)}
        rates: dict[str, list[float]] = {k: [] for k in (*kinds, *variants)}
        for i in range(args.rounds):
            print(f"round {i + 1}: {load()}")
            for kind in kinds:
                rates[kind].append(bare(kind, bootstrap, topics, total))
            for name, (changelog, every) in variants.items():
                kafka = {"bootstrap_servers": bootstrap, "transport": args.transport, **FAST_KAFKA}
                cfg = core_config(tmp, topics, changelog, **kafka)
                rate, scrapes = pipeline(cfg, total, every)
                rates[name].append(rate)
            print(
                "  " + "  ".join(f"{k} {v[-1]:,.0f}/s" for k, v in rates.items())
                + f"  ({scrapes} scrapes)"
            )  # fmt: skip
    med = {k: statistics.median(v) for k, v in rates.items()}
    print()
    labels = {
        "kafka-python-nocrc": "bare kafka-python, pure-Python CRC32C",
        "kafka-python": "bare kafka-python + crc32c",
        "confluent-kafka": "bare confluent-kafka",
        "stream-fair": f"stream-fair run ({args.transport}, scraped every 1 s)",
        "stream-fair-unscraped": "  the same, never scraped",
        "stream-fair-no-changelog": "  the same, scraped, state.changelog off",
    }
    for k, label in labels.items():
        if k not in med:
            continue
        print(f"{label:40s}: {med[k]:>10,.0f} records/s (median of {args.rounds})")
    sf = rates["stream-fair"]
    for k in kinds:
        ratios = [a / b for a, b in zip(sf, rates[k], strict=True)]
        print(
            f"ratio stream-fair / {k:20s}: {statistics.median(ratios):.2f} (per round: "
            + ", ".join(f"{r:.2f}" for r in ratios) + ")"
        )  # fmt: skip
    print(f"load after the run: {load()}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--core", action="store_true", help="the in-process core only (no broker)")
    ap.add_argument("--bootstrap-servers", help="an existing cluster (default: embedded Tansu)")
    ap.add_argument("--predictions", type=int, default=100_000)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--transport", choices=("kafka-python", "confluent"), default="kafka-python",
        help="kafka.transport of the stream-fair runs (end to end)",
    )  # fmt: skip
    ap.add_argument(
        "--python-gc", action="store_true",
        help="--core: Python's default garbage collector settings instead of the run loop's",
    )  # fmt: skip
    ap.add_argument("--poll-size", type=int, default=2000, help="records per poll (--core)")
    ap.add_argument(
        "--variants", action="store_true",
        help="also run stream-fair unscraped and with state.changelog off (where the time goes)",
    )  # fmt: skip
    args = ap.parse_args(argv)
    print(load())
    if args.core:
        from stream_fair import transport  # noqa: F401 - imported by the first poll: not timed

        core(args.predictions, args.partitions, args.poll_size, args.rounds, not args.python_gc)
        print(load())
    else:
        end_to_end(args)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
