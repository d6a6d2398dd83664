"""State benchmark: pending predictions on disk — bytes, RSS, join speed, checkpoints, restores.

Runs the real core (decode, join, counts) on the real local store (RocksDB) with the real
checkpoints (one atomic write batch of the changes every ``--checkpoint-events`` records), and
the real changelog restore against a Kafka-protocol broker (embedded Tansu by default)::

    python bench/state.py                          # 20 million pending; restore with 1 million
    python bench/state.py --pending 2000000 --restore 200000     # quicker

Printed, with the goals of the state issue:

* bytes on disk per pending prediction (uuid4 ids, the default schema; after compaction) — <= 120
* RSS with ``--pending`` predictions waiting — < 600 MB
* join throughput (outcomes joining random pending predictions, plus as many new predictions)
  with ``--pending`` waiting, against the same with ``--small`` (10k) waiting — ratio >= 0.8
* checkpoint time of the same delta (``--checkpoint-events`` new records) at 100k and at
  ``--pending`` waiting — ratio <= 1.5
* restore from the changelog: seconds per million pending predictions (an empty disk, as a new pod)
  and the time from the partition's assignment to its first processed record.

Timings are noisy on shared machines: the ratios are measured in one run, side by side.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, NamedTuple

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stream_fair.app import tuned_collector  # noqa: E402
from stream_fair.config import Config  # noqa: E402
from stream_fair.state.rocks import RocksBackend  # noqa: E402
from stream_fair.tracker import Tracker  # noqa: E402

SEXES, RACES, AGES = ("F", "M"), ("A", "B", "C", "D"), ("18-30", "31-50", "51+")


def rss_mb() -> tuple[float, float]:
    """(current, peak) resident set size of this process in MB."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                name, value = line.split(":")
                fields[name] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


STATE: dict[str, Any] = {}  # state-section overrides from the command line (cache, write buffer)


def core_config(path: Path) -> Config:
    return Config.model_validate(
        {
            "fairness": {"features": ["sex", "race", "age"], "intersections": [["race", "sex"]]},
            "join": {"ttl": "3650d"},
            "state": {"path": str(path), **STATE},
        }
    )


class Stream:
    """Prediction and outcome records with uuid-shaped ids, derived from the record's index.

    Nothing per record is kept (ids are recomputed from their index), and records are formatted
    as bytes directly: the benchmark's own memory stays out of the RSS it reports.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.n = 0  # predictions generated so far
        self.used: set[int] = set()  # indexes whose outcome was sent
        self.ts = 1_700_000_000.0

    def id_of(self, i: int) -> str:
        h = hashlib.blake2b(
            i.to_bytes(8, "little") + self.seed.to_bytes(4, "little"), digest_size=16
        ).hexdigest()
        return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-a{h[17:20]}-{h[20:]}"

    def predictions(self, n: int) -> list[bytes]:
        out, rng = [], self.rng
        for _ in range(n):
            i = self.id_of(self.n)
            self.n += 1
            self.ts += 0.01
            out.append(
                b'{"id":"%s","ts":%.2f,"model":"credit-v3","prediction":%d,"score":%.6f,'
                b'"attributes":{"sex":"%s","race":"%s","age":"%s"}}'
                % (
                    i.encode(),
                    self.ts,
                    rng.getrandbits(1),
                    rng.random(),
                    rng.choice(SEXES).encode(),
                    rng.choice(RACES).encode(),
                    rng.choice(AGES).encode(),
                )
            )
        return out

    def pick_pending(self, k: int, below: int) -> list[int]:
        """``k`` distinct indexes < ``below`` whose outcome was not sent yet."""
        out: list[int] = []
        while len(out) < k:
            i = self.rng.randrange(below)
            if i not in self.used:
                self.used.add(i)
                out.append(i)
        return out

    def outcomes(self, indexes: list[int]) -> list[bytes]:
        self.ts += 0.01
        return [
            b'{"id":"%s","ts":%.2f,"label":%d}' % (self.id_of(i).encode(), self.ts, self.rng.getrandbits(1))
            for i in indexes
        ]


POLL = 1000  # records of one partition and topic per poll (kafka.max_poll_records is 2000)


class Rec(NamedTuple):
    offset: int
    value: bytes
    timestamp: int | None


class Core:
    """The tracker on a local store, checkpointing every ``every`` records as the run loop does."""

    def __init__(self, path: Path, every: int) -> None:
        self.cfg = core_config(path)
        st = self.cfg.state
        self.backend = RocksBackend(
            path, cache_bytes=st.cache_bytes, write_buffer_bytes=st.write_buffer_bytes
        )
        self.tracker = Tracker(self.cfg, self.backend)
        self.every = every
        self.offsets = [0, 0]
        self.since = 0
        self.checkpoint_seconds: list[float] = []

    def records(self, kind: int, raws: list[bytes]) -> list[Rec]:
        """Kafka-like records (offset, value, timestamp) with this topic's next offsets."""
        off = self.offsets[kind]
        self.offsets[kind] = off + len(raws)
        return [Rec(off + i, raw, None) for i, raw in enumerate(raws)]

    def feed(self, kind: int, records: list[Rec]) -> None:
        """As the run loop does: one poll's records of the partition at a time (``POLL``), then a
        checkpoint once ``every`` records were read since the last one."""
        process = self.tracker.process
        for i in range(0, len(records), POLL):
            batch = records[i : i + POLL]
            process(0, kind, batch)
            self.since += len(batch)
            if self.since >= self.every:
                self.checkpoint()

    def checkpoint(self) -> float:
        t0 = time.perf_counter()
        self.tracker.commit(self.tracker.checkpoint())
        dt = time.perf_counter() - t0
        self.checkpoint_seconds.append(dt)
        self.since = 0
        return dt

    @property
    def pending(self) -> int:
        return self.tracker.shards[0].join.pending_predictions

    def close(self) -> None:
        self.backend.close()


