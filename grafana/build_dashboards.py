# ruff: noqa: E501  (PromQL reads better on one line than split across string pieces)
"""Generate the stream-fair Grafana dashboards (grafana/dashboards/*.json).

The JSON files are committed (Grafana provisions them as they are); this script is their source.
Edit it, run ``python grafana/build_dashboards.py`` and commit both. ``--check`` exits 1 when a
committed file differs from what the script generates (tests/test_grafana.py runs it).

Conventions: every panel and target uses the ``${datasource}`` variable; counters are read only
through ``rate``/``increase``; uids are fixed (links and runbooks refer to them).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "dashboards"
DS = {"type": "prometheus", "uid": "${datasource}"}
TAGS = ["stream-fair"]

RATES = [
    "selection_rate",
    "true_positive_rate",
    "false_positive_rate",
    "positive_predictive_value",
    "accuracy",
    "base_rate",
]
DIFFERENCES = [
    "demographic_parity_difference",
    "equal_opportunity_difference",
    "equalized_odds_difference",
    "predictive_parity_difference",
    "accuracy_difference",
]
RATIOS = ["demographic_parity_ratio", "equal_opportunity_ratio", "equalized_odds_ratio"]

# Dashed, unfilled lines for credible-interval bounds (series whose legend ends in lower/upper).
BOUND_OVERRIDE = {
    "matcher": {"id": "byRegexp", "options": ".*(lower|upper)$"},
    "properties": [
        {"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [6, 4]}},
        {"id": "custom.fillOpacity", "value": 0},
        {"id": "custom.lineWidth", "value": 1},
    ],
}
THRESHOLD_OVERRIDE = {
    "matcher": {"id": "byName", "options": "threshold"},
    "properties": [
        {"id": "color", "value": {"mode": "fixed", "fixedColor": "red"}},
        {"id": "custom.lineStyle", "value": {"fill": "dot", "dash": [2, 4]}},
    ],
}


# ----------------------------------------------------------------------------------- builders
def target(expr: str, legend: str = "", *, instant: bool = False, table: bool = False) -> dict[str, Any]:
    t: dict[str, Any] = {"datasource": DS, "expr": expr, "legendFormat": legend or "__auto"}
    if instant:
        t["instant"], t["range"] = True, False
    if table:
        t["format"] = "table"
    return t


def panel(
    kind: str,
    title: str,
    targets: list[dict[str, Any]],
    *,
    width: int = 12,
    height: int = 8,
    unit: str = "percentunit",
    description: str = "",
    minmax: tuple[float | None, float | None] = (None, None),
    overrides: list[dict[str, Any]] | None = None,
    options: dict[str, Any] | None = None,
    custom: dict[str, Any] | None = None,
) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": unit}
    if minmax[0] is not None:
        defaults["min"] = minmax[0]
    if minmax[1] is not None:
        defaults["max"] = minmax[1]
    if custom:
        defaults["custom"] = custom
    p: dict[str, Any] = {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DS,
        "targets": [dict(t, refId=chr(ord("A") + i)) for i, t in enumerate(targets)],
        "fieldConfig": {"defaults": defaults, "overrides": overrides or []},
        "options": options or {},
        "gridPos": {"w": width, "h": height},
    }
    return p


def row(title: str) -> dict[str, Any]:
    return {
        "type": "row",
        "title": title,
        "collapsed": False,
        "panels": [],
        "gridPos": {"w": 24, "h": 1},
    }


def datasource_var() -> dict[str, Any]:
    return {
        "type": "datasource",
        "name": "datasource",
        "label": "Data source",
        "query": "prometheus",
        "current": {},
        "hide": 0,
    }


def query_var(
    name: str, query: str, *, label: str = "", multi: bool = False, include_all: bool = False
) -> dict[str, Any]:
    v: dict[str, Any] = {
        "type": "query",
        "name": name,
        "label": label or name.capitalize(),
        "datasource": DS,
        "definition": query,
        "query": {"query": query, "refId": f"{name}-variable"},
        "refresh": 2,
        "sort": 1,
        "multi": multi,
        "includeAll": include_all,
        "current": {},
        "hide": 0,
    }
    if include_all:
        v["allValue"] = ".*"
    return v


def custom_var(name: str, values: list[str], *, label: str = "") -> dict[str, Any]:
    return {
        "type": "custom",
        "name": name,
        "label": label or name.capitalize(),
        "query": ",".join(values),
        "current": {"text": values[0], "value": values[0]},
        "options": [{"text": v, "value": v, "selected": i == 0} for i, v in enumerate(values)],
        "multi": False,
        "includeAll": False,
        "hide": 0,
    }


def layout(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Assign ids and grid positions left to right, top to bottom."""
    x = y = row_height = 0
    for i, p in enumerate(panels, start=1):
        p["id"] = i
        w, h = p["gridPos"]["w"], p["gridPos"]["h"]
        if p["type"] == "row" or x + w > 24:
            x, y, row_height = 0, y + row_height, 0
        p["gridPos"] = {"x": x, "y": y, "w": w, "h": h}
        x, row_height = x + w, max(row_height, h)
        if p["type"] == "row":
            x, y, row_height = 0, y + h, 0
    return panels


