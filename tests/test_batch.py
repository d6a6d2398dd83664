"""The batch hot path (``Tracker.process``) equals record-by-record processing, on messy input.

What a record does to the state is pinned elsewhere against independent computations
(test_tracker, test_join, test_event_time, test_decode); this test pins that batching is invisible:
decoding a poll at once (one wall-clock reading per poll), the batched id lookup, and offsets,
consumed counts and resume marks set once per batch.

Two trackers over their own RocksDB stores read the same records: one a poll at a time (random poll
sizes, several partitions, polls interleaving the topics), the other one record at a time through
``update_prediction`` / ``update_outcome``. After every poll both are checkpointed; the checkpoints
(store writes, changelog records, metas, increments), the rejections (the dead letters), the
committed views (fates, counts, histograms, label windows) and the feedback monitor's state must be
identical. The input mixes numeric and ISO-8601 timestamps (with and without a zone, a numeric
string), duplicates, early outcomes, malformed records, implausible and far-jumping timestamps,
and a join capacity small enough to evict.
"""

from __future__ import annotations

import random
import tempfile
import zlib
from datetime import datetime, timedelta, timezone
from typing import Any, NamedTuple

import orjson
import pytest

from stream_fair.app import _default_feedback
from stream_fair.config import Config
from stream_fair.dev import simulate
from stream_fair.state.rocks import RocksBackend
from stream_fair.tracker import Tracker
from stream_fair.verdict.settings import VerdictSettings


class Rec(NamedTuple):
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None


def _iso(ts: float, style: int) -> str:
    d = datetime.fromtimestamp(ts, timezone.utc)
    if style == 0:
        return d.isoformat().replace("+00:00", "Z")
    if style == 1:  # another zone
        return d.astimezone(timezone(timedelta(hours=2))).isoformat()
    if style == 2:  # no zone: UTC
        return d.replace(tzinfo=None).isoformat()
    return repr(ts)  # a number in a string


def messy_records(seed: int, n: int, partitions: int) -> list[tuple[int, int, Rec]]:
    """``(partition, topic, record)`` in arrival order."""
    rng = random.Random(seed)
    events = simulate.messy(
        simulate.generate(simulate.SCENARIOS["lending"](), n, seed=seed, rate_per_s=0.05),
        seed=seed, duplicate_rate=0.05, malformed_rate=0.03, early_outcome_rate=0.1,
    )  # fmt: skip
    out: list[tuple[int, int, Rec]] = []
    offsets: dict[tuple[int, int], int] = {}
    for kind, payload in events:
        topic = 0 if kind == "prediction" else 1
        if isinstance(payload, dict):
            payload = dict(payload)
            ts = payload.get("ts")
            roll = rng.random()
            if isinstance(ts, float | int):
                if roll < 0.4:
                    payload["ts"] = _iso(float(ts), rng.randrange(4))
                elif roll < 0.41:
                    payload["ts"] = float(ts) + 400 * 86400 * 365  # beyond the wall clock: rejected
                elif roll < 0.43:
                    payload["ts"] = float(ts) + rng.choice([3, 30]) * 86400  # a far jump ahead
                elif roll < 0.44:
                    payload.pop("ts")
            key = str(payload.get("id", "")).encode()
            value: bytes | None = orjson.dumps(payload)
            if rng.random() < 0.005:
                value = None  # a tombstone
            elif rng.random() < 0.005:
                value = b"[1, 2]"  # JSON, not an object
        else:
            key, value = None, payload
        p = (zlib.crc32(key) if key else rng.randrange(partitions)) % partitions
        off = offsets.get((p, topic), 0)
        offsets[(p, topic)] = off + 1
        out.append((p, topic, Rec(off, 1_790_000_000_000 + len(out), key, value)))
    return out


def config(tmp: str) -> Config:
    return Config.model_validate(
        {
            "fairness": {"features": ["sex", "race", "age"], "intersections": [["race", "sex"]]},
            "windows": ["1h", "1d"],
            "join": {"ttl": "6h", "max_pending": 60},
            "event_time": {"allowed_skew": "1h", "confirmations": 3},
            "schema": {"missing_timestamp": "use_kafka_timestamp"},
            "state": {"path": tmp},
        }
    )


def tracker(tmp: str) -> Tracker:
    cfg = config(tmp)
    feedback = _default_feedback(cfg)
    return Tracker(cfg, RocksBackend(tmp), feedback, verdict=VerdictSettings(period=3600.0, slot=600.0))


