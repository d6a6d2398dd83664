"""End to end with the real servers: a biased stream -> stream-fair -> Prometheus (the project's
rules) -> Alertmanager (the project's routes) -> the model team's pager; Grafana's queries against
that Prometheus; the detector dying; and the demo's own Prometheus.

Components: the embedded Kafka-protocol broker, an in-process :class:`~stream_fair.app.Detector`,
Debian's ``prometheus`` and ``prometheus-alertmanager`` as subprocesses (started by
:mod:`stream_fair.dev.observability`, the same code the demo uses), and a webhook receiver on loopback.

The test copies differ from ``deploy/`` only where waiting would be impossible:

* ``alert_rules.yml``: every ``for:`` is ``FOR`` (the real ones are 5m to 6h); everything else,
  ``keep_firing_for: 15m`` included, is the committed file (asserted below);
* ``alertmanager.yml``: webhook URLs point at the loopback receiver (paths kept, so the path says
  which receiver was chosen), ``group_wait`` 1s, ``group_interval`` 1s and ``repeat_interval`` 2s,
  so a firing alert that is *not* inhibited is re-sent within the observation window;
* Prometheus scrapes and evaluates every second, ``--rules.alert.resend-delay=1s``.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any

import pytest

from stream_fair.app import Detector
from stream_fair.config import Config
from stream_fair.dev import observability, simulate
from stream_fair.dev.broker import create_topics, produce_events
from tests.conftest import TopicNames
from tests.grafana_queries import (
    custom_options,
    label_values,
    panel_queries,
    substitute,
    template_variables,
    variable_query,
)
from tests.helpers import cli_env, detector_config, paced, stop_process, wait_consumed, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[1]
DASHBOARDS = sorted((ROOT / "grafana" / "dashboards").glob("*.json"))
RUNBOOKS = ROOT / "docs" / "runbooks.md"
RUNBOOK_BASE = "https://github.com/stream-fair/stream-fair/blob/main/docs/runbooks.md#"

MODEL = "credit-v3"
BIASED = "race&sex"  # the lending scenario hides its bias in this intersection
BIASED_GROUP = "Black&Female"
FOR = "2s"
REPEAT = 2.0  # repeat_interval of the test's Alertmanager, seconds
OBSERVE = 3 * REPEAT + 2  # how long "no new fairness notification" is watched
PAGE_WITHIN = 60.0  # seconds from the end of the stream to the fairness page

#: Panel queries that cannot return data here, with the reason. Keep it tiny; it is asserted.
NO_DATA_EXPECTED: dict[str, str] = {}


# -- the live pipeline ----------------------------------------------------------------------
@dataclass
class Live:
    detector: Detector
    stop: threading.Event
    thread: threading.Thread
    stack: observability.Stack
    instance: str

    @property
    def prometheus(self) -> str:
        return self.stack.prometheus.url

    @property
    def alertmanager(self) -> str:
        return self.stack.alertmanager.url

    def notifications(self, path_prefix: str = "/") -> list[observability.Notification]:
        return [n for n in self.stack.receiver.received() if n.path.startswith(path_prefix)]


def _get(url: str) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return json.load(resp)
    except urllib.error.HTTPError as exc:  # Prometheus explains a bad query in the JSON body
        return json.load(exc)


def query(prometheus: str, expr: str) -> dict[str, Any]:
    """The ``/api/v1/query`` answer for ``expr``: ``{"status", "data" | "error", ...}``."""
    return _get(f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})) or {}


def result(prometheus: str, expr: str) -> list[dict[str, Any]]:
    answer = query(prometheus, expr)
    assert answer.get("status") == "success", (expr, answer)
    return answer["data"]["result"]  # type: ignore[no-any-return]


def lending_config(bootstrap: str, topics: TopicNames, state: Path) -> Config:
    cfg = detector_config(
        bootstrap,
        topics,
        f"stream-fair-e2e-{uuid.uuid4().hex[:8]}",
        state,
        fairness={
            "features": [
                {"name": "sex", "reference": "Male"},
                {"name": "race", "reference": "White"},
                # three age bands, limit 2: the third is folded into __other__, so the
                # cardinality-overflow panel has a series to show
                {"name": "age", "cardinality_limit": 2},
            ],
            "min_samples": 100,  # = the recording rules' eligibility
        },
        windows=["1h", "1d"],  # the rules judge 1d; the dashboards offer 1d, 1h, cumulative
        join={"ttl": "10m"},  # unlabelled predictions expire: label coverage below 1
        # 5-minute feedback periods close a few times in the stream's ~28 event-minutes, so
        # traffic share, exposure, trends and the loop indicator are defined
        # (a whole number of alarm slots: the model-wide loop test counts by slot)
        feedback={"period": "5m", "alarm_slot": "5m", "min_samples": 30},
    )
    cfg["window_resolution"] = "1m"
    return Config.model_validate(cfg)


def lending_stream() -> Iterator[tuple[str, Any]]:
    """20,000 lending predictions over the last ~28 minutes of event time, 10% never labelled,
    with duplicates and malformed records (rejections, dead letters)."""
    scenario = simulate.SCENARIOS["lending"](label_delay_mean_s=30.0, label_prob=0.9)
    clean = simulate.generate(scenario, 20_000, seed=11, start_ts=time.time() - 1700, rate_per_s=12.0)
    return simulate.messy(clean, seed=11, duplicate_rate=0.002, malformed_rate=0.001)


@pytest.fixture(scope="module")
def live(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    tmp = tmp_path_factory.mktemp("e2e")
    tag = uuid.uuid4().hex[:12]
    topics = TopicNames(f"predictions-{tag}", f"outcomes-{tag}", f"dead-letters-{tag}")
    create_topics(kafka_bootstrap, list(topics), partitions=1)
    detector = Detector(lending_config(kafka_bootstrap, topics, tmp / "state"), exporter_port=0)
    stop = threading.Event()
    thread = threading.Thread(target=detector.run, args=(stop,), name="detector", daemon=True)
    stack = None
    try:
        thread.start()
        instance = f"127.0.0.1:{detector.port}"
        stack = observability.start_stack(
            tmp / "observability",
            instance,
            model=MODEL,
            for_duration=FOR,
            interval="1s",
            group_wait="1s",
            group_interval="1s",
            repeat_interval=f"{REPEAT:g}s",
        )
        wait_for(
            lambda: result(stack.prometheus.url, 'up{job="stream-fair"} == 1'),
            20,
            "Prometheus to scrape the detector",
        )
        # Produce only now, paced over ~8 s, so Prometheus sees the counters grow (increase()
        # in the recording rules needs the growth, not just the final values).
        sent: Counter[str] = Counter()

        def counted() -> Iterator[tuple[str, Any]]:
            for kind, payload in paced(lending_stream(), per_second=5_000):
                sent[kind] += 1
                yield kind, payload

        produce_events(kafka_bootstrap, topics.predictions, topics.outcomes, counted())
        wait_consumed(detector.port, (sent["prediction"], sent["outcome"]), timeout=60)
        yield Live(detector, stop, thread, stack, instance)
    finally:
        stop.set()
        thread.join(timeout=30)
        if stack is not None:
            stack.stop()


def _alerts(
    note: observability.Notification, status: str | None = None, **labels: str
) -> list[dict[str, Any]]:
    """The notification's alerts with these labels (and this status: firing / resolved)."""
    return [
        a
        for a in note.payload.get("alerts", [])
        if (status is None or a["status"] == status)
        and all(a["labels"].get(k) == v for k, v in labels.items())
    ]


