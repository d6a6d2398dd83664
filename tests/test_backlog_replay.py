"""A whole stream already in Kafka, read in one go: fates must not depend on which topic is read first.

Kafka hands out one topic's backlog faster than the other's. Expiry follows event time, so without
a two-input watermark predictions expire by the predictions topic's clock before their outcomes,
already written, are read (seen end to end: 13k of 20k predictions expired, 6.5k outcomes late).
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from stream_fair.dev import simulate
from stream_fair.dev.broker import create_topics, produce_events
from tests.helpers import detector_config, recount, scrape, wait_consumed
from tests.test_integration_pipeline import Running

pytestmark = pytest.mark.integration


def test_backlog_read_in_one_go_keeps_every_labelled_pair(
    kafka_bootstrap: str, topic_names: Any, group_id: str, tmp_path: Any
) -> None:
    scenario = simulate.SCENARIOS["lending"](label_delay_mean_s=5.0)
    events = list(simulate.generate(scenario, 20_000, seed=11, rate_per_s=50.0))
    exp = recount(events)
    create_topics(kafka_bootstrap, [topic_names.predictions, topic_names.outcomes], partitions=2)
    create_topics(kafka_bootstrap, [topic_names.dead_letters], partitions=1)
    produce_events(kafka_bootstrap, topic_names.predictions, topic_names.outcomes, events)
    # a ttl of 2 minutes of event time against 5 s mean delays (P(delay > ttl) = e^-24): no true
    # expiry; but one fetch skews the two topics by minutes of event time
    cfg = detector_config(kafka_bootstrap, topic_names, group_id, tmp_path / "state", join={"ttl": "2m"})
    running = Running(cfg)
    try:
        s = wait_consumed(running.port, (exp.consumed["predictions"], exp.consumed["outcomes"]), 120)
        time.sleep(0.5)
        s = scrape(running.port)
        for topic, fate in (("predictions", "expired"), ("outcomes", "late"), ("outcomes", "orphan")):
            assert s.get("stream_fair_event_fates_total", topic=topic, fate=fate) == 0, (topic, fate)
        assert s.get("stream_fair_event_fates_total", topic="outcomes", fate="joined") == 20_000
    finally:
        running.close()
