"""/explain, /search, the status page and the CLI on a real detector fed through a real broker.

The lending stream's bias sits in race&sex (Black women's TPR), which this detector is *not*
configured to watch: the search must find it, and the explanation of the race disparity must name
sex=Female as its driver. Counts are checked against a recount of the produced events (pandas).
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pandas as pd
import pytest

from stream_fair.app import Detector
from stream_fair.config import Config
from stream_fair.dev import simulate
from stream_fair.dev.broker import create_topics, produce_events
from tests.conftest import TopicNames
from tests.helpers import detector_config, recount, run_cli, wait_consumed

pytestmark = pytest.mark.integration

MODEL = "credit-v3"
BIASED = "Black&Female"


@pytest.fixture(scope="module")
def served(
    kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, pd.DataFrame]]:
    """``(base url, joined pairs recounted)`` of a detector that consumed a lending stream."""
    tmp = tmp_path_factory.mktemp("explain")
    tag = uuid.uuid4().hex[:12]
    topics = TopicNames(f"predictions-{tag}", f"outcomes-{tag}", f"dead-letters-{tag}")
    create_topics(kafka_bootstrap, list(topics), partitions=1)
    cfg = detector_config(
        kafka_bootstrap,
        topics,
        f"stream-fair-explain-{tag}",
        tmp / "state",
        fairness={"features": ["sex", "race", "age"], "intersections": [], "min_samples": 100},
        state={"checkpoint_interval": "200ms"},
    )
    detector = Detector(Config.model_validate(cfg), exporter_port=0)
    stop = threading.Event()
    thread = threading.Thread(target=detector.run, args=(stop,), name="detector", daemon=True)
    thread.start()
    try:
        scenario = simulate.SCENARIOS["lending"](label_delay_mean_s=5.0)
        events = list(simulate.generate(scenario, 20_000, seed=12))
        sent = Counter(kind for kind, _ in events)
        produce_events(kafka_bootstrap, topics.predictions, topics.outcomes, events)
        wait_consumed(detector.port, (sent["prediction"], sent["outcome"]), timeout=90)
        joined = pd.DataFrame(recount(events, ("sex", "race", "age"), ()).joined)
        yield f"http://127.0.0.1:{detector.port}", joined
    finally:
        stop.set()
        thread.join(timeout=30)


def get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as resp:
        assert resp.headers["Content-Type"] == "application/json"
        return json.loads(resp.read())


def test_search_finds_the_unconfigured_biased_intersection(served: tuple[str, pd.DataFrame]) -> None:
    base, joined = served
    doc = get(base + "/search")["models"][MODEL]
    assert doc["correction"] == "holm" and doc["tested"] > 0
    top = doc["findings"][0]  # carried order: the features as configured
    assert (top["intersection"], top["group"], top["rate"]) == (
        "sex&race",
        "Female&Black",
        "true_positive_rate",
    )
    biased = [
        f for f in doc["findings"] if f["group"] == "Female&Black" and f["rate"] == "true_positive_rate"
    ]
    assert biased and biased[0]["direction"] == "below", doc["findings"]
    f = biased[0]
    pos = joined[joined.y_true == 1]
    cell = (pos.race == "Black") & (pos.sex == "Female")
    assert (f["trials"], f["successes"]) == (int(cell.sum()), int(pos[cell].y_pred.sum()))
    assert (f["rest_trials"], f["rest_successes"]) == (int((~cell).sum()), int(pos[~cell].y_pred.sum()))
    assert "['sex', 'race']" in f["suggestion"]


def test_explain_names_the_driver_of_the_race_gap(served: tuple[str, pd.DataFrame]) -> None:
    base, joined = served
    url = f"{base}/explain?model={MODEL}&feature=race&disparity=equal_opportunity_difference&group=Black"
    doc = get(url)
    assert doc["group"] == "Black" and doc["rate"] == "true_positive_rate"
    assert doc["periods"]["split_source"] in ("alarm", "midpoint")
    # one replica owns every partition: the answer says so and carries no partial-coverage note
    assert doc["partitions_total"] and doc["partitions"] == list(range(doc["partitions_total"]))
    assert "coverage_note" not in doc
    drivers = doc["drivers"]
    assert (drivers["ranked"][0]["by"], drivers["ranked"][0]["value"]) == ("sex", "Female")
    # the after period's pairs, recounted: the gap and the driver's counts
    after_pairs = doc["periods"]["after"]["pairs"]
    assert 0 < after_pairs <= len(joined)
    total = sum(d["contribution"] for d in drivers["ranked"] if d["by"] == "sex")
    assert total == pytest.approx(drivers["gap"], abs=1e-6)
    gap = doc["decomposition"]["gap"]
    comps = gap["components"]
    assert sum(c["value"] for c in comps.values()) == pytest.approx(gap["change"]["value"], abs=1e-5)


def test_explain_errors_are_http_statuses(served: tuple[str, pd.DataFrame]) -> None:
    base, _ = served
    for query, code in (
        ("model=credit-v3&feature=race", 400),
        ("model=credit-v3&feature=nope&disparity=equal_opportunity_difference", 404),
        ("model=nope&feature=race&disparity=equal_opportunity_difference", 404),
        ("model=credit-v3&feature=race&disparity=nope", 400),
        ("model=credit-v3&feature=race&disparity=equal_opportunity_difference&rate=nope", 400),
        # a group without pairs, a rate of another disparity: were 200s with every value null, or an
        # FPR decomposition labelled equal opportunity
        ("model=credit-v3&feature=race&disparity=equal_opportunity_difference&group=nogroup", 400),
        ("model=credit-v3&feature=race&disparity=equal_opportunity_difference&rate=false_positive_rate", 400),
    ):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{base}/explain?{query}", timeout=30)
        assert err.value.code == code, query


def test_status_page_lists_the_findings(served: tuple[str, pd.DataFrame]) -> None:
    base, _ = served
    with urllib.request.urlopen(base + "/", timeout=30) as resp:
        html = resp.read().decode()
    section = html.split("<h2>Intersections nobody configured</h2>", 1)[1].split("<h2>", 1)[0]
    assert "Female&amp;Black" in section and "fairness.intersections" in section


def test_cli_prints_the_explanation_and_the_findings(served: tuple[str, pd.DataFrame]) -> None:
    base, _ = served
    out = run_cli(
        "explain", "--url", base, "--model", MODEL, "--feature", "race",
        "--disparity", "equal_opportunity_difference", "--group", "Black",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "sex=Female" in out.stdout and "error_rates" in out.stdout and "traffic_mix" in out.stdout
    found = run_cli("explain", "--url", base, "--search")
    assert found.returncode == 0 and "sex&race=Female&Black true_positive_rate" in found.stdout
    bad = run_cli("explain", "--url", base, "--model", MODEL)
    assert bad.returncode == 2 and "--feature" in bad.stderr


def test_explain_refuses_a_split_that_is_no_time(served: tuple[str, pd.DataFrame]) -> None:
    """``split=inf`` overflowed in the period arithmetic: an HTTP 500 (and NaN a 400 that quoted
    Python's own message). Anything outside 1970..9999 is a 400 that says what a split is."""
    base, _ = served
    for split in ("inf", "-inf", "nan", "9" * 400, "-5"):
        url = (
            f"{base}/explain?model={MODEL}&feature=race&disparity=equal_opportunity_difference&split={split}"
        )
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(url, timeout=30)
        assert err.value.code == 400, (split, err.value.code)
        assert "is not a unix time between 1970 and 9999" in err.value.read().decode(), split