def fairness_page(live: Live) -> observability.Notification:
    """The first notification on the model team's pager with the race&sex EO calibrated alarm."""

    def arrived() -> observability.Notification | None:
        for note in live.notifications("/credit-risk/page"):
            if _alerts(
                note,
                alertname="StreamFairDisparityFlagged",
                feature=BIASED,
                disparity="equal_opportunity_difference",
                status="firing",
            ):
                return note
        return None

    return wait_for(arrived, PAGE_WITHIN, "the StreamFairDisparityFlagged page", interval=0.2)


def runbook_anchors() -> set[str]:
    """GitHub's anchors for the headings of docs/runbooks.md."""
    anchors = set()
    for line in RUNBOOKS.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", title)))
    return anchors


# -- the fairness page ----------------------------------------------------------------------
def test_rule_copies_differ_only_in_for(tmp_path: Path) -> None:
    real = [(observability.DEPLOY / "prometheus" / f).read_text() for f in observability.RULE_FILES]
    copies = [p.read_text() for p in observability.write_rule_files(tmp_path, FOR)]
    for original, copy in zip(real, copies, strict=True):
        original_lines, copy_lines = original.splitlines(), copy.splitlines()
        assert len(original_lines) == len(copy_lines)
        changed = [(a, b) for a, b in zip(original_lines, copy_lines, strict=True) if a != b]
        assert all(a.strip().startswith("for:") and b.strip() == f"for: {FOR}" for a, b in changed), changed
    assert "keep_firing_for: 15m" in copies[1]