def dashboard(
    uid: str,
    title: str,
    description: str,
    variables: list[dict[str, Any]],
    panels: list[dict[str, Any]],
    annotations: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    builtin = {
        "builtIn": 1,
        "datasource": {"type": "grafana", "uid": "-- Grafana --"},
        "enable": True,
        "hide": True,
        "iconColor": "rgba(0, 211, 255, 1)",
        "name": "Annotations & Alerts",
        "type": "dashboard",
    }
    links = [
        {
            "type": "dashboards",
            "title": "stream-fair",
            "tags": TAGS,
            "asDropdown": True,
            "includeVars": True,
            "keepTime": True,
        },
    ]
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": TAGS,
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "refresh": "1m",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-24h", "to": "now"},
        "links": links,
        "annotations": {"list": [builtin, *(annotations or [])]},
        "templating": {"list": variables},
        "panels": layout(panels),
    }


# ------------------------------------------------------------------------------ the dashboards
MODEL_VAR = query_var("model", "label_values(stream_fair_group_samples, model)")
WINDOW_VAR = custom_var("window", ["1d", "1h", "cumulative"])
METHOD_VAR = custom_var("method", ["between_groups", "to_reference"])


def feature_var(*, multi: bool, intersections_only: bool = False) -> dict[str, Any]:
    selector = 'model="$model", feature=~".+&.+"' if intersections_only else 'model="$model"'
    return query_var(
        "feature",
        f"label_values(stream_fair_group_samples{{{selector}}}, feature)",
        label="Intersection" if intersections_only else "Feature",
        multi=multi,
        include_all=multi,
    )


GROUP_VAR = query_var(
    "group",
    'label_values(stream_fair_group_samples{model="$model", feature=~"$feature"}, group)',
    multi=True,
    include_all=True,
)


