"""``check-config --probe``: what a few real records look like under the config.

Unit tests decode hand-made records; the integration test probes real topics on the broker, with
a config that matches and with the README's minimal config on a stream it does not fit.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import orjson
import pytest

from stream_fair.config import Config
from stream_fair.dev import simulate
from stream_fair.dev.broker import create_topics, produce_events
from stream_fair.groups import MISSING
from stream_fair.probe import probe_topic, render
from tests.conftest import TopicNames
from tests.helpers import cli_env, run_cli, write_config

LENDING = {"fairness": {"features": ["sex", "race"]}}


def _pred(i: int, **attrs: str) -> bytes:
    return orjson.dumps(
        {"id": f"r{i}", "ts": 1_790_000_000 + i, "model": "m", "prediction": i % 2, "attributes": attrs}
    )


def test_groups_fields_and_paths_of_matching_records() -> None:
    cfg = Config.model_validate(LENDING)
    values = [_pred(i, sex="F" if i % 3 else "M", race="B") for i in range(9)]
    p = probe_topic("predictions", "preds", values, cfg)
    assert p.records == 9 and p.problems == []
    assert p.groups == {"sex": {"F": 6, "M": 3}, "race": {"B": 9}}
    assert p.fields["attributes.sex"] == 9 and p.fields["id"] == 9
    assert p.configured["feature sex"] == ("attributes.sex", 9)
    assert p.models == {"m": 9}
    text = render([p])
    assert "groups of sex: F (6), M (3)" in text and text.endswith("will count these records")


def test_a_feature_in_no_record_is_a_problem_that_names_what_is_there() -> None:
    cfg = Config.model_validate(LENDING)
    p = probe_topic("predictions", "preds", [_pred(i, group="A") for i in range(5)], cfg)
    assert p.groups["sex"] == {MISSING: 5}
    assert len(p.problems) == 2  # sex and race
    assert "feature 'sex': path attributes.sex is in 0 of 5 records" in p.problems[0]
    assert "the records have attributes.group" in p.problems[0]
    text = render([p])
    assert "2 problems:" in text and "MISSING" in text


def test_a_feature_in_few_records_is_a_problem() -> None:
    cfg = Config.model_validate({"fairness": {"features": ["sex"]}})
    values = [_pred(0, sex="F")] + [_pred(i) for i in range(1, 4)]
    p = probe_topic("predictions", "preds", values, cfg)
    assert p.problems == [
        f"feature 'sex': path attributes.sex is in only 1 of 4 records (the rest count as group {MISSING})"
    ]


def test_rejections_are_counted_with_an_example() -> None:
    cfg = Config.model_validate(LENDING)
    values = [
        b"not json",
        orjson.dumps({"id": "x", "ts": 1, "label": "maybe"}),
        orjson.dumps({"id": "y", "ts": 2, "label": 1}),
    ]
    p = probe_topic("outcomes", "outs", values, cfg)
    assert p.rejections == {"invalid_json": 1, "invalid_label": 1}
    assert "schema.label_values" in p.examples["invalid_label"]
    assert p.problems == [] and p.groups == {}
    everything_bad = probe_topic("outcomes", "outs", values[:2], cfg)
    assert everything_bad.problems and "every record is rejected" in everything_bad.problems[0]


def test_an_empty_topic_is_a_problem() -> None:
    p = probe_topic("outcomes", "outs", [], Config.model_validate(LENDING))
    assert p.problems == ["no records read from 'outs': is anything producing to it?"]


@pytest.mark.integration
@pytest.mark.transports
def test_probe_on_real_topics(kafka_bootstrap: str, kafka_transport: str, tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:12]
    topics = TopicNames(f"predictions-{tag}", f"outcomes-{tag}", f"dead-letters-{tag}")
    create_topics(kafka_bootstrap, [topics.predictions, topics.outcomes], partitions=2)
    events = simulate.messy(
        simulate.generate(simulate.SCENARIOS["bias_onset"](), 400, seed=3), seed=3, malformed_rate=0.2
    )
    produce_events(kafka_bootstrap, topics.predictions, topics.outcomes, events)
    base = {
        "kafka": {
            "bootstrap_servers": kafka_bootstrap,
            "request_timeout_ms": 10000,
            "transport": kafka_transport,
        },
        "topics": {"predictions": topics.predictions, "outcomes": topics.outcomes},
    }
    fits = write_config(tmp_path / "fits.yaml", {**base, "fairness": {"features": ["group"]}})
    result = run_cli("check-config", "--config", str(fits), "--probe", "--records", "40", env=cli_env())
    assert result.returncode == 0, result.stdout + result.stderr
    assert "predictions: topic" in result.stdout and "40 records read" in result.stdout
    assert "groups of group: " in result.stdout
    assert "rejected " in result.stdout  # the malformed records, with their reasons
    assert result.stdout.rstrip().endswith("will count these records")

    # The README's minimal config on this stream: every event would land in __missing__.
    readme = write_config(
        tmp_path / "readme.yaml",
        {**base, "fairness": {"features": [{"name": "sex", "reference": "Male"}, "race", "age"]}},
    )
    result = run_cli("check-config", "--config", str(readme), "--probe", env=cli_env())
    assert result.returncode == 1, result.stdout + result.stderr
    assert "3 problems:" in result.stdout
    assert "feature 'sex': path attributes.sex is in 0 of" in result.stdout
    assert "the records have attributes.group" in result.stdout

    missing = write_config(
        tmp_path / "missing.yaml",
        {**base, "topics": {"predictions": f"nope-{tag}"}, "fairness": {"features": ["group"]}},
    )
    result = run_cli("check-config", "--config", str(missing), "--probe", env=cli_env())
    assert result.returncode == 2 and result.stderr.strip().endswith("create it or fix topics.*")