def test_fairness_page_reaches_the_model_team_pager(live: Live) -> None:
    note = fairness_page(live)
    payload = note.payload
    assert payload["receiver"] == "team-credit-risk-pager"  # credit-* + critical
    assert payload["status"] == "firing"
    assert payload["groupLabels"] == {"model": MODEL, "feature": BIASED}

    [alert] = _alerts(note, alertname="StreamFairDisparityFlagged", disparity="equal_opportunity_difference")
    labels, annotations = alert["labels"], alert["annotations"]
    # The page is the calibrated alarm: one per model, feature and disparity (no window/method),
    # model-wide (no instance: whichever replica leads, it is the same alert).
    assert labels == {
        "alertname": "StreamFairDisparityFlagged",
        "severity": "critical",
        "category": "fairness",
        "model": MODEL,
        "feature": BIASED,
        "disparity": "equal_opportunity_difference",
        "job": "stream-fair",
    }
    assert annotations["summary"] == (
        f"{MODEL}: calibrated alarm on equal_opportunity_difference for {BIASED}"
    )
    assert annotations["description"] == (
        f"On model {MODEL}, the calibrated default alarm for equal_opportunity_difference on "
        f"feature {BIASED} is raised (time-uniform confidence sequence or calibrated change "
        "detector, valid under continuous monitoring; model-wide, from the partitions of every "
        "replica). Find the group "
        f'with stream_fair_group_change_alarm{{model="{MODEL}",feature="{BIASED}"}} == 1. '
        "Check label coverage and delays before acting."
    )
    url = annotations["runbook_url"]
    assert url.startswith(RUNBOOK_BASE), url
    assert url.removeprefix(RUNBOOK_BASE) in runbook_anchors(), url
    # ... and the query the description names finds the biased group.
    raised = result(
        live.prometheus, f'stream_fair_group_change_alarm{{model="{MODEL}",feature="{BIASED}"}} == 1'
    )
    assert BIASED_GROUP in {r["metric"]["group"] for r in raised}, raised

    # The bias is in the intersection only: no marginal verdict pages anyone, and fairness
    # verdicts go to the model team alone, never to the on-call or the triage queue.
    flagged = {
        a["labels"]["feature"]
        for n in live.notifications()
        for a in _alerts(n, alertname="StreamFairDisparityFlagged")
    }
    assert flagged == {BIASED}
    elsewhere = [
        n.path
        for n in live.notifications()
        if not n.path.startswith("/credit-risk/") and _alerts(n, category="fairness", severity="critical")
    ]
    assert elsewhere == []

    # The page came from the model-wide leader, and StreamFairNoLeader's input says so on the
    # real Prometheus: the model is led (1, not 0 and not absent), and that alert is quiet.
    [led] = result(live.prometheus, "max without (instance, pod) (stream_fair_leader)")
    assert led["metric"].get("model") == MODEL and led["value"][1] == "1", led
    assert result(live.prometheus, 'ALERTS{alertname="StreamFairNoLeader", alertstate="firing"}') == []


