"""Prometheus recording and alerting rules: promtool checks, promtool unit tests, conventions.

promtool is required: a missing binary FAILS these tests rather than skipping them, because a
skipped rules test looks green while nothing was checked. CI installs it (Debian package
``prometheus``); locally: ``apt-get install -y --no-install-recommends prometheus``.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from grafana_queries import (
    ANNOUNCED_METRICS,
    PROMETHEUS_BUILTINS,
    counters_outside_rate,
    documented_metrics,
    expand_name_regex,
    metric_names,
    name_matchers,
)

ROOT = Path(__file__).resolve().parents[1]
PROM_DIR = ROOT / "deploy" / "prometheus"
RECORDING = PROM_DIR / "recording_rules.yml"
ALERTING = PROM_DIR / "alert_rules.yml"
UNIT_TESTS = sorted((PROM_DIR / "tests").glob("*.yml"))
RUNBOOKS = ROOT / "docs" / "runbooks.md"
RUNBOOK_BASE = "https://github.com/stream-fair/stream-fair/blob/main/docs/runbooks.md#"

CASES = ("fires", "does not fire", "missing input", "stale input")
#: Alerts whose whole point is absent input: for them "missing"/"stale" input must fire.
FIRES_ON_ABSENCE = {"StreamFairDetectorDown"}
SEVERITIES = {"critical", "warning", "info"}
CATEGORIES = {"fairness", "pipeline"}


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _rules(path: Path) -> list[dict[str, Any]]:
    return [rule for group in _load(path)["groups"] for rule in group["rules"]]


ALERTS = [rule for rule in _rules(ALERTING) if "alert" in rule]
RECORDS = [rule for rule in _rules(RECORDING) if "record" in rule]
ALERT_NAMES = [rule["alert"] for rule in ALERTS]
RECORD_NAMES = {rule["record"] for rule in RECORDS}


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool not found on PATH. It is required (CI installs it): "
            "apt-get install -y --no-install-recommends prometheus"
        )
    return path


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=ROOT)


def github_anchors(markdown: str) -> set[str]:
    """Anchors GitHub generates for the headings of a Markdown file."""
    anchors = set()
    for line in markdown.splitlines():
        match = re.match(r"#{1,6}\s+(.*)", line)
        if match:
            text = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower())
            anchors.add(text.replace(" ", "-"))
    return anchors


# ------------------------------------------------------------------------------------- promtool
@pytest.mark.parametrize("path", [RECORDING, ALERTING], ids=lambda p: p.name)
def test_promtool_check_rules(promtool: str, path: Path) -> None:
    result = _run(promtool, "check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_unit_test_files_exist() -> None:
    names = {p.name for p in UNIT_TESTS}
    assert {
        "recording_rules_test.yml",
        "fairness_alerts_test.yml",
        "accuracy_alert_test.yml",
        "pipeline_alerts_test.yml",
    } <= names


@pytest.fixture(scope="module")
def unit_test_results(promtool: str) -> dict[Path, tuple[int, str]]:
    """Run every promtool unit-test file at once (they are independent and CPU-bound)."""
    procs = {
        path: subprocess.Popen(
            [promtool, "test", "rules", str(path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=ROOT,
        )
        for path in UNIT_TESTS
    }
    return {path: (proc.wait(timeout=600), proc.stdout.read()) for path, proc in procs.items()}  # type: ignore[union-attr]


@pytest.mark.parametrize("path", UNIT_TESTS, ids=lambda p: p.name)
def test_promtool_unit_tests(unit_test_results: dict[Path, tuple[int, str]], path: Path) -> None:
    returncode, output = unit_test_results[path]
    assert returncode == 0, output
    assert "SUCCESS" in output


# --------------------------------------------------------------------- unit-test coverage
@functools.cache
def _test_groups() -> dict[str, dict[str, Any]]:
    groups: dict[str, dict[str, Any]] = {}
    for path in UNIT_TESTS:
        doc = _load(path)
        assert {"../recording_rules.yml", "../alert_rules.yml"} >= set(doc["rule_files"])
        for group in doc["tests"]:
            assert group.get("name"), f"{path.name}: every test group needs a name"
            assert group["name"] not in groups, f"duplicate test group name {group['name']!r}"
            groups[group["name"]] = group
    return groups


@pytest.mark.parametrize("alert", ALERT_NAMES)
@pytest.mark.parametrize("case", CASES)
def test_every_alert_has_every_case(alert: str, case: str) -> None:
    group = _test_groups().get(f"{alert}: {case}")
    assert group is not None, f'add a promtool test group named "{alert}: {case}"'
    checks = [t for t in group.get("alert_rule_test", []) if t["alertname"] == alert]
    assert checks, f'"{alert}: {case}" never evaluates {alert}'
    fired = [t for t in checks if t.get("exp_alerts")]
    if case == "fires" or (alert in FIRES_ON_ABSENCE and case != "does not fire"):
        assert fired, f'"{alert}: {case}" must expect the alert to fire at some eval_time'
    elif case == "does not fire":
        assert not fired, f'"{alert}: does not fire" expects it to fire'
    else:  # missing / stale input: whatever happened before, it must end quiet
        last = max(checks, key=lambda t: _duration_seconds(t["eval_time"]))
        assert not last.get("exp_alerts"), f'"{alert}: {case}" must end with no alert'


def test_fire_expectations_include_annotations() -> None:
    """The "fires" cases pin the rendered summary/description/runbook_url, so templating is
    tested, not just the expression."""
    for alert in ALERT_NAMES:
        group = _test_groups()[f"{alert}: fires"]
        for check in group["alert_rule_test"]:
            for expected in check.get("exp_alerts", []):
                assert set(expected.get("exp_annotations", {})) == {
                    "summary",
                    "description",
                    "runbook_url",
                }, alert


def test_test_groups_name_existing_alerts() -> None:
    for name in _test_groups():
        subject = name.split(":")[0]
        assert subject in ALERT_NAMES or subject == "recording rules", name


def test_fairness_alerts_keep_the_model_label() -> None:
    """Alertmanager routes fairness alerts to the model's team by the `model` label and the
    detector-down inhibition matches on it: every fairness alert must carry it."""
    categories = {rule["alert"]: rule["labels"]["category"] for rule in ALERTS}
    for alert, category in categories.items():
        if category != "fairness":
            continue
        for check in _test_groups()[f"{alert}: fires"]["alert_rule_test"]:
            for expected in check.get("exp_alerts", []):
                assert "model" in expected["exp_labels"], alert


def _duration_seconds(text: str) -> int:
    units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    return sum(int(n) * units[u] for n, u in re.findall(r"(\d+)([dhms])", str(text)))


def test_duration_parser() -> None:
    assert _duration_seconds("1d1h30m") == 91800
    assert _duration_seconds("45m") == 2700


# ---------------------------------------------------------------------------- conventions
@pytest.mark.parametrize("rule", ALERTS, ids=ALERT_NAMES)
def test_alert_labels_and_annotations(rule: dict[str, Any]) -> None:
    assert rule["alert"].startswith("StreamFair")
    assert rule["labels"]["severity"] in SEVERITIES
    assert rule["labels"]["category"] in CATEGORIES
    annotations = rule["annotations"]
    assert set(annotations) >= {"summary", "description", "runbook_url"}
    assert "{{ $labels." in annotations["description"]
    anchor = rule["alert"].lower()
    assert annotations["runbook_url"] == RUNBOOK_BASE + anchor


def test_runbook_anchors_exist() -> None:
    anchors = github_anchors(RUNBOOKS.read_text())
    missing = [r["alert"] for r in ALERTS if r["annotations"]["runbook_url"].split("#")[1] not in anchors]
    assert not missing, f"docs/runbooks.md has no section for {missing}"


ROUTES = {"fairness": "model team", "pipeline": "on-call"}
TIERS = {"critical": "(pager)", "warning": "(queue)"}


def test_runbook_index_has_a_row_for_every_alert() -> None:
    """Review finding: the index table at the top of docs/runbooks.md lacked three alerts that had
    sections. Every alert has a row linking its section, with its severity and where it goes."""
    rows = {
        m[0]: m[1:]
        for m in re.findall(r"^\| \[(\w+)\]\(#(\w+)\) \| (\w+) \| ([^|]+?) \|$", RUNBOOKS.read_text(), re.M)
    }
    missing = [name for name in ALERT_NAMES if name not in rows]
    assert not missing, f"docs/runbooks.md's alert index has no row for {missing}"
    assert set(rows) == set(ALERT_NAMES), f"rows for unknown alerts: {set(rows) - set(ALERT_NAMES)}"
    for rule in ALERTS:
        anchor, severity, routed = rows[rule["alert"]]
        assert anchor == rule["alert"].lower(), rule["alert"]
        assert severity == rule["labels"]["severity"], rule["alert"]
        if severity == "info":
            assert routed == "troubleshooting only", rule["alert"]
        else:
            assert routed == f"{ROUTES[rule['labels']['category']]} {TIERS[severity]}", rule["alert"]


@pytest.mark.parametrize("doc", ["runbooks.md", "deployment.md"])
def test_the_keep_firing_for_lists_name_every_alert_that_has_it(doc: str) -> None:
    """Review finding: docs/runbooks.md and docs/deployment.md named 5 alerts with
    ``keep_firing_for`` where the rules have 7 (``...X`` abbreviates an alert name ending in X)."""
    kept = {rule["alert"] for rule in ALERTS if "keep_firing_for" in rule}
    text = (ROOT / "docs" / doc).read_text()
    match = re.search(r"gauge-based fairness alerts\s*\((.*?)\)\s*(?:keep firing|carry)", text, re.S)
    assert match, f"docs/{doc}: no list of the alerts that keep firing"
    named = set()
    for token in re.findall(r"`(StreamFair\w+|\.\.\.\w+)`", match.group(1)):
        full = [a for a in ALERT_NAMES if a.endswith(token.lstrip("."))] if token[0] == "." else [token]
        assert len(full) == 1, f"docs/{doc}: {token} names no single alert"
        named.add(full[0])
    assert named == kept, f"docs/{doc}: missing {sorted(kept - named)}, not kept {sorted(named - kept)}"


def test_github_anchor_slug() -> None:
    assert github_anchors("## StreamFairDetectorDown\n### Silence it: `amtool`") == {
        "streamfairdetectordown",
        "silence-it-amtool",
    }


def test_alert_names_unique() -> None:
    assert len(ALERT_NAMES) == len(set(ALERT_NAMES))


def test_severities_used() -> None:
    """Each tier has at least one member, and only real outages page."""
    by_severity: dict[str, set[str]] = {}
    for rule in ALERTS:
        by_severity.setdefault(rule["labels"]["severity"], set()).add(rule["alert"])
    assert set(by_severity) == SEVERITIES
    assert by_severity["critical"] == {
        "StreamFairDisparityFlagged",
        "StreamFairDetectorDown",
        "StreamFairNoLeader",  # nobody computes the verdict: the page above cannot fire
        "StreamFairPipelineStalled",
    }


@pytest.mark.parametrize("rule", RECORDS, ids=[r["record"] for r in RECORDS])
def test_recording_rule_names(rule: dict[str, Any]) -> None:
    level, metric, operations = rule["record"].split(":")
    assert re.fullmatch(r"[a-z_]+", level) and re.fullmatch(r"[a-z0-9_]+", operations)
    assert metric.startswith("stream_fair_") and not metric.endswith("_total")
    if level == "partition":  # one continuous series per partition, no window (see below)
        assert operations == "max" and not re.findall(r"\[(\w+)\]", rule["expr"]), rule["record"]
        return
    # the window in the name is the window the rule aggregates over
    window = re.search(r"(1h|1d)$", operations)
    assert window is not None
    for rng in re.findall(r"\[(\w+)\]", rule["expr"]):
        assert rng == window.group(1), rule["record"]
    for name in metric_names(rule["expr"]):
        if ":" in name and not name.startswith("partition:"):
            assert name.endswith(window.group(1)), f"{rule['record']} mixes windows via {name}"


def test_counters_are_joined_per_partition_then_summed_before_dividing() -> None:
    """Raw counters enter only through `max without (instance, pod) (X_total)`: one continuous
    series per partition, whichever replica owns it (docs/state.md); those enter only through
    `sum without (partition) (increase(partition:X:max[w]))`, then numerators and denominators
    are divided."""
    joined = set()
    for rule in RECORDS:
        expr = rule["expr"].strip()
        if any(n.endswith("_total") for n in metric_names(expr)):
            m = re.fullmatch(r"max without \(instance, pod\) \((stream_fair_(\w+)_total)\)", expr)
            assert m is not None and rule["record"] == f"partition:stream_fair_{m.group(2)}:max", rule[
                "record"
            ]
            joined.add(rule["record"])
    assert "partition:stream_fair_confusion:max" in joined
    for rule in RECORDS:
        expr = rule["expr"].strip()
        used = {n for n in metric_names(expr) if n.startswith("partition:")}
        if used and not rule["record"].startswith("partition:"):
            first_level = r"sum without \(partition\) \(increase\(partition:stream_fair_\w+:max\[1[hd]\]\)\)"
            assert re.fullmatch(first_level, expr), rule["record"]


def test_recording_rules_cover_both_windows() -> None:
    for name in RECORD_NAMES:
        twin = re.sub(r"1h$", "1d", name) if name.endswith("1h") else re.sub(r"1d$", "1h", name)
        assert twin in RECORD_NAMES, f"{name} has no {twin}"


ALL_EXPRS = [(r.get("record") or r["alert"], r["expr"]) for r in RECORDS + ALERTS]


@pytest.mark.parametrize("name,expr", ALL_EXPRS, ids=[n for n, _ in ALL_EXPRS])
def test_counters_only_through_rate_or_increase(name: str, expr: str) -> None:
    if name.startswith("partition:"):  # the per-partition join of the owners' series (see above)
        assert re.fullmatch(r"max without \(instance, pod\) \(stream_fair_\w+_total\)", expr.strip())
        return
    assert counters_outside_rate(expr) == []


@pytest.mark.parametrize("name,expr", ALL_EXPRS, ids=[n for n, _ in ALL_EXPRS])
def test_rules_use_only_known_metrics(name: str, expr: str) -> None:
    """promtool accepts any metric name; a typo would silently never fire. Every name must be
    in docs/metrics.md, a recording rule, a Prometheus built-in or the announced list."""
    known = (
        documented_metrics((ROOT / "docs" / "metrics.md").read_text())
        | RECORD_NAMES
        | PROMETHEUS_BUILTINS
        | ANNOUNCED_METRICS
    )
    assert metric_names(expr) - known == set()
    for op, value in name_matchers(expr):
        names = {value} if op == "=" else expand_name_regex(value)
        assert names is not None, f"use a prefix(a|b)suffix __name__ regex in {name}"
        assert names <= known, names - known


def test_known_metrics_catalogue_is_not_empty() -> None:
    """Guards the guard: if docs/metrics.md parsing broke, every name would look unknown."""
    documented = documented_metrics((ROOT / "docs" / "metrics.md").read_text())
    assert {
        "stream_fair_confusion_total",
        "stream_fair_true_positive_rate_lower",
        "stream_fair_demographic_parity_ratio_upper",
        "stream_fair_disparity_flagged",
    } <= documented
    assert "stream_fair_predictive_parity_ratio" not in documented
