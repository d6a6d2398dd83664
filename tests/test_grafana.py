"""Grafana dashboards and provisioning: JSON model, stable uids, datasource variable, queries.

Queries are checked statically here (metric names known, counters only through rate/increase,
every variable defined); ``grafana_queries.panel_queries`` is what an end-to-end test uses to run
each of them against a real Prometheus.
"""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from grafana_queries import (
    ANNOUNCED_METRICS,
    PROMETHEUS_BUILTINS,
    counters_outside_rate,
    documented_metrics,
    iter_panels,
    metric_names,
    panel_queries,
    substitute,
)

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD_DIR = ROOT / "grafana" / "dashboards"
PROVISIONING = ROOT / "grafana" / "provisioning"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

#: uids are part of the interface: runbooks, links and bookmarks refer to them.
EXPECTED_UIDS = {
    "overview.json": "stream-fair-overview",
    "groups.json": "stream-fair-groups",
    "intersections.json": "stream-fair-intersections",
    "feedback.json": "stream-fair-feedback",
    "pipeline.json": "stream-fair-pipeline",
}
FAIRNESS_DASHBOARDS = ["overview.json", "groups.json", "intersections.json", "feedback.json"]
SAMPLE_VALUES = {
    "datasource": "prometheus",
    "model": "credit-v3",
    "feature": "race",
    "group": ".*",
    "instance": ".*",
}


def _load(name: str) -> dict[str, Any]:
    return json.loads((DASHBOARD_DIR / name).read_text())


def _recorded() -> set[str]:
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "recording_rules.yml").read_text())
    return {r["record"] for g in rules["groups"] for r in g["rules"]}


def _known_metrics() -> set[str]:
    documented = documented_metrics((ROOT / "docs" / "metrics.md").read_text())
    return documented | _recorded() | ANNOUNCED_METRICS | PROMETHEUS_BUILTINS


def _variable_assignments(dashboard: dict[str, Any]) -> list[dict[str, str]]:
    """One assignment per combination of custom-variable options (query variables get a sample
    value): every metric name a `stream_fair_${rate}` panel can produce gets checked."""
    variables = dashboard["templating"]["list"]
    fixed = {v["name"]: SAMPLE_VALUES[v["name"]] for v in variables if v["type"] != "custom"}
    customs = [v for v in variables if v["type"] == "custom"]
    options = [[o["value"] for o in v["options"]] for v in customs]
    return [
        {**fixed, **{v["name"]: value for v, value in zip(customs, combo, strict=True)}}
        for combo in itertools.product(*options)
    ]


def _all_exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """Panel targets, variable queries and annotation queries, variables substituted."""
    out = []
    for values in _variable_assignments(dashboard):
        out += panel_queries(dashboard, values)
        for var in dashboard["templating"]["list"]:
            if var["type"] == "query":
                query = substitute(var["query"]["query"], values)
                inner = re.fullmatch(r"label_values\((.*),\s*\w+\)", query)
                assert inner, f"variable {var['name']}: use label_values(<selector>, <label>)"
                out.append((f"variable {var['name']}", inner.group(1)))
        for annotation in dashboard["annotations"]["list"]:
            if annotation.get("expr"):
                out.append((f"annotation {annotation['name']}", substitute(annotation["expr"], values)))
    return out


@pytest.fixture(params=sorted(EXPECTED_UIDS), scope="module")
def dashboard(request: pytest.FixtureRequest) -> dict[str, Any]:
    return _load(request.param)


# ------------------------------------------------------------------------------ JSON model
def test_dashboards_are_exactly_the_expected_files() -> None:
    assert sorted(p.name for p in DASHBOARD_DIR.glob("*.json")) == sorted(EXPECTED_UIDS)


def test_committed_json_is_generated() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "grafana" / "build_dashboards.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_uids_stable_and_unique() -> None:
    uids = {name: _load(name)["uid"] for name in EXPECTED_UIDS}
    assert uids == EXPECTED_UIDS
    titles = [_load(name)["title"] for name in EXPECTED_UIDS]
    assert len(set(titles)) == len(titles)


def test_model_shape(dashboard: dict[str, Any]) -> None:
    assert isinstance(dashboard["schemaVersion"], int)
    assert dashboard["tags"] == ["stream-fair"]
    ids = [p["id"] for p in iter_panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in iter_panels(dashboard):
        grid = panel["gridPos"]
        assert set(grid) == {"x", "y", "w", "h"} and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["title"] and panel["targets"], panel
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]


def test_panels_use_the_datasource_variable(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in iter_panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]
    for var in variables.values():
        if var["type"] == "query":
            assert var["datasource"] == DATASOURCE, var["name"]


