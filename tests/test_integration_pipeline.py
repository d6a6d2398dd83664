"""The whole pipeline against a real broker: a messy stream in, exact numbers out on /metrics.

Every expected value is recounted in the test from the produced event list
(:func:`tests.helpers.recount`), never taken from stream-fair's own join or counting code.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from fairlearn.metrics import (
    MetricFrame,
    false_positive_rate,
    selection_rate,
    true_positive_rate,
)

from stream_fair.app import Detector
from stream_fair.config import Config
from stream_fair.dev import simulate
from stream_fair.dev.broker import consume_topic, create_topics, produce_events
from tests.helpers import (
    LENDING_FEATURES,
    LENDING_INTERSECTIONS,
    assert_accounting,
    consumed,
    detector_config,
    full_confusion,
    full_predictions,
    paced,
    ready,
    recount,
    rejection_reason,
    scrape,
    wait_consumed,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.transports]

FATES = ("joined", "expired", "orphan", "duplicate", "late", "rejected")
HEADERS = (
    "stream_fair.reason",
    "stream_fair.source_topic",
    "stream_fair.source_partition",
    "stream_fair.source_offset",
)


class Running:
    """A Detector consuming in a background thread; ``close()`` stops it and re-raises failures."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.detector = Detector(Config.model_validate(config))
        self.stop = threading.Event()
        self.failure: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, name="detector", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.detector.run(self.stop)
        except BaseException as exc:  # surfaced by close()
            self.failure.append(exc)

    @property
    def port(self) -> int:
        return self.detector.port

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "the detector did not stop within 30 s"
        if self.failure:
            raise self.failure[0]


def _messy_lending(n: int, seed: int) -> list[tuple[str, Any]]:
    scenario = simulate.SCENARIOS["lending"](label_delay_mean_s=60.0)
    return list(
        simulate.messy(
            simulate.generate(scenario, n, seed=seed), seed=seed, duplicate_rate=0.03, malformed_rate=0.01
        )
    )


def test_messy_stream_exact_counts_fates_rates_and_dead_letters(
    kafka_bootstrap: str, topic_names: Any, group_id: str, tmp_path: Path
) -> None:
    events = _messy_lending(5_000, seed=11)
    exp = recount(events)
    # the stream really is messy: every kind of trouble is present
    assert exp.fates["predictions"]["duplicate"] > 0 and exp.fates["outcomes"]["duplicate"] > 0
    assert set(exp.rejected["predictions"]) == {
        "invalid_json",
        "missing_id",
        "invalid_prediction",
        "invalid_timestamp",
    }
    assert exp.rejected["outcomes"]["invalid_json"] + exp.rejected["outcomes"]["missing_id"] > 0
    assert any(k == "outcome" and not isinstance(p, bytes) for k, p in events[:50])

    create_topics(kafka_bootstrap, [topic_names.predictions, topic_names.outcomes], partitions=2)
    create_topics(kafka_bootstrap, [topic_names.dead_letters], partitions=1)
    cfg = detector_config(
        kafka_bootstrap, topic_names, group_id, tmp_path / "state", state={"checkpoint_interval": "1s"}
    )
    det = Running(cfg)
    producer_error: list[BaseException] = []

    def produce() -> None:
        try:
            produce_events(
                kafka_bootstrap,
                topic_names.predictions,
                topic_names.outcomes,
                paced(events, per_second=2_000),
            )
        except BaseException as exc:
            producer_error.append(exc)

    producer = threading.Thread(target=produce, name="producer", daemon=True)
    try:
        # produce only once partitions are assigned, so consumption follows the paced producer
        wait_for(lambda: ready(det.port), 60, "the detector to be ready")
        producer.start()
        total = (exp.consumed["predictions"], exp.consumed["outcomes"])
        mid_stream = 0
        scrapes = 0
        deadline = time.monotonic() + 90
        seen = (0, 0)
        while True:
            assert time.monotonic() < deadline, f"consumed {seen} of {total} after 90 s"
            assert not det.failure, det.failure
            s = scrape(det.port)
            scrapes += 1
            assert_accounting(s)  # at EVERY scrape, including mid-stream ones
            seen = consumed(s)
            if 0 < sum(seen) < sum(total):
                mid_stream += 1
            if seen == total:
                break
            assert seen[0] <= total[0] and seen[1] <= total[1], (seen, total)
            time.sleep(0.02)
        producer.join(timeout=30)
        assert not producer_error, producer_error
        assert mid_stream >= 5, f"only {mid_stream} of {scrapes} scrapes saw a partial stream"

        s = scrape(det.port)
        assert_accounting(s)
        # fates, pending and rejections: exact, per topic
        for topic in ("predictions", "outcomes"):
            fates = s.by("stream_fair_event_fates_total", ["fate"], topic=topic)
            want = dict.fromkeys(FATES, 0.0)
            want.update({f: float(n) for f, n in exp.fates[topic].items()})
            assert fates == {(f,): n for f, n in want.items()}, topic
            assert s.get("stream_fair_pending_events", topic=topic) == exp.pending[topic]
            assert s.by("stream_fair_rejected_events_total", ["reason"], topic=topic) == {
                (r,): float(n) for r, n in exp.rejected[topic].items()
            }, topic
        assert exp.pending["predictions"] == 0 and exp.pending["outcomes"] == 0
        # confusion counts for every marginal feature and the intersection, zeros included
        keys = ["model", "feature", "group", "actual", "predicted"]
        got = s.by("stream_fair_confusion_total", keys)
        assert got == {k: float(n) for k, n in full_confusion(exp).items()}
        assert {k[1] for k in got} == {*LENDING_FEATURES, "race&sex"}
        preds = s.by("stream_fair_predictions_total", ["model", "feature", "group", "predicted"])
        assert preds == {k: float(n) for k, n in full_predictions(exp).items()}
        # per-group rates equal fairlearn's MetricFrame on the same joined pairs
        _assert_rates_match_fairlearn(s, exp.joined)
        # the dead-letter counter catches up within one lag refresh of the run loop
        letters = {(t,): float(exp.fates[t]["rejected"]) for t in ("predictions", "outcomes")}
        wait_for(
            lambda: scrape(det.port).by("stream_fair_dead_letters_total", ["topic"]) == letters,
            10,
            "stream_fair_dead_letters_total to count every rejected record",
        )
    finally:
        det.close()
        producer.join(timeout=30)
    _assert_dead_letters(kafka_bootstrap, topic_names, exp.malformed)


