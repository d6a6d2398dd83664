"""Helpers to pull PromQL out of Grafana dashboards and to check which metrics it uses.

Shared by the static tests (``test_grafana.py``, ``test_rules.py``) and meant for an end-to-end
test against a real Prometheus: ``panel_queries(dashboard, {...})`` returns every panel query with
Grafana's variables substituted, ready for ``/api/v1/query``.

>>> dash = {"panels": [{"type": "row", "title": "r", "panels": [
...     {"title": "TPR", "targets": [{"refId": "A",
...      "expr": 'rate(x_total{model=~"$model"}[$__rate_interval]) / ${n}'}]}]}]}
>>> panel_queries(dash, {"model": "credit-v3", "n": "2"})
[('TPR', 'rate(x_total{model=~"credit-v3"}[5m]) / 2')]
>>> sorted(metric_names('sum by (group) (rate(a_total{b="c"}[5m])) / on (group) d offset 1h'))
['a_total', 'd']
>>> counters_outside_rate('sum(a_total) + sum(rate(b_total[5m]))')
['a_total']
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from typing import Any

#: Values for Grafana's built-in variables; callers may override any of them.
BUILTIN_VARIABLES: dict[str, str] = {
    "__rate_interval": "5m",
    "__interval": "1m",
    "__interval_ms": "60000",
    "__range": "1h",
    "__range_s": "3600",
    "__range_ms": "3600000",
    "__from": "0",
    "__to": "3600000",
}

#: Metrics announced for the feedback-loop/drift work but not yet listed in docs/metrics.md.
#: Remove each name from here once the metrics reference documents it.
ANNOUNCED_METRICS: frozenset[str] = frozenset(
    {
        "stream_fair_label_coverage",
        "stream_fair_label_coverage_gap",
        "stream_fair_label_delay_seconds",
        "stream_fair_traffic_share",
        "stream_fair_traffic_share_reference",
        "stream_fair_exposure_ratio",
        "stream_fair_selection_rate_trend",
        "stream_fair_disparity_trend",
        "stream_fair_feedback_loop_indicator",
        "stream_fair_feedback_loop_amplifying",
        "stream_fair_drift_detections_total",
        "stream_fair_last_drift_timestamp_seconds",
        "stream_fair_disparity_drift_detections_total",
    }
)

#: Series Prometheus itself provides.
PROMETHEUS_BUILTINS: frozenset[str] = frozenset({"up", "ALERTS", "ALERTS_FOR_STATE"})

_KEYWORDS = frozenset(
    [
        "and",
        "or",
        "unless",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "offset",
        "atan2",
        "inf",
        "nan",
    ]
)
_COUNTER_FUNCTIONS = frozenset({"rate", "increase", "irate"})
_VARIABLE = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\[\[(\w+)(?::[^\]]*)?\]\]|\$(\w+)")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"(?<![\w:.$])[a-zA-Z_:][\w:]*")
_NAME_MATCHER = re.compile(r'__name__\s*(=~|=)\s*"((?:[^"\\]|\\.)*)"')


def iter_panels(dashboard: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    """Every panel of a dashboard, including those nested in (collapsed) rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from iter_panels(panel)


def substitute(expr: str, variables: Mapping[str, str]) -> str:
    """Replace ``$var``, ``${var}``, ``${var:fmt}`` and ``[[var]]`` by their values.

    Built-ins (``$__rate_interval``, ``$__range``, ...) default to ``BUILTIN_VARIABLES``.
    An unknown variable raises ``KeyError`` naming it, so no ``$`` ever reaches Prometheus.
    """
    values = {**BUILTIN_VARIABLES, **variables}

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2) or match.group(3)
        if name not in values:
            raise KeyError(f"no value for Grafana variable ${name} in {expr!r}; pass it in variables")
        return values[name]

    return _VARIABLE.sub(replace, expr)


def panel_queries(
    dashboard_json: str | Mapping[str, Any], variables: Mapping[str, str]
) -> list[tuple[str, str]]:
    """``(panel title, PromQL)`` for every target of every panel, variables substituted."""
    dashboard = json.loads(dashboard_json) if isinstance(dashboard_json, str) else dashboard_json
    queries = []
    for panel in iter_panels(dashboard):
        for target in panel.get("targets", []):
            if target.get("expr"):
                queries.append((panel.get("title", ""), substitute(target["expr"], variables)))
    return queries


_LABEL_VALUES = re.compile(r"^\s*label_values\((?:(.*),\s*)?(\w+)\)\s*$", re.DOTALL)