def overview() -> dict[str, Any]:
    sel = 'model="$model", feature=~"$feature", window="$window", method="$method"'
    panels: list[dict[str, Any]] = [
        row("Verdicts"),
        panel(
            "stat",
            "Calibrated disparity alarms (page)",
            [
                target(
                    'sum(stream_fair_disparity_alarm{model="$model", feature=~"$feature"}) or vector(0)',
                    "alarms",
                )
            ],
            width=4,
            unit="none",
            description=(
                "Raised calibrated default alarms (time-uniform verdict or change detector, valid "
                "under continuous monitoring); StreamFairDisparityFlagged pages on them. The group: "
                "stream_fair_group_change_alarm (dashboard stream-fair-feedback)."
            ),
            options={"colorMode": "background", "reduceOptions": {"calcs": ["lastNotNull"]}},
            custom=None,
        ),
        panel(
            "stat",
            "Fixed-level intervals beyond threshold (warning)",
            [
                target(
                    'sum(stream_fair_disparity_flagged{model="$model", window="$window"}) or vector(0)',
                    "flagged",
                )
            ],
            width=4,
            unit="none",
            description=(
                "Disparities whose whole fixed-level credible interval lies beyond the threshold "
                "(StreamFairDisparityIntervalBeyondThreshold, a warning: not calibrated for "
                "repeated looks)."
            ),
            options={"colorMode": "background", "reduceOptions": {"calcs": ["lastNotNull"]}},
            custom=None,
        ),
        panel(
            "stat",
            "Eligible groups per feature",
            [
                target(
                    'min by (feature) (stream_fair_groups_eligible{model="$model", feature=~"$feature", window="$window"})',
                    "{{feature}}",
                )
            ],
            width=4,
            unit="none",
            description="Groups with n >= min_samples; fewer than 2 means no verdict for the feature.",
        ),
        panel(
            "timeseries",
            "Overall accuracy, all replicas (pitfall: a worse model can look fairer)",
            [
                target('model:stream_fair_accuracy:ratio1h{model="$model"}', "1h"),
                target('model:stream_fair_accuracy:ratio1d{model="$model"}', "1d"),
            ],
            width=12,
            minmax=(0, 1),
            description="From the confusion counters by join time (recording rules). StreamFairOverallAccuracyDrop fires when 1h is 5 points below 1d.",
        ),
        panel(
            "table",
            "Firing stream-fair alerts",
            [
                target(
                    'sum by (alertname, severity, model, feature, instance) (ALERTS{alertstate="firing", alertname=~"StreamFair.*"})',
                    instant=True,
                    table=True,
                )
            ],
            width=24,
            height=6,
            unit="none",
            description="Runbooks: docs/runbooks.md#<alertname in lower case>.",
        ),
        row("Worst disparity per feature against its threshold (estimate and credible interval)"),
    ]
    for d in DIFFERENCES + RATIOS:
        worst = "max" if d in DIFFERENCES else "min"
        panels.append(
            panel(
                "timeseries",
                d,
                [
                    target(f"{worst} by (feature) (stream_fair_{d}{{{sel}}})", "{{feature}}"),
                    target(
                        f"{worst} by (feature) (stream_fair_{d}_lower{{{sel}}})",
                        "{{feature}} lower",
                    ),
                    target(
                        f"{worst} by (feature) (stream_fair_{d}_upper{{{sel}}})",
                        "{{feature}} upper",
                    ),
                    target(f'max(stream_fair_disparity_threshold{{disparity="{d}"}})', "threshold"),
                ],
                width=8,
                minmax=(0, 1),
                unit="none",
                description=(
                    f"{'Largest' if worst == 'max' else 'Smallest'} value over replicas per feature; "
                    "flagged when the interval lies entirely "
                    f"{'above' if worst == 'max' else 'below'} the threshold."
                ),
                overrides=[BOUND_OVERRIDE, THRESHOLD_OVERRIDE],
            )
        )
    panels.append(row("Between-groups differences across all replicas (recording rules, by join time)"))
    for d in [
        "demographic_parity_difference",
        "equal_opportunity_difference",
        "equalized_odds_difference",
        "accuracy_difference",
    ]:
        panels.append(
            panel(
                "timeseries",
                f"{d} (1h, 1d)",
                [
                    target(
                        f'model_feature:stream_fair_{d}:ratio1h{{model="$model", feature=~"$feature"}}',
                        "{{feature}} 1h",
                    ),
                    target(
                        f'model_feature:stream_fair_{d}:ratio1d{{model="$model", feature=~"$feature"}}',
                        "{{feature}} 1d",
                    ),
                ],
                width=6,
                minmax=(0, 1),
                unit="none",
            )
        )
    return dashboard(
        "stream-fair-overview",
        "stream-fair / Overview",
        "Worst disparity per feature against its threshold, flagged verdicts and firing alerts.",
        [datasource_var(), MODEL_VAR, feature_var(multi=True), WINDOW_VAR, METHOD_VAR],
        panels,
    )


