"""The tracker and report pipeline: accounting, windows, persistence, and fairlearn after every step."""

from __future__ import annotations

import pickle
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import orjson
import pandas as pd
import pytest
from fairlearn.metrics import MetricFrame, false_positive_rate, selection_rate, true_positive_rate
from sklearn.metrics import accuracy_score

from stream_fair.aggregate import ModelCounts
from stream_fair.config import Config
from stream_fair.report import CUMULATIVE, build_report
from stream_fair.tracker import TOPICS, Snapshot
from stream_fair.tracker import Tracker as CoreTracker
from tests.helpers import LocalTracker as Tracker

FEATURES = {"sex": ["F", "M"], "race": ["A", "B", "C"], "age": ["y", "o"]}


def config(**overrides: object) -> Config:
    base: dict[str, object] = {
        "fairness": {
            "features": list(FEATURES),
            "intersections": [["race", "sex"]],
            "min_samples": 1,
        },
        "windows": ["10m"],
        "window_resolution": "1m",
    }
    base.update(overrides)
    return Config.model_validate(base)


def stream(n: int, seed: int, *, shuffle: bool = True) -> list[tuple[str, bytes, dict[str, object]]]:
    """Predictions and outcomes (outcomes delayed and shuffled), with the truth attached."""
    rng = random.Random(seed)
    events: list[tuple[float, str, bytes, dict[str, object]]] = []
    for i in range(n):
        attrs = {f: rng.choice(v) for f, v in FEATURES.items()}
        ts = 1000.0 + i
        bias = 0.3 if (attrs["race"], attrs["sex"]) == ("B", "F") else 0.0
        label = int(rng.random() < 0.4)
        predicted = int(rng.random() < (0.8 - bias if label else 0.15))
        row = {"id": f"r{i}", "label": label, "predicted": predicted, **attrs}
        p = {"id": f"r{i}", "ts": ts, "model": "m", "prediction": predicted, "attributes": attrs}
        o = {"id": f"r{i}", "ts": ts + 5, "label": label}
        delay = rng.expovariate(1 / 20) if shuffle else 5
        events.append((ts, "predictions", orjson.dumps(p), row))
        events.append((ts + delay, "outcomes", orjson.dumps(o), row))
    events.sort(key=lambda e: e[0])
    return [(topic, raw, row) for _, topic, raw, row in events]


def feed(tracker: CoreTracker, topic: str, raw: bytes, offset: int, shard: int = 0) -> None:
    update = tracker.update_prediction if topic == "predictions" else tracker.update_outcome
    update(shard, raw, offset)


def test_pipeline_rates_equal_fairlearn_after_every_step() -> None:
    """river-style oracle: every joined pair, every feature and the intersection, every step."""
    cfg = config()
    tracker = Tracker(cfg)
    joined: dict[str, dict[str, object]] = {}
    seen: dict[str, set[str]] = {"predictions": set(), "outcomes": set()}
    offsets = {"predictions": 0, "outcomes": 0}
    metrics = {
        "selection_rate": selection_rate,
        "true_positive_rate": true_positive_rate,
        "false_positive_rate": false_positive_rate,
        "accuracy": accuracy_score,
    }
    for step, (topic, raw, row) in enumerate(stream(150, seed=3)):
        feed(tracker, topic, raw, offsets[topic])
        offsets[topic] += 1
        seen[topic].add(str(row["id"]))
        if row["id"] in seen["predictions"] and row["id"] in seen["outcomes"]:
            joined[str(row["id"])] = row
        if len(joined) < 2 or step % 3:
            continue
        df = pd.DataFrame(list(joined.values()))
        df["race&sex"] = df["race"] + "&" + df["sex"]
        report = build_report(tracker.snapshot(), cfg)
        for feature in ["sex", "race", "age", "race&sex"]:
            view = report.view("m", feature, CUMULATIVE)
            mf = MetricFrame(
                metrics=metrics,
                y_true=df["label"],
                y_pred=df["predicted"],
                sensitive_features=df[feature],
            )
            by_group = mf.by_group
            assert sorted(view.report.groups) == sorted(by_group.index)
            for group, gr in view.report.groups.items():
                sub = df[df[feature] == group]
                assert gr.counts.n == len(sub)
                for name in metrics:
                    if name in gr.rates:
                        assert gr.rates[name].value == pytest.approx(by_group.loc[group, name], abs=1e-12)
                    else:  # the rate's denominator is empty for this group
                        positives = int(sub["label"].sum())
                        assert (name == "true_positive_rate" and positives == 0) or (
                            name == "false_positive_rate" and positives == len(sub)
                        )


