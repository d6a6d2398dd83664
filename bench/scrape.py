"""Scrape benchmark: what a ``/metrics`` scrape costs next to the bare exposition of the same series,
and what scraping every second costs the consumer.

Part 1 (in process). A real :class:`~stream_fair.app.Detector` state is built by feeding a synthetic
stream through the real code (``Detector.process`` on kafka-python-shaped records, checkpoints to
the RocksDB state), sized to about 15k and 45k exported series. For each size, in the same run and
alternating:

- *scrape*: what ``GET /metrics`` answers (the detector's exposition over its real registry:
  ``FairnessCollector`` and the process collector), after a new snapshot was published (what a
  scrape costs when the state changed since the last one) and with nothing new published (a
  repeated scrape);
- *bare*: ``generate_latest`` over a registry of plain prometheus_client ``Gauge``/``Counter``
  objects holding the very same series (names, label sets, values) parsed from the scrape.

It also measures how long the consumer lock is held per published snapshot and per scrape, and
profiles one scrape (``--profile``).

Part 2 (embedded broker, the real ``Detector.run`` path). The same stream is read to the end by
``stream-fair run``'s loop, once without scrapes and once with a ``/metrics`` scrape every second
from another thread, alternating; printed: records/s and the ratio.

    python bench/scrape.py                   # both parts, 15k and 45k series
    python bench/scrape.py --part scrape --sizes 15k --profile
    python bench/scrape.py --part consume --rounds 3
    python bench/scrape.py --part consume --consume-size 45k --in-process  # report on the consumer

Goals (issue 13): scrape <= 1.5x bare exposition at 15k and 45k series; consumption scraped every
second >= 0.9x unscraped. Timings on shared machines are noisy: compare the ratios, each measured
within one run.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import random
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from stream_fair.app import Detector, tuned_collector
from stream_fair.config import Config

# Sizes: (models, region values). Series grow with models x groups x windows; these two give
# about 15k and 45k series with the config below.
SIZES = {"15k": (1, 21), "45k": (2, 35)}
PARTITIONS = 4


def config(
    state_dir: Path, bootstrap: str = "localhost:9092", topics: tuple[str, str] = ("p", "o")
) -> Config:
    return Config.model_validate(
        {
            "kafka": {
                "bootstrap_servers": bootstrap,
                "group_id": f"bench-scrape-{uuid.uuid4().hex[:6]}",
                "session_timeout_ms": 6000,
                "heartbeat_interval_ms": 2000,
                "max_poll_interval_ms": 10000,
            },
            "topics": {"predictions": topics[0], "outcomes": topics[1], "dead_letters": None},
            "fairness": {
                "features": [
                    {"name": "sex", "reference": "M"},
                    {"name": "race", "reference": "A"},
                    {"name": "region"},
                ],
                "intersections": [["race", "sex"], ["region", "sex"]],
                "cardinality_limit": 50,
                "intersection_cardinality_limit": 100,
            },
            "windows": ["1h", "1d"],
            "join": {"ttl": "1h"},
            "state": {"path": str(state_dir / uuid.uuid4().hex), "changelog": False},
            "exporter": {"host": "127.0.0.1", "port": 0},
        }
    )


def events(
    n: int, models: int, regions: int, seed: int = 1, start: float = 1_790_000_000.0
) -> Iterator[tuple[str, bytes, bytes]]:
    """``(kind, key, value)``: ``n`` scored predictions over ``models`` models and every
    sex x race x region cell, each followed shortly by its outcome (90 % labelled)."""
    rng = random.Random(seed)
    race = "ABCDE"
    late: list[tuple[float, bytes, bytes]] = []
    for i in range(n):
        ts = start + i * 0.05
        key = f"r{i}".encode()
        score = rng.random()
        attrs = {"sex": rng.choice("MF"), "race": rng.choice(race), "region": f"reg{rng.randrange(regions)}"}
        yield (
            "prediction",
            key,
            orjson.dumps(
                {
                    "id": key.decode(),
                    "ts": ts,
                    "model": f"model{i % models}",
                    "prediction": int(score > 0.5),
                    "score": round(score, 4),
                    "attributes": attrs,
                }
            ),
        )
        if rng.random() < 0.9:
            label = int(rng.random() < score)
            late.append((ts + 1.0, key, orjson.dumps({"id": key.decode(), "ts": ts + 1.0, "label": label})))
        while late and late[0][0] <= ts:
            _, k, v = late.pop(0)
            yield "outcome", k, v
    for _, k, v in late:
        yield "outcome", k, v


@dataclass
class _TP:
    topic: str
    partition: int

    def __hash__(self) -> int:
        return hash((self.topic, self.partition))


@dataclass
class _Record:
    offset: int
    key: bytes
    value: bytes
    timestamp: int = 0
    timestamp_type: int = 0


class _NoCommit:
    def commit(self, offsets: Any = None) -> None:  # the transport protocol's offset mirror
        pass


class _NoDeadLetters:
    sent: dict[str, int] = {}  # noqa: RUF012
    errors: dict[str, int] = {}  # noqa: RUF012
    pending = 0
    backlogged = False

    def send(self, *args: Any) -> None:
        pass

    def settle(self, timeout: float) -> set[int]:
        return set()

    def state(self, i: int) -> dict[str, list[int]]:
        return {"sent": [0, 0], "errors": [0, 0]}


class Feeder:
    """A detector fed through ``Detector.process`` (kafka-python-shaped records, four partitions)
    and checkpointed to its RocksDB state, as the run loop does."""

    def __init__(self, state_dir: Path, models: int, regions: int) -> None:
        cfg = config(state_dir)
        self.detector = d = Detector(cfg, exporter_port=0)
        d.attach(_NoCommit(), _NoDeadLetters())
        self._topics = (cfg.topics.predictions, cfg.topics.outcomes)
        self._events = events(10**9, models, regions)
        self._offsets = [[0, 0] for _ in range(PARTITIONS)]

    def feed(self, n: int) -> None:
        """Process the next ``n`` records (in polls of 2,000), then checkpoint (which publishes)."""
        d = self.detector
        batch: dict[_TP, list[_Record]] = {}
        for _ in range(n):
            kind, key, value = next(self._events)
            role = 0 if kind == "prediction" else 1
            p = int.from_bytes(key[-2:], "big") % PARTITIONS
            tp = _TP(self._topics[role], p)
            batch.setdefault(tp, []).append(_Record(self._offsets[p][role], key, value))
            self._offsets[p][role] += 1
            if sum(len(r) for r in batch.values()) >= 2000:
                d.process(batch)
                batch = {}
        d.process(batch)
        d.checkpoint()


def built_detector(state_dir: Path, models: int, regions: int, n: int) -> Detector:
    """A detector whose state holds about ``n`` predictions and their outcomes."""
    f = Feeder(state_dir, models, regions)
    f.feed(2 * n)
    return f.detector


def bare_registry(text: bytes) -> CollectorRegistry:
    """Plain ``Gauge``/``Counter`` objects holding the series of a scrape (same names, labels, values)."""
    disable_created_metrics()  # the scrape has no *_created series either
    reg = CollectorRegistry(auto_describe=False)
    for fam in text_string_to_metric_families(text.decode()):
        if not fam.samples or fam.name.startswith("process_"):
            continue
        labelnames = sorted({k for s in fam.samples for k in s.labels})
        if fam.type == "counter":
            metric: Any = Counter(fam.name, fam.documentation or fam.name, labelnames, registry=reg)
            for s in fam.samples:
                if s.name.endswith("_total"):
                    target = metric.labels(**s.labels) if labelnames else metric
                    target.inc(s.value)
        else:
            metric = Gauge(fam.name, fam.documentation or fam.name, labelnames, registry=reg)
            for s in fam.samples:
                (metric.labels(**s.labels) if labelnames else metric).set(s.value)
    return reg


def series(text: bytes) -> int:
    return sum(1 for line in text.splitlines() if line and not line.startswith(b"#"))


def timed(fn: Any, repeat: int) -> list[tuple[float, float]]:
    """(wall, CPU of this thread) seconds per call: the CPU time does not count other processes'
    load, which on a shared machine moves wall times by 2x from one minute to the next."""
    out = []
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.thread_time()
        fn()
        out.append((time.perf_counter() - t0, time.thread_time() - c0))
    return out


def median(xs: list[tuple[float, float]], i: int) -> float:
    return statistics.median(x[i] for x in xs)


class LockTimer:
    """Wraps the detector's consumer lock and records how long each hold lasted."""

    def __init__(self, lock: Any) -> None:
        self._lock = lock
        self.holds: list[float] = []
        self._t = 0.0

    def __enter__(self) -> LockTimer:
        self._lock.acquire()
        self._t = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.holds.append(time.perf_counter() - self._t)
        self._lock.release()

    def acquire(self, *a: Any, **k: Any) -> bool:
        return self._lock.acquire(*a, **k)

    def release(self) -> None:
        self._lock.release()


