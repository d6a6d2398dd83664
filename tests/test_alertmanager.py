"""Alertmanager configuration: amtool validation, routing of every alert, real inhibition.

amtool and prometheus-alertmanager are required (Debian package ``prometheus-alertmanager``;
CI installs it): a missing binary fails these tests instead of skipping them.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"
ALERT_RULES = ROOT / "deploy" / "prometheus" / "alert_rules.yml"

ALERTS = [
    rule
    for group in yaml.safe_load(ALERT_RULES.read_text())["groups"]
    for rule in group["rules"]
    if "alert" in rule
]


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} not found on PATH. It is required (CI installs it): "
            "apt-get install -y --no-install-recommends prometheus-alertmanager"
        )
    return path


@pytest.fixture(scope="module")
def amtool() -> str:
    return _binary("amtool")


def _route(amtool: str, labels: dict[str, str], receiver: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            amtool,
            "config",
            "routes",
            "test",
            f"--config.file={CONFIG}",
            f"--verify.receivers={receiver}",
            *(f"{k}={v}" for k, v in labels.items()),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_config(amtool: str) -> None:
    result = subprocess.run([amtool, "check-config", str(CONFIG)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


ROUTES = [
    # fairness alerts go to the model's team; critical pages, warning queues
    (
        {
            "alertname": "StreamFairDisparityFlagged",
            "severity": "critical",
            "category": "fairness",
            "model": "credit-v3",
            "feature": "race",
        },
        "team-credit-risk-pager",
    ),
    (
        {
            "alertname": "StreamFairLabelCoverageGap",
            "severity": "warning",
            "category": "fairness",
            "model": "credit-v3",
            "feature": "race",
        },
        "team-credit-risk-queue",
    ),
    (
        {
            "alertname": "StreamFairDriftDetected",
            "severity": "warning",
            "category": "fairness",
            "model": "fraud-v1",
            "feature": "sex",
            "group": "Female",
        },
        "team-fraud-queue",
    ),
    (
        {
            "alertname": "StreamFairDisparityFlagged",
            "severity": "critical",
            "category": "fairness",
            "model": "fraud-v1",
            "feature": "race",
        },
        "team-fraud-pager",
    ),
    # a model no team has claimed yet still reaches a human
    (
        {
            "alertname": "StreamFairDisparityFlagged",
            "severity": "critical",
            "category": "fairness",
            "model": "churn-v1",
            "feature": "age",
        },
        "fairness-triage",
    ),
    # info never notifies, whatever the category
    (
        {
            "alertname": "StreamFairGroupBelowMinSamples",
            "severity": "info",
            "category": "fairness",
            "model": "credit-v3",
        },
        "troubleshooting-log",
    ),
    # pipeline alerts go to the stream-fair on-call, even when they carry a model label
    (
        {
            "alertname": "StreamFairDetectorDown",
            "severity": "critical",
            "category": "pipeline",
            "model": "credit-v3",
            "instance": "10.0.0.7:9800",
        },
        "oncall-pager",
    ),
    (
        {
            "alertname": "StreamFairDetectorDown",
            "severity": "critical",
            "category": "pipeline",
            "job": "stream-fair",
        },
        "oncall-pager",
    ),
    (
        {
            "alertname": "StreamFairDeadLettersIncreasing",
            "severity": "warning",
            "category": "pipeline",
            "topic": "predictions",
        },
        "oncall-queue",
    ),
]


@pytest.mark.parametrize(
    "labels,receiver", ROUTES, ids=[f"{labels['alertname']}-{r}" for labels, r in ROUTES]
)
def test_routes(amtool: str, labels: dict[str, str], receiver: str) -> None:
    result = _route(amtool, labels, receiver)
    assert result.returncode == 0, result.stdout + result.stderr


def test_route_verification_can_fail(amtool: str) -> None:
    """amtool must reject a wrong expectation, or test_routes would prove nothing."""
    labels = {"severity": "critical", "category": "fairness", "model": "credit-v3"}
    assert _route(amtool, labels, "oncall-pager").returncode != 0


EXPECTED_RECEIVER = {
    ("fairness", "critical"): "team-credit-risk-pager",
    ("fairness", "warning"): "team-credit-risk-queue",
    ("fairness", "info"): "troubleshooting-log",
    ("pipeline", "critical"): "oncall-pager",
    ("pipeline", "warning"): "oncall-queue",
    ("pipeline", "info"): "troubleshooting-log",
}


@pytest.mark.parametrize("rule", ALERTS, ids=[r["alert"] for r in ALERTS])
def test_every_alert_rule_reaches_its_receiver(amtool: str, rule: dict[str, Any]) -> None:
    """Routing by the labels the rules actually set (not a hand-written copy of them)."""
    labels = {"alertname": rule["alert"], **rule["labels"], "model": "credit-v3", "feature": "race"}
    expected = EXPECTED_RECEIVER[(rule["labels"]["category"], rule["labels"]["severity"])]
    result = _route(amtool, labels, expected)
    assert result.returncode == 0, result.stdout + result.stderr


def test_grouping_by_model_and_feature() -> None:
    config = yaml.safe_load(CONFIG.read_text())
    assert config["route"]["group_by"] == ["model", "feature"]
    receivers = config["receivers"]
    assert receivers and all(r.get("webhook_configs") for r in receivers)


# --------------------------------------------------------------- inhibition on a real Alertmanager
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def alertmanager(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = _binary("prometheus-alertmanager")
    port = _free_port()
    storage = tmp_path_factory.mktemp("alertmanager")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={CONFIG}",
            f"--storage.path={storage}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{url}/-/ready", timeout=1)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    err = proc.stderr.read() if proc.stderr else b""
                    raise RuntimeError(f"alertmanager did not start: {err!r}") from None
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _alert(**labels: str) -> dict[str, Any]:
    return {"labels": labels}


def test_detector_down_inhibits_its_models_alerts(alertmanager: str) -> None:
    alerts = [
        _alert(
            alertname="StreamFairDetectorDown",
            severity="critical",
            category="pipeline",
            job="stream-fair",
            model="credit-v3",
            instance="a:9800",
        ),
        # same model, other replica: inhibited (the model's picture is partial)
        _alert(
            alertname="StreamFairDisparityFlagged",
            severity="critical",
            category="fairness",
            model="credit-v3",
            feature="race",
            instance="b:9800",
        ),
        _alert(
            alertname="StreamFairOverallAccuracyDrop",
            severity="warning",
            category="fairness",
            model="credit-v3",
        ),
        # another model: not inhibited
        _alert(
            alertname="StreamFairDisparityFlagged",
            severity="critical",
            category="fairness",
            model="fraud-v1",
            feature="race",
            instance="c:9800",
        ),
        # pipeline symptoms of the same instance: inhibited; of another instance: not
        _alert(
            alertname="StreamFairPipelineStalled",
            severity="critical",
            category="pipeline",
            instance="a:9800",
            topic="predictions",
        ),
        _alert(
            alertname="StreamFairPipelineStalled",
            severity="critical",
            category="pipeline",
            instance="b:9800",
            topic="predictions",
        ),
        # the calibrated page (no window/method) inhibits the fixed-level warnings about the
        # same model, feature and disparity only
        _alert(
            alertname="StreamFairDisparityFlagged",
            severity="critical",
            category="fairness",
            model="fraud-v1",
            feature="sex",
            disparity="demographic_parity_difference",
        ),
        _alert(
            alertname="StreamFairDisparityIntervalBeyondThreshold",
            severity="warning",
            category="fairness",
            model="fraud-v1",
            feature="sex",
            window="1d",
            method="between_groups",
            disparity="demographic_parity_difference",
        ),
        _alert(
            alertname="StreamFairDisparitySuspected",
            severity="warning",
            category="fairness",
            model="fraud-v1",
            feature="sex",
            window="1d",
            method="to_reference",
            disparity="demographic_parity_difference",
        ),
        _alert(
            alertname="StreamFairDisparitySuspected",
            severity="warning",
            category="fairness",
            model="fraud-v1",
            feature="sex",
            window="1d",
            method="between_groups",
            disparity="equal_opportunity_ratio",
        ),
        # a credible fixed-level interval inhibits the "suspected" warning for the same
        # disparity, window and method only
        _alert(
            alertname="StreamFairDisparityIntervalBeyondThreshold",
            severity="warning",
            category="fairness",
            model="fraud-v1",
            feature="age",
            window="1d",
            method="between_groups",
            disparity="equal_opportunity_ratio",
        ),
        _alert(
            alertname="StreamFairDisparitySuspected",
            severity="warning",
            category="fairness",
            model="fraud-v1",
            feature="age",
            window="1d",
            method="between_groups",
            disparity="equal_opportunity_ratio",
        ),
        _alert(
            alertname="StreamFairDisparitySuspected",
            severity="warning",
            category="fairness",
            model="fraud-v1",
            feature="age",
            window="1d",
            method="to_reference",
            disparity="equal_opportunity_ratio",
        ),
    ]
    request = urllib.request.Request(
        f"{alertmanager}/api/v2/alerts",
        data=json.dumps(alerts).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    assert urllib.request.urlopen(request, timeout=10).status == 200

    def key(labels: dict[str, str]) -> tuple[str, ...]:
        return (
            labels["alertname"],
            labels.get("model", ""),
            labels.get("instance", ""),
            labels.get("feature", ""),
            labels.get("disparity", ""),
            labels.get("method", ""),
        )

    deadline = time.monotonic() + 20
    while True:
        got = json.load(urllib.request.urlopen(f"{alertmanager}/api/v2/alerts", timeout=10))
        if len(got) == len(alerts) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    inhibited = {key(a["labels"]) for a in got if a["status"]["inhibitedBy"]}
    assert inhibited == {
        ("StreamFairDisparityFlagged", "credit-v3", "b:9800", "race", "", ""),
        ("StreamFairOverallAccuracyDrop", "credit-v3", "", "", "", ""),
        ("StreamFairPipelineStalled", "", "a:9800", "", "", ""),
        (
            "StreamFairDisparityIntervalBeyondThreshold",
            "fraud-v1",
            "",
            "sex",
            "demographic_parity_difference",
            "between_groups",
        ),
        (
            "StreamFairDisparitySuspected",
            "fraud-v1",
            "",
            "sex",
            "demographic_parity_difference",
            "to_reference",
        ),
        ("StreamFairDisparitySuspected", "fraud-v1", "", "age", "equal_opportunity_ratio", "between_groups"),
    }
