"""``/whatif`` with two replicas in one consumer group: each answers from the partitions it owns,
says so, and the two answers split the labelled pairs exactly (no pair in both, none missing)."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from stream_fair.dev.broker import produce_events
from tests.helpers import stop_process, wait_for
from tests.test_replicas import PARTITIONS, Replica, events, merged, settled, setup

pytestmark = pytest.mark.integration


def _whatif(port: int) -> dict[str, Any]:
    url = f"http://127.0.0.1:{port}/whatif?model=credit-v3&feature=sex&threshold=Female:0.4&current=0.5"
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.loads(resp.read())  # type: ignore[no-any-return]


def test_each_replica_answers_for_its_partitions(
    kafka_bootstrap: str, topic_names: Any, group_id: str, tmp_path: Path
) -> None:
    config = setup(kafka_bootstrap, topic_names, group_id, tmp_path)
    live: list[Replica] = []
    try:
        live = [Replica(config, "a", tmp_path / "a"), Replica(config, "b", tmp_path / "b")]
        wait_for(lambda: all(r.owned() for r in live), 60, "both replicas to own partitions", interval=0.5)
        settled(live)
        produce_events(kafka_bootstrap, topic_names.predictions, topic_names.outcomes, events(6_000, seed=5))

        def joined_by_sex() -> dict[str, float]:
            return merged(live).by("stream_fair_confusion_total", ["group"], model="credit-v3", feature="sex")

        def split_exactly() -> bool:
            counts = {g: v for (g,), v in joined_by_sex().items() if g in ("Female", "Male")}
            docs = [_whatif(r.port) for r in live]
            answered = {g: sum(d["groups"].get(g, {}).get("n", 0) for d in docs) for g in counts}
            return bool(counts) and answered == counts

        wait_for(split_exactly, 120, "the replicas' what-ifs to cover every labelled pair once", interval=1.0)
        docs = [_whatif(r.port) for r in live]
        owned = [set(d["partitions"]) for d in docs]
        assert owned[0].isdisjoint(owned[1]) and owned[0] | owned[1] == set(range(PARTITIONS))
        for d, o in zip(docs, owned, strict=True):
            assert d["partitions_total"] == PARTITIONS
            assert f"this replica owns {len(o)} of {PARTITIONS} partitions" in " ".join(d["notes"])
    finally:
        for r in live:
            stop_process(r.proc)