def test_accounting_identity_with_messy_input_at_every_step() -> None:
    cfg = config(join={"ttl": "30s"})
    tracker = Tracker(cfg)
    rng = random.Random(5)
    events = [(t, raw) for t, raw, _ in stream(300, seed=5)]
    events += [
        ("predictions", b"{not json"),
        ("outcomes", b'{"id": "x", "ts": 1, "label": 7}'),
        ("predictions", b"[1, 2]"),
        ("outcomes", None),
    ]  # type: ignore[list-item]
    events += rng.sample(events, 40)  # redeliveries of the same records
    rng.shuffle(events)
    offsets = {"predictions": 0, "outcomes": 0}
    for topic, raw in events:
        feed(tracker, topic, raw, offsets[topic], shard=rng.randrange(1))
        offsets[topic] += 1
        snap = tracker.snapshot()
        for t in TOPICS:
            assert snap.consumed[t] == sum(snap.fates[t].values()) + snap.pending[t]
            assert snap.fates[t]["rejected"] == sum(snap.rejected[t].values())
    snap = tracker.snapshot()
    assert snap.consumed == offsets
    assert snap.fates["predictions"]["duplicate"] > 0
    assert snap.fates["predictions"]["rejected"] == 2
    assert snap.rejected["outcomes"] == {"invalid_label": 1, "invalid_json": 1}
    assert snap.fates["predictions"]["expired"] > 0  # the 30 s ttl against up to ~100 s delays
    assert snap.fates["predictions"]["orphan"] == 0 and snap.fates["outcomes"]["expired"] == 0
    expired_by_cell = sum(snap.expired.values())
    assert expired_by_cell == snap.fates["predictions"]["expired"]


def test_window_counts_only_recent_predictions() -> None:
    cfg = config(windows=["10m"], window_resolution="1m")
    tracker = Tracker(cfg)
    offsets = {"predictions": 0, "outcomes": 0}
    for topic, raw, _ in stream(2000, seed=1, shuffle=False):
        feed(tracker, topic, raw, offsets[topic])
        offsets[topic] += 1
    snap = tracker.snapshot()
    window = snap.windows["10m"]
    in_window = sum(sum(q) for q in window.values())
    # predictions at 1000..2999 s, one per second; watermark 3004 s (last outcome): the window
    # covers the 10 one-minute buckets ending with the watermark's, i.e. ts >= 2460
    assert in_window == 2999 - 2460 + 1
    assert sum(sum(q) for q in snap.cumulative.values()) == 2000


def test_state_round_trip_then_identical_results() -> None:
    cfg = config()
    events = stream(400, seed=9)
    a = Tracker(cfg)
    offsets = {"predictions": 0, "outcomes": 0}
    for topic, raw, _ in events[:500]:
        feed(a, topic, raw, offsets[topic])
        offsets[topic] += 1
    a.snapshot()  # a checkpoint
    a.backend.close()
    copy = tempfile.mkdtemp()
    shutil.copytree(a.path, copy, dirs_exist_ok=True)
    a = Tracker(cfg, a.path)
    b = Tracker(cfg, copy)
    for t in (a, b):  # the windows are the model-wide aggregator's: give both the same history
        t.model_counts = ModelCounts(cfg.window_resolution, tuple(cfg.windows))
    for topic, raw, _ in events[500:]:
        for t in (a, b):
            feed(t, topic, raw, offsets[topic])
        offsets[topic] += 1
    sa, sb = a.snapshot(), b.snapshot()
    assert sa.cumulative and sa.cumulative == sb.cumulative and sa.windows == sb.windows
    assert sa.fates == sb.fates and sa.pending == sb.pending and sa.predictions == sb.predictions
    assert b.shards[0].offsets == [offsets["predictions"], offsets["outcomes"]]


