"""The model-wide leader survives a bad increment, and says so where an alert reads it.

A record on ``<group_id>-stream-fair-increments`` that the leader cannot read is skipped (one bad
record must not stop every leader in turn); before, that was a log line only, so a leader losing
increments, or failing to checkpoint its fold, went unseen. It now counts in
``stream_fair_errors_total{kind="leader"}``, which ``StreamFairInternalErrors`` reads.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaProducer

from stream_fair.dev import simulate
from stream_fair.dev.broker import produce_events
from tests.faults.proc import Run, consumed_all, setup
from tests.helpers import recount, wait_for

pytestmark = pytest.mark.integration


def test_an_unreadable_increment_is_skipped_and_counted_as_a_leader_error(
    kafka_bootstrap: str, topic_names: Any, group_id: str, tmp_path: Path
) -> None:
    config = setup(kafka_bootstrap, topic_names, group_id, tmp_path, partitions=2)
    first = list(simulate.generate(simulate.SCENARIOS["lending"](), 300, seed=3, start_ts=time.time() - 7200))
    more = list(simulate.generate(simulate.SCENARIOS["lending"](), 300, seed=4, start_ts=time.time() - 3600))
    more = [(k, {**p, "id": f"m-{p['id']}"}) for k, p in more]
    produce_events(kafka_bootstrap, topic_names.predictions, topic_names.outcomes, first)
    run = Run(config).start()
    try:
        exp = recount(first)
        s = consumed_all(run, exp.consumed["predictions"], exp.consumed["outcomes"])
        wait_for(lambda: run.scrape().get("stream_fair_leader") == 1, 60, "the replica to lead")
        assert (run.scrape().get("stream_fair_errors_total", kind="leader") or 0) == 0
        producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
        try:
            producer.send(
                f"{group_id}-stream-fair-increments", key=b"0", value=b"{not json", partition=0
            ).get(30)
        finally:
            producer.close()
        wait_for(
            lambda: run.scrape().get("stream_fair_errors_total", kind="leader") == 1,
            60,
            "the unreadable increment counted as a leader error",
        )
        # the leader reads on: later increments are folded, the consumer counts on
        produce_events(kafka_bootstrap, topic_names.predictions, topic_names.outcomes, more)
        total = recount(first + more)
        s = consumed_all(run, total.consumed["predictions"], total.consumed["outcomes"])
        assert s.get("stream_fair_leader") == 1
        assert s.get("stream_fair_errors_total", kind="leader") == 1
        assert "skipped (unreadable)" in run.log
        assert run.stop() == 0, run.log
    finally:
        run.kill()