def _assert_rates_match_fairlearn(s: Any, joined: list[dict[str, Any]]) -> None:
    df = pd.DataFrame(joined)
    metrics = {
        "selection_rate": selection_rate,
        "true_positive_rate": true_positive_rate,
        "false_positive_rate": false_positive_rate,
    }
    compared = 0
    for model, rows in df.groupby("model"):
        for feature in [*((f,) for f in LENDING_FEATURES), *LENDING_INTERSECTIONS]:
            frame = MetricFrame(
                metrics=metrics,
                y_true=rows["y_true"],
                y_pred=rows["y_pred"],
                sensitive_features=rows[list(feature)],
            )
            for idx, row in frame.by_group.iterrows():
                group = "&".join(idx) if isinstance(idx, tuple) else str(idx)
                for name, value in row.items():
                    got = s.get(
                        f"stream_fair_{name}",
                        model=model,
                        feature="&".join(feature),
                        group=group,
                        window="cumulative",
                    )
                    assert got is not None, (name, feature, group)
                    assert got == pytest.approx(value, abs=1e-9, rel=0), (name, feature, group)
                    compared += 1
    assert compared >= 3 * (2 + 4 + 3 + 8)


def _assert_dead_letters(bootstrap: str, topics: Any, malformed: list[tuple[str, bytes, str]]) -> None:
    """Every rejected record is in the dead-letter topic: its bytes, key and provenance."""
    sources: dict[tuple[str, int, int], Any] = {}
    expected: set[tuple[str, int, int]] = set()
    for name, kind in ((topics.predictions, "prediction"), (topics.outcomes, "outcome")):
        for r in consume_topic(bootstrap, name):
            sources[name, r.partition, r.offset] = r
            if rejection_reason(kind, r.value) is not None:
                expected.add((name, r.partition, r.offset))
    role = {topics.predictions: "predictions", topics.outcomes: "outcomes"}
    assert Counter((role[t], sources[t, p, o].value) for t, p, o in expected) == Counter(
        (t, raw) for t, raw, _ in malformed
    )
    letters = consume_topic(bootstrap, topics.dead_letters)
    seen: list[tuple[str, int, int]] = []
    for d in letters:
        h = {k: v.decode() for k, v in d.headers}
        assert set(HEADERS) <= set(h), h
        where = (
            h["stream_fair.source_topic"],
            int(h["stream_fair.source_partition"]),
            int(h["stream_fair.source_offset"]),
        )
        src = sources[where]
        assert d.value == src.value and d.key == src.key, where
        kind = "prediction" if where[0] == topics.predictions else "outcome"
        assert h["stream_fair.reason"] == rejection_reason(kind, src.value), where
        seen.append(where)
    assert Counter(seen) == Counter(expected), "dead letters differ from the rejected records"


