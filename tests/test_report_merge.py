"""The pure merge of several replicas' report inputs (:mod:`stream_fair.report_merge`), against an
independent recount of the whole stream (plain Python over the events, no stream-fair counting).

The stream is split into 4 partitions by id; replica A owns 0 and 1, replica B owns 2 and 3 and
still holds a stale copy of partition 1 (as during a rebalance: fewer events, lower offsets).
The merged counts must equal the recount (the stale copy never counted), the audit trail must name
both sources, the partitions each contributed and the one dropped; the rule must follow the
offsets (the copy with the higher offsets wins, whichever replica holds it).
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest

from stream_fair.config import Config
from stream_fair.report_merge import inputs_from_json, inputs_to_json, merge
from stream_fair.stakeholder_report import ReportError, ReportInputs, assemble

PARTITIONS = 4
MODEL = "m"
SEXES, RACES = ("Female", "Male"), ("Black", "White", "Asian")
ALARM = {"ts": 1.0, "seq": 1, "kind": "alarm_raised", "model": MODEL, "feature": "sex", "group": "Female",
         "disparity": "demographic_parity_difference", "rate": "selection_rate"}  # fmt: skip


def _config(**fairness: Any) -> Config:
    return Config.model_validate(
        {"fairness": {"features": ["sex", "race"], "min_samples": 10, **fairness}, "windows": ["1h"]}
    )


def _stream(n: int, seed: int) -> list[dict[str, Any]]:
    """Events with a label that is missing (pending) more often for Black applicants."""
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        sex, race = rnd.choice(SEXES), rnd.choice(RACES)
        pred = int(rnd.random() < (0.6 if sex == "Male" else 0.4))
        label = int(rnd.random() < 0.5)
        labelled = rnd.random() < (0.5 if race == "Black" else 0.9)
        out.append(
            {
                "id": i,
                "p": i % PARTITIONS,
                "sex": sex,
                "race": race,
                "pred": pred,
                "label": label if labelled else None,
            }
        )
    return out


def _row(events: list[dict[str, Any]]) -> list[int]:
    """[predicted_0, predicted_1, tp, fp, tn, fn, expired] of some events (independent of counts.py)."""
    r = [0] * 7
    for e in events:
        r[e["pred"]] += 1
        if e["label"] is not None:
            r[{(1, 1): 2, (0, 1): 3, (0, 0): 4, (1, 0): 5}[(e["label"], e["pred"])]] += 1
    return r


def _partition_rows(events: list[dict[str, Any]]) -> dict[tuple[str, tuple[str, ...]], list[int]]:
    cells: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for e in events:
        cells.setdefault((e["sex"], e["race"]), []).append(e)
    return {(MODEL, c): _row(evs) for c, evs in cells.items()}


def _source(
    name: str, cfg: Config, parts: dict[int, list[dict[str, Any]]], leader: bool | None
) -> ReportInputs:
    rows = {p: _partition_rows(evs) for p, evs in parts.items()}
    cumulative: dict[Any, list[int]] = {}
    for prow in rows.values():
        for k, r in prow.items():
            acc = cumulative.setdefault(k, [0] * 7)
            for i, v in enumerate(r):
                acc[i] += v
    return ReportInputs(
        config=cfg,
        cumulative=cumulative,
        buckets={},
        partitions=[
            {"partition": p, "next_offsets": [len(evs), len(evs)], "consumed": [len(evs), len(evs)]}
            for p, evs in parts.items()
        ],
        source=name,
        taken_at=1_790_000_000.0,
        software_version="test",
        alarm_events=None if leader is None else [ALARM],
        partition_rows=rows,
        partitions_total=PARTITIONS,
        leader=leader,
        signals={
            "threshold_whatif": {"over": "x", "whatifs": [{"model": MODEL, "feature": "sex", "notes": []}]}
        },
    )  # fmt: skip


def _recount(events: list[dict[str, Any]]) -> dict[tuple[str, str], Counter[str]]:
    out: dict[tuple[str, str], Counter[str]] = {}
    for e in events:
        for feature in ("sex", "race"):
            c = out.setdefault((feature, e[feature]), Counter())
            c["predictions"] += 1
            if e["label"] is None:
                c["pending"] += 1
            else:
                c["labelled"] += 1
                c[{(1, 1): "tp", (0, 1): "fp", (0, 0): "tn", (1, 0): "fn"}[(e["label"], e["pred"])]] += 1
    return out


def _counted(doc: dict[str, Any]) -> dict[tuple[str, str], Counter[str]]:
    out = {}
    for f in doc["features"]:
        for g in f["groups"]:
            c = Counter({k: g[k] for k in ("predictions", "pending", "labelled")})
            c.update(g["confusion"])
            out[(f["feature"], g["group"])] = +c
    return out


@pytest.fixture(scope="module")
def stream() -> list[dict[str, Any]]:
    return _stream(4000, seed=41)


def _by_partition(events: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    out: dict[int, list[dict[str, Any]]] = {p: [] for p in range(PARTITIONS)}
    for e in events:
        out[e["p"]].append(e)
    return out


def test_duplicate_partition_counted_once_from_the_higher_offsets(stream: list[dict[str, Any]]) -> None:
    cfg, parts = _config(), _by_partition(stream)
    stale = parts[1][: len(parts[1]) // 2]  # B's copy of partition 1 stopped halfway
    a = _source("replica-a", cfg, {0: parts[0], 1: parts[1]}, leader=True)
    b = _source("replica-b", cfg, {1: stale, 2: parts[2], 3: parts[3]}, leader=False)
    for order in ([a, b], [b, a]):  # the rule follows the offsets, not the order of the sources
        m = merge(order)
        doc = assemble(m)
        assert _counted(doc) == {k: +v for k, v in _recount(stream).items()}
        by_source = {s["source"]: s for s in doc["audit"]["sources"]}
        assert [p["partition"] for p in by_source["replica-a"]["partitions_used"]] == [0, 1]
        assert [p["partition"] for p in by_source["replica-b"]["partitions_used"]] == [2, 3]
        assert by_source["replica-b"]["partitions_dropped"] == [
            {
                "partition": 1,
                "next_offsets": [len(stale)] * 2,
                "consumed": [len(stale)] * 2,
                "kept_from": "replica-a",
            }
        ]
        assert [(p["partition"], p["source"]) for p in doc["audit"]["partitions"]] == [
            (0, "replica-a"), (1, "replica-a"), (2, "replica-b"), (3, "replica-b")
        ]  # fmt: skip
        assert doc["audit"]["coverage"] == {
            "partitions_total": 4, "covered": [0, 1, 2, 3], "missing": [], "model_wide": True
        }  # fmt: skip
        assert any("Partition 1 was reported by replica-a" in n for n in doc["unknown"]["notes"])
        # the alarm log is the leader's; the what-if is kept per source and says so
        assert doc["alarms"]["available"] and len(doc["alarms"]["events_in_period"]) == 1
        whatifs = doc["signals"]["threshold_whatif"]["data"]["whatifs"]
        assert sorted(w["source"] for w in whatifs) == ["replica-a", "replica-b"]
        assert all("only (not model-wide)" in w["notes"][-1] for w in whatifs)
    # the other way round: B's copy got further, so B's is kept and A's dropped
    ahead = _source("replica-b", cfg, {1: parts[1], 2: parts[2], 3: parts[3]}, leader=False)
    behind = _source("replica-a", cfg, {0: parts[0], 1: stale}, leader=True)
    doc = assemble(merge([behind, ahead]))
    assert _counted(doc) == {k: +v for k, v in _recount(stream).items()}
    assert doc["audit"]["sources"][0]["partitions_dropped"][0]["kept_from"] == "replica-b"


def test_naive_sum_would_count_the_duplicate_twice(stream: list[dict[str, Any]]) -> None:
    """The check above can fail: adding every source's counts overcounts partition 1."""
    cfg, parts = _config(), _by_partition(stream)
    a = _source("a", cfg, {0: parts[0], 1: parts[1]}, leader=None)
    b = _source("b", cfg, {1: parts[1], 2: parts[2], 3: parts[3]}, leader=None)
    naive = ReportInputs(
        config=cfg, cumulative={**a.cumulative}, buckets={}, partitions=[*a.partitions, *b.partitions],
        source="naive", taken_at=0.0, software_version="test",
    )  # fmt: skip
    for k, r in b.cumulative.items():
        naive.cumulative[k] = [x + y for x, y in zip(naive.cumulative.get(k, [0] * 7), r, strict=True)]  # type: ignore[index]
    assert _counted(assemble(naive)) != {k: +v for k, v in _recount(stream).items()}
    merged = assemble(merge([a, b]))
    assert _counted(merged) == {k: +v for k, v in _recount(stream).items()}
    assert not merged["alarms"]["available"]  # no leader among the sources: replica-local logs are not merged
    assert any("No source is the model-wide leader" in n for n in merged["unknown"]["notes"])