def scrape_part(sizes: list[str], rounds: int, profile: bool, n: int) -> dict[str, dict[str, float]]:
    # the garbage collector as `stream-fair run` sets it (the scrapes run in its process), for the
    # scrape and the bare exposition alike
    with tuned_collector():
        return _scrape_part(sizes, rounds, profile, n)


def _scrape_part(sizes: list[str], rounds: int, profile: bool, n: int) -> dict[str, dict[str, float]]:
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            models, regions = SIZES[size]
            t0 = time.perf_counter()
            feeder = Feeder(Path(tmp), models, regions)
            feeder.feed(2 * n)
            d = feeder.detector
            render = d.server.exposition.render  # what GET /metrics answers
            text = render()
            build_s = time.perf_counter() - t0
            # the same text as prometheus_client's own exposition (process_* values move between the two)
            same = generate_latest(d.server.exposition._registry)
            assert _without_process(text) == _without_process(same), "the exposition differs"
            bare = bare_registry(text)
            assert series(generate_latest(bare)) >= series(text) - _process_series(text), "bare lost series"
            lock = LockTimer(d.lock)
            d.lock = lock  # type: ignore[assignment]
            cold, warm, plain, publish = [], [], [], []
            for _ in range(rounds):
                # one second of a 5k events/s stream, checkpointed: new counts in most groups
                feeder.feed(5000)
                publish.append(lock.holds[-1])  # the last hold: the commit that published the snapshot
                lock.holds.clear()
                cold += timed(render, 1)
                warm += timed(render, 1)
                plain += timed(partial(generate_latest, bare), 1)
            scrape_holds = list(lock.holds)
            if profile:
                feeder.feed(5000)
                prof = cProfile.Profile()
                prof.enable()
                render()
                prof.disable()
                s = io.StringIO()
                pstats.Stats(prof, stream=s).sort_stats(os.environ.get("SORT", "cumulative")).print_stats(45)
                print(s.getvalue())
            cache = d._report_cache.calibration
            row = {
                "series": float(series(text)),
                "scrape_new": median(cold, 0),
                "scrape_new_cpu": median(cold, 1),
                "scrape_repeat": median(warm, 0),
                "bare": median(plain, 0),
                "bare_cpu": median(plain, 1),
                "publish_lock": statistics.median(publish),  # commit + publish
                "scrape_lock": max(scrape_holds, default=0.0),
            }
            out[size] = row
            print(
                f"{size}: {row['series']:,.0f} series (state built in {build_s:.0f} s)\n"
                f"  scrape after a new snapshot {row['scrape_new'] * 1e3:.0f} ms "
                f"(CPU {row['scrape_new_cpu'] * 1e3:.0f} ms), repeated {row['scrape_repeat'] * 1e3:.0f} ms; "
                f"bare exposition {row['bare'] * 1e3:.0f} ms (CPU {row['bare_cpu'] * 1e3:.0f} ms)\n"
                f"  ratio scrape / bare: {row['scrape_new'] / row['bare']:.2f} wall, "
                f"{row['scrape_new_cpu'] / row['bare_cpu']:.2f} CPU (goal <= 1.5); repeated "
                f"{row['scrape_repeat'] / row['bare']:.2f}\n"
                f"  consumer lock held {row['publish_lock'] * 1e3:.1f} ms per checkpoint commit (publishes "
                f"the snapshot), {row['scrape_lock'] * 1e3:.1f} ms at most per scrape; calibrations reused "
                f"{cache.hits} of {cache.hits + cache.misses}"
            )
            d.server.stop()
            d.close()
    return out


