"""A human-readable status page, server-rendered HTML with no external assets.

For people without Grafana: a one-line verdict, features missing from the events, the flagged
disparities, a sparkline of each disparity and its alarm over the last minutes, then per model and
feature (cumulative window) a forest plot of the per-group rates with their intervals and the live
per-group table with the groups that make a flagged disparity marked, the pipeline accounting, and
links to ``/metrics``. It refreshes itself every 5 s. Pictures are inline SVG (:mod:`stream_fair.svg`).
"""

from __future__ import annotations

import html
import math
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

from stream_fair.disparity import DISPARITY_RATES
from stream_fair.explain import p_value, top_drivers
from stream_fair.exporter import PipelineStats
from stream_fair.fairness import rate_parts
from stream_fair.missing import report_missing
from stream_fair.report import CUMULATIVE, FeatureView, Report, flagged_extremes
from stream_fair.svg import ForestRow, Point, forest_plot, sparkline

_RATES = (
    ("selection_rate", "selection"),
    ("true_positive_rate", "TPR"),
    ("false_positive_rate", "FPR"),
    ("accuracy", "accuracy"),
)

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5rem;color:#1d2330;
max-width:84rem}
h1{font-size:1.4rem;margin:0 0 .3rem} h2{font-size:1.1rem;margin:1.6rem 0 .4rem}
.muted{color:#667} table{border-collapse:collapse;margin:.3rem 0 1rem;font-size:.9rem}
th,td{padding:.25rem .6rem;border-bottom:1px solid #dde;text-align:right}
th.l,td.l{text-align:left} th{background:#f3f4f8}
.flag{background:#fde2e1;color:#8a1c17;font-weight:600;padding:.1rem .4rem;border-radius:.3rem}
.ok{background:#e2f5e6;color:#17692b;font-weight:600;padding:.1rem .4rem;border-radius:.3rem}
td.ext{background:#fde2e1;color:#8a1c17;font-weight:600}
table.nw td{white-space:nowrap}
.verdict{font-size:1rem;margin:.8rem 0} .small{color:#a66b00} .ci{color:#778;font-size:.8rem}
.warn{background:#fff4d6;border-left:4px solid #e0a800;padding:.4rem .7rem;margin:.4rem 0}
.sparks{display:flex;flex-wrap:wrap;gap:.6rem 1.2rem;margin:.3rem 0 1rem}
.spark-card{font-size:.8rem} .spark-card b{font-weight:600}
svg text{font-family:system-ui,sans-serif} svg .ax{font-size:12px;fill:#1d2330}
svg .lab{font-size:11px;fill:#1d2330} svg .tick{font-size:9px;fill:#778}
"""

#: The forest plot's panels: the rates the main disparities compare.
_FOREST = (
    ("selection_rate", "selection rate"),
    ("true_positive_rate", "TPR"),
    ("false_positive_rate", "FPR"),
)
#: Disparities drawn as sparklines (the differences; ratios carry the same information).
_SPARK_METHOD = "between_groups"


HistoryPoint = tuple[str, str, str, float, float, float, bool]  # model, feature, disparity, est, raised


def history_points(report: Report) -> list[HistoryPoint]:
    """The sparklines' point of each cumulative between-groups difference of a report, with
    whether its calibrated alarm is raised."""
    fb = report.snapshot.feedback
    out: list[HistoryPoint] = []
    for v in report.views:
        if v.window != CUMULATIVE:
            continue
        alarms = fb.features.get((v.model, v.feature.name)) if fb is not None else None
        for (d, method), est in v.report.disparities.items():
            if method != _SPARK_METHOD or not d.endswith("_difference"):
                continue
            alarm = alarms.alarms.get(d) if alarms is not None else None
            raised = bool(alarm is not None and alarm.flagged)
            out.append((v.model, v.feature.name, d, est.value, est.lower, est.upper, raised))
    return out


class History:
    """A small bounded in-process history of each disparity for the sparklines.

    Keeps the last ``capacity`` points per (model, feature, disparity), at most one every
    ``interval`` seconds: (snapshot time, value, lower, upper, calibrated alarm raised). Written
    whenever a new report is built, read by the page; the lock makes both safe across threads.
    """

    def __init__(self, capacity: int = 90, interval: float = 10.0) -> None:
        self.capacity = capacity
        self.interval = interval
        self._last: float | None = None
        self._points: dict[tuple[str, str, str], deque[Point]] = {}
        self._lock = threading.Lock()

    def record(self, report: Report) -> bool:
        """Add a point per disparity unless the last one is younger than ``interval``."""
        return self.add(report.snapshot.taken_at, history_points(report))

    def add(self, t: float, points: Sequence[HistoryPoint]) -> bool:
        """Add the points of a report taken at ``t`` (:func:`history_points`; the report worker
        computes them in its own process) unless the last ones are younger than ``interval``."""
        with self._lock:
            if self._last is not None and t - self._last < self.interval:
                return False
            self._last = t
            for model, feature, d, value, lower, upper, raised in points:
                series = self._points.setdefault((model, feature, d), deque(maxlen=self.capacity))
                series.append((t, value, lower, upper, raised))
            return True

    def series(self, model: str, feature: str, disparity: str) -> list[Point]:
        with self._lock:
            return list(self._points.get((model, feature, disparity), ()))


def _fmt(x: float | None) -> str:
    return "–" if x is None or math.isnan(x) else f"{x:.3f}"


def _extremes(view: FeatureView) -> set[tuple[str, str]]:
    """``(group, rate)`` cells at the minimum or maximum of a flagged between-groups disparity."""
    return flagged_extremes(view.report)


def _alarm_log(feedback: Any, stats: PipelineStats, last: int = 20) -> list[str]:
    """The calibrated alarm's event log (the newest first), or where to find it."""
    e = html.escape
    out = ["<h2>Calibrated alarm: events</h2>"]
    if stats.leader is False:
        out.append(
            "<p class=muted>The model-wide alarm is computed by the leader replica "
            "(<code>stream_fair_leader == 1</code>); its status page and <a href=/alarms>/alarms</a> "
            "list the events.</p>"
        )
        return out
    events = list(getattr(feedback, "alarm_events", ()) or ())[-last:][::-1]
    if not events:
        out.append("<p class=muted>No alarm raised or cleared yet. <a href=/alarms>/alarms</a> (JSON)</p>")
        return out
    out.append(
        "<table><tr><th class=l>evidence time (UTC)</th><th class=l>event</th><th class=l>model</th>"
        "<th class=l>feature</th><th class=l>disparity</th><th class=l>group</th><th class=l>rate</th>"
        "<th>group</th><th>rest</th><th>statistic / threshold</th><th class=l>change point (UTC)</th>"
        "<th class=l>evidence</th><th class=l>why</th></tr>"
    )

    def when(ts: float | None) -> str:
        return "–" if ts is None else time.strftime("%Y-%m-%d %H:%M", time.gmtime(ts))

    for ev in events:
        flag = "flag" if ev.kind == "alarm_raised" else "ok"
        evidence = ", ".join(f"{k} {v}" for k, v in sorted(ev.evidence.items()))
        out.append(
            f"<tr><td class=l>{when(ev.ts)}</td><td class=l><span class={flag}>{e(ev.kind)}</span></td>"
            f"<td class=l>{e(ev.model)}</td><td class=l>{e(ev.feature)}</td>"
            f"<td class=l>{e(ev.disparity)}</td>"
            f"<td class=l>{e(str(ev.group))}</td><td class=l>{e(str(ev.rate))}</td>"
            f"<td>{_fmt(ev.group_value)}</td><td>{_fmt(ev.rest_value)}</td>"
            f"<td>{ev.statistic:.1f} / {ev.threshold:.1f}</td><td class=l>{when(ev.change_point_ts)}</td>"
            f"<td class=l>{e(evidence)}</td><td class=l>{_explain_link(ev)}</td></tr>"
        )
    out.append("</table><p class=muted>Newest first; all of them: <a href=/alarms>/alarms</a> (JSON).</p>")
    return out


def _explain_link(ev: Any) -> str:
    """A raised alarm's ``/explain`` link: split at its change point, for its group and rate."""
    if ev.kind != "alarm_raised":
        return ""
    query = {
        "model": ev.model,
        "feature": ev.feature,
        "disparity": ev.disparity,
        "group": ev.group,
        "rate": ev.rate,
    }
    if ev.change_point_ts is not None:
        query["split"] = f"{ev.change_point_ts:.0f}"
    return f"<a href='/explain?{html.escape(urllib.parse.urlencode(query))}'>/explain</a>"


def _why(report: Report, view: FeatureView, disparity: str) -> str:
    """The flagged disparity's widest group-to-rest gap and its top drivers (stream_fair.explain,
    cumulative counts), with a link to the full ``/explain`` (the decomposition between periods)."""
    e = html.escape
    url = "/explain?" + urllib.parse.urlencode(
        {"model": view.model, "feature": view.feature.name, "disparity": disparity}
    )
    link = f"<a href='{e(url)}'>explain</a>"
    if disparity not in DISPARITY_RATES:
        return link
    cells = {c: q for (m, c), q in report.snapshot.cumulative.items() if m == view.model}
    intersections = [x.feature for x in report.views if x.feature.is_intersection and x.window == CUMULATIVE]
    d = top_drivers(
        cells, view.feature, disparity, report.attributes, intersections, report.settings.min_samples
    )
    if d is None or d.gap is None:
        return link
    top = d.ranked[0] if d.ranked else None
    driver = "" if top is None else f" · {top.by}={top.value} {top.contribution:+.3f}"
    return f"<span class=small>{e(d.group)} {d.gap:+.3f}{e(driver)}</span> {link}"


def _interval(est: Any) -> str:
    return f"{_fmt(est.value)} <span class=ci>[{_fmt(est.lower)}, {_fmt(est.upper)}]</span>"


def _estimates(report: Report) -> list[str]:
    """Label-free estimates of the pending predictions and calibration by group (docs/estimates.md)."""
    if not report.estimates:
        return []
    e = html.escape
    settings = report.settings
    out = [
        "<h2>Before the labels arrive: label-free estimates</h2>",
        "<p class=muted>From the scores of the predictions still waiting for their labels, each "
        "score taken as the probability of label 1 (calibrated scores assumed). <i>pending</i>: "
        "those predictions only; <i>realized + estimated</i> converges to the realized rate as "
        "labels mature. Calibration is measured on matured labels (ECE over 10 reliability bins); "
        "an untrusted group is shown but takes no part in the estimated gaps. Estimates cannot see "
        "a change in P(label | score).</p>",
    ]
    for ev in report.estimates:
        fe = ev.estimates
        pend = fe.groups.get("pending", {})
        comb = fe.groups.get("combined", {})
        gaps = []
        for (d, m), est in sorted(fe.disparities.get("pending", {}).items()):
            if m != "between_groups" or d not in (
                "equal_opportunity_difference",
                "demographic_parity_difference",
            ):
                continue
            flag = fe.flagged["pending"][d, m]
            name = f"<span class=flag>{e(d)}</span>" if flag else e(d)
            gaps.append(f"{name} {_interval(est)} (threshold {_fmt(settings.thresholds.get(d, math.nan))})")
        out.append(f"<h3>{e(ev.model)} · {e(ev.feature.name)}</h3>")
        out.append(
            "<p>estimated gaps (pending, trusted groups): "
            + ("; ".join(gaps) if gaps else "none: fewer than two trusted groups with enough data")
            + "</p>"
        )
        out.append(
            "<table><tr><th class=l>group</th><th>pending</th><th>selection rate</th>"
            "<th>TPR (pending)</th><th>FPR (pending)</th><th>TPR (realized + estimated)</th>"
            "<th>ECE (matured labels)</th><th class=l>trust</th><th class=l>reliability: observed share "
            "of label 1 per score decile</th></tr>"
        )
        for g in sorted(set(fe.calibration) | set(pend)):
            cells = []
            for grp, rate in (
                (pend, "selection_rate"),
                (pend, "true_positive_rate"),
                (pend, "false_positive_rate"),
                (comb, "true_positive_rate"),
            ):
                r = grp[g].rates.get(rate) if g in grp else None
                cells.append("<td>–</td>" if r is None else f"<td>{_interval(r)}</td>")
            cal = fe.calibration.get(g)
            if cal is None or cal.ece is None:
                ece, trust, rel = "<td>–</td>", "no matured labels", ""
            else:
                ece = f"<td>{_interval(cal.ece)}</td>"
                trusted, by = fe.trust.get(g, (cal.trusted, "cumulative"))
                wcal = fe.window_calibration.get(by, {}).get(g) if by != "cumulative" else None
                trust = (
                    "trusted"
                    if trusted
                    else (
                        f"<span class=flag>miscalibrated in the last {e(by)}</span>"
                        if wcal is not None and wcal.reason == "miscalibrated"
                        else "<span class=flag>miscalibrated</span>"
                        if cal.reason == "miscalibrated"
                        else "too few labels"
                    )
                )
                rel = " ".join("·" if b.count == 0 else f"{b.frequency:.2f}" for b in cal.bins)
            out.append(
                f"<tr><td class=l>{e(g)}</td><td>{fe.pending.get(g, 0)}</td>{''.join(cells)}{ece}"
                f"<td class=l>{trust}</td><td class=l><span class=small>{rel}</span></td></tr>"
            )
        out.append("</table>")
    return out


def _findings(report: Report) -> list[str]:
    """Cells of intersections nobody configured that differ from the rest (stream_fair.search)."""
    e = html.escape
    searches = report.searches
    if not searches:
        return []
    out = ["<h2>Intersections nobody configured</h2>"]
    found = [(sv, f) for sv in searches for f in sv.result.findings]
    tested = ", ".join(
        f"{e(sv.model)}: {sv.result.tested} hypotheses in {sv.result.combinations} combinations"
        f"{' (truncated)' if sv.result.truncated else ''}, window {e(sv.window)}"
        for sv in searches
    )
    alpha = searches[0].result.alpha
    note = (
        f"<p class=muted>Searched {tested}. Holm's correction over every hypothesis tested: "
        f"the chance that any finding below is spurious is at most {alpha:g} per search. "
        "JSON: <a href=/search>/search</a>.</p>"
    )
    if not found:
        out.append("<p>None found: no unconfigured cell differs credibly from the rest.</p>" + note)
        return out
    out.append(
        "<table><tr><th class=l>model</th><th class=l>intersection</th><th class=l>group</th>"
        "<th class=l>rate</th><th>group (successes/trials)</th><th>rest</th><th>adjusted p</th>"
        "<th class=l>suggestion</th></tr>"
    )
    for sv, f in found:
        out.append(
            f"<tr><td class=l>{e(sv.model)}</td><td class=l>{e(f.intersection)}</td>"
            f"<td class=l><span class=flag>{e(f.group)}</span></td><td class=l>{e(f.rate)}</td>"
            f"<td>{_fmt(f.value)} ({f.successes}/{f.trials})</td>"
            f"<td>{_fmt(f.rest_value)} ({f.rest_successes}/{f.rest_trials})</td>"
            f"<td>{p_value(f.adjusted_p_value)}</td><td class=l>{e(f.suggestion)}</td></tr>"
        )
    out.append("</table>" + note)
    return out


def render(report: Report, stats: PipelineStats, history: History | None = None) -> str:
    """The whole page as one HTML string (sparklines only with a ``history``)."""
    snap, settings = report.snapshot, report.settings
    e = html.escape
    views = [v for v in report.views if v.window == CUMULATIVE]
    flagged = [(v, d, m) for v in views for (d, m), f in sorted(v.report.flagged.items()) if f]
    out = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        "<meta http-equiv=refresh content=5><title>stream-fair status</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>stream-fair</h1>",
        f"<p class=muted>updated {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(snap.taken_at))}"
        " UTC · <a href=/metrics>/metrics</a> (Prometheus) · <a href=/healthz>/healthz</a> · "
        "<a href=/readyz>/readyz</a></p>",
    ]
    if flagged:
        features = sorted({f"{v.model} · {v.feature.name}" for v, _, _ in flagged})
        out.append(
            f"<p class=verdict><span class=flag>{len(flagged)} disparities flagged</span> "
            f"in {e(', '.join(features))}</p>"
        )
    else:
        out.append("<p class=verdict><span class=ok>no disparity flagged</span></p>")
    for missing in report_missing(report):
        if missing.mostly_missing:
            out.append(f"<p class=warn><b>Missing feature</b>: {e(missing.message())}</p>")
    out.append(
        f"<p class=muted>Cumulative window. <span class=ci>[lower, upper]</span>: "
        f"{settings.credible_level:.0%} credible interval. A disparity is flagged when its whole "
        f"interval lies beyond the threshold; groups with fewer than {settings.min_samples} "
        "joined pairs are shown but take no part. Marked cells: the groups at both ends of a "
        "flagged disparity. Forest plots: each group's rate (dot) and credible interval (bar) "
        "from 0 to 1, the dashed line at the reference group's rate (or all eligible groups "
        "pooled), grey below min samples, red at the ends of a flagged disparity.</p>"
    )

    out.append("<h2>Flagged disparities</h2>")
    if flagged:
        out.append(
            "<table class=nw><tr><th class=l>model</th><th class=l>feature</th>"
            "<th class=l>disparity</th><th class=l>method</th><th>value</th>"
            "<th>interval</th><th>threshold</th><th class=l title='the widest group-to-rest gap, then the "
            "value of another attribute that carries most of it'>why: widest gap · top driver</th></tr>"
        )
        for v, d, m in flagged:
            gap = v.report.disparities[d, m]
            out.append(
                f"<tr><td class=l>{e(v.model)}</td><td class=l>{e(v.feature.name)}</td>"
                f"<td class=l><span class=flag>{e(d)}</span></td><td class=l>{e(m)}</td>"
                f"<td>{_fmt(gap.value)}</td>"
                f"<td class=ci>[{_fmt(gap.lower)}, {_fmt(gap.upper)}]</td>"
                f"<td>{_fmt(settings.thresholds.get(d, math.nan))}</td>"
                f"<td class='l why'>{_why(report, v, d)}</td></tr>"
            )
        out.append("</table>")
    else:
        out.append("<p>None: no disparity is credibly beyond its threshold.</p>")
    if history is not None:
        out.extend(_sparklines(views, history, settings.thresholds))

    for v in views:
        fr = v.report
        n_flagged = sum(fr.flagged.values())
        ref = f" · reference <b>{e(fr.reference)}</b>" if fr.reference else ""
        badge = f" <span class=flag>{n_flagged} flagged</span>" if n_flagged else ""
        out.append(f"<h2>{e(v.model)} · {e(v.feature.name)}{ref}{badge}</h2>")
        out.append(
            "<table><tr><th class=l>group</th><th>n</th>"
            + "".join(f"<th>{label}</th>" for _, label in _RATES)
            + "<th></th></tr>"
        )
        marked = _extremes(v)
        out.append(_forest(v, marked))
        for g, gr in sorted(fr.groups.items(), key=lambda kv: -kv[1].counts.n):
            cells = []
            for rate, _ in _RATES:
                est = gr.rates.get(rate)
                cls = " class=ext" if (g, rate) in marked else ""
                cells.append(
                    "<td>–</td>"
                    if est is None
                    else f"<td{cls}>{_fmt(est.value)} "
                    f"<span class=ci>[{_fmt(est.lower)}, {_fmt(est.upper)}]</span></td>"
                )
            note = "" if gr.eligible else "<span class=small>below min samples / excluded</span>"
            out.append(
                f"<tr><td class=l>{e(g)}</td><td>{gr.counts.n}</td>{''.join(cells)}"
                f"<td class=l>{note}</td></tr>"
            )
        out.append("</table>")

    out.extend(_estimates(report))
    out.extend(_findings(report))
    fates = list(next(iter(snap.fates.values()), {}))
    out.append(
        "<h2>Pipeline</h2><table><tr><th class=l>topic</th><th>consumed</th>"
        "<th>pending</th>" + "".join(f"<th>{e(f)}</th>" for f in fates) + "</tr>"
    )
    for t, by_fate in snap.fates.items():
        out.append(
            f"<tr><td class=l>{e(t)}</td><td>{snap.consumed[t]}</td>"
            f"<td>{snap.pending[t]}</td>" + "".join(f"<td>{n}</td>" for n in by_fate.values()) + "</tr>"
        )
    out.append("</table>")
    lag = sum(stats.lag.values())
    out.append(
        f"<p class=muted>consumer lag {lag} · dead letters "
        f"{sum(stats.dead_letters.values())} · every series: "
        "<a href=/metrics>/metrics</a></p>"
    )
    out.extend(_alarm_log(snap.feedback, stats))  # last: the first screen stays the plots'
    out.append("</body></html>")
    return "".join(out)


def _forest(view: FeatureView, marked: set[tuple[str, str]]) -> str:
    """The forest plot of one feature: each group's rates with intervals, the reference line."""
    fr = view.report
    groups = sorted(fr.groups.items(), key=lambda kv: -kv[1].counts.n)
    rows = [
        ForestRow(
            g,
            [
                (est.value, est.lower, est.upper) if (est := gr.rates.get(rate)) is not None else None
                for rate, _ in _FOREST
            ],
            gr.eligible,
            frozenset(i for i, (rate, _) in enumerate(_FOREST) if (g, rate) in marked),
        )
        for g, gr in groups
    ]
    ref = fr.groups.get(fr.reference) if fr.reference else None
    if ref is not None:
        references = [est.value if (est := ref.rates.get(rate)) else None for rate, _ in _FOREST]
        label = f"reference group {fr.reference}"
    else:  # no reference group: the pooled rate of the eligible groups
        references = [_pooled(view, rate) for rate, _ in _FOREST]
        label = "all eligible groups pooled"
    caption = f"dashed line: {html.escape(label)}"
    return (
        f"<figure class=forest-fig>{forest_plot(rows, [t for _, t in _FOREST], references, label)}"
        f"<figcaption class=ci>{caption}</figcaption></figure>"
    )


def _pooled(view: FeatureView, rate: str) -> float | None:
    """``rate`` over the eligible groups' summed counts (TP, FP, TN, FN)."""
    tp = fp = tn = fn = 0
    for gr in view.report.groups.values():
        if gr.eligible:
            c = gr.counts
            tp, fp, tn, fn = tp + c.tp, fp + c.fp, tn + c.tn, fn + c.fn
    num, den = rate_parts(rate, (tp, fp, tn, fn))
    return num / den if den else None


def _sparklines(views: Sequence[FeatureView], history: History, thresholds: Mapping[str, float]) -> list[str]:
    out = [
        "<h2>Disparities over time</h2>",
        f"<p class=muted>Last points of the cumulative {_SPARK_METHOD} disparities, one every "
        f"{history.interval:g} s: value (line), credible interval (band), threshold (dashed), red "
        "dots where the calibrated alarm was raised.</p><div class=sparks>",
    ]
    e = html.escape
    for v in views:
        for d, method in sorted(v.report.disparities):
            if method != _SPARK_METHOD or not d.endswith("_difference"):
                continue
            points = history.series(v.model, v.feature.name, d)
            if not points:
                continue
            last = points[-1]
            alarm = " <span class=flag>alarm</span>" if last[4] else ""
            out.append(
                f"<div class=spark-card><b>{e(v.model)} · {e(v.feature.name)}</b><br>"
                f"{e(d.removesuffix('_difference').replace('_', ' '))} {_fmt(last[1])}{alarm}<br>"
                f"{sparkline(points, threshold=thresholds.get(d))}</div>"
            )
    out.append("</div>")
    return out