def groups() -> dict[str, Any]:
    sel = 'model="$model", feature="$feature", group=~"$group", window="$window"'
    panels: list[dict[str, Any]] = [row("Per-group rates with credible intervals (per replica)")]
    for r in RATES:
        panels.append(
            panel(
                "timeseries",
                r,
                [
                    target(f"stream_fair_{r}{{{sel}}}", "{{group}} {{instance}}"),
                    target(f"stream_fair_{r}_lower{{{sel}}}", "{{group}} {{instance}} lower"),
                    target(f"stream_fair_{r}_upper{{{sel}}}", "{{group}} {{instance}} upper"),
                ],
                width=8,
                minmax=(0, 1),
                overrides=[BOUND_OVERRIDE],
            )
        )
    panels += [
        row("Sample sizes"),
        panel(
            "timeseries",
            "Joined pairs per group in the window (n)",
            [target(f"stream_fair_group_samples{{{sel}}}", "{{group}} {{instance}}")],
            width=12,
            unit="short",
        ),
        panel(
            "state-timeline",
            "Below min_samples (left out of verdicts)",
            [target(f"stream_fair_group_below_min_samples{{{sel}}}", "{{group}} {{instance}}")],
            width=12,
            unit="none",
        ),
        panel(
            "timeseries",
            "Joined pairs per second",
            [
                target(
                    'sum by (group) (rate(partition:stream_fair_confusion:max{model="$model", feature="$feature", group=~"$group"}[$__rate_interval]))',
                    "{{group}}",
                )
            ],
            width=12,
            unit="ops",
        ),
        panel(
            "timeseries",
            "Predictions per second",
            [
                target(
                    'sum by (group) (rate(partition:stream_fair_predictions:max{model="$model", feature="$feature", group=~"$group"}[$__rate_interval]))',
                    "{{group}}",
                )
            ],
            width=12,
            unit="ops",
        ),
        row("Across all replicas (recording rules, by join time)"),
    ]
    for r in ["selection_rate", "true_positive_rate", "false_positive_rate", "accuracy"]:
        panels.append(
            panel(
                "timeseries",
                f"{r} (1h, 1d)",
                [
                    target(
                        f'model_feature_group:stream_fair_{r}:ratio1h{{model="$model", feature="$feature", group=~"$group"}}',
                        "{{group}} 1h",
                    ),
                    target(
                        f'model_feature_group:stream_fair_{r}:ratio1d{{model="$model", feature="$feature", group=~"$group"}}',
                        "{{group}} 1d",
                    ),
                ],
                width=6,
                minmax=(0, 1),
            )
        )
    panels += estimates_row()
    return dashboard(
        "stream-fair-groups",
        "stream-fair / Group drill-down",
        "One feature's groups: every rate with its credible interval, and the sample sizes behind it.",
        [datasource_var(), MODEL_VAR, feature_var(multi=False), GROUP_VAR, WINDOW_VAR],
        panels,
    )