def _checkpoint(t: Tracker) -> list[Any]:
    cp = t.checkpoint()
    out = []
    for sc in cp.shards:
        meta = {k: v for k, v in sc.meta.items() if k not in ("wall", "incarnation")}
        for m in meta.get("outbox", []):
            m.pop("incarnation", None)
        out.append((sc.partition, sorted(sc.store.items()), sc.changelog, meta, sc.increment))
    t.commit(cp)
    return out


def _views(t: Tracker) -> dict[int, Any]:
    return {
        i: (v.consumed, v.fates, v.rejected, v.pending, v.capacity_evictions, v.last_ts, v.watermark,
            v.cells, v.overflow, v.remembered, v.histograms, v.label_windows)
        for i, v in t.views.items()
    }  # fmt: skip


@pytest.mark.parametrize("seed", [3, 11])
def test_batch_equals_record_by_record(seed: int) -> None:
    partitions = 3
    records = messy_records(seed, 3000, partitions)
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        batch, single = tracker(a), tracker(b)
        i = 0
        dead_batch: list[tuple[int, int, int, str, str]] = []
        dead_single: list[tuple[int, int, int, str, str]] = []
        polls = 0
        while i < len(records):
            size = rng.choice([1, 7, 50, 300])
            poll = records[i : i + size]
            i += size
            by_tp: dict[tuple[int, int], list[Rec]] = {}
            for p, topic, r in poll:
                by_tp.setdefault((p, topic), []).append(r)
            for (p, topic), recs in by_tp.items():  # one partition's records of one topic at a time
                for r, rej in batch.process(p, topic, recs):
                    dead_batch.append((p, topic, r.offset, rej.reason, rej.detail))
                for r in recs:
                    update = single.update_prediction if topic == 0 else single.update_outcome
                    rej = update(p, r.value, r.offset, r.timestamp)
                    if rej is not None:
                        dead_single.append((p, topic, r.offset, rej.reason, rej.detail))
            for p in range(partitions):  # the run loop's lag work, the same for both
                behind = rng.random() < 0.2
                for t in (batch, single):
                    t.set_behind(p, 0, behind)
            # process() also records the resume mark: copy it so the metas compare
            for p, s in batch.shards.items():
                single.shard(p).marks = list(s.marks)
            assert _checkpoint(batch) == _checkpoint(single), f"poll {polls}"
            assert _views(batch) == _views(single), f"poll {polls}"
            polls += 1
        assert dead_batch == dead_single
        assert batch.feedback is not None and single.feedback is not None
        assert orjson.dumps(batch.feedback.to_state()) == orjson.dumps(single.feedback.to_state())
        # the input really was messy
        snap = batch.snapshot()
        reasons = snap.rejected["predictions"] | snap.rejected["outcomes"]
        for reason in (
            "invalid_json",
            "not_an_object",
            "future_timestamp",
            "missing_id",
            "invalid_prediction",
        ):
            assert reasons.get(reason, 0) > 0, reasons
        fates = snap.fates
        assert fates["predictions"]["duplicate"] > 0 and fates["outcomes"]["duplicate"] > 0
        assert fates["outcomes"]["joined"] > 1000
        assert fates["predictions"]["expired"] > 0
        assert sum(snap.capacity_evictions.values()) > 0
        iso = sum(1 for _, _, r in records if r.value and b'"ts":"' in r.value)
        assert iso > 1000


def test_heartbeats_wait_while_the_increments_topic_refuses_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Review finding: while the increments topic refused writes, every 10 s heartbeat added one
    more message to each partition's outbox, which every meta carries: 8,640 messages (1.3 MB per
    meta) after a day, past the changelog's message size after about six. A partition with
    unacknowledged messages sends no heartbeat: they tell the leader it is alive once they go."""
    import types

    import stream_fair.tracker as tracker_module

    clock = [1_800_000_000.0]
    monkeypatch.setattr(tracker_module, "time", types.SimpleNamespace(time=lambda: clock[0]))
    with tempfile.TemporaryDirectory() as d:
        t = tracker(d)
        recs = [r for _p, topic, r in messy_records(3, 400, 1) if topic == 0][:50]
        t.process(0, 0, recs)
        t.set_behind(0, 0, False)
        t.set_behind(0, 1, False)
        for _ in range(360):  # an hour of checkpoints, every 10 s; nothing is acknowledged
            clock[0] += 10.0
            t.heartbeat()
            t.commit(t.checkpoint())
        assert len(t.shards[0].outbox) <= 2
        t.shards[0].outbox.clear()  # the topic is back: acknowledged
        clock[0] += 10.0
        t.heartbeat()
        assert t.shards[0].changed  # heartbeats resume