# -- every Grafana panel query --------------------------------------------------------------
def _variable_values(live: Live, dashboard: dict[str, Any]) -> list[dict[str, str]]:
    """Every assignment Grafana could make: query variables resolved against the live
    Prometheus (the model's, the biased feature and group preferred), all custom options."""
    preferred = {"model": MODEL, "feature": BIASED, "group": BIASED_GROUP, "instance": live.instance}
    fixed: dict[str, str] = {}
    custom: dict[str, list[str]] = {}
    for var in template_variables(dashboard):
        name = var["name"]
        if var["type"] == "datasource":
            fixed[name] = "prometheus"
        elif var["type"] == "custom":
            custom[name] = custom_options(var)
        elif var["type"] == "query":
            selector, label = label_values(substitute(variable_query(var), fixed))
            series = _get(
                f"{live.prometheus}/api/v1/series?" + urllib.parse.urlencode({"match[]": selector})
            )["data"]
            options = sorted({s[label] for s in series if label in s})
            assert preferred[name] in options, (dashboard["uid"], name, options)
            fixed[name] = preferred[name]
        else:
            raise AssertionError(f"{dashboard['uid']}: unexpected variable type {var['type']}")
    return [{**fixed, **dict(zip(custom, values, strict=True))} for values in product(*custom.values())]


def test_every_grafana_panel_query_returns_data(live: Live) -> None:
    fairness_page(live)  # firing alerts exist (the overview's alert panel), verdicts are in
    checked: dict[str, tuple[str, str]] = {}  # PromQL -> (dashboard, panel)
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text(encoding="utf-8"))
        for variables in _variable_values(live, dashboard):
            for title, expr in panel_queries(dashboard, variables):
                checked.setdefault(expr, (dashboard["uid"], title))
    failures, empty = [], []
    for expr, (uid, title) in checked.items():
        answer = query(live.prometheus, expr)
        if answer.get("status") != "success":
            failures.append(f"{uid} / {title}: {expr}\n    {answer.get('error')}")
        elif not answer["data"]["result"]:
            empty.append(f"{uid} / {title}: {expr}")
    assert failures == [], "\n".join(failures)
    assert sorted(e for e in empty if e.split(": ", 1)[1] not in NO_DATA_EXPECTED) == [], (
        "panel queries without data:\n" + "\n".join(empty)
    )
    assert set(NO_DATA_EXPECTED) <= {e.split(": ", 1)[1] for e in empty}  # no stale exemption
    panels = sum(len(panel_queries(json.loads(p.read_text()), _any_values(p))) for p in DASHBOARDS)
    assert len(checked) >= panels > 100  # every target ran, some under several assignments


def _any_values(path: Path) -> dict[str, str]:
    dashboard = json.loads(path.read_text(encoding="utf-8"))
    return {v["name"]: "x" for v in template_variables(dashboard)}


# -- the detector goes away -----------------------------------------------------------------
def test_detector_down_pages_oncall_and_inhibits_the_fairness_page(live: Live) -> None:
    fairness_page(live)
    # Control: while the detector runs, the fairness group is re-sent every REPEAT seconds, so
    # OBSERVE seconds without a fairness notification below can only come from the inhibition.
    start = time.monotonic()
    wait_for(
        lambda: len([n for n in live.notifications("/credit-risk/") if n.received > start]) >= 2,
        OBSERVE,
        "two fairness re-sends",
    )

    live.stop.set()  # stop the detector: its exporter goes away with it
    live.thread.join(timeout=30)
    assert not live.thread.is_alive()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://{live.instance}/metrics", timeout=2)

    # (on a slow start, the absent() variant may have paged before the first scrape: not this one)
    def down_page() -> observability.Notification | None:
        for note in live.notifications("/oncall/page"):
            if _alerts(note, alertname="StreamFairDetectorDown", status="firing", instance=live.instance):
                return note
        return None

    note = wait_for(down_page, 30, "the StreamFairDetectorDown page", interval=0.2)
    assert note.payload["receiver"] == "oncall-pager"
    [alert] = _alerts(note, alertname="StreamFairDetectorDown", instance=live.instance)
    assert alert["labels"] == {
        "alertname": "StreamFairDetectorDown",
        "severity": "critical",
        "category": "pipeline",
        "job": "stream-fair",
        "instance": live.instance,
        "model": MODEL,
    }
    assert alert["annotations"]["summary"] == f"stream-fair detector down on {live.instance}"
    assert alert["annotations"]["runbook_url"].removeprefix(RUNBOOK_BASE) in runbook_anchors()

    # Prometheus keeps the verdict firing (keep_firing_for) although its series went stale...
    assert result(
        live.prometheus,
        f'ALERTS{{alertname="StreamFairDisparityFlagged", alertstate="firing", feature="{BIASED}"}}',
    )
    # ... and Alertmanager holds it back, inhibited by the detector-down alert of the same model.
    alerts = _get(f"{live.alertmanager}/api/v2/alerts")
    [down] = [
        a
        for a in alerts
        if a["labels"]["alertname"] == "StreamFairDetectorDown"
        and a["labels"].get("instance") == live.instance
    ]
    assert down["status"]["state"] == "active"
    fairness = [a for a in alerts if a["labels"]["alertname"] == "StreamFairDisparityFlagged"]
    assert fairness
    for a in fairness:
        assert a["status"]["state"] == "suppressed", a
        assert a["status"]["inhibitedBy"] == [down["fingerprint"]], a

    # No fairness notification (neither a re-send nor a false "resolved") while it is down.
    time.sleep(OBSERVE)
    late = [n for n in live.notifications("/credit-risk/") if n.received > note.received]
    assert late == [], [
        (n.path, [(a["status"], a["labels"]["alertname"]) for a in n.payload["alerts"]]) for n in late
    ]
    assert (
        len([n for n in live.notifications("/oncall/page") if n.received > note.received]) >= 1
    )  # the down alert is still being re-sent


