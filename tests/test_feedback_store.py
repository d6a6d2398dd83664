"""The feedback monitor's counts are the tracker's (one count store), its math runs on a copy, and
its checkpointed state is written per entry, only what changed, and restored exactly."""

from __future__ import annotations

import random
import zlib
from collections import Counter
from typing import Any

import orjson
import pytest

from stream_fair.config import Config, feedback_settings
from stream_fair.feedback import FeedbackMonitor, FeedbackSettings
from stream_fair.groups import feature_keys
from stream_fair.verdict import VerdictEngine
from tests.helpers import LocalTracker

FEATURES = {"sex": ["F", "M"], "race": ["A", "B", "C"]}
KEYS = feature_keys(["sex", "race"], [["race", "sex"]])
PARTITIONS = 4


# the feedback settings of both configs: 1-minute periods of 1-minute alarm slots, small batches
FEEDBACK = {"period": "1m", "alarm_slot": "1m", "min_samples": 5, "drift_batch": 10, "flush_every": 64}


def config() -> Config:
    return Config.model_validate(
        {
            "fairness": {"features": list(FEATURES), "intersections": [["race", "sex"]], "min_samples": 1},
            "windows": ["10m"],
            "window_resolution": "1m",
            "feedback": FEEDBACK,
        }
    )


def stream(n: int, seed: int, start: int = 0) -> list[tuple[int, str, bytes, dict[str, Any]]]:
    """(partition, topic, value, truth): predictions and their outcomes, shuffled delays, keyed by id."""
    rng = random.Random(seed)
    events = []
    for i in range(start, start + n):
        attrs = {f: rng.choice(v) for f, v in FEATURES.items()}
        ts = 1000.0 + i
        label = int(rng.random() < 0.4)
        predicted = int(rng.random() < (0.5 if attrs["sex"] == "F" else 0.3) + 0.3 * label)
        rid = f"r{i}"
        part = zlib.crc32(rid.encode()) % PARTITIONS
        row = {"id": rid, "label": label, "predicted": predicted, **attrs}
        p = {"id": rid, "ts": ts, "model": "m", "prediction": predicted, "attributes": attrs}
        o = {"id": rid, "ts": ts + 5, "label": label}
        events.append((ts, part, "predictions", orjson.dumps(p), row))
        events.append((ts + rng.expovariate(1 / 30), part, "outcomes", orjson.dumps(o), row))
    events.sort(key=lambda e: e[0])
    return [(part, topic, raw, row) for _, part, topic, raw, row in events]


def detector_config(tmp_path: Any) -> Config:
    """A detector's config for :func:`stream` (topics ``p`` and ``o``, no changelog, no dead letters)."""
    return Config.model_validate(
        {
            "topics": {"predictions": "p", "outcomes": "o", "dead_letters": None},
            "fairness": {"features": ["sex", "race"], "intersections": [["race", "sex"]]},
            "feedback": FEEDBACK,
            "state": {"path": str(tmp_path / "state"), "checkpoint_interval": "30s", "changelog": False},
        }
    )


def fed_detector(cfg: Config, events: list[tuple[int, str, bytes, dict[str, Any]]], chunk: int) -> Any:
    """A real detector (RocksDB state, no broker) fed ``events`` in polls of ``chunk`` records, each
    poll checkpointed."""
    from stream_fair.app import Detector
    from stream_fair.kafka_io import DeadLetters
    from tests.test_checkpoint_pace import TP, NoGroup, Record

    d = Detector(cfg, exporter_port=0)
    d.attach(NoGroup(), DeadLetters(cfg))
    offsets: Counter = Counter()
    for start in range(0, len(events), chunk):
        poll: dict[Any, list[Any]] = {}
        for part, topic, raw, _ in events[start : start + chunk]:
            tp = TP("p" if topic == "predictions" else "o", part)
            poll.setdefault(tp, []).append(Record(offsets[tp], b"k", raw))
            offsets[tp] += 1
        d.process(poll)
        assert d.checkpoint()
    return d