def estimates_row() -> list[dict[str, Any]]:
    """Label-free estimates from the scores of pending predictions, and calibration by group
    (docs/estimates.md): per replica, like the per-group rates above."""
    g = 'model="$model", feature="$feature", group=~"$group"'
    f = 'model="$model", feature="$feature", view="pending", method="between_groups"'
    fv = 'model="$model", feature="$feature", method="between_groups"'  # both views
    panels: list[dict[str, Any]] = [
        row("Label-free estimates: predictions still waiting for labels (per replica; docs/estimates.md)")
    ]
    for r in ["selection_rate", "true_positive_rate", "false_positive_rate", "accuracy"]:
        panels.append(
            panel(
                "timeseries",
                f"estimated {r}",
                [
                    target(f'stream_fair_estimated_{r}{{{g}, view="pending"}}', "{{group}} pending"),
                    target(
                        f'stream_fair_estimated_{r}_lower{{{g}, view="pending"}}', "{{group}} pending lower"
                    ),
                    target(
                        f'stream_fair_estimated_{r}_upper{{{g}, view="pending"}}', "{{group}} pending upper"
                    ),
                    target(
                        f'stream_fair_estimated_{r}{{{g}, view="combined"}}', "{{group}} realized + estimated"
                    ),
                ],
                width=6,
                minmax=(0, 1),
                overrides=[BOUND_OVERRIDE],
                description=(
                    "pending: the predictions waiting for a label, scores taken as P(label 1); "
                    "realized + estimated converges to the realized rate as labels mature. "
                    "Untrusted groups (see calibration) are shown but excluded from the gap."
                ),
            )
        )
    panels += [
        panel(
            "timeseries",
            "Estimated gaps (trusted groups) against the threshold",
            [
                target(
                    f"stream_fair_estimated_equal_opportunity_difference{{{fv}}}",
                    "equal opportunity {{view}}",
                ),
                target(
                    f"stream_fair_estimated_equal_opportunity_difference_lower{{{fv}}}",
                    "equal opportunity {{view}} lower",
                ),
                target(
                    f"stream_fair_estimated_equal_opportunity_difference_upper{{{fv}}}",
                    "equal opportunity {{view}} upper",
                ),
                target(f"stream_fair_estimated_demographic_parity_difference{{{f}}}", "demographic parity"),
                target(
                    'stream_fair_disparity_threshold{disparity="equal_opportunity_difference"}', "threshold"
                ),
            ],
            width=12,
            minmax=(0, 1),
            overrides=[BOUND_OVERRIDE, THRESHOLD_OVERRIDE],
            description=(
                "pending: the predictions waiting for labels; combined: realized + estimated. "
                "StreamFairEstimatedDisparityFlagged (warning) fires when the pending interval lies "
                "beyond the threshold for 2h."
            ),
        ),
        panel(
            "timeseries",
            "Calibration error by group (ECE on matured labels)",
            [
                target(f"stream_fair_calibration_error{{{g}}}", "{{group}}"),
                target(f"stream_fair_calibration_error_lower{{{g}}}", "{{group}} lower"),
                target(f"stream_fair_calibration_error_upper{{{g}}}", "{{group}} upper"),
            ],
            width=12,
            overrides=[BOUND_OVERRIDE],
            description=(
                "A group whose ECE interval lies above fairness.estimates.max_calibration_error is "
                "untrusted (StreamFairCalibrationDrift)."
            ),
        ),
        panel(
            "timeseries",
            "Calibration error by group on recent labels (ECE per window)",
            [
                target(
                    f"max without (instance, pod) (stream_fair_window_calibration_error{{{g}}})",
                    "{{group}} {{window}}",
                ),
                target(
                    f"max without (instance, pod) (stream_fair_window_calibration_error_lower{{{g}}})",
                    "{{group}} {{window}} lower",
                ),
                target(
                    f"max without (instance, pod) (stream_fair_window_calibration_error_upper{{{g}}})",
                    "{{group}} {{window}} upper",
                ),
            ],
            width=12,
            overrides=[BOUND_OVERRIDE],
            description=(
                "ECE on the labels whose event time lies in each configured window: calibration drift, "
                "not diluted by history. A window checks a group from 500 of its labels; "
                "StreamFairCalibrationDrift fires when a checked window's interval lies above "
                "fairness.estimates.max_calibration_error for 1h."
            ),
        ),
        panel(
            "state-timeline",
            "Trusted for estimates (calibration checked and fine)",
            [target(f"stream_fair_estimated_group_trusted{{{g}}}", "{{group}}")],
            width=12,
            unit="none",
        ),
        panel(
            "timeseries",
            "Scored predictions waiting for a label",
            [target(f"stream_fair_estimated_pending_predictions{{{g}}}", "{{group}} {{instance}}")],
            width=12,
            unit="short",
        ),
    ]
    return panels