def template_variables(dashboard: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The dashboard's template variables, in the order Grafana resolves them."""
    return list(dashboard.get("templating", {}).get("list", []))


def variable_query(variable: Mapping[str, Any]) -> str:
    """A variable's query text (Grafana stores it as a string or as ``{"query": ...}``)."""
    query = variable.get("query", "")
    return str(query.get("query", "") if isinstance(query, Mapping) else query)


def label_values(query: str) -> tuple[str | None, str]:
    """``(series selector or None, label)`` of a ``label_values(...)`` variable query.

    >>> label_values('label_values(up{job="stream-fair"}, model)')
    ('up{job="stream-fair"}', 'model')
    >>> label_values("label_values(instance)")
    (None, 'instance')
    """
    match = _LABEL_VALUES.match(query)
    if match is None:
        raise ValueError(f"not a label_values(...) query: {query!r}")
    return match.group(1), match.group(2)


def custom_options(variable: Mapping[str, Any]) -> list[str]:
    """The values of a ``custom`` variable (``"1d,1h,cumulative"``)."""
    return [v.strip() for v in variable_query(variable).split(",") if v.strip()]


def _blank(pattern: re.Pattern[str], text: str) -> str:
    return pattern.sub(lambda m: " " * len(m.group()), text)


def _skeleton(expr: str) -> str:
    """The expression with strings, label matchers, ranges and grouping clauses blanked out
    (same length, so positions still line up with the original)."""
    text = _blank(_STRING, expr)
    text = _blank(re.compile(r"\{[^}]*\}"), text)
    text = _blank(re.compile(r"\[[^\]]*\]"), text)
    return _blank(_GROUPING, text)


def _metric_tokens(expr: str) -> Iterator[re.Match[str]]:
    text = _skeleton(expr)
    for match in _IDENT.finditer(text):
        if match.group() in _KEYWORDS or text[match.end() :].lstrip().startswith("("):
            continue  # a keyword, or a function / aggregation being called
        yield match


def metric_names(expr: str) -> set[str]:
    """Metric names selected by a PromQL expression (``{__name__=...}`` selectors excluded;
    see ``name_matchers``)."""
    return {m.group() for m in _metric_tokens(expr)}


def name_matchers(expr: str) -> list[tuple[str, str]]:
    """``(operator, value)`` of every ``__name__`` matcher, e.g. ``("=~", "stream_fair_.*")``."""
    return [(m.group(1), m.group(2)) for m in _NAME_MATCHER.finditer(expr)]


def counters_outside_rate(expr: str) -> list[str]:
    """Counters (``*_total``) not read directly through ``rate``/``increase``/``irate``."""
    text = _skeleton(expr)
    bad = []
    for match in _metric_tokens(expr):
        if not match.group().endswith("_total"):
            continue
        depth, i = 0, match.start() - 1
        while i >= 0:  # walk back to the innermost unclosed "("
            if text[i] == ")":
                depth += 1
            elif text[i] == "(":
                if depth == 0:
                    break
                depth -= 1
            i -= 1
        caller = re.search(r"(\w+)\s*$", text[: max(i, 0)])
        if i < 0 or caller is None or caller.group(1) not in _COUNTER_FUNCTIONS:
            bad.append(match.group())
    return bad


def documented_metrics(metrics_md: str) -> set[str]:
    """Every metric name the metrics reference (docs/metrics.md) defines.

    Besides literal ``stream_fair_*`` names it expands the two families: each rate ``R`` of the
    per-group table as ``stream_fair_R``/``_lower``/``_upper``, each disparity ``D`` (and its
    ``/ _ratio`` sibling) as ``stream_fair_D``/``_lower``/``_upper``.
    """
    names = set(re.findall(r"`(stream_fair_\w+)`", metrics_md))
    families: list[str] = []
    section = ""
    for line in metrics_md.splitlines():
        if line.startswith("## "):
            section = line.lower()
        if not line.startswith("| `") or ("rates" not in section and "disparities" not in section):
            continue
        first_cell = line.split("|")[1]
        cells = re.findall(r"`(\w+)`", first_cell)
        if not cells or cells[0].startswith("stream_fair_"):
            continue
        base = cells[0]
        families.append(base)
        for other in cells[1:]:  # "`D_difference`, `D_ratio`" or "`D_difference` / `_ratio`"
            if other.startswith("_"):
                families.append(re.sub(r"_[a-z]+$", other, base))
            else:
                families.append(other)
    for family in families:
        names |= {f"stream_fair_{family}{s}" for s in ("", "_lower", "_upper")}
    return names


def expand_name_regex(pattern: str) -> set[str] | None:
    """Names a ``__name__=~`` regex of the form ``prefix(a|b|c)suffix`` matches, else ``None``."""
    match = re.fullmatch(r"([\w:]*)\(([\w:|]+)\)([\w:]*)", pattern)
    if match is None:
        return None
    return {match.group(1) + alt + match.group(3) for alt in match.group(2).split("|")}
