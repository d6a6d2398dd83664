"""Cardinality bounded everywhere: features, intersection groups and models fold into __other__.

The issue's two cases, measured on a full scrape (feedback families included): an intersection of
two 50-value features (2,499 groups, 309k series before) and 1,000 model names (385k series
before). With the default limits each scrape stays under 50k series.
"""

from __future__ import annotations

import itertools

import orjson
from prometheus_client import generate_latest

from stream_fair.app import _default_feedback
from stream_fair.config import Config
from stream_fair.exporter import PipelineStats, registry_for
from stream_fair.groups import MODEL_OVERFLOW, OTHER
from stream_fair.report import build_report
from tests.helpers import LocalTracker as Tracker

SERIES_BUDGET = 50_000


def _scrape(cfg: Config, rows: list[tuple[str, dict[str, str]]]) -> tuple[Tracker, str]:
    t = Tracker(cfg, feedback=_default_feedback(cfg))
    for i, (model, attrs) in enumerate(rows):
        ts = 1_000_000 + i
        p = {"id": f"r{i}", "ts": ts, "model": model, "prediction": i % 2, "attributes": attrs}
        t.update_prediction(0, orjson.dumps(p), i)
        t.update_outcome(0, orjson.dumps({"id": f"r{i}", "ts": ts + 1, "label": (i // 2) % 2}), i)
    registry = registry_for(lambda: (build_report(t.snapshot(), cfg), PipelineStats()))
    return t, generate_latest(registry).decode()


def _series(text: str) -> int:
    return sum(1 for line in text.splitlines() if line and not line.startswith("#"))


def test_an_intersection_of_two_50_value_features_stays_under_budget() -> None:
    cfg = Config.model_validate({"fairness": {"features": ["a", "b"], "intersections": [["a", "b"]]}})
    rows = [("m", {"a": f"a{x}", "b": f"b{y}"}) for x, y in itertools.product(range(50), repeat=2)]
    t, text = _scrape(cfg, rows)
    assert _series(text) < SERIES_BUDGET, _series(text)
    snap = t.snapshot()
    groups = {t.features[2].group(cell) for (_, cell) in snap.predictions}
    assert len(groups) == cfg.fairness.intersection_cardinality_limit + 1 and OTHER in groups
    assert snap.overflow["a&b"] == 2500 - cfg.fairness.intersection_cardinality_limit
    assert snap.overflow["a"] == snap.overflow["b"] == 0
    assert (
        f'stream_fair_cardinality_overflow_total{{feature="a&b",partition="0"}} {snap.overflow["a&b"]}.0'
        in text
    )
    # the marginals are untouched by the intersection's folding
    assert {t.features[0].group(cell) for (_, cell) in snap.predictions} == {f"a{x}" for x in range(50)}


def test_a_thousand_models_stay_under_budget() -> None:
    cfg = Config.model_validate(
        {"fairness": {"features": ["sex", "race", "age"], "intersections": [["race", "sex"]]}}
    )
    attrs = [
        {"sex": s, "race": r, "age": a}
        for s, r, a in itertools.product(
            ["F", "M"], ["A", "B", "C", "D", "E"], ["18-25", "26-40", "41-65", "65+"]
        )
    ]
    rows = [(f"model-{i % 1000}", attrs[i % len(attrs)]) for i in range(20_000)]
    t, text = _scrape(cfg, rows)
    assert _series(text) < SERIES_BUDGET, _series(text)
    models = {model for (model, _) in t.snapshot().predictions}
    assert len(models) == cfg.fairness.model_limit + 1 and OTHER in models
    overflow = t.snapshot().overflow[MODEL_OVERFLOW]
    assert overflow == 20_000 - sum(1 for m, _ in rows if m in models)
    assert (
        f'stream_fair_cardinality_overflow_total{{feature="{MODEL_OVERFLOW}",partition="0"}} {overflow}.0'
        in text
    )


def test_admissions_survive_a_checkpoint() -> None:
    cfg = Config.model_validate(
        {
            "fairness": {
                "features": ["a", "b"],
                "intersections": [["a", "b"]],
                "intersection_cardinality_limit": 2,
                "model_limit": 1,
            }
        }
    )
    t = Tracker(cfg)
    for i, (a, m) in enumerate([("x", "m1"), ("y", "m2"), ("z", "m1")]):
        t.update_prediction(
            0,
            orjson.dumps(
                {"id": f"r{i}", "ts": 1e6, "model": m, "prediction": 1, "attributes": {"a": a, "b": "q"}}
            ),
            i,
        )
    t.snapshot()  # a checkpoint: the admissions are saved with the partition
    u = Tracker(cfg)
    u.shard(0).guard.load_state(orjson.loads(orjson.dumps(t.shards[0].guard.to_state())))
    ug, tg = u.shards[0].guard, t.shards[0].guard
    assert ug.cells == tg.cells and ug.models == {"m1"} and ug.model_overflow == 1
    u.update_prediction(
        0,
        orjson.dumps(
            {"id": "new", "ts": 1e6, "model": "m1", "prediction": 1, "attributes": {"a": "w", "b": "q"}}
        ),
        9,
    )
    assert u.snapshot().overflow == {"a": 0, "b": 0, "a&b": 2, MODEL_OVERFLOW: 1}


def test_duplicates_admit_no_group_model_or_cell() -> None:
    """A prediction whose id is already counted is a duplicate whatever model or group it claims:
    it must not take a model slot (the genuine next model would be folded into ``__other__``), a
    group slot, an overflow count or a zero-count cell. Before, the guard folded it first."""
    cfg = Config.model_validate({"fairness": {"features": ["a"], "model_limit": 2, "cardinality_limit": 2}})
    t = Tracker(cfg)

    def predict(i: int, event_id: str, model: str, a: str) -> None:
        raw = {"id": event_id, "ts": 1e6 + i, "model": model, "prediction": 1, "attributes": {"a": a}}
        t.update_prediction(0, orjson.dumps(raw), i)

    predict(0, "x", "m0", "g0")
    for i in range(1, 11):  # ten copies of x, each claiming a new model and a new group
        predict(i, "x", f"dup{i}", f"h{i}")
    predict(11, "y", "real", "g1")
    snap = t.snapshot()
    assert snap.fates["predictions"]["duplicate"] == 10
    assert {model for (model, _) in snap.predictions} == {"m0", "real"}
    assert {t.features[0].group(cell) for (_, cell) in snap.predictions} == {"g0", "g1"}
    assert snap.overflow[MODEL_OVERFLOW] == 0 and snap.overflow["a"] == 0
    counted = sum(sum(v) for v in snap.predictions.values())
    assert counted == 2, snap.predictions  # the two genuine predictions, in cells of their own
    assert len(snap.predictions) == 2

    # a duplicate of a model and group already admitted, in a pair never seen: no cell either
    predict(12, "y", "m0", "g1")
    snap = t.snapshot()
    assert snap.fates["predictions"]["duplicate"] == 11 and len(snap.predictions) == 2