def intersections() -> dict[str, Any]:
    sel = 'model="$model", feature="$feature", group=~"$group", window="$window"'
    rate_var = custom_var("rate", RATES[:5], label="Rate")
    panels = [
        panel(
            "heatmap",
            "$rate by intersectional cell",
            [target(f"max by (group) (stream_fair_${{rate}}{{{sel}}})", "{{group}}")],
            width=24,
            height=12,
            minmax=(0, 1),
            description="One row per cell (e.g. Black&Female); colour is the rate.",
            options={
                "calculate": False,
                "yAxis": {"axisPlacement": "left"},
                "color": {"mode": "scheme", "scheme": "RdYlGn", "min": 0, "max": 1},
                "cellGap": 1,
                "tooltip": {"show": True, "yHistogram": False},
            },
        ),
        panel(
            "table",
            "Cells now: $rate, interval and n",
            [
                target(f"max by (group) (stream_fair_${{rate}}{{{sel}}})", instant=True, table=True),
                target(
                    f"max by (group) (stream_fair_${{rate}}_lower{{{sel}}})",
                    instant=True,
                    table=True,
                ),
                target(
                    f"max by (group) (stream_fair_${{rate}}_upper{{{sel}}})",
                    instant=True,
                    table=True,
                ),
                target(f"sum by (group) (stream_fair_group_samples{{{sel}}})", instant=True, table=True),
            ],
            width=14,
            height=10,
            unit="none",
            options={"sortBy": [{"displayName": "Value #A", "desc": True}]},
        ),
        panel(
            "bargauge",
            "Joined pairs per cell (n)",
            [
                target(
                    f"sum by (group) (stream_fair_group_samples{{{sel}}})",
                    "{{group}}",
                    instant=True,
                )
            ],
            width=10,
            height=10,
            unit="short",
            options={"orientation": "horizontal", "displayMode": "basic"},
        ),
    ]
    panels.append(
        panel(
            "timeseries",
            "Intersections nobody configured: cells found (search)",
            [
                target('max by (window) (stream_fair_search_findings{model="$model"})', "found ({{window}})"),
                target(
                    'max by (window) (stream_fair_search_hypotheses{model="$model"})',
                    "hypotheses tested ({{window}})",
                ),
            ],
            width=24,
            height=8,
            unit="short",
            description="Cells of unconfigured pairs of features and audit_only attributes whose rate "
            "differs from the rest after Holm's correction over every hypothesis tested (family-wise "
            "error at most fairness.search.alpha per search). Which cells: the status page or /search "
            "(docs/explain.md).",
            options={"legend": {"displayMode": "list", "placement": "bottom"}},
        )
    )
    for p in panels:
        if p["type"] == "table":
            p["transformations"] = [{"id": "merge", "options": {}}]
    return dashboard(
        "stream-fair-intersections",
        "stream-fair / Intersections",
        "Rates over intersectional cells: small marginal disparities can hide large ones in cells.",
        [
            datasource_var(),
            MODEL_VAR,
            feature_var(multi=False, intersections_only=True),
            GROUP_VAR,
            WINDOW_VAR,
            rate_var,
        ],
        panels,
    )