def fill(core: Core, stream: Stream, n: int, chunk: int = 200_000) -> float:
    t0 = time.perf_counter()
    done = 0
    while done < n:
        k = min(chunk, n - done)
        core.feed(0, core.records(0, stream.predictions(k)))
        done += k
        if done % 2_000_000 < chunk:
            cur, _ = rss_mb()
            print(
                f"  {done:>11,} pending  rss {cur:6.0f} MB  {done / (time.perf_counter() - t0):8.0f}/s",
                flush=True,
            )
    core.checkpoint()
    return time.perf_counter() - t0


def join_rate(core: Core, stream: Stream, pairs: int) -> tuple[float, float]:
    """Records/s of wall time and of process CPU time (all threads, RocksDB's included):
    ``pairs`` outcomes for random pending predictions, interleaved with as many new predictions
    (the pending count stays put). Generation happens before the clocks start."""
    chunks = []
    for _ in range(pairs // 1000):
        below = stream.n  # only predictions written before this chunk: they are in the store
        preds, outs = stream.predictions(1000), stream.outcomes(stream.pick_pending(1000, below))
        chunks.append((core.records(0, preds), core.records(1, outs)))
    t0, c0 = time.perf_counter(), time.process_time()
    for preds, outs in chunks:
        core.feed(0, preds)
        core.feed(1, outs)
    return 2 * pairs / (time.perf_counter() - t0), 2 * pairs / (time.process_time() - c0)


def checkpoint_time(core: Core, stream: Stream, events: int, repeats: int = 5) -> float:
    """Median seconds of one checkpoint after ``events`` new predictions."""
    times = []
    for _ in range(repeats):
        preds = core.records(0, stream.predictions(events))
        core.since = -len(preds) * 10  # no automatic checkpoint in between
        core.feed(0, preds)
        times.append(core.checkpoint())
    return statistics.median(times)


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.suffix in (".sst", ".log"))


# -- restore from the changelog -----------------------------------------------------------------
def restore_bench(n: int, workdir: Path, bootstrap: str | None) -> dict[str, float]:
    """A replica builds ``n`` pending predictions with the changelog on; a second one on an empty
    disk restores them. Returns seconds per million and assignment → first processed record."""
    from stream_fair.app import Detector
    from stream_fair.dev.broker import EmbeddedBroker, create_topics, produce_events

    broker = None
    if bootstrap is None:
        broker = EmbeddedBroker().start()
        bootstrap = broker.bootstrap_servers
    try:
        tag = uuid.uuid4().hex[:8]
        topics = (f"bench-p-{tag}", f"bench-o-{tag}")
        create_topics(bootstrap, list(topics), partitions=1)
        stream = Stream(seed=7)
        events: list[tuple[str, Any]] = [("prediction", orjson.loads(r)) for r in stream.predictions(n)]
        produce_events(bootstrap, topics[0], topics[1], events)

        def cfg(state: Path) -> Config:
            return Config.model_validate(
                {
                    "kafka": {
                        "bootstrap_servers": bootstrap,
                        "group_id": f"bench-{tag}",
                        "session_timeout_ms": 6000,
                        "heartbeat_interval_ms": 2000,
                        "max_poll_interval_ms": 20000,
                    },
                    "topics": {"predictions": topics[0], "outcomes": topics[1], "dead_letters": None},
                    "fairness": {"features": ["sex", "race", "age"], "intersections": [["race", "sex"]]},
                    "join": {"ttl": "3650d"},
                    "state": {"path": str(state), "checkpoint_events": 50_000},
                    "exporter": {"host": "127.0.0.1", "port": 0},
                    "log_level": "WARNING",
                }
            )

        def run_until(det: Detector, done: Any, timeout: float) -> None:
            stop = threading.Event()
            th = threading.Thread(target=det.run, args=(stop,), daemon=True)
            th.start()
            deadline = time.monotonic() + timeout
            while not done() and time.monotonic() < deadline:
                time.sleep(0.05)
            stop.set()
            th.join(timeout=120)

        a = Detector(cfg(workdir / "a"))
        run_until(
            a, lambda: a._snapshot is not None and a._snapshot.consumed["predictions"] >= n, timeout=3600
        )
        # new records waiting when the second replica starts: the first one processed is the clock
        produce_events(
            bootstrap,
            topics[0],
            topics[1],
            [("outcome", orjson.loads(r)) for r in stream.outcomes(list(range(1000)))],
        )
        b = Detector(cfg(workdir / "b"))
        marks: dict[str, float] = {}
        on_assign = b._on_assign

        def assigned(shards: set[int]) -> None:
            marks.setdefault("assigned", time.perf_counter())
            on_assign(shards)

        b._on_assign = assigned  # type: ignore[method-assign]

        def first_record() -> bool:
            if "first" not in marks and b.stats.records_read["outcomes"] > 0:
                marks["first"] = time.perf_counter()
            return "first" in marks

        t0 = time.perf_counter()
        run_until(b, first_record, timeout=3600)
        restore_s = marks["first"] - marks["assigned"]
        return {
            "pending": float(n),
            "assignment_to_first_record_s": restore_s,
            "restore_s_per_million": restore_s / (n / 1e6),
            "wall_s": time.perf_counter() - t0,
        }
    finally:
        if broker is not None:
            broker.stop()