def test_one_source_says_which_partitions_are_missing(stream: list[dict[str, Any]]) -> None:
    cfg, parts = _config(), _by_partition(stream)
    doc = assemble(_source("replica-a", cfg, {0: parts[0], 1: parts[1]}, leader=True))
    assert doc["audit"]["coverage"]["missing"] == [2, 3]
    assert doc["summary"]["coverage"].startswith("PARTIAL: the counts cover input partitions 0, 1 of 4")
    assert doc["summary"]["coverage"] in doc["unknown"]["notes"]
    assert _counted(doc) != {k: +v for k, v in _recount(stream).items()}


def test_raw_payload_round_trips_and_configs_must_match(stream: list[dict[str, Any]]) -> None:
    cfg, parts = _config(), _by_partition(stream)
    a = _source("a", cfg, {0: parts[0], 1: parts[1]}, leader=True)
    b = _source("b", cfg, {2: parts[2], 3: parts[3]}, leader=False)
    back = [inputs_from_json(inputs_to_json(s), s.source) for s in (a, b)]
    assert assemble(merge(back))["features"] == assemble(merge([a, b]))["features"]
    other = _source("c", _config(min_samples=11), {2: parts[2]}, leader=False)
    with pytest.raises(ReportError, match="run different configurations"):
        merge([a, other])
    with pytest.raises(ReportError, match="not the raw report inputs"):
        inputs_from_json({"schema": "stream-fair-report/1"}, "http://x")