def test_cardinality_overflow_folds_into_other_and_is_counted() -> None:
    cfg = config(fairness={"features": [{"name": "zip", "cardinality_limit": 3}], "min_samples": 1})
    tracker = Tracker(cfg)
    for i in range(10):
        raw = orjson.dumps({"id": i, "ts": i, "model": "m", "prediction": 1, "attributes": {"zip": f"z{i}"}})
        tracker.update_prediction(0, raw, i)
    snap = tracker.snapshot()
    groups = sorted(cell[0] for (_, cell) in snap.predictions)
    assert groups == ["__other__", "z0", "z1", "z2"]
    assert snap.overflow == {"zip": 7, "__model__": 0}
    assert snap.predictions[("m", ("__other__",))] == (0, 7)


def test_intersection_reference_and_exclusion_of_reserved_groups() -> None:
    cfg = Config.model_validate(
        {
            "fairness": {
                "features": [{"name": "sex", "reference": "M"}, {"name": "race", "reference": "A"}],
                "intersections": [["race", "sex"]],
                "min_samples": 1,
            }
        }
    )
    tracker = Tracker(cfg)
    rows = [
        ("M", "A", 1, 1),
        ("F", "B", 1, 0),
        ("F", None, 1, 0),
        ("M", "B", 0, 0),
        ("F", "A", 0, 1),
    ]
    for i, (sex, race, label, pred) in enumerate(rows * 5):
        attrs = {"sex": sex} if race is None else {"sex": sex, "race": race}
        tracker.update_prediction(
            0, orjson.dumps({"id": i, "ts": i, "prediction": pred, "attributes": attrs}), i
        )
        tracker.update_outcome(0, orjson.dumps({"id": i, "ts": i, "label": label}), i)
    report = build_report(tracker.snapshot(), cfg)
    view = report.view("default", "race&sex")
    assert view.report.reference == "A&M"
    assert "__missing__&F" in view.report.groups
    assert not view.report.groups["__missing__&F"].eligible