def recount(processed: list[tuple[int, str, bytes, dict[str, Any]]], owned: set[int]) -> dict[Any, list[int]]:
    """Independent count per (feature, group) over the processed events of the owned partitions:
    predictions, positive predictions, joined pairs (both sides processed), tp, fp, tn, fn."""
    seen: dict[str, set[str]] = {}
    rows: dict[str, dict[str, Any]] = {}
    for part, topic, _, row in processed:
        if part in owned:
            seen.setdefault(row["id"], set()).add(topic)
            rows[row["id"]] = row
    out: dict[Any, list[int]] = {}
    for rid, topics in seen.items():
        row = rows[rid]
        if "predictions" not in topics:
            continue
        groups = [("sex", row["sex"]), ("race", row["race"]), ("race&sex", f"{row['race']}&{row['sex']}")]
        for g in groups:
            acc = out.setdefault(g, [0] * 7)
            acc[0] += 1
            acc[1] += row["predicted"]
            if "outcomes" in topics:
                acc[2] += 1
                y, p = row["label"], row["predicted"]
                acc[3 + {(1, 1): 0, (0, 1): 1, (0, 0): 2, (1, 0): 3}[(y, p)]] += 1
    return out


def feed(
    tracker: LocalTracker, events: list[Any], owned: set[int], processed: list[Any], offsets: Counter
) -> None:
    for ev in events:
        part, topic, raw, _ = ev
        if part not in owned:
            continue
        update = tracker.update_prediction if topic == "predictions" else tracker.update_outcome
        update(part, raw, offsets[part, topic])
        offsets[part, topic] += 1
        processed.append(ev)


def test_monitor_counts_are_the_trackers_after_a_rebalance() -> None:
    """Attached to a tracker, the monitor keeps no cumulative counts of its own: its groups' counts
    equal an independent recount of the owned partitions' events, after partitions were lost and
    one restored from the store; the drift detectors are rebased (no jump fed on a rebalance)."""
    cfg = config()
    monitor = FeedbackMonitor(KEYS, feedback_settings(cfg.feedback))
    tracker = LocalTracker(cfg, feedback=monitor)
    assert monitor._own is None  # noqa: SLF001 - no second count store
    events = stream(3000, seed=11)
    owned = set(range(PARTITIONS))
    processed: list[Any] = []
    offsets: Counter = Counter()
    for p in owned:
        tracker.shard(p)
    feed(tracker, events[:2400], owned, processed, offsets)
    tracker.commit(tracker.checkpoint())
    # a rebalance: partitions 1 and 3 move away
    for p in (1, 3):
        tracker.drop(p)
    owned -= {1, 3}

    def check() -> None:
        fb = tracker.snapshot().feedback
        expected = recount(processed, owned)
        got = {
            (f, g): [v.predictions, v.positive_predictions, v.joined]
            for (m, f, g), v in fb.groups.items()
            if v.predictions
        }
        assert got == {k: v[:3] for k, v in expected.items()}
        # the detectors' cumulative feed never counts more trials than the owned partitions hold
        for (_m, f, g, sig), d in monitor._detectors.items():  # noqa: SLF001
            if sig == "selection_rate":
                assert d.den <= expected.get((f, g), [0])[0]

    check()
    # rebased on the owned partitions' counts at the rebalance: never more trials than they hold
    exp = recount(processed, owned)
    for (_m, f, g, sig), d in monitor._detectors.items():  # noqa: SLF001
        if sig == "selection_rate":
            assert (d.num, d.den) == (exp[(f, g)][1], exp[(f, g)][0])
    feed(tracker, events[2400:4000], owned, processed, offsets)
    # partition 3 comes back, restored from the local store as of the checkpoint (its events
    # processed are those before it, all in events[:2400])
    tracker.shard(3)
    owned.add(3)
    feed(tracker, events[4000:], owned, processed, offsets)
    check()


