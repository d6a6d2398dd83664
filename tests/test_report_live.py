"""``stream-fair report`` against a real detector on a real broker: from the running instance
(``--url``, its ``/report.json``) and from its state directory read offline while it runs.

The numbers are checked against what the same detector exports on ``/metrics`` (confusion and
prediction counters, rates, disparities and flags of the cumulative window; the window counts of
the ``1h`` window for the period that covers exactly that window), and the offline report must
count the same as the live one. Partitions: two, so the offsets of both are in the audit trail.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stream_fair import report_render as render
from stream_fair.app import Detector
from stream_fair.config import Config
from stream_fair.dev import simulate
from stream_fair.dev.broker import create_topics, produce_events
from stream_fair.stakeholder_report import iso, verify
from tests.conftest import TopicNames
from tests.helpers import Scrape, detector_config, run_cli, scrape, wait_consumed, write_config

pytestmark = pytest.mark.integration

MODEL = "credit-v3"
CELLS = (("1", "1", "tp"), ("0", "1", "fp"), ("0", "0", "tn"), ("1", "0", "fn"))


@pytest.fixture(scope="module")
def live(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("report-live")
    tag = uuid.uuid4().hex[:12]
    topics = TopicNames(f"predictions-{tag}", f"outcomes-{tag}", f"dead-letters-{tag}")
    create_topics(kafka_bootstrap, list(topics), partitions=2)
    cfg = detector_config(
        kafka_bootstrap,
        topics,
        f"stream-fair-report-{tag}",
        tmp / "state",
        fairness={
            "features": [{"name": "sex", "reference": "Male"}, {"name": "race", "reference": "White"}, "age"],
            "min_samples": 100,
        },
        windows=["1h"],  # type: ignore[arg-type]  # top-level keys are values, not sections
        window_resolution="1m",  # type: ignore[arg-type]
        state={"checkpoint_interval": "200ms"},
        schema={"score_threshold": 0.5},  # the simulated model decides score >= 0.5: what-ifs start there
    )
    config_path = write_config(tmp / "config.yaml", cfg)
    detector = Detector(Config.model_validate(cfg), exporter_port=0)
    stop = threading.Event()
    thread = threading.Thread(target=detector.run, args=(stop,), name="detector", daemon=True)
    thread.start()
    try:
        scenario = simulate.SCENARIOS["lending"](
            label_delay_mean_s=120.0, label_prob_by_cell={"race=Hispanic&sex=Female": 0.8}
        )
        # 2 predictions a second over ~100 minutes: more than the 1h window, cut with outcomes in flight
        events = [
            (k, p)
            for k, p in simulate.generate(scenario, 12_000, seed=23, rate_per_s=2.0)
            if p["ts"] < 1_790_005_900
        ]
        sent = Counter(kind for kind, _ in events)
        produce_events(kafka_bootstrap, topics.predictions, topics.outcomes, events)
        # the consumed counters are those of the last checkpoint: /metrics, /report.json and the
        # store on disk then hold the same counts
        metrics = wait_consumed(detector.port, (sent["prediction"], sent["outcome"]), timeout=90)
        yield {
            "url": f"http://127.0.0.1:{detector.port}",
            "port": detector.port,
            "config": config_path,
            "state": tmp / "state",
            "metrics": metrics,
            "tmp": tmp,
        }
    finally:
        stop.set()
        thread.join(timeout=30)


def _report(live: dict[str, Any], *args: str, name: str = "report.json") -> dict[str, Any]:
    out = live["tmp"] / name
    proc = run_cli("report", *args, "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.startswith(f"wrote {out}: json"), proc.stderr
    doc = json.loads(out.read_text(encoding="utf-8"))
    assert verify(doc)
    return doc


def _check_against_metrics(doc: dict[str, Any], m: Scrape, window: str | None = None) -> int:
    checked = 0
    for f in doc["features"]:
        for g in f["groups"]:
            labels = {"model": MODEL, "feature": f["feature"], "group": g["group"]}
            for actual, predicted, cell in CELLS:
                if window is None:
                    expected = (
                        m.get("stream_fair_confusion_total", **labels, actual=actual, predicted=predicted)
                        or 0
                    )
                else:
                    expected = (
                        m.get(
                            "stream_fair_window_confusion",
                            **labels,
                            window=window,
                            actual=actual,
                            predicted=predicted,
                        )
                        or 0
                    )
                assert g["confusion"][cell] == expected, (f["feature"], g["group"], cell)
            if window is not None:
                continue
            for p, key in (("0", None), ("1", "positive_predictions")):
                n = m.get("stream_fair_predictions_total", **labels, predicted=p)
                if key:
                    assert g[key] == n
            total = sum(m.get("stream_fair_predictions_total", **labels, predicted=p) or 0 for p in "01")
            assert g["predictions"] == total
            assert g["pending"] == total - g["labelled"] - g["expired"]
            w = {**labels, "window": "cumulative"}
            for rate in ("selection_rate", "true_positive_rate", "false_positive_rate", "accuracy"):
                for suffix, part in (("", "value"), ("_lower", "lower"), ("_upper", "upper")):
                    assert g["rates"][rate][part] == pytest.approx(
                        m.get(f"stream_fair_{rate}{suffix}", **w), abs=1e-6
                    )
            assert g["below_min_samples"] == bool(m.get("stream_fair_group_below_min_samples", **w))
            checked += 1
        if window is None:
            for d in f["disparities"]:
                lab = {"model": MODEL, "feature": f["feature"], "window": "cumulative", "method": d["method"]}
                value = m.get(f"stream_fair_{d['disparity']}", **lab)
                if not d["computable"]:
                    assert value is None
                    continue
                assert d["value"] == pytest.approx(value, abs=1e-6)
                assert d["flagged"] == bool(
                    m.get("stream_fair_disparity_flagged", **lab, disparity=d["disparity"])
                )
    return checked


def test_report_from_the_running_instance_matches_its_metrics(live: dict[str, Any]) -> None:
    doc = _report(live, "--url", live["url"])
    assert _check_against_metrics(doc, live["metrics"]) > 10
    assert doc["audit"]["source"].startswith("running detector 127.0.0.1:")
    parts = doc["audit"]["partitions"]
    assert [p["partition"] for p in parts] == [0, 1]
    consumed = sum(p["consumed"][0] for p in parts)
    assert consumed == live["metrics"].get("stream_fair_events_consumed_total", topic="predictions")
    assert all(p["next_offsets"][0] and p["next_offsets"][1] for p in parts)
    assert doc["alarms"]["available"] is True  # one replica: it leads the model-wide alarm
    assert doc["summary"]["totals"][MODEL]["pending"] > 0
    flagged = {(x["feature"], x["disparity"]) for x in doc["summary"]["flagged"]}
    assert ("race&sex", "equal_opportunity_difference") in flagged


def test_the_other_analyses_are_in_the_report(live: dict[str, Any]) -> None:
    doc = _report(live, "--url", live["url"], name="signals.json")
    sig = doc["signals"]
    assert all(s["available"] for s in sig.values()), {k: s.get("reason") for k, s in sig.items()}
    [w] = [w for w in sig["threshold_whatif"]["data"]["whatifs"] if w["feature"] == "race&sex"]
    assert w["status"] == 200 and w["criterion"] == "equal_opportunity" and "Black&Female" in w["groups"]
    assert w["groups"]["Black&Female"]["current_threshold"] == 0.5
    # the what-if's current rates are the report's own (same labelled pairs, same threshold)
    rs = next(f for f in doc["features"] if f["feature"] == "race&sex")
    bf = next(g for g in rs["groups"] if g["group"] == "Black&Female")
    now = w["groups"]["Black&Female"]["current_rates"]["true_positive_rate"]["value"]
    assert now == pytest.approx(bf["rates"]["true_positive_rate"]["value"], abs=0.02)  # scores binned by 0.02
    est = sig["label_free_estimates"]["data"]["features"]
    assert {f["feature"] for f in est} >= {"sex", "race", "race&sex"}
    assert doc["unknown"]["estimated_values"]
    explained = sig["root_cause"]["data"]["explained"]
    assert any(x["feature"] == "race&sex" and "error" not in x for x in explained)
    html = render.to_html(doc)
    assert '<figure class=whatif><svg class="forest"' in html and "(estimated)" in html


def test_a_period_equal_to_the_window_matches_the_window_counts(live: dict[str, Any]) -> None:
    whole = _report(live, "--url", live["url"])
    points = whole["over_time"][0]["points"]  # the kept buckets: exactly the 1h window
    start, end = points[0]["t"], points[-1]["t"] + whole["over_time"][0]["step_seconds"]
    doc = _report(
        live, "--url", live["url"], "--from", str(start), "--to", iso(end) or "", name="period.json"
    )
    assert (doc["period"]["prediction_time_from"], doc["period"]["prediction_time_to"]) == (
        iso(start),
        iso(end),
    )
    assert end - start == 3600.0
    _check_against_metrics(doc, scrape(live["port"]), window="1h")
    assert doc["summary"]["totals"][MODEL]["predictions"] < whole["summary"]["totals"][MODEL]["predictions"]


def test_offline_report_from_the_live_state_directory(live: dict[str, Any]) -> None:
    online = _report(live, "--url", live["url"])
    offline = _report(
        live, "--config", str(live["config"]), "--state-dir", str(live["state"]), name="offline.json"
    )
    assert offline["audit"]["source"].startswith("state directory ")
    assert offline["audit"]["config_fingerprint"] == online["audit"]["config_fingerprint"]

    def counts(doc: dict[str, Any]) -> list[Any]:
        return [
            (f["feature"], [(g["group"], g["predictions"], g["confusion"]) for g in f["groups"]])
            for f in doc["features"]
        ]

    assert counts(offline) == counts(online)
    assert [p["next_offsets"] for p in offline["audit"]["partitions"]] == [
        p["next_offsets"] for p in online["audit"]["partitions"]
    ]
    # the detector was not disturbed: it still answers and still owns its store
    assert scrape(live["port"]).get("stream_fair_partitions_owned") == 2


def test_html_and_markdown_from_the_instance(live: dict[str, Any]) -> None:
    html_path, md_path = live["tmp"] / "r.html", live["tmp"] / "r.md"
    saved = _report(live, "--url", live["url"], name="saved.json")  # one document, three renderings
    for path in (html_path, md_path):
        proc = run_cli("report", "--input", str(live["tmp"] / "saved.json"), "-o", str(path))
        assert proc.returncode == 0, proc.stderr
    html = html_path.read_text(encoding="utf-8")
    assert render.verify_html(html)
    assert html.count('<figure><svg class="forest"') == html.count('<svg class="coverage"') == 4
    assert '<svg class="spark"' in html
    doc = render.embedded_document(html)
    assert doc == saved and doc["audit"]["content_hash"]["value"] in md_path.read_text(encoding="utf-8")
    assert run_cli("report", "--verify", str(html_path)).returncode == 0


def test_a_period_without_predictions_says_so(live: dict[str, Any]) -> None:
    doc = _report(live, "--url", live["url"], "--last", "1d", name="empty.json")  # the stream is older
    assert doc["features"] == [] and doc["models"] == []
    assert any(n.startswith("No predictions in this period") for n in doc["unknown"]["notes"])
    assert "No predictions in this period" in render.to_markdown(doc)


def test_report_endpoint_errors_are_one_line(live: dict[str, Any]) -> None:
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{live['url']}/report.json?from=noon", timeout=10)
    assert err.value.code == 400
    body = json.loads(err.value.read())
    assert body["error"].startswith("report error: ") and "\n" not in body["error"]
    # times and durations no datetime holds: a 400 naming the value, never a 500
    for query in (
        "from=99999999999999999999",
        "from=0001-01-01T00:00:00%2B14:00",
        "last=99999999999999w",
        "from=" + "9" * 5000,
    ):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{live['url']}/report.json?{query}", timeout=10)
        assert err.value.code == 400, (query, err.value.code)
        assert err.value.headers["Content-Type"] == "application/json"
        assert json.loads(err.value.read())["error"].startswith("report error: "), query
    proc = run_cli("report", "--url", live["url"], "--from", "2020-01-01T00:00Z")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "per-period counts are kept only from" in proc.stderr


def test_cli_reads_no_state_of_another_config(live: dict[str, Any], tmp_path: Path) -> None:
    other = json.loads(json.dumps(__import__("yaml").safe_load(Path(live["config"]).read_text())))
    other["windows"] = ["2h"]  # another window layout: the stored fingerprint differs
    path = write_config(tmp_path / "other.yaml", other)
    proc = run_cli("report", "--config", str(path), "--state-dir", str(live["state"]))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "another configuration" in proc.stderr