def test_pure_core_imports_neither_kafka_nor_prometheus() -> None:
    core = [
        "config",
        "events",
        "decode",
        "join",
        "groups",
        "counts",
        "fairness",
        "disparity",
        "tracker",
        "report",
        "stakeholder_report",
        "report_merge",
        "report_render",
        "dev.simulate",
        "aggregate",
        "state.codec",
        "state.ids",
        "state.restore",
        "state.rocks",
        "missing",
        "probe",
        "svg",
        "sequential",
        "explain",
        "search",
        "label_windows",
        "event_time",
        "feedback",
    ]
    code = (
        "import sys, importlib\n"
        f"for m in {core!r}: importlib.import_module('stream_fair.' + m)\n"
        "clients = ('kafka', 'confluent_kafka', 'prometheus_client')\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in clients]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_counters_are_published_only_by_a_checkpoint() -> None:
    """Scrapes see committed counters: what a crash could take back is never exported."""
    cfg = config()
    tracker = Tracker(cfg)
    offsets = {"predictions": 0, "outcomes": 0}
    for topic, raw, _ in stream(20, seed=2, shuffle=False):
        feed(tracker, topic, raw, offsets[topic])
        offsets[topic] += 1
    assert CoreTracker.snapshot(tracker).consumed == {"predictions": 0, "outcomes": 0}
    assert tracker.snapshot().consumed == {"predictions": 20, "outcomes": 20}


def test_snapshot_is_a_copy() -> None:
    cfg = config()
    tracker = Tracker(cfg)
    offsets = {"predictions": 0, "outcomes": 0}
    for topic, raw, _ in stream(50, seed=2, shuffle=False):
        feed(tracker, topic, raw, offsets[topic])
        offsets[topic] += 1
    snap = tracker.snapshot()
    before = dict(snap.cumulative)
    for topic, raw, _ in stream(50, seed=4, shuffle=False):
        feed(tracker, topic, raw.replace(b'"r', b'"s'), offsets[topic])
        offsets[topic] += 1
    assert snap.cumulative == before
    assert np.sum([sum(q) for q in tracker.snapshot().cumulative.values()]) == 100


class _SlowCompute:
    """A feedback capture whose math waits for ``release`` (a snapshot read by a slow reader)."""

    def __init__(self, release: threading.Event | None = None) -> None:
        self.release, self.calls = release, 0

    def compute(self) -> str:
        self.calls += 1
        if self.release is not None and not self.release.wait(10):
            raise TimeoutError("never released")
        return f"computed {id(self)}"


def test_reading_one_snapshot_never_waits_for_another_snapshots_math() -> None:
    """A reader of a new snapshot's ``feedback`` (a status page) does not wait while another
    thread still computes an older snapshot's (the report of an ``/alarms`` request): up to Python
    3.11 ``functools.cached_property`` holds one lock per attribute of the class while it computes,
    which serialised them. Each snapshot still computes once and keeps its value, also pickled."""
    release = threading.Event()
    old = Snapshot(1.0, {}, feedback_source=_SlowCompute(release))
    new_source = _SlowCompute()
    new = Snapshot(2.0, {}, feedback_source=new_source)
    slow = threading.Thread(target=lambda: old.feedback, daemon=True)
    slow.start()
    while old.feedback_source.calls == 0:  # the slow reader is inside the old snapshot's math
        time.sleep(0.001)
    got: list[str] = []
    fast = threading.Thread(target=lambda: got.append(new.feedback), daemon=True)
    fast.start()
    fast.join(5)
    try:
        assert got == [f"computed {id(new_source)}"], "the new snapshot's read waited for the old one's math"
    finally:
        release.set()
        slow.join(5)
    assert old.feedback == f"computed {id(old.feedback_source)}" and old.feedback_source.calls == 1
    assert new.feedback is got[0] and new_source.calls == 1
    copy = pickle.loads(pickle.dumps(new))  # how the report worker receives a snapshot
    assert copy.feedback == got[0] and copy.feedback_source.calls == 1


def test_a_topic_that_is_behind_holds_event_time_back() -> None:
    """Reading a backlog, predictions run ahead of outcomes: they must not expire meanwhile."""
    cfg = config(join={"ttl": "60s"})
    tracker = Tracker(cfg)
    tracker.shard(0)
    tracker.set_behind(0, 1, True)  # the outcomes partition has unread records
    preds = [
        orjson.dumps(
            {
                "id": f"r{i}",
                "ts": 1000 + 10 * i,
                "model": "m",
                "prediction": 1,
                "attributes": {"sex": "F", "race": "A", "age": "y"},
            }
        )
        for i in range(50)
    ]
    for i, raw in enumerate(preds):  # 490 s of predictions read before any outcome
        tracker.update_prediction(0, raw, i)
    assert tracker.snapshot().fates["predictions"]["expired"] == 0
    for i in range(50):  # each outcome 5 s after its prediction
        tracker.update_outcome(0, orjson.dumps({"id": f"r{i}", "ts": 1005 + 10 * i, "label": 1}), i)
    snap = tracker.snapshot()
    assert snap.fates["outcomes"]["joined"] == 50 and snap.fates["predictions"]["expired"] == 0
    # once caught up, event time follows the newest record again and a stale prediction expires
    tracker.update_prediction(
        0, orjson.dumps({"id": "old", "ts": 1400, "prediction": 0, "attributes": {"sex": "M"}}), 50
    )
    tracker.set_behind(0, 1, False)
    tracker.update_prediction(
        0, orjson.dumps({"id": "new", "ts": 1600, "prediction": 0, "attributes": {"sex": "M"}}), 51
    )
    assert tracker.snapshot().fates["predictions"]["expired"] == 1


def test_without_the_hold_a_backlog_would_expire_predictions() -> None:
    """The control: the same reading order with nothing marked behind expires them (by design)."""
    cfg = config(join={"ttl": "60s"})
    tracker = Tracker(cfg)
    for i in range(50):
        tracker.update_prediction(
            0,
            orjson.dumps({"id": f"r{i}", "ts": 1000 + 10 * i, "prediction": 1, "attributes": {"sex": "F"}}),
            i,
        )
    assert tracker.snapshot().fates["predictions"]["expired"] > 30


def test_a_poll_processed_as_a_batch_equals_record_by_record() -> None:
    """``process`` decodes a poll, reads its ids in one batched lookup, then joins in order: the
    result is that of one record at a time, with duplicates and a prediction and its outcome
    in the same poll, redeliveries and bad records, across checkpoints."""
    from collections import namedtuple

    Rec = namedtuple("Rec", "offset value timestamp")
    cfg = config(join={"ttl": "40s"})
    rng = random.Random(11)
    events = [(t, raw) for t, raw, _ in stream(400, seed=11)]
    events += [("predictions", b"{not json"), ("outcomes", b'{"id": "r3", "ts": 1, "label": 7}')]
    events += rng.sample(events, 60)  # redeliveries
    rng.shuffle(events)
    batched, single = Tracker(cfg), Tracker(cfg)
    offsets = {"predictions": 0, "outcomes": 0}
    i = 0
    while i < len(events):
        topic = events[i][0]
        poll: list[Rec] = []
        while i < len(events) and events[i][0] == topic and len(poll) < rng.randint(1, 40):
            poll.append(Rec(offsets[topic], events[i][1], None))
            offsets[topic] += 1
            i += 1
        if not poll:
            continue
        t = TOPICS.index(topic)
        rejected = batched.process(0, t, poll)
        for r in poll:
            feed(single, topic, r.value, r.offset)
        bad = (b"{not json", b'{"id": "r3", "ts": 1, "label": 7}')
        assert len(rejected) == sum(1 for r in poll if r.value in bad)
        if rng.random() < 0.2:  # a checkpoint between polls: later reads go to the store
            a, b = batched.snapshot(), single.snapshot()
            assert (a.consumed, a.fates, a.pending) == (b.consumed, b.fates, b.pending)
            assert a.rejected == b.rejected
    a, b = batched.snapshot(), single.snapshot()
    assert (a.consumed, a.fates, a.pending) == (b.consumed, b.fates, b.pending)
    assert a.rejected == b.rejected
    assert a.cumulative == b.cumulative and a.expired == b.expired
    assert a.fates["predictions"]["duplicate"] > 0 and a.fates["predictions"]["joined"] > 0


def test_a_reopened_store_keeps_its_configured_options(tmp_path: object) -> None:
    """rocksdict reopens an existing database with the options of its OPTIONS file unless they are
    given per column family: the table options (bloom filters, partitioned index, the configured
    block cache) were silently dropped after every restart."""
    from stream_fair.state.rocks import RocksBackend

    path = str(tmp_path)
    first = RocksBackend(path, cache_bytes=32 << 20)
    first.write({b"k": b"v"})
    first.close()
    again = RocksBackend(path, cache_bytes=48 << 20)
    assert again._db.property_int_value("rocksdb.block-cache-capacity") == 48 << 20
    assert again.get_many([b"k", b"missing"]) == [b"v", None]
    again.close()


def test_uuid_ids_are_stored_short_and_read_back_exactly(tmp_path: object) -> None:
    """Canonical UUIDs go into keys as 17 bytes (format 4); every other id as its UTF-8. The id
    records and both indexes give back the same strings, and ids that differ only in the case of a
    UUID stay distinct ids."""
    import uuid

    from stream_fair.state.codec import PendingPrediction, id_key
    from stream_fair.state.ids import IdTable, remembered
    from stream_fair.state.rocks import RocksBackend

    u = str(uuid.UUID(int=0x1B4E28BA2FA141D2883F0016D3CCA427))
    ids = [u, u.upper(), "req-1", "é-ü", u.replace("-", "", 1) + "-", u[:-1] + "g"]
    assert len(id_key(0, u)) == 3 + 17 and len(id_key(0, u.upper())) == 3 + 36
    backend = RocksBackend(str(tmp_path))
    table = IdTable(backend, partition=0, ttl=10.0, outcome_ttl=10.0)
    for i, event_id in enumerate(ids):
        assert table.get(event_id) is None
        table.put(event_id, PendingPrediction(ts=float(i), cell=i, predicted=1, score=None))
    store, changelog = table.changes()
    backend.write(store)
    table.committed()
    table.prefetch(ids)
    assert [table.get(e).cell for e in ids] == list(range(len(ids)))  # type: ignore[union-attr]
    table.committed()
    due = table.pop_due(13.5)  # deadlines 10..15: the first four
    assert [e for e, _ in due] == ids[:4]
    for event_id, _ in due:
        table.put(event_id, remembered(b"J", 100.0 + len(event_id)))
    store, _ = table.changes()
    backend.write(store)
    table.committed()
    assert sorted(e for e, _ in table.pop_forget()) == sorted(ids[:4])
    backend.close()


def test_index_keys_live_in_their_own_column_family_without_bloom_filters(tmp_path: object) -> None:
    """Format 5: the expiry and forget index keys (only range-scanned) are in the ``index`` column
    family, which builds no filters; id records (looked up by key) keep theirs. Reads, scans,
    range deletes and a reopen see each key where it was written."""
    from stream_fair.state.codec import PendingPrediction, deadline_key, forget_key, id_key
    from stream_fair.state.ids import IdTable, remembered
    from stream_fair.state.rocks import INDEX_FAMILY, RocksBackend

    backend = RocksBackend(str(tmp_path))
    table = IdTable(backend, partition=0, ttl=10.0, outcome_ttl=10.0)
    ids = [f"id-{i}" for i in range(2000)]
    for i, event_id in enumerate(ids):
        table.get(event_id)
        if i % 2:
            table.put(event_id, remembered(b"J", 50.0 + i))
        else:
            table.put(event_id, PendingPrediction(ts=float(i), cell=0, predicted=1, score=None))
    store, _ = table.changes()
    backend.write(store)
    table.committed()
    backend.flush()
    assert {key[0] for key in backend._db.keys()} == {0, 1}  # noqa: SIM118 (raw mode: no iteration)
    assert {key[0] for key in backend._index.keys()} == {2, 3}  # noqa: SIM118 (deadline, forget)
    props = backend._db.property_value("rocksdb.aggregated-table-properties")
    assert "# entries for filter=0;" not in props
    index_props = backend._index.property_value("rocksdb.aggregated-table-properties")
    assert "# entries=2000;" in index_props  # 1000 deadline and 1000 forget entries
    assert "# entries for filter=0;" in index_props and "filter block size=0;" in index_props
    assert backend.get(deadline_key(0, 10.0, b"P", "id-0")) == b""
    assert backend.get(forget_key(0, 51.0, "id-1")) == b""
    assert backend._db.get(deadline_key(0, 10.0, b"P", "id-0")) is None
    assert backend.get(id_key(0, "id-0")) is not None
    backend.close()

    again = RocksBackend(str(tmp_path))
    assert INDEX_FAMILY in again._db.list_cf(str(tmp_path))
    table = IdTable(again, partition=0, ttl=10.0, outcome_ttl=10.0)
    due = table.pop_due(10.0 + 100.0)
    assert [e for e, _ in due] == [f"id-{i}" for i in range(0, 100, 2)]
    assert [e for e, _ in table.pop_forget(50.0 + 100.0)] == [f"id-{i}" for i in range(1, 100, 2)]
    again.delete_range(deadline_key(0, 0.0, b"", ""), deadline_key(0, 1e9, b"", ""))
    assert again.scan(deadline_key(0, 0.0, b"", ""), deadline_key(0, 1e9, b"", "")) == []
    assert len(again.scan(forget_key(0, 0.0, ""), forget_key(0, 1e9, ""))) == 1000
    again.close()


def test_a_store_of_format_4_is_refused_with_one_line(tmp_path: object) -> None:
    """A format-4 store has its index keys in the default column family, where format 5 does not
    look: it is refused (and restored from the changelog, whose records did not change)."""
    from stream_fair.errors import StateError
    from stream_fair.state.codec import FORMAT_KEY, FORMAT_VERSION, encode_json
    from stream_fair.state.rocks import RocksBackend

    assert FORMAT_VERSION == 4  # the changelog's records are unchanged: format-4 changelogs restore
    old = RocksBackend(str(tmp_path))
    old.write({FORMAT_KEY: encode_json({"version": 4, "fingerprint": {}})}, sync=True)
    old.close()
    with pytest.raises(StateError) as err:
        RocksBackend(str(tmp_path))
    assert "state format 4, this version reads 5" in str(err.value)
    assert "\n" not in str(err.value)


def test_a_store_of_format_3_is_refused_with_one_line(tmp_path: object) -> None:
    from stream_fair.errors import StateError
    from stream_fair.state.codec import FORMAT_KEY, encode_json
    from stream_fair.state.rocks import RocksBackend

    old = RocksBackend(str(tmp_path))
    old.write({FORMAT_KEY: encode_json({"version": 3, "fingerprint": {}})}, sync=True)
    old.close()
    with pytest.raises(StateError) as err:
        RocksBackend(str(tmp_path))
    assert "state format 3, this version reads 5" in str(err.value)
    assert "\n" not in str(err.value)


def test_a_store_that_predates_the_feedback_units_is_taken_with_a_warning(
    tmp_path: object, caplog: pytest.LogCaptureFixture
) -> None:
    """Upgrading with an unchanged configuration must not lock a store out: a fingerprint written
    before the feedback units were recorded cannot be compared on them, so it is accepted (with a
    WARNING), rewritten in full, and from then on a change of the units is refused."""
    from stream_fair.config import fingerprint
    from stream_fair.errors import StateError
    from stream_fair.state.codec import FORMAT_KEY, decode_json, encode_json
    from stream_fair.state.rocks import STORE_FORMAT_VERSION, RocksBackend

    cfg = Config.model_validate({"fairness": {"features": ["sex"]}, "feedback": {"period": "2h"}})
    now = fingerprint(cfg)
    before = {k: v for k, v in now.items() if k != "feedback"}
    db = RocksBackend(str(tmp_path))
    db.write({FORMAT_KEY: encode_json({"version": STORE_FORMAT_VERSION, "fingerprint": before})}, sync=True)
    db.close()
    with caplog.at_level("WARNING", logger="stream_fair.state.rocks"):
        RocksBackend(str(tmp_path), now).close()
    assert "did not record feedback" in caplog.text
    db = RocksBackend(str(tmp_path), now)
    assert decode_json(db.get(FORMAT_KEY))["fingerprint"] == now  # type: ignore[arg-type]
    db.close()
    slot = fingerprint(
        Config.model_validate({**cfg.model_dump(), "feedback": {"period": "2h", "alarm_slot": "5m"}})
    )
    with pytest.raises(StateError) as err:
        RocksBackend(str(tmp_path), slot)
    assert "(feedback differ)" in str(err.value) and "\n" not in str(err.value)