def _without_process(text: bytes) -> list[bytes]:
    return [line for line in text.splitlines() if not line.startswith((b"process_", b"# HELP process_"))]


def _process_series(text: bytes) -> int:
    return sum(1 for line in text.splitlines() if line.startswith(b"process_"))


# -- part 2: consumption with and without scrapes ---------------------------------------------------
def consume_part(
    rounds: int, size: str, n: int, bootstrap: str | None, in_process: bool = False
) -> dict[str, float]:
    from stream_fair.dev.broker import EmbeddedBroker, create_topics, produce_events

    models, regions = SIZES[size]
    with ExitStack() as stack:
        boot = bootstrap or stack.enter_context(EmbeddedBroker()).bootstrap_servers
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        run = uuid.uuid4().hex[:8]
        topics = (f"bench-scrape-p-{run}", f"bench-scrape-o-{run}")
        create_topics(boot, list(topics), partitions=PARTITIONS)
        evs = [(k, v) for k, _, v in events(n, models, regions)]
        total = produce_events(boot, *topics, evs)
        print(f"filled {topics[0]} / {topics[1]}: {total} records, {PARTITIONS} partitions")
        plain, scraped = [], []
        for i in range(rounds):
            plain.append(_run_once(boot, topics, tmp, total, None, in_process)[0])
            rate, scrapes, scrape_s = _run_once(boot, topics, tmp, total, 1.0, in_process)
            scraped.append(rate)
            print(
                f"round {i + 1}: unscraped {plain[-1]:,.0f} records/s, scraped every 1 s {scraped[-1]:,.0f} "
                f"records/s ({scrapes} scrapes, median {scrape_s * 1e3:.0f} ms): "
                f"ratio {scraped[-1] / plain[-1]:.2f}"
            )
    ratios = [s / p for s, p in zip(scraped, plain, strict=True)]
    return {
        "plain": statistics.median(plain),
        "scraped": statistics.median(scraped),
        "ratio": statistics.median(ratios),
    }


