"""``stream-fair report`` over two replicas (real ``stream-fair run`` processes in one consumer group
on the real broker, 4 partitions): one ``--url`` per replica gives one report of the whole model.

The stream's label delays and label chances differ by group (Asian men's outcomes take 10x
longer, a fifth of Hispanic women's never come) and it is cut with outcomes in flight. The merged
report's counts per group (confusion cells, predictions) must equal an independent recount of the
whole stream, for all data and for a period spanning the stream (per-period buckets summed over the
replicas); the report of one replica must not, and must say which partitions are missing. The
audit trail lists both replicas and the partitions and offsets each contributed. Read offline,
the two state directories merged count the same.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from stream_fair.dev import simulate
from stream_fair.dev.broker import create_topics, produce_events
from stream_fair.stakeholder_report import iso, verify
from tests.helpers import (
    Expected,
    detector_config,
    full_confusion,
    full_predictions,
    recount,
    run_cli,
    stop_process,
    wait_for,
    write_config,
)
from tests.test_replicas import GROUP, Replica, consumed_total, merged

pytestmark = pytest.mark.integration

PARTITIONS = 4
CELLS = (("1", "1", "tp"), ("0", "1", "fp"), ("0", "0", "tn"), ("1", "0", "fn"))


def _events() -> list[tuple[str, Any]]:
    scenario = simulate.SCENARIOS["lending"](
        label_delay_mean_s=120.0,
        label_delay_mean_by_cell={"race=Asian&sex=Male": 1200.0},
        label_prob_by_cell={"race=Hispanic&sex=Female": 0.8},
    )
    evs = list(simulate.generate(scenario, 6000, seed=57, rate_per_s=2.0))
    cut = 1_790_000_000.0 + 2700.0  # 45 min of predictions: outcomes still in flight, all in the 1h window
    return [(k, p) for k, p in evs if p["ts"] < cut]


def _counts(doc: dict[str, Any]) -> tuple[dict[Any, int], dict[Any, int]]:
    """(model, feature, group, actual, predicted) and (model, feature, group, predicted) counts."""
    confusion: dict[Any, int] = {}
    predictions: dict[Any, int] = {}
    for f in doc["features"]:
        for g in f["groups"]:
            cell = (f["model"], f["feature"], g["group"])
            for actual, predicted, name in CELLS:
                confusion[(*cell, actual, predicted)] = g["confusion"][name]
            predictions[(*cell, "1")] = g["positive_predictions"]
            predictions[(*cell, "0")] = g["predictions"] - g["positive_predictions"]
    return confusion, predictions


def _expected(exp: Expected) -> tuple[dict[Any, int], dict[Any, int]]:
    return dict(full_confusion(exp)), dict(full_predictions(exp))


def _report(tmp: Path, name: str, *args: str) -> dict[str, Any]:
    out = tmp / name
    proc = run_cli("report", *args, "--format", "json", "-o", str(out), timeout=120)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text(encoding="utf-8"))
    assert verify(doc)
    return doc


def test_merged_report_of_two_replicas_counts_the_whole_stream(
    kafka_bootstrap: str, topic_names: Any, group_id: str, tmp_path: Path
) -> None:
    evs = _events()
    exp = recount(evs)
    create_topics(kafka_bootstrap, [topic_names.predictions, topic_names.outcomes], partitions=PARTITIONS)
    create_topics(kafka_bootstrap, [topic_names.dead_letters], partitions=1)
    cfg = detector_config(
        kafka_bootstrap,
        topic_names,
        group_id,
        tmp_path / "unused",
        kafka=GROUP,
        windows=["1h"],  # type: ignore[arg-type]  # top-level keys are values, not sections
        window_resolution="1m",  # type: ignore[arg-type]
        state={"checkpoint_interval": "300ms"},
    )
    config = write_config(tmp_path / "stream-fair.yaml", cfg)
    replicas: list[Replica] = []
    try:
        replicas.append(Replica(config, "r1", tmp_path / "r1"))
        replicas.append(Replica(config, "r2", tmp_path / "r2"))

        def split() -> bool:
            owned = [r.scrape().get("stream_fair_partitions_owned") for r in replicas]
            return owned == [2.0, 2.0]

        wait_for(split, 90, "the 4 partitions split 2 + 2 over the replicas", interval=0.5)
        produce_events(kafka_bootstrap, topic_names.predictions, topic_names.outcomes, evs)
        want = (exp.consumed["predictions"], exp.consumed["outcomes"])
        wait_for(lambda: consumed_total(merged(replicas)) == want, 120, f"{want} consumed", interval=0.5)
        assert split(), "no rebalance while consuming"
        urls = [f"http://127.0.0.1:{r.port}" for r in replicas]

        # all data, one --url per replica: the recount of the whole stream
        doc = _report(tmp_path, "merged.json", "--url", urls[0], "--url", urls[1])
        assert _counts(doc) == _expected(exp)
        audit = doc["audit"]
        assert [s["source"] for s in audit["sources"]] == urls
        assert audit["coverage"] == {
            "partitions_total": 4, "covered": [0, 1, 2, 3], "missing": [], "model_wide": True
        }  # fmt: skip
        used = {s["source"]: [p["partition"] for p in s["partitions_used"]] for s in audit["sources"]}
        assert sorted(used[urls[0]] + used[urls[1]]) == [0, 1, 2, 3] and len(used[urls[0]]) == 2
        assert all(not s["partitions_dropped"] for s in audit["sources"])
        # the committed offsets of the 4 partitions add up to every record produced
        assert sum(p["next_offsets"][0] for p in audit["partitions"]) == want[0]
        assert sum(p["next_offsets"][1] for p in audit["partitions"]) == want[1]
        assert doc["summary"]["coverage"].startswith("The counts cover all 4 input partitions")
        for name in ("threshold_whatif", "label_free_estimates"):  # never shown as model-wide
            sig = doc["signals"][name]
            if sig["available"]:
                text = json.dumps(sig["data"])
                assert "not the whole model" in text and all(u in text for u in urls), name

        # rendered: the coverage and the sources are in the HTML, which verifies
        html = tmp_path / "merged.html"
        proc = run_cli("report", "--input", str(tmp_path / "merged.json"), "-o", str(html))
        assert proc.returncode == 0, proc.stderr
        page = html.read_text(encoding="utf-8")
        assert "The counts cover all 4 input partitions" in page and all(u in page for u in urls)
        assert run_cli("report", "--verify", str(html)).returncode == 0

        # a period spanning the stream: the replicas' per-period buckets summed
        ts = [p["ts"] for k, p in evs if k == "prediction"]
        period = _report(
            tmp_path, "period.json", "--url", urls[0], "--url", urls[1],
            "--from", iso(min(ts) - 60) or "", "--to", iso(max(ts) + 120) or "",
        )  # fmt: skip
        assert _counts(period) == _expected(exp)

        # one replica: a fraction of the stream, and the report says which partitions are missing
        single = _report(tmp_path, "single.json", "--url", urls[0])
        assert _counts(single) != _expected(exp)
        missing = sorted(set(range(4)) - set(used[urls[0]]))
        assert single["audit"]["coverage"]["missing"] == missing
        assert single["summary"]["coverage"].startswith("PARTIAL")
        assert f"partitions {', '.join(map(str, missing))} are MISSING" in single["summary"]["coverage"]

        # offline: both state directories, read-only next to the running replicas
        offline = _report(
            tmp_path, "offline.json", "--config", str(config),
            "--state-dir", str(tmp_path / "r1"), "--state-dir", str(tmp_path / "r2"),
        )  # fmt: skip
        assert _counts(offline) == _expected(exp)
        assert sorted(p["partition"] for p in offline["audit"]["partitions"]) == [0, 1, 2, 3]
        # r1 owned all 4 partitions before r2 joined: a stale copy of r2's partitions on r1's disk
        # is dropped for r2's (higher offsets), never counted twice
        dirs = [str(tmp_path / "r1"), str(tmp_path / "r2")]
        for i, s in enumerate(offline["audit"]["sources"]):
            for p in s["partitions_dropped"]:
                assert dirs[1 - i] in p["kept_from"] and p["partition"] in used[urls[1 - i]], p
    finally:
        for r in replicas:
            stop_process(r.proc)