def _monitor_stream(n: int, seed: int) -> list[tuple[tuple[str, str], int, float, int, float, float]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        cell = (rng.choice(["A", "B", "C"]), rng.choice(["F", "M"]))
        pred = int(rng.random() < (0.6 if cell[1] == "F" else 0.4))
        out.append((cell, pred, 1000.0 + i, int(rng.random() < 0.5), rng.random(), rng.expovariate(1 / 40)))
    return out


def _run(m: FeedbackMonitor, events: list[Any]) -> None:
    for cell, pred, ts, label, fate, delay in events:
        m.on_prediction("m", cell, pred, ts)
        if fate < 0.7:
            m.on_joined("m", cell, pred, label, ts, ts + delay)
        elif fate < 0.8:
            m.on_expired("m", cell, ts)


SETTINGS = FeedbackSettings(period=120.0, min_samples=10, drift_batch=20, flush_every=50)
KEYS2 = feature_keys(["race", "sex"], [["race", "sex"]])


def apply(store: dict[Any, Any], changes: dict[Any, Any]) -> None:
    """What the checkpoint does with the entries: a JSON round trip, None deletes."""
    for k, v in changes.items():
        if v is None:
            store.pop(k, None)
        else:
            store[k] = orjson.loads(orjson.dumps(v))


def test_restore_after_many_checkpoints_equals_the_monitor() -> None:
    """Entries written checkpoint after checkpoint (one failed, written again by the next) restore
    the monitor exactly; a checkpoint with one new event writes O(1) entries, not every detector."""
    events = _monitor_stream(6000, seed=5)
    live = FeedbackMonitor(KEYS2, SETTINGS)
    store: dict[Any, Any] = {}
    sizes = []
    for i, start in enumerate(range(0, 5000, 250)):
        _run(live, events[start : start + 250])
        changes = live.changes()
        sizes.append(len(changes))
        if i == 7:
            continue  # this checkpoint failed: nothing committed, the next writes its entries too
        apply(store, changes)
        live.committed()
    assert len(store) > 60  # detectors, trends, rows, features
    assert {k[0] for k in store} >= {
        "meta",
        "verdict",
        "vdet",
        "det",
        "ddet",
        "srt",
        "dt",
        "mf",
        "row",
        "counts",
    }
    restored = FeedbackMonitor.from_entries(store, KEYS2, SETTINGS)
    assert orjson.dumps(restored.to_state()) == orjson.dumps(live.to_state())
    assert restored.snapshot() == live.snapshot()
    # one more prediction: the meta, its row, the counts and the verdict engine; no detector, trend
    live.changes()
    live.committed()
    for m in (live, restored):
        m.on_prediction("m", ("A", "F"), 1, 5000.5)
    keys = set(live.changes())
    assert keys <= {("meta",), ("row", "m", ("A", "F")), ("counts",), ("verdict",)}, keys
    live.committed()
    # an idle checkpoint writes the meta only
    assert set(live.changes()) == {("meta",)}
    live.committed()
    # the model-wide verdict takes over (the run loop then shows the leader's engine, here an
    # empty one): the local engine's entry is deleted (a tombstone)
    live.local_verdict = False
    live.verdict = VerdictEngine(KEYS2, SETTINGS.verdict_settings())
    changes = live.changes()
    assert changes[("verdict",)] is None
    apply(store, live.changes() | changes)
    live.committed()
    restored.local_verdict = False
    restored.verdict = VerdictEngine(KEYS2, SETTINGS.verdict_settings())
    for m in (live, restored):
        _run(m, events[5000:])
    apply(store, live.changes())
    live.committed()
    # restored from the store again after the rest: the same state
    again = FeedbackMonitor.from_entries(store, KEYS2, SETTINGS)
    again.local_verdict = False
    again.verdict = VerdictEngine(KEYS2, SETTINGS.verdict_settings())
    assert ("verdict",) not in store
    assert again.snapshot() == live.snapshot() == restored.snapshot()


def test_a_detector_entry_is_written_when_it_is_fed() -> None:
    """Every detector whose state changed since the last checkpoint is written, no other."""
    events = _monitor_stream(4000, seed=9)
    m = FeedbackMonitor(KEYS2, SETTINGS)
    _run(m, events[:3000])
    m.changes()
    m.committed()
    before = {k: orjson.dumps(d.to_state()) for k, d in m._detectors.items()}  # noqa: SLF001
    _run(m, events[3000:3300])
    written = {k[1:] for k in m.changes() if k[0] == "det"}
    after = {k: orjson.dumps(d.to_state()) for k, d in m._detectors.items()}  # noqa: SLF001
    changed = {k for k in after if before.get(k) != after[k]}
    assert changed and written == changed
    assert len(written) < len(after)


def test_capture_is_a_copy_computed_outside() -> None:
    """The snapshot computed from a capture is the monitor's at capture time, whatever the monitor
    does after (so the math can run outside the consumer lock)."""
    events = _monitor_stream(5000, seed=3)
    a, b = FeedbackMonitor(KEYS2, SETTINGS), FeedbackMonitor(KEYS2, SETTINGS)
    _run(a, events[:3000])
    _run(b, events[:3000])
    capture = a.capture()
    _run(a, events[3000:])  # the consumer goes on
    assert capture.compute() == b.snapshot()
    assert a.snapshot() != b.snapshot()


def test_the_model_wide_loop_periods_replace_the_replicas_own_when_computed() -> None:
    """A capture carrying the leader's closed periods computes to the monitor's snapshot with each
    feature's ``feedback_loop`` the loop test of the leader's periods (None where the leader has
    none); nothing else changes."""
    from dataclasses import replace

    from stream_fair.feedback.loop import loop_indicator

    m = FeedbackMonitor(KEYS2, SETTINGS)
    _run(m, _monitor_stream(5000, seed=4))
    own = m.capture().compute()
    assert len(own.features) >= 2
    first, *rest = sorted(own.features)
    # six periods in which group F's share follows its selection rate: the leader's, not this replica's
    n = SETTINGS.min_samples * 4
    periods = [
        {"F": (n * (10 - k) // 10, n * (10 - k) // 40), "G": (n, n // 2), "H": (n, n // 3)} for k in range(6)
    ]
    capture = m.capture()
    capture.loop_history = {first: periods}
    got = capture.compute()
    alpha = SETTINGS.loop_alpha / len(KEYS2)  # Bonferroni over the feature keys
    want = loop_indicator(
        periods, SETTINGS.min_samples, SETTINGS.loop_min_periods, alpha, SETTINGS.loop_horizon
    )
    assert want is not None and want.pairs == 15 and want != own.features[first].feedback_loop
    assert got.features[first].feedback_loop == want
    assert all(got.features[mf].feedback_loop is None for mf in rest)
    assert got.features == {
        mf: replace(ff, feedback_loop=got.features[mf].feedback_loop) for mf, ff in own.features.items()
    }
    assert (got.groups, got.watermark, got.alarm_events) == (own.groups, own.watermark, own.alarm_events)


def test_publishing_a_checkpoint_runs_no_feedback_math_on_the_consumer_thread(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint publishes the monitor's capture; the math runs once, at the first read of
    ``Snapshot.feedback`` (the report worker's or a scrape's thread), and reads the same as the
    monitor's own snapshot, also after the snapshot was pickled (as for the report worker)."""
    import pickle

    from stream_fair.feedback.monitor import FeedbackCapture

    computed: list[int] = []
    compute = FeedbackCapture.compute

    def counted(self: FeedbackCapture) -> Any:
        computed.append(1)
        return compute(self)

    monkeypatch.setattr(FeedbackCapture, "compute", counted)
    cfg = detector_config(tmp_path)
    events = stream(2000, seed=5)
    d = fed_detector(cfg, events, 250)
    snap = d._snapshot  # noqa: SLF001 - what /metrics shows
    assert sum(snap.consumed.values()) == len(events)  # sixteen checkpoints published it all
    assert computed == []  # and no feedback math ran on this thread
    # the run loop reads the alarm log of every published snapshot (to explain a new alarm: only
    # then is a report built); with every event explained already, that reads the capture only
    events_raised = snap.feedback_source.alarm_events
    assert events_raised  # the stream's sex disparity raised alarms
    d._explained_seq = events_raised[-1].seq  # noqa: SLF001
    d.explain_new_alarms()
    assert computed == []
    assert isinstance(snap.feedback_source, FeedbackCapture)
    shipped = pickle.loads(pickle.dumps(snap))  # as the report worker receives it
    want = d.feedback.snapshot()  # the monitor itself, unchanged since the last checkpoint
    computed.clear()
    assert snap.feedback == want and snap.feedback is snap.feedback
    assert shipped.feedback == want
    assert len(computed) == 2  # once for the snapshot, once for the shipped copy
    d.close()


def test_an_old_single_document_feedback_state_is_refused(tmp_path: Any) -> None:
    from stream_fair.app import Detector, fingerprint
    from stream_fair.errors import StateError
    from stream_fair.state.codec import FEEDBACK_KEY
    from stream_fair.state.rocks import RocksBackend

    cfg = Config.model_validate(
        {
            "topics": {"predictions": "p", "outcomes": "o", "dead_letters": None},
            "fairness": {"features": ["sex"]},
            "state": {"path": str(tmp_path / "state"), "changelog": False},
        }
    )
    db = RocksBackend(cfg.state.path, fingerprint(cfg))
    db.write({FEEDBACK_KEY: orjson.dumps({"version": 1, "rows": []})})
    db.close()
    d = Detector(cfg, exporter_port=0)
    with pytest.raises(StateError) as err:
        d.open_state()
    msg = str(err.value)
    assert "\n" not in msg and "state.path" in msg and "new directory" in msg


def test_a_restarted_detector_has_the_same_monitor(tmp_path: Any) -> None:
    """Through the real checkpoints (RocksDB, many of them, each writing the changed entries) a
    restarted detector's monitor equals the one that stopped; its counts are the restored shards'."""
    from stream_fair.app import Detector
    from stream_fair.kafka_io import DeadLetters
    from tests.test_checkpoint_pace import NoGroup

    cfg = detector_config(tmp_path)
    events = stream(3000, seed=21)
    d = fed_detector(cfg, events, 300)
    before = orjson.dumps(d.feedback.to_state())
    snap = d._snapshot.feedback  # noqa: SLF001 - what /metrics showed
    d.close()
    e = Detector(cfg, exporter_port=0)
    e.attach(NoGroup(), DeadLetters(cfg))
    for p in range(PARTITIONS):
        e.tracker.shard(p)
    assert orjson.dumps(e.feedback.to_state()) == before
    assert e.feedback.snapshot() == snap
    e.close()
    # restarted with partition 3 gone elsewhere: once the assignment is loaded, the detectors'
    # bases are the owned partitions' counts (a rebase, as on a rebalance)
    f = Detector(cfg, exporter_port=0)
    f.attach(NoGroup(), DeadLetters(cfg))
    for p in range(PARTITIONS - 1):
        f.tracker.shard(p)
    f.tracker.settled()
    exp = recount(events, set(range(PARTITIONS - 1)))
    rates = [k for k in f.feedback._detectors if k[3] == "selection_rate"]  # noqa: SLF001
    assert rates
    for key in rates:
        d = f.feedback._detectors[key]  # noqa: SLF001
        assert (d.num, d.den) == (exp[key[1:3]][1], exp[key[1:3]][0])
    assert f.feedback.to_state()["partitions"] == [0, 1, 2]
    f.close()
