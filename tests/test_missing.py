"""A configured feature missing from most events is called out: log, metric, status page.

The README's first wrong turn (issue 10, hole 1): its minimal config (sex, race, age) on the
``bias_onset`` stream (feature ``group``) put every event in ``__missing__`` without a word.
"""

from __future__ import annotations

import logging
import re
import threading
import urllib.request
import uuid
from pathlib import Path

import orjson
import pytest
from prometheus_client import CollectorRegistry

from stream_fair.app import Detector
from stream_fair.config import Config
from stream_fair.dev import simulate
from stream_fair.dev.broker import create_topics, produce_events
from stream_fair.exporter import PipelineStats, registry_for
from stream_fair.groups import MISSING
from stream_fair.missing import MIN_PREDICTIONS, MissingFeatureLog, missing_shares, report_missing
from stream_fair.report import build_report
from stream_fair.status_page import render
from tests.conftest import TopicNames
from tests.helpers import LocalTracker as Tracker
from tests.helpers import detector_config, wait_consumed, wait_for


def test_missing_shares_per_model_and_feature() -> None:
    preds = {
        ("m1", ("F", MISSING)): (30, 10),
        ("m1", (MISSING, MISSING)): (50, 10),
        ("m2", ("M", "White")): (5, 5),
    }
    got = {(m.model, m.feature): (m.missing, m.predictions) for m in missing_shares(preds, ["sex", "race"])}
    assert got == {
        ("m1", "sex"): (60, 100),
        ("m1", "race"): (100, 100),
        ("m2", "sex"): (0, 10),
        ("m2", "race"): (0, 10),
    }
    mostly = [(m.model, m.feature) for m in missing_shares(preds, ["sex", "race"]) if m.mostly_missing]
    assert mostly == [("m1", "sex"), ("m1", "race")]  # m2 has too few predictions to judge


def test_few_predictions_prove_nothing() -> None:
    [m] = missing_shares({("m", (MISSING,)): (MIN_PREDICTIONS - 1, 0)}, ["sex"])
    assert m.share == 1.0 and not m.mostly_missing


def test_log_at_start_up_then_periodically(caplog: pytest.LogCaptureFixture) -> None:
    preds = {("m", (MISSING, "A")): (150, 50)}
    reads = []

    def source() -> dict:
        reads.append(1)
        return preds

    warn = MissingFeatureLog({"sex": "attributes.sex", "group": "attributes.group"}, every=300, check_every=5)
    with caplog.at_level(logging.WARNING, logger="stream_fair"):
        warn.maybe_warn(0.0, source)  # first check: warns at once
        warn.maybe_warn(1.0, source)  # within check_every: not even read
        warn.maybe_warn(10.0, source)  # read, but warned recently
        warn.maybe_warn(301.0, source)  # every 5 minutes again
    assert len(reads) == 3
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert lines[0].startswith(
        "feature 'sex' (path attributes.sex) is missing from 100% of the 200 predictions"
    )
    assert "check-config --probe" in lines[0] and "'group'" not in lines[0]


def _tracker_report(features: list[str], attributes: dict[str, str], n: int = 150):  # type: ignore[no-untyped-def]
    cfg = Config.model_validate({"fairness": {"features": features}})
    tracker = Tracker(cfg)
    for i in range(n):
        raw = orjson.dumps(
            {"id": f"r{i}", "ts": i, "model": "m", "prediction": i % 2, "attributes": attributes}
        )
        tracker.update_prediction(0, raw, i)
    return build_report(tracker.snapshot(), cfg)


def test_metric_and_status_page() -> None:
    report = _tracker_report(["sex", "group"], {"group": "A"})
    assert [(m.feature, m.share) for m in report_missing(report)] == [("sex", 1.0), ("group", 0.0)]
    registry: CollectorRegistry = registry_for(lambda: (report, PipelineStats()))
    assert (
        registry.get_sample_value("stream_fair_feature_missing_ratio", {"model": "m", "feature": "sex"})
        == 1.0
    )
    assert (
        registry.get_sample_value("stream_fair_feature_missing_ratio", {"model": "m", "feature": "group"})
        == 0.0
    )
    page = render(report, PipelineStats())
    assert re.search(
        r"<p class=warn><b>Missing feature</b>: feature &#x27;sex&#x27; is missing from 100%", page
    )
    fine = render(_tracker_report(["group"], {"group": "A"}), PipelineStats())
    assert "Missing feature" not in fine


@pytest.mark.integration
def test_readme_config_on_the_bias_onset_stream_is_called_out(
    kafka_bootstrap: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tag = uuid.uuid4().hex[:12]
    topics = TopicNames(f"predictions-{tag}", f"outcomes-{tag}", f"dead-letters-{tag}")
    create_topics(kafka_bootstrap, list(topics), partitions=1)
    events = list(simulate.generate(simulate.SCENARIOS["bias_onset"](), 2_000, seed=1))
    produce_events(kafka_bootstrap, topics.predictions, topics.outcomes, events)
    cfg = detector_config(
        kafka_bootstrap,
        topics,
        f"stream-fair-missing-{tag}",
        tmp_path / "state",
        fairness={
            "features": [{"name": "sex", "reference": "Male"}, {"name": "race", "reference": "White"}, "age"]
        },
    )
    detector = Detector(Config.model_validate(cfg), exporter_port=0)
    stop = threading.Event()
    thread = threading.Thread(target=detector.run, args=(stop,), daemon=True)
    with caplog.at_level(logging.WARNING, logger="stream_fair"):
        thread.start()
        try:
            n_out = sum(kind == "outcome" for kind, _ in events)
            s = wait_consumed(detector.port, (2_000, n_out), timeout=60)
            for feature in ("sex", "race", "age"):
                assert s.get("stream_fair_feature_missing_ratio", model="credit-v3", feature=feature) == 1.0
            with urllib.request.urlopen(f"http://127.0.0.1:{detector.port}/", timeout=10) as resp:
                page = resp.read().decode()
            assert page.count("<b>Missing feature</b>") == 3

            def warned() -> set[str]:
                lines = [r.getMessage() for r in caplog.records if "is missing from 100%" in r.getMessage()]
                return {line.split("'")[1] for line in lines}

            assert wait_for(lambda: warned() == {"sex", "race", "age"}, 30, "the start-up warnings")
        finally:
            stop.set()
            thread.join(timeout=30)