def _run_once(
    bootstrap: str,
    topics: tuple[str, str],
    tmp: Path,
    total: int,
    scrape_every: float | None,
    in_process: bool = False,
) -> tuple[float, int, float]:
    """Run ``Detector.run`` until every record is accounted for; records/s from the first record read."""
    cfg = config(tmp, bootstrap, topics)
    exporter = cfg.exporter.model_copy(update={"report_process": not in_process})
    cfg = cfg.model_copy(update={"exporter": exporter})
    d = Detector(cfg)
    stop = threading.Event()
    t = threading.Thread(target=d.run, args=(stop,), daemon=True)
    t.start()
    durations: list[float] = []
    first_read = threading.Event()
    done = threading.Event()

    def scraper() -> None:  # from another thread, as Prometheus would: never delays the end check
        first_read.wait()
        while not done.is_set():
            t0 = time.perf_counter()
            with urllib.request.urlopen(f"http://127.0.0.1:{d.port}/metrics", timeout=60) as r:
                r.read()
            durations.append(time.perf_counter() - t0)
            done.wait(max(0.0, scrape_every - durations[-1]))  # type: ignore[operator]

    scraping = threading.Thread(target=scraper, daemon=True)
    if scrape_every is not None:
        scraping.start()
    started: float | None = None
    deadline = time.monotonic() + 900
    try:
        while time.monotonic() < deadline:  # the end is checked every 10 ms in both modes
            read = sum(d.stats.records_read.values())
            if started is None and read:
                started = time.perf_counter()
                first_read.set()
            snap = d._snapshot
            if snap is not None and sum(snap.consumed.values()) >= total:
                break
            time.sleep(0.01)
        else:
            raise RuntimeError("the detector did not finish in time")
        elapsed = time.perf_counter() - (started or time.perf_counter())
    finally:
        done.set()
        first_read.set()
        if scrape_every is not None:
            scraping.join(60)
        stop.set()
        t.join(60)
    return total / elapsed, len(durations), statistics.median(durations) if durations else 0.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("scrape", "consume", "both"), default="both")
    ap.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=sorted(SIZES))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--predictions", type=int, default=60_000, help="state size of part 1")
    ap.add_argument("--consume-predictions", type=int, default=200_000)
    ap.add_argument(
        "--in-process",
        action="store_true",
        help="part 2 with exporter.report_process: false (the report built on the consumer's process)",
    )
    ap.add_argument("--consume-size", choices=sorted(SIZES), default="15k")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--bootstrap-servers", help="an existing cluster (default: embedded Tansu)")
    args = ap.parse_args(argv)
    if args.part in ("scrape", "both"):
        scrape_part(args.sizes, args.rounds, args.profile, args.predictions)
    if args.part in ("consume", "both"):
        r = consume_part(
            args.rounds, args.consume_size, args.consume_predictions, args.bootstrap_servers, args.in_process
        )
        print(
            f"consumption: unscraped {r['plain']:,.0f} records/s, scraped every 1 s {r['scraped']:,.0f} "
            f"records/s, ratio {r['ratio']:.2f} (goal >= 0.9)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