def main(argv: list[str] | None = None) -> int:
    with tuned_collector():  # the garbage collector as `stream-fair run` sets it
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pending", type=int, default=20_000_000, help="pending predictions for the big store")
    ap.add_argument("--small", type=int, default=10_000, help="pending predictions for the small store")
    ap.add_argument("--pairs", type=int, default=100_000, help="outcomes joined per throughput measure")
    ap.add_argument("--checkpoint-events", type=int, default=50_000, help="records per checkpoint")
    ap.add_argument("--restore", type=int, default=1_000_000, help="pending predictions to restore (0: skip)")
    ap.add_argument("--bootstrap-servers", default=None, help="a Kafka cluster (default: embedded Tansu)")
    ap.add_argument("--workdir", default=None, help="where the stores go (default: a temp dir)")
    ap.add_argument("--cache-bytes", default=None, help="state.cache_bytes (default: the config default)")
    ap.add_argument(
        "--write-buffer-bytes", default=None, help="state.write_buffer_bytes (default: the default)"
    )
    args = ap.parse_args(argv)
    if args.cache_bytes:
        STATE["cache_bytes"] = args.cache_bytes
    if args.write_buffer_bytes:
        STATE["write_buffer_bytes"] = args.write_buffer_bytes
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="sf-state-bench-"))
    print(f"stores in {workdir}; cpu count {os.cpu_count()}; load {os.getloadavg()[0]:.1f}")
    try:
        print(f"\n1) {args.small:,} pending (small store)")
        small_stream, small = Stream(seed=1), Core(workdir / "small", args.checkpoint_events)
        fill(small, small_stream, args.small)
        print(
            f"\n2) {args.pending:,} pending (big store), checkpoint every {args.checkpoint_events:,} records"
        )
        big_stream, big = Stream(seed=2), Core(workdir / "big", args.checkpoint_events)
        # checkpoint cost at 100k pending, measured on the way up
        fill(big, big_stream, 100_000)
        ck_100k = checkpoint_time(big, big_stream, args.checkpoint_events)
        secs = fill(big, big_stream, max(0, args.pending - big.pending))
        print(f"  filled in {secs:.0f} s ({args.pending / secs:,.0f} predictions/s)")
        gc.collect()
        rss, peak = rss_mb()
        ck_big = checkpoint_time(big, big_stream, args.checkpoint_events)
        # throughput side by side, alternating, twice
        rates_small, rates_big = [], []
        for _ in range(3):
            rates_small.append(join_rate(small, small_stream, args.pairs))
            rates_big.append(join_rate(big, big_stream, args.pairs))
        big.checkpoint()
        pending = big.pending
        big.backend.compact()
        big.backend.flush()
        per_pending = disk_bytes(workdir / "big") / pending
        small.close()
        big.close()
        print("\n== results ==")
        print(f"bytes on disk per pending prediction: {per_pending:.0f}          (goal <= 120)")
        print(f"RSS with {pending:,} pending: {rss:.0f} MB (peak {peak:.0f} MB)   (goal < 600 MB)")
        for i, clock in enumerate(("wall", "CPU")):
            rs = statistics.median(r[i] for r in rates_small)
            rb = statistics.median(r[i] for r in rates_big)
            print(
                f"join throughput ({clock} time): {rb:,.0f} records/s with {pending:,} pending vs "
                f"{rs:,.0f} with {args.small:,}: ratio {rb / rs:.2f}   (goal >= 0.8)"
            )
        print(
            f"checkpoint of {args.checkpoint_events:,} records: {ck_big * 1e3:.0f} ms at {pending:,} "
            f"pending vs {ck_100k * 1e3:.0f} ms at 100,000: ratio {ck_big / ck_100k:.2f}   (goal <= 1.5)"
        )
        if args.restore:
            print(f"\n3) restore of {args.restore:,} pending predictions from the changelog (empty disk)")
            res = restore_bench(args.restore, workdir, args.bootstrap_servers)
            print(
                f"restore: {res['restore_s_per_million']:.1f} s per million pending predictions; "
                f"assignment -> first processed record {res['assignment_to_first_record_s']:.1f} s"
            )
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