# -- the demo's own Prometheus and Alertmanager ---------------------------------------------
def test_demo_starts_prometheus_and_alertmanager_and_a_fairness_alert_fires() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "stream_fair", "demo", "--seconds", "90", "--port", "0", "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        env=cli_env(),
    )
    lines: list[str] = []
    reader = threading.Thread(
        target=lambda: lines.extend(iter(proc.stdout.readline, "")),  # type: ignore[union-attr]
        daemon=True,
    )
    reader.start()
    try:

        def urls() -> re.Match[str] | None:
            assert proc.poll() is None, "".join(lines)
            found = (
                re.match(
                    r"prometheus (http://127\.0\.0\.1:\d+)/alerts; alertmanager "
                    r"(http://127\.0\.0\.1:\d+)",
                    line,
                )
                for line in list(lines)
            )
            return next((m for m in found if m), None)

        match = wait_for(urls, 40, "the demo's Prometheus and Alertmanager URLs", interval=0.2)
        prometheus, alertmanager = match.group(1), match.group(2)

        def target_up() -> list[dict[str, Any]]:
            active = _get(f"{prometheus}/api/v1/targets")["data"]["activeTargets"]
            return [t for t in active if t["labels"].get("job") == "stream-fair" and t["health"] == "up"]

        [target] = wait_for(target_up, 20, "the demo's stream-fair target to be up")
        assert target["labels"]["model"] == MODEL
        rules = _get(f"{prometheus}/api/v1/rules")["data"]["groups"]
        names = {r["name"] for g in rules for r in g["rules"]}
        assert {"StreamFairDisparityFlagged", "StreamFairDetectorDown"} <= names

        # A newcomer sees the fairness alert fire: on the console, in Prometheus, in Alertmanager.
        wait_for(
            lambda: any(
                "ALERT firing -> team-credit-risk-pager: StreamFairDisparityFlagged" in line
                and BIASED in line
                for line in list(lines)
            ),
            60,
            "the demo to print the fairness page",
            interval=0.5,
        )
        assert result(
            prometheus,
            f'ALERTS{{alertname="StreamFairDisparityFlagged", alertstate="firing", feature="{BIASED}"}}',
        )
        assert any(
            a["labels"]["alertname"] == "StreamFairDisparityFlagged"
            for a in _get(f"{alertmanager}/api/v2/alerts")
        )
        # The demo's event time is the wall clock: the lag alert is not even pending (it fired
        # when the demo's event time started an hour back), and nothing on the console says so.
        assert not result(prometheus, 'ALERTS{alertname="StreamFairEventTimeLagHigh"}')
        assert not [line for line in list(lines) if "StreamFairEventTimeLagHigh" in line]

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=40) == 0, "".join(lines)
        for url in (prometheus, alertmanager):  # the demo stopped its servers
            with pytest.raises(OSError):
                urllib.request.urlopen(url + "/-/ready", timeout=2)
    finally:
        if proc.poll() is None:  # let the demo stop its servers (they also die with it)
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=40)
        stop_process(proc)  # type: ignore[arg-type]