def feedback() -> dict[str, Any]:
    sel = 'model="$model", feature="$feature", group=~"$group"'
    fsel = 'model="$model", feature="$feature"'
    panels = [
        row("Label coverage and delay (check these before trusting outcome-based rates)"),
        panel(
            "timeseries",
            "Label coverage by group",
            [target(f"stream_fair_label_coverage{{{sel}}}", "{{group}}")],
            width=8,
            minmax=(0, 1),
        ),
        panel(
            "timeseries",
            "Label coverage gap (max - min)",
            [target(f"stream_fair_label_coverage_gap{{{fsel}}}", "{{feature}}")],
            width=8,
            minmax=(0, 1),
            description="StreamFairLabelCoverageGap fires above 0.2 for 2h.",
        ),
        panel(
            "timeseries",
            "Label delay (p50, p90, p99)",
            [
                target(
                    f'stream_fair_label_delay_seconds{{{sel}, quantile="{q}"}}',
                    f"{{{{group}}}} p{q[2:] or '50'}",
                )
                for q in ("0.5", "0.9", "0.99")
            ],
            width=8,
            unit="s",
        ),
        panel(
            "timeseries",
            "Expired predictions per second (no outcome within join.ttl)",
            [
                target(
                    f"sum by (group) (rate(partition:stream_fair_expired_predictions:max{{{sel}}}[$__rate_interval]))",
                    "{{group}}",
                )
            ],
            width=12,
            unit="ops",
        ),
        panel(
            "timeseries",
            "Predictions per second",
            [
                target(
                    f"sum by (group) (rate(partition:stream_fair_predictions:max{{{sel}}}[$__rate_interval]))",
                    "{{group}}",
                )
            ],
            width=12,
            unit="ops",
        ),
        row("Traffic and exposure"),
        panel(
            "timeseries",
            "Traffic share: recent vs reference period",
            [
                target(f"stream_fair_traffic_share{{{sel}}}", "{{group}}"),
                target(f"stream_fair_traffic_share_reference{{{sel}}}", "{{group}} reference"),
            ],
            width=12,
            minmax=(0, 1),
            overrides=[
                {
                    "matcher": {"id": "byRegexp", "options": ".*reference$"},
                    "properties": [{"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [6, 4]}}],
                }
            ],
        ),
        panel(
            "timeseries",
            "Exposure ratio (share of positives / share of traffic)",
            [target(f"stream_fair_exposure_ratio{{{sel}}}", "{{group}}")],
            width=12,
            unit="none",
            description="1 = a group receives positive decisions in proportion to its traffic.",
        ),
        row("Calibrated alarms (the default alert condition; StreamFairDisparityFlagged pages on it)"),
        panel(
            "timeseries",
            "Disparity alarm (1 = raised)",
            [target(f"max by (disparity) (stream_fair_disparity_alarm{{{fsel}}})", "{{disparity}}")],
            width=12,
            unit="none",
            minmax=(0, 1),
            description="Time-uniform verdict OR a calibrated change detector of one of the disparity's rates.",
        ),
        panel(
            "timeseries",
            "Group change alarms (which group; 1 = raised)",
            [
                target(
                    f"max by (group, signal) (stream_fair_group_change_alarm{{{sel}}})",
                    "{{group}} {{signal}}",
                )
            ],
            width=12,
            unit="none",
            minmax=(0, 1),
            description="Calibrated change detector of a group's rate against the rest of the feature.",
        ),
        row("Trends, feedback loops and drift"),
        panel(
            "timeseries",
            "Selection-rate trend (fast - slow average)",
            [target(f"stream_fair_selection_rate_trend{{{sel}}}", "{{group}}")],
            width=8,
            unit="none",
        ),
        panel(
            "timeseries",
            "Disparity trend",
            [target(f"stream_fair_disparity_trend{{{fsel}}}", "{{disparity}}")],
            width=8,
            unit="none",
        ),
        panel(
            "timeseries",
            "Feedback-loop indicator and verdict",
            [
                target(f"stream_fair_feedback_loop_indicator{{{fsel}}}", "indicator"),
                target(f"stream_fair_feedback_loop_amplifying{{{fsel}}}", "amplifying"),
            ],
            width=8,
            unit="none",
            minmax=(-1, 1),
            description="Association between a group's selection rate and the next period's change in its traffic share / base rate.",
        ),
        panel(
            "timeseries",
            "Drift detections per group and signal",
            [
                target(
                    f"sum by (group, signal) (increase(stream_fair_drift_detections_total{{{sel}}}[$__rate_interval]))",
                    "{{group}} {{signal}}",
                )
            ],
            width=12,
            unit="short",
            custom={"drawStyle": "bars", "fillOpacity": 80},
        ),
        panel(
            "timeseries",
            "Disparity drift detections",
            [
                target(
                    f"sum by (disparity) (increase(stream_fair_disparity_drift_detections_total{{{fsel}}}[$__rate_interval]))",
                    "{{disparity}}",
                )
            ],
            width=12,
            unit="short",
            custom={"drawStyle": "bars", "fillOpacity": 80},
        ),
    ]
    drift_annotation = {
        "datasource": DS,
        "enable": True,
        "iconColor": "orange",
        "name": "Drift detections",
        "expr": 'sum by (feature, group, signal) (changes(stream_fair_last_drift_timestamp_seconds{model="$model"}[2m])) > 0',
        "titleFormat": "drift: {{signal}}",
        "textFormat": "{{feature}}={{group}}",
        "step": "60s",
    }
    return dashboard(
        "stream-fair-feedback",
        "stream-fair / Feedback loops & drift",
        "Label coverage and delay, traffic share and exposure, trends, feedback-loop indicators and drift events.",
        [datasource_var(), MODEL_VAR, feature_var(multi=False), GROUP_VAR],
        panels,
        annotations=[drift_annotation],
    )


def pipeline() -> dict[str, Any]:
    t = 'job="stream-fair", model=~"$model", instance=~"$instance"'
    # recorded per-partition series have no instance: a partition's owners are joined (docs/state.md)
    tm = 'job="stream-fair", model=~"$model"'
    panels = [
        row("Health"),
        panel(
            "stat",
            "Detectors up",
            [target(f"sum(up{{{t}}})", "up"), target(f"count(up{{{t}}})", "targets")],
            width=6,
            unit="none",
        ),
        panel(
            "table",
            "Versions",
            [target(f"count by (version) (stream_fair_build_info{{{t}}})", instant=True, table=True)],
            width=6,
            unit="none",
        ),
        panel(
            "timeseries",
            "Checkpoint age",
            [target(f"time() - stream_fair_last_checkpoint_timestamp_seconds{{{t}}}", "{{instance}}")],
            width=6,
            unit="s",
        ),
        panel(
            "timeseries",
            "Internal errors per second",
            [
                target(
                    f"sum by (kind) (rate(stream_fair_errors_total{{{t}}}[$__rate_interval]))",
                    "{{kind}}",
                )
            ],
            width=6,
            unit="ops",
        ),
        row("Throughput and lag"),
        panel(
            "timeseries",
            "Records consumed per second",
            [
                target(
                    f"sum by (topic) (rate(stream_fair_records_read_total{{{t}}}[$__rate_interval]))",
                    "{{topic}}",
                )
            ],
            width=8,
            unit="ops",
        ),
        panel(
            "timeseries",
            "Consumer lag (records)",
            [
                target(
                    f"sum by (topic, partition) (stream_fair_consumer_lag{{{t}}})",
                    "{{topic}}/{{partition}}",
                )
            ],
            width=8,
            unit="short",
        ),
        panel(
            "timeseries",
            "Event-time lag (now - newest event time)",
            [
                target(
                    f"time() - max by (topic) (stream_fair_last_event_timestamp_seconds{{{t}}})",
                    "{{topic}}",
                ),
                target(f"time() - max(stream_fair_watermark_timestamp_seconds{{{t}}})", "watermark"),
            ],
            width=8,
            unit="s",
        ),
        row("Event fates"),
        panel(
            "timeseries",
            "Event fates per second",
            [
                target(
                    f"sum by (topic, fate) (rate(partition:stream_fair_event_fates:max{{{tm}}}[$__rate_interval]))",
                    "{{topic}} {{fate}}",
                )
            ],
            width=12,
            unit="ops",
            custom={"stacking": {"mode": "normal"}, "fillOpacity": 30},
        ),
        panel(
            "timeseries",
            "Pending (waiting for their partner)",
            [target(f"sum by (topic) (stream_fair_pending_events{{{t}}})", "{{topic}}")],
            width=12,
            unit="short",
        ),
        panel(
            "timeseries",
            "Rejected records per second by reason",
            [
                target(
                    f"sum by (topic, reason) (rate(stream_fair_rejected_events_total{{{t}}}[$__rate_interval]))",
                    "{{topic}} {{reason}}",
                )
            ],
            width=8,
            unit="ops",
        ),
        panel(
            "timeseries",
            "Dead letters per second",
            [
                target(
                    f"sum by (topic) (rate(stream_fair_dead_letters_total{{{t}}}[$__rate_interval]))",
                    "{{topic}}",
                )
            ],
            width=8,
            unit="ops",
        ),
        panel(
            "timeseries",
            "Capacity evictions and cardinality overflow per second",
            [
                target(
                    f"sum by (topic) (rate(stream_fair_capacity_evictions_total{{{t}}}[$__rate_interval]))",
                    "evicted {{topic}}",
                ),
                target(
                    f"sum by (feature) (rate(stream_fair_cardinality_overflow_total{{{t}}}[$__rate_interval]))",
                    "overflow {{feature}}",
                ),
            ],
            width=8,
            unit="ops",
        ),
    ]
    return dashboard(
        "stream-fair-pipeline",
        "stream-fair / Pipeline health",
        "Throughput, consumer and event-time lag, event fates, dead letters and internal errors.",
        [
            datasource_var(),
            query_var("model", 'label_values(up{job="stream-fair"}, model)', multi=True, include_all=True),
            query_var(
                "instance",
                'label_values(up{job="stream-fair", model=~"$model"}, instance)',
                multi=True,
                include_all=True,
            ),
        ],
        panels,
    )


DASHBOARDS = {
    "overview.json": overview,
    "groups.json": groups,
    "intersections.json": intersections,
    "feedback.json": feedback,
    "pipeline.json": pipeline,
}


def render(build: Any) -> str:
    return json.dumps(build(), indent=2, sort_keys=False) + "\n"


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    OUT.mkdir(parents=True, exist_ok=True)
    for name, build in DASHBOARDS.items():
        path, text = OUT / name, render(build)
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print(f"out of date, run python grafana/build_dashboards.py: {', '.join(stale)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