# -- expiry, orphans and late outcomes on a hand-built stream -----------------------------------
def _pred(ident: str, ts: float, sex: str, predicted: int = 1) -> tuple[str, dict[str, Any]]:
    return "prediction", {
        "id": ident,
        "ts": ts,
        "model": "m",
        "prediction": predicted,
        "attributes": {"sex": sex, "race": "White", "age": "25-44"},
    }


def _out(ident: str, ts: float, label: int = 1) -> tuple[str, dict[str, Any]]:
    return "outcome", {"id": ident, "ts": ts, "label": label}


def test_expiry_orphans_and_late_outcomes(
    kafka_bootstrap: str, topic_names: Any, group_id: str, tmp_path: Path
) -> None:
    """TTL 100 s. Phases are produced one after another (waiting for each to be consumed), so the
    interleaving of the two topics cannot change any fate."""
    phases: list[list[tuple[str, dict[str, Any]]]] = [
        [  # t = 1000: three predictions wait; one outcome joins; one outcome has no prediction
            _pred("p-join", 1000, "Female", 1),
            _pred("p-expire", 1000, "Female", 0),
            _pred("p-late", 1001, "Male", 1),
            _out("p-join", 1010, 1),
            _out("p-join", 1010, 1),
            _out("o-orphan", 1005, 0),
        ],
        # t = 1200 passes every deadline (ts + 100): p-expire and p-late expire, o-orphan orphans
        [_pred("p-tick", 1200, "Male", 0)],
        # p-late's outcome arrives after its prediction expired: late; its second copy: duplicate
        [_out("p-late", 1150, 1), _out("p-late", 1150, 1)],
    ]
    create_topics(kafka_bootstrap, [*topic_names], partitions=1)
    cfg = detector_config(
        kafka_bootstrap,
        topic_names,
        group_id,
        tmp_path / "state",
        join={"ttl": "100s", "dedupe_retention": "1d"},
    )
    det = Running(cfg)
    try:
        sent: Counter[str] = Counter()
        for phase in phases:
            produce_events(kafka_bootstrap, topic_names.predictions, topic_names.outcomes, phase)
            sent.update(k + "s" for k, _ in phase)
            want = (sent["predictions"], sent["outcomes"])
            s = wait_consumed(det.port, want, 60)
            assert_accounting(s)
        fates = s.by("stream_fair_event_fates_total", ["topic", "fate"])
        assert {k: v for k, v in fates.items() if v} == {
            ("predictions", "joined"): 1,
            ("predictions", "expired"): 2,
            ("outcomes", "joined"): 1,
            ("outcomes", "duplicate"): 2,
            ("outcomes", "orphan"): 1,
            ("outcomes", "late"): 1,
        }
        pending = s.by("stream_fair_pending_events", ["topic"])
        assert pending == {("predictions",): 1, ("outcomes",): 0}
        expired = s.by("stream_fair_expired_predictions_total", ["feature", "group"], model="m")
        assert {k: v for k, v in expired.items() if k[0] == "sex"} == {
            ("sex", "Female"): 1,
            ("sex", "Male"): 1,
        }
        assert expired[("race&sex", "White&Male")] == 1
        # only p-join's pair is in the confusion counts; expired and late ones never are
        conf = s.by("stream_fair_confusion_total", ["group", "actual", "predicted"], model="m", feature="sex")
        assert {k: v for k, v in conf.items() if v} == {("Female", "1", "1"): 1}
        preds = s.by("stream_fair_predictions_total", ["group", "predicted"], model="m", feature="sex")
        assert {k: v for k, v in preds.items() if v} == {
            ("Female", "1"): 1,
            ("Female", "0"): 1,
            ("Male", "1"): 1,
            ("Male", "0"): 1,
        }
    finally:
        det.close()