def test_template_variables(dashboard: dict[str, Any]) -> None:
    names = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "model"} <= names
    if dashboard["uid"] != "stream-fair-overview" and dashboard["uid"] != "stream-fair-pipeline":
        assert {"feature", "group"} <= names
    if dashboard["uid"] == "stream-fair-overview":
        assert "feature" in names


def test_every_variable_used_is_defined(dashboard: dict[str, Any]) -> None:
    """panel_queries raises KeyError for an undefined $variable."""
    for values in _variable_assignments(dashboard):
        for _title, expr in panel_queries(dashboard, values):
            assert "$" not in expr


# -------------------------------------------------------------------------------- queries
def test_queries_use_only_known_metrics(dashboard: dict[str, Any]) -> None:
    known = _known_metrics()
    for title, expr in _all_exprs(dashboard):
        unknown = metric_names(expr) - known
        assert not unknown, f"{dashboard['uid']} / {title}: unknown metrics {unknown} in {expr}"


def test_counters_only_through_rate_or_increase(dashboard: dict[str, Any]) -> None:
    for title, expr in _all_exprs(dashboard):
        assert counters_outside_rate(expr) == [], f"{dashboard['uid']} / {title}: {expr}"


def test_every_dashboard_queries_something_real(dashboard: dict[str, Any]) -> None:
    names = set().union(*(metric_names(e) for _t, e in _all_exprs(dashboard)))
    assert any(n.startswith("stream_fair_") for n in names)


def test_overview_shows_intervals_threshold_and_alerts() -> None:
    exprs = [e for _t, e in _all_exprs(_load("overview.json"))]
    for d in ["demographic_parity_difference", "equal_opportunity_ratio"]:
        assert any(f"stream_fair_{d}_lower" in e for e in exprs)
        assert any(f"stream_fair_{d}_upper" in e for e in exprs)
        assert any(f'stream_fair_disparity_threshold{{disparity="{d}"}}' in e for e in exprs)
    assert any("ALERTS{" in e for e in exprs)


def test_intersections_heatmap_over_cells() -> None:
    dash = _load("intersections.json")
    heatmaps = [p for p in iter_panels(dash) if p["type"] == "heatmap"]
    assert heatmaps and heatmaps[0]["options"]["calculate"] is False
    feature = next(v for v in dash["templating"]["list"] if v["name"] == "feature")
    assert 'feature=~".+&.+"' in feature["query"]["query"]


def test_fairness_dashboards_filter_by_model(dashboard: dict[str, Any]) -> None:
    """A panel that ignores $model mixes models; ALERTS and thresholds are the only exceptions."""
    for title, expr in panel_queries(
        dashboard, {**SAMPLE_VALUES, "window": "1d", "method": "between_groups", "rate": "accuracy"}
    ):
        if "ALERTS" in expr or "stream_fair_disparity_threshold" in expr:
            continue
        assert "credit-v3" in expr, f"{dashboard['uid']} / {title}: {expr}"


# ------------------------------------------------------------------------- panel_queries
def test_panel_queries_substitutes_grafana_syntax() -> None:
    dash = {
        "panels": [
            {
                "title": "p",
                "targets": [
                    {
                        "expr": 'rate(a_total{m="$model",f="${feature}",g=~"[[group]]"}'
                        "[$__rate_interval]) "
                        "+ increase(b_total[$__range]) / $__interval_ms + ${feature:regex}"
                    },
                    {"expr": ""},
                ],
            }
        ]
    }
    assert panel_queries(
        json.dumps(dash), {"model": "m1", "feature": "race", "group": "A|B", "__range": "6h"}
    ) == [("p", 'rate(a_total{m="m1",f="race",g=~"A|B"}[5m]) + increase(b_total[6h]) / 60000 + race')]


def test_panel_queries_rejects_unknown_variables() -> None:
    dash = {"panels": [{"title": "p", "targets": [{"expr": 'up{x="$nope"}'}]}]}
    with pytest.raises(KeyError, match="nope"):
        panel_queries(dash, {})


def test_checks_catch_bad_queries() -> None:
    """The static checks above must be able to fail."""
    assert counters_outside_rate("sum(stream_fair_dead_letters_total)") == ["stream_fair_dead_letters_total"]
    assert counters_outside_rate("sum by (topic) (rate(stream_fair_dead_letters_total[5m]))") == []
    assert metric_names('stream_fair_tpr{model="x"}') - _known_metrics() == {"stream_fair_tpr"}


# --------------------------------------------------------------------------- provisioning
def test_datasource_provisioning() -> None:
    config = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())
    (source,) = config["datasources"]
    assert source["type"] == "prometheus" and source["uid"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"


def test_dashboard_provisioning() -> None:
    config = yaml.safe_load((PROVISIONING / "dashboards" / "stream-fair.yml").read_text())
    (provider,) = config["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards/stream-fair"
