"""The stakeholder report as self-contained HTML (inline SVG charts) and as Markdown.

Both render a document made by :func:`stream_fair.stakeholder_report.assemble` and nothing else,
deterministically, so the same document always gives the same bytes. The HTML carries the document
itself in an inert ``<script type="application/json">`` block (no script runs): :func:`verify_html`
checks its content hash *and* that re-rendering it gives the file, so a number edited in the HTML
is caught as surely as one edited in the JSON. Charts reuse :mod:`stream_fair.svg` (the status
page's forest plot and sparkline) and add the label-coverage bars.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from stream_fair.config import format_duration
from stream_fair.stakeholder_report import DEFINITIONS, SHOWN_RATES, iso, verify
from stream_fair.svg import CoverageRow, ForestRow, coverage_bars, forest_plot, sparkline

_FOREST = (
    ("selection_rate", "selection rate"),
    ("true_positive_rate", "TPR"),
    ("false_positive_rate", "FPR"),
)
_LABELS = {
    "selection_rate": "selection rate",
    "true_positive_rate": "TPR",
    "false_positive_rate": "FPR",
    "accuracy": "accuracy",
}
_DATA_ID = "stream-fair-report"
_DATA = re.compile(r'<script type="application/json" id="stream-fair-report">(.*?)</script>', re.S)

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5rem auto;color:#1d2330;
max-width:72rem;padding:0 1rem}
h1{font-size:1.5rem;margin:0 0 .3rem}
h2{font-size:1.2rem;margin:1.8rem 0 .4rem;border-bottom:2px solid #e3e6ef}
h3{font-size:1rem;margin:1.2rem 0 .3rem}
.muted{color:#667} table{border-collapse:collapse;margin:.3rem 0 1rem;font-size:.82rem}
th,td{padding:.22rem .55rem;border-bottom:1px solid #dde;text-align:right;vertical-align:top;
white-space:nowrap}
th.l,td.l{text-align:left} th{background:#f3f4f8}
.flag{background:#fde2e1;color:#8a1c17;font-weight:600;padding:.1rem .4rem;border-radius:.3rem}
.ok{background:#e2f5e6;color:#17692b;font-weight:600;padding:.1rem .4rem;border-radius:.3rem}
.small{background:#fff4d6;color:#7a5600;padding:.05rem .35rem;border-radius:.3rem;font-size:.8rem}
.est{background:#ece3f7;color:#4b2a7a;padding:.05rem .35rem;border-radius:.3rem;font-size:.8rem}
td.ext{background:#fde2e1;color:#8a1c17;font-weight:600}
.ci{color:#778;font-size:.78rem} .na{background:#f3f4f8;border-left:4px solid #a0a6b4;padding:.4rem .7rem}
.charts{display:flex;flex-wrap:wrap;gap:.8rem 1.6rem;align-items:flex-start}
.spark-card{font-size:.8rem} figure{margin:.2rem 0} code{font-size:.85em;word-break:break-all}
dl dt{font-weight:600;margin-top:.4rem} dl dd{margin-left:1rem}
svg text{font-family:system-ui,sans-serif} svg .ax{font-size:12px;fill:#1d2330}
svg .lab{font-size:11px;fill:#1d2330} svg .tick{font-size:9px;fill:#778}
"""


def _f(x: float | None, digits: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _interval(est: Mapping[str, Any]) -> str:
    return f"<span class=ci>[{_f(est['lower'])}, {_f(est['upper'])}]</span>"


def _md_estimate(est: Mapping[str, Any] | None, extreme: bool) -> str:
    if est is None:
        return "–"
    text = f"{_f(est['value'])} [{_f(est['lower'])}, {_f(est['upper'])}]"
    return text + (" **(end of flagged gap)**" if extreme else "")


def _why(ev: Mapping[str, Any]) -> str:
    """The explanation the detector attached to an alarm event when it was raised (if any)."""
    why = ev.get("explanation")
    return str(why.get("summary", "")) if isinstance(why, Mapping) else ""


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x:.0%}"


def _period_text(doc: Mapping[str, Any]) -> str:
    p = doc["period"]
    if p["from"] is None and p["to"] is None:
        return "all data since the detector's state began"
    return f"{p['prediction_time_from'] or 'start'} to {p['prediction_time_to'] or 'now'} (prediction time)"


def _ci(e: Mapping[str, Any] | None) -> str:
    if not e or e.get("value") is None:
        return "–"
    return f"{e['value']:+.3f} [{_f(e.get('lower'))}, {_f(e.get('upper'))}]"


def _signal_tables(name: str, data: Any) -> list[tuple[str, list[str], list[list[Any]]]] | None:
    """(caption, header, rows) tables for a known signal's document; None to show it as JSON."""
    out: list[tuple[str, list[str], list[list[Any]]]] = []
    try:
        if name == "root_cause":
            for doc in data["explained"]:
                title = f"{doc['model']} · {doc['feature']} · {doc['disparity']}"
                if "error" in doc:
                    out.append((f"{title}: not explained ({doc['error']})", ["item"], []))
                    continue
                gap, p = doc["decomposition"]["gap"], doc["periods"]
                caption = (
                    f"{title}: {doc['group']}'s {doc['rate']} against the rest of the feature, before "
                    f"and after {iso(p['after']['start'])} ({p['split_source']} split); gap "
                    f"{_f(gap['before'])} → {_f(gap['after'])}, change {_ci(gap['change'])}. "
                    f"Decomposition: {doc['decomposition']['method']}."
                )
                rows = [[k.replace("_", " "), _ci(c)] for k, c in gap["components"].items()]
                out.append((caption, ["part of the change in the gap", "value [interval]"], rows))
                drivers = doc["drivers"]["ranked"][:8]
                out.append(
                    (
                        f"Drivers of the gap now ({doc['group']}: {_f(doc['drivers']['group_rate'])}, rest: "
                        f"{_f(doc['drivers']['rest_rate'])}); contributions sum to the gap",
                        ["by", "value", "pairs", "rate", "share", "contribution"],
                        [
                            [
                                d["by"],
                                d["value"],
                                d["trials"],
                                _f(d["rate"]),
                                _f(d["share"]),
                                f"{d['contribution']:+.3f}",
                            ]
                            for d in drivers
                        ],
                    )
                )
            if data.get("left_out"):
                out.append((f"{data['left_out']} more flagged disparities not explained here", ["item"], []))
            return out
        if name == "unconfigured_intersections":
            for model, r in data["models"].items():
                caption = (
                    f"{model}: {r['tested']} hypotheses over {r['combinations']} attribute combinations "
                    f"({data['over']}), {r['correction']}-corrected at {r['alpha']}: {r['guarantee']}"
                    + (" (truncated at max_tests)" if r["truncated"] else "")
                    + ("" if r["findings"] else ". Nothing found.")
                )
                rows = [
                    [f["intersection"], f["group"], f["rate"], f["direction"], _f(f["value"]),
                     _f(f["rest_value"]), f["trials"], f"{f['adjusted_p_value']:.2g}", f["suggestion"]]
                    for f in r["findings"]
                ]  # fmt: skip
                header = ["intersection", "group", "rate", "direction", "group value", "rest", "pairs",
                          "adjusted p", "suggestion"]  # fmt: skip
                out.append((caption, header, rows))
            return out
        if name == "threshold_whatif":
            for w in data["whatifs"]:
                title = f"{w['model']} · {w['feature']}: thresholds that would meet {w['criterion']}"
                if w.get("status") != 200 or "error" in w:
                    out.append((f"{title}: not computed ({w.get('error', w.get('status'))})", ["item"], []))
                    continue
                acc = w["accuracy_change"]
                caption = (
                    f"{title} ({data['over']}; mode {w['mode']}, tolerance {_f(w['tolerance'])}): "
                    f"{'meets it' if w['met'] else 'does not meet it'}"
                    + (", degenerate (select all or none)" if w["degenerate"] else "")
                    + f"; overall accuracy change {_ci(acc)}"
                    + ("; excluded: " + ", ".join(f"{g} ({r})" for g, r in w["excluded"].items())
                       if w["excluded"] else "")
                    + (f". {' '.join(w['notes'])}" if w["notes"] else "")
                )  # fmt: skip
                rows = []
                for g, r in w["groups"].items():
                    rule = " / ".join(_f(t, 2) for t in r["rule"]["thresholds"]) + (
                        " (mixed)" if len(r["rule"]["thresholds"]) > 1 or "coin" in r["rule"] else ""
                    )
                    now, new = r["current_rates"], r["rates"]
                    rows.append(
                        [g, r["n"], _f(r["current_threshold"], 2), rule]
                        + [f"{_f(now.get(k, {}).get('value'))} → {_f(new.get(k, {}).get('value'))}"
                           for k in ("selection_rate", "true_positive_rate", "false_positive_rate")]
                        + [_ci(r["accuracy_change"])]
                    )  # fmt: skip
                header = ["group", "labelled", "threshold now", "what-if threshold", "selection rate",
                          "TPR", "FPR", "accuracy change"]  # fmt: skip
                out.append((caption, header, rows))
            return out
        if name == "label_free_estimates":
            for fe in data["features"]:
                caption = (
                    (f"[{fe['source']}] " if fe.get("source") else "")
                    + f"{fe['model']} · {fe['feature']} ({data['view']}): ESTIMATED from the scores of "
                    "predictions whose outcome has not arrived, trusted only where the group's scores "
                    "are calibrated on its matured labels"
                    + (f"; estimated flagged: {', '.join(fe['flagged'])}" if fe["flagged"] else "")
                )
                rows = [
                    [g, x["pending"], "yes" if x["trusted"] else f"no ({x['reason']})",
                     _f(x["calibration_error"])]
                    + [f"{_md_estimate(x['rates'].get(k), False)} (estimated)" if x["rates"].get(k) else "–"
                       for k in ("selection_rate", "true_positive_rate", "false_positive_rate")]
                    for g, x in fe["groups"].items()
                ]  # fmt: skip
                out.append((caption, ["group", "pending", "trusted", "calibration error", "selection rate",
                                      "TPR", "FPR"], rows))  # fmt: skip
            return out
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    return None


def _signal_rows(data: Any) -> list[tuple[str, str]]:
    """A generic two-column view of another analysis' JSON (its own fields, flattened one level)."""
    if isinstance(data, Mapping):
        return [(str(k), json.dumps(v, sort_keys=True)[:400]) for k, v in data.items()]
    if isinstance(data, list):
        return [(str(i), json.dumps(v, sort_keys=True)[:400]) for i, v in enumerate(data[:50])]
    return [("value", json.dumps(data)[:400])]


# -- HTML -----------------------------------------------------------------------------------------
def to_html(doc: Mapping[str, Any]) -> str:
    """The whole report as one HTML page (no external asset, no executed script)."""
    e = html.escape
    s = doc["summary"]
    out = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f"<title>{e(doc['title'])}: {e(', '.join(doc['models']) or 'no data')}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{e(doc['title'])}</h1>",
        f"<p class=muted>Models: <b>{e(', '.join(doc['models']) or 'none seen')}</b> · period: "
        f"{e(_period_text(doc))} · data as of {e(doc['generated_at'])} · stream-fair "
        f"{e(doc['audit']['software']['version'])} · content hash "
        f"<code>{e(doc['audit']['content_hash']['value'][:16])}…</code></p>",
    ]
    # summary
    out.append("<h2 id=summary>Summary</h2>")
    cov = doc["audit"].get("coverage") or {}
    if s.get("coverage"):
        cls = "flag" if cov.get("model_wide") is False else "muted"
        out.append(f"<p class={cls}>{e(s['coverage'])}</p>")
    if s["flagged"]:
        out.append(f"<p><span class=flag>{len(s['flagged'])} disparities flagged</span></p>")
    else:
        out.append("<p><span class=ok>no disparity flagged</span> in this period.</p>")
    raised = s["alarms_raised_in_period"]
    out.append(
        "<p>"
        + (
            "The alarm history is not available from this source (see below)."
            if raised is None
            else f"The calibrated alarm was raised {raised} time(s) in the period."
        )
        + "</p>"
    )
    out.append(
        "<table><tr><th class=l>model</th><th>predictions</th><th>labelled</th><th>expired</th>"
        "<th>pending</th><th>label coverage</th></tr>"
    )
    for m, t in s["totals"].items():
        out.append(
            f"<tr><td class=l>{e(m)}</td><td>{t['predictions']}</td><td>{t['labelled']}</td>"
            f"<td>{t['expired']}</td><td>{t['pending']}</td><td>{_pct(t['label_coverage'])}</td></tr>"
        )
    out.append("</table>")
    if s["flagged"]:
        out.append(
            "<table><tr><th class=l>model</th><th class=l>feature</th><th class=l>disparity</th>"
            "<th class=l>method</th><th>value</th><th>interval</th><th>threshold</th></tr>"
        )
        for f in s["flagged"]:
            out.append(
                f"<tr><td class=l>{e(f['model'])}</td><td class=l>{e(f['feature'])}</td>"
                f"<td class=l><span class=flag>{e(f['disparity'])}</span></td>"
                f"<td class=l>{e(f['method'])}</td>"
                f"<td>{_f(f['value'])}</td><td class=ci>[{_f(f['lower'])}, {_f(f['upper'])}]</td>"
                f"<td>{_f(f['threshold'])}</td></tr>"
            )
        out.append("</table>")
    cl = doc["settings"]["credible_level"]
    out.append(
        f"<p class=muted>How to read: every rate comes with its {cl:.0%} credible interval "
        f"<span class=ci>[lower, upper]</span>. A disparity is <b>flagged</b> only when its whole "
        f"interval lies beyond its threshold. Groups with fewer than {doc['settings']['min_samples']} "
        "labelled pairs are shown, marked <span class=small>below min samples</span>, and take no "
        "part in disparities. Every term is defined at the end.</p>"
    )

    # over time
    out.append("<h2 id=over-time>Disparities over time</h2>")
    if doc["over_time"]:
        step = doc["over_time"][0]["step_seconds"]
        out.append(
            f"<p class=muted>Each point is the between-groups disparity on the predictions of one "
            f"{format_duration(step)} step alone (line), its credible interval (band) and the threshold "
            "(dashed). Red dots: steps during which the calibrated alarm was raised. A step without "
            "two groups at min samples has no point.</p><div class=charts>"
        )
        for series in doc["over_time"]:
            pts = [
                (
                    float(p["t"]),
                    math.nan if p["value"] is None else p["value"],
                    math.nan if p["lower"] is None else p["lower"],
                    math.nan if p["upper"] is None else p["upper"],
                    bool(p["alarm_raised"]),
                )
                for p in series["points"]
            ]
            alarm = any(p["alarm_raised"] for p in series["points"])
            first, last = series["points"][0]["from"], series["points"][-1]["to"]
            out.append(
                f"<div class=spark-card><b>{e(series['model'])} · {e(series['feature'])}</b> · "
                f"{e(series['disparity'])}{' <span class=flag>alarm</span>' if alarm else ''}<br>"
                f"{sparkline(pts, threshold=series['threshold'], width=330, height=70)}"
                f"<br><span class=ci>{e(first)} → {e(last)}</span></div>"
            )
        out.append("</div>")
    else:
        out.append("<p class=na>No per-period counts in this period: nothing to draw over time.</p>")

    # per feature
    out.append("<h2 id=groups>Groups: rates, intervals and label coverage</h2>")
    for f in doc["features"]:
        out.extend(_feature_html(f, doc))

    # alarm log
    out.append("<h2 id=alarms>Calibrated alarm: events in the period</h2>")
    al = doc["alarms"]
    if not al["available"]:
        out.append(
            "<p class=na>Not available from this source: the alarm log is kept by the running "
            "detector (its leader replica). Make the report from the running instance "
            "(<code>stream-fair report --url</code>) to include it.</p>"
        )
    elif not al["events_in_period"]:
        out.append("<p>No alarm raised or cleared in the period.</p>")
    else:
        out.append(
            "<table><tr><th class=l>time (UTC)</th><th class=l>event</th><th class=l>model</th>"
            "<th class=l>feature</th><th class=l>disparity</th><th class=l>group</th><th class=l>rate</th>"
            "<th>group</th><th>rest</th><th class=l>change point</th><th class=l>why (at the raise)</th></tr>"
        )
        for ev in al["events_in_period"]:
            cls = "flag" if ev["kind"] == "alarm_raised" else "ok"
            out.append(
                f"<tr><td class=l>{e(iso(ev['ts']) or '')}</td>"
                f"<td class=l><span class={cls}>{e(ev['kind'])}</span></td>"
                f"<td class=l>{e(ev['model'])}</td><td class=l>{e(ev['feature'])}</td>"
                f"<td class=l>{e(ev['disparity'])}</td><td class=l>{e(str(ev['group']))}</td>"
                f"<td class=l>{e(str(ev['rate']))}</td><td>{_f(ev.get('group_value'))}</td>"
                f"<td>{_f(ev.get('rest_value'))}</td>"
                f"<td class=l>{e(iso(ev.get('change_point_ts')) or '–')}</td>"
                f"<td class=l style='white-space:normal;min-width:20rem'>{e(_why(ev))}</td></tr>"
            )
        out.append("</table>")

    # other analyses
    for name, sig in doc["signals"].items():
        out.append(f"<h2 id={e(name)}>{e(sig['title'])}</h2>")
        if not sig["available"]:
            out.append(f"<p class=na>Not available: {e(sig['reason'])}.</p>")
            continue
        if name == "label_free_estimates":
            out.append(
                "<p><span class=est>estimated</span> Values below are estimates made without outcomes.</p>"
            )
        tables = _signal_tables(name, sig["data"])
        if tables is None:
            out.append("<table>")
            for k, v in _signal_rows(sig["data"]):
                out.append(f"<tr><td class=l>{e(k)}</td><td class=l><code>{e(v)}</code></td></tr>")
            out.append("</table>")
            continue
        if name == "threshold_whatif":
            out.append(
                "<div class=charts>"
                + "".join(_whatif_chart(w) for w in sig["data"].get("whatifs", []) if w.get("status") == 200)
                + "</div>"
            )
        for caption, header, rows in tables:
            out.append(f"<p>{e(caption)}</p>")
            if rows:
                out.append("<table><tr>" + "".join(f"<th class=l>{e(h)}</th>" for h in header) + "</tr>")
                for row in rows:
                    out.append("<tr>" + "".join(f"<td class=l>{e(str(c))}</td>" for c in row) + "</tr>")
                out.append("</table>")

    out.extend(_unknown_html(doc))
    out.append("<h2 id=definitions>Definitions</h2><dl>")
    for term, text in DEFINITIONS.items():
        out.append(f"<dt>{e(term)}</dt><dd>{e(text)}</dd>")
    out.append("</dl>")
    out.extend(_audit_html(doc))
    data = json.dumps(doc, ensure_ascii=False).replace("</", "<\\/")
    out.append(f'<script type="application/json" id="{_DATA_ID}">{data}</script>')
    out.append("</body></html>")
    return "".join(out) + "\n"


def _whatif_chart(w: Mapping[str, Any]) -> str:
    """Each group's rates now (grey) and under the what-if thresholds (blue), with intervals."""
    try:
        rows = []
        for g, r in w["groups"].items():
            for label, rates, now in (("now", r["current_rates"], True), ("what-if", r["rates"], False)):
                rows.append(
                    ForestRow(
                        f"{g} · {label}",
                        [
                            (x["value"], x["lower"], x["upper"])
                            if (x := rates.get(rate)) and x.get("value") is not None
                            else None
                            for rate, _ in _FOREST
                        ],
                        eligible=not now,
                    )
                )
        label = f"{w['model']} · {w['feature']}: {w['criterion']} what-if"
        plot = forest_plot(rows, [t for _, t in _FOREST], [None] * len(_FOREST), label)
        return (
            f"<figure class=whatif>{plot}<figcaption class=ci>{html.escape(label)}: grey now, blue "
            "under the what-if thresholds</figcaption></figure>"
        )
    except (KeyError, TypeError):
        return ""


def _feature_html(f: Mapping[str, Any], doc: Mapping[str, Any]) -> list[str]:
    e = html.escape
    n_flagged = sum(d["flagged"] for d in f["disparities"])
    ref = f" · reference <b>{e(f['reference'])}</b>" if f["reference"] else ""
    badge = f" <span class=flag>{n_flagged} flagged</span>" if n_flagged else ""
    out = [f"<h3>{e(f['model'])} · {e(f['feature'])}{ref}{badge}</h3>"]
    groups = f["groups"]
    rows = [
        ForestRow(
            g["group"],
            [
                (r["value"], r["lower"], r["upper"])
                if (r := g["rates"].get(rate)) is not None and r["value"] is not None
                else None
                for rate, _ in _FOREST
            ],
            g["eligible"],
            frozenset(i for i, (rate, _) in enumerate(_FOREST) if rate in g["flagged_extreme"]),
        )
        for g in groups
    ]
    refg = next((g for g in groups if g["group"] == f["reference"]), None) if f["reference"] else None
    if refg is not None and refg["rates"]:
        refs = [(refg["rates"].get(rate) or {}).get("value") for rate, _ in _FOREST]
        label = f"reference group {f['reference']}"
    else:
        refs = [(f["pooled_eligible_rates"].get(rate) or {}).get("value") for rate, _ in _FOREST]
        label = "all eligible groups pooled"
    cov = [CoverageRow(g["group"], g["labelled"], g["expired"], g["pending"], g["eligible"]) for g in groups]
    out.append(
        "<div class=charts>"
        f"<figure>{forest_plot(rows, [t for _, t in _FOREST], refs, label)}"
        f"<figcaption class=ci>rate (dot) and credible interval (bar); dashed: {e(label)}; grey: "
        "below min samples; red: the ends of a flagged disparity</figcaption></figure>"
        f"<figure>{coverage_bars(cov)}<figcaption class=ci>label coverage: what is known of each "
        "group's predictions</figcaption></figure></div>"
    )
    out.append(
        "<table><tr><th class=l>group</th><th>predictions</th><th>labelled (n)</th><th>pending</th>"
        "<th>expired</th><th>label coverage</th>"
        + "".join(f"<th>{_LABELS[r]}</th>" for r in SHOWN_RATES)
        + "<th></th></tr>"
    )
    for g in groups:
        cells = []
        for rate in SHOWN_RATES:
            r = g["rates"].get(rate)
            cls = " class=ext" if rate in g["flagged_extreme"] else ""
            cells.append("<td>–</td>" if r is None else f"<td{cls}>{_f(r['value'])} {_interval(r)}</td>")
        note = "<span class=small>below min samples</span>" if g["below_min_samples"] else ""
        out.append(
            f"<tr><td class=l>{e(g['group'])}</td><td>{g['predictions']}</td><td>{g['labelled']}</td>"
            f"<td>{g['pending']}</td><td>{g['expired']}</td><td>{_pct(g['label_coverage'])}</td>"
            f"{''.join(cells)}<td class=l>{note}</td></tr>"
        )
    out.append("</table>")
    methods = [
        m for m in ("between_groups", "to_reference") if any(d["method"] == m for d in f["disparities"])
    ]
    out.append(
        "<table><tr><th class=l>disparity</th>"
        + "".join(f"<th>{m.replace('_', ' ')}</th>" for m in methods)
        + "<th>threshold</th><th class=l>verdict</th></tr>"
    )
    by_name: dict[str, dict[str, Any]] = {}
    for d in f["disparities"]:
        by_name.setdefault(d["disparity"], {})[d["method"]] = d
    for name, ds in by_name.items():
        cells = []
        for m in methods:
            d = ds.get(m)
            if d is None or not d["computable"]:
                cells.append("<td>–</td>")
            else:
                cls = " class=ext" if d["flagged"] else ""
                cells.append(f"<td{cls}>{_f(d['value'])} {_interval(d)}</td>")
        flagged = [m.replace("_", " ") for m, d in ds.items() if d["flagged"]]
        if flagged:
            verdict = f"<span class=flag>flagged</span> ({', '.join(flagged)})"
        elif not any(d["computable"] for d in ds.values()):
            verdict = "not computable: fewer than two groups at min samples"
        else:
            verdict = "not flagged"
        threshold = next(iter(ds.values()))["threshold"]
        out.append(
            f"<tr><td class=l>{e(name)}</td>{''.join(cells)}<td>{_f(threshold)}</td>"
            f"<td class=l>{verdict}</td></tr>"
        )
    out.append("</table>")
    return out


def _unknown_html(doc: Mapping[str, Any]) -> list[str]:
    e = html.escape
    u = doc["unknown"]
    out = ["<h2 id=unknown>What is not known yet</h2><ul>"]
    for m, n in u["pending_labels"].items():
        out.append(
            f"<li><b>{n}</b> predictions of {e(m)} in the period still wait for their outcome: their "
            "error rates are unknown, and the rates above may move when they arrive.</li>"
        )
    if u["groups_below_min_samples"]:
        names = ", ".join(
            f"{g['feature']}={g['group']} ({g['labelled']})" for g in u["groups_below_min_samples"]
        )
        out.append(f"<li>Groups below min samples (shown, not judged): {e(names)}.</li>")
    if u["disparities_not_computable"]:
        out.append(
            f"<li>{len(u['disparities_not_computable'])} disparities cannot be computed yet (fewer "
            "than two groups at min samples, or no reference group data).</li>"
        )
    if u["estimated_values"]:
        out.append(
            "<li>Some values are <span class=est>estimated</span> without outcomes (marked where shown).</li>"
        )
    else:
        out.append(
            "<li>No estimated values: every number in this report is counted from observed outcomes.</li>"
        )
    if not u["alarm_log_available"]:
        out.append("<li>The alarm history is not available from this source.</li>")
    for note in u["notes"]:
        out.append(f"<li>{e(note)}</li>")
    out.append("</ul>")
    return out


def _missing_text(missing: Sequence[int] | None) -> str:
    if missing is None:
        return "unknown"
    return ", ".join(map(str, missing)) or "none"


def _audit_html(doc: Mapping[str, Any]) -> list[str]:
    e = html.escape
    a = doc["audit"]
    out = ["<h2 id=audit>Audit trail</h2><table>"]
    rows = [
        ("software", f"{a['software']['name']} {a['software']['version']}"),
        (
            "config fingerprint",
            f"{a['config_fingerprint']['algorithm']} {a['config_fingerprint']['value']} "
            f"(sections: {', '.join(a['config_fingerprint']['sections'])})",
        ),
        ("source", a["source"]),
        ("data taken at", a["data_taken_at"]),
        (
            "data period (prediction time)",
            f"{a['period']['from'] or 'start'} to {a['period']['to'] or 'now'}",
        ),
        ("bucket width", f"{a['window_resolution_seconds']:g} s"),
        ("content hash", f"{a['content_hash']['algorithm']} {a['content_hash']['value']}"),
        ("hashed", a["content_hash"]["covers"]),
    ]
    for k, v in rows:
        out.append(f"<tr><td class=l>{e(k)}</td><td class=l><code>{e(str(v))}</code></td></tr>")
    out.append("</table><h3>Input offsets covered</h3>")
    out.append(
        "<table><tr><th>partition</th><th>next offset: predictions</th><th>next offset: outcomes</th>"
        "<th>consumed: predictions</th><th>consumed: outcomes</th><th class=l>from</th></tr>"
    )
    for p in a["partitions"]:
        no, co = p.get("next_offsets") or [None, None], p.get("consumed") or [None, None]
        out.append(
            f"<tr><td>{p['partition']}</td><td>{no[0]}</td><td>{no[1]}</td><td>{co[0]}</td><td>{co[1]}</td>"
            f"<td class=l>{e(str(p.get('source', a['source'])))}</td></tr>"
        )
    cov = a.get("coverage")
    if cov is not None:
        missing = cov["missing"]
        out.append(
            f"</table><p>Partitions of the topics: {cov['partitions_total'] or 'unknown'}; missing: "
            f"{e(_missing_text(missing))}.</p>"
        )
        out.append("<h3>Sources</h3><table><tr><th class=l>source</th><th>data taken at</th><th>leader</th>"
                   "<th>partitions used</th><th>partitions dropped (duplicate)</th></tr>")  # fmt: skip
        for src in a.get("sources") or ():
            used = ", ".join(f"{p['partition']} @ {p.get('next_offsets')}" for p in src["partitions_used"])
            dropped = ", ".join(
                f"{p['partition']} @ {p.get('next_offsets')} (kept from {p['kept_from']})"
                for p in src["partitions_dropped"]
            )
            out.append(
                f"<tr><td class=l>{e(src['source'])}</td><td>{e(str(src['data_taken_at']))}</td>"
                f"<td>{e(str(src['leader']))}</td><td>{e(used or 'none')}</td>"
                f"<td>{e(dropped or 'none')}</td></tr>"
            )
    out.append(
        "</table><p class=muted>Verify: <code>stream-fair report --verify FILE</code> recomputes the "
        "hash of the JSON report, or of the document embedded in this HTML file, and re-renders "
        "it (docs/report.md).</p>"
    )
    return out


def embedded_document(text: str) -> dict[str, Any] | None:
    """The document an HTML report carries (None if there is none)."""
    m = _DATA.search(text)
    if m is None:
        return None
    return json.loads(m.group(1).replace("<\\/", "</"))  # type: ignore[no-any-return]


def verify_html(text: str) -> bool:
    """The embedded document's hash holds and re-rendering it gives exactly this file."""
    doc = embedded_document(text)
    return doc is not None and verify(doc) and to_html(doc) == text


# -- Markdown -------------------------------------------------------------------------------------
def _md(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_md(c) for c in r) + " |" for r in rows]
    return out + [""]


def to_markdown(doc: Mapping[str, Any]) -> str:
    """The report as Markdown (for a ticket): the same sections as the HTML, tables for charts."""
    s, a = doc["summary"], doc["audit"]
    out = [
        f"# {doc['title']}: {', '.join(doc['models']) or 'no data'}",
        "",
        f"Period: {_period_text(doc)}. Data as of {doc['generated_at']}. stream-fair "
        f"{a['software']['version']}. Content hash (sha256): `{a['content_hash']['value']}`.",
        "",
        "## Summary",
        "",
        *(
            [
                f"**{s['coverage']}**" if a.get("coverage", {}).get("model_wide") is False else s["coverage"],
                "",
            ]
            if s.get("coverage")
            else []
        ),
        f"**{len(s['flagged'])} disparities flagged.**" if s["flagged"] else "**No disparity flagged.**",
        "",
    ]
    raised = s["alarms_raised_in_period"]
    out += [
        "Alarm history: not available from this source."
        if raised is None
        else f"The calibrated alarm was raised {raised} time(s) in the period.",
        "",
    ]
    out += _table(
        ["model", "predictions", "labelled", "expired", "pending", "label coverage"],
        [
            [m, t["predictions"], t["labelled"], t["expired"], t["pending"], _pct(t["label_coverage"])]
            for m, t in s["totals"].items()
        ],
    )
    if s["flagged"]:
        out += _table(
            ["model", "feature", "disparity", "method", "value", "interval", "threshold"],
            [
                [
                    f["model"],
                    f["feature"],
                    f["disparity"],
                    f["method"],
                    _f(f["value"]),
                    f"[{_f(f['lower'])}, {_f(f['upper'])}]",
                    _f(f["threshold"]),
                ]
                for f in s["flagged"]
            ],
        )
    out += ["## Groups", ""]
    for f in doc["features"]:
        ref = f" (reference {f['reference']})" if f["reference"] else ""
        out += [f"### {f['model']} · {f['feature']}{ref}", ""]
        header = ["group", "predictions", "labelled (n)", "pending", "expired", "label coverage"]
        out += _table(
            [*header, *(_LABELS[r] for r in SHOWN_RATES), "note"],
            [
                [
                    *(g[k] for k in ("group", "predictions", "labelled", "pending", "expired")),
                    _pct(g["label_coverage"]),
                    *(_md_estimate(g["rates"].get(r), r in g["flagged_extreme"]) for r in SHOWN_RATES),
                    "below min samples" if g["below_min_samples"] else "",
                ]
                for g in f["groups"]
            ],
        )
        out += _table(
            ["disparity", "method", "value", "interval", "threshold", "verdict"],
            [
                [
                    d["disparity"],
                    d["method"],
                    _f(d["value"]),
                    f"[{_f(d['lower'])}, {_f(d['upper'])}]",
                    _f(d["threshold"]),
                    "**flagged**"
                    if d["flagged"]
                    else ("within threshold or uncertain" if d["computable"] else "not computable"),
                ]
                for d in f["disparities"]
            ],
        )
    out += ["## Disparities over time", ""]
    if doc["over_time"]:
        for series in doc["over_time"]:
            alarmed = [p["from"] for p in series["points"] if p["alarm_raised"]]
            flagged = [p["from"] for p in series["points"] if p["flagged"]]
            values = [p["value"] for p in series["points"] if p["value"] is not None]
            out.append(
                f"- {series['model']} · {series['feature']} · {series['disparity']}: "
                f"{len(series['points'])} steps of {format_duration(series['step_seconds'])}, "
                + (f"from {_f(values[0])} to {_f(values[-1])}" if values else "no computable step")
                + f"; flagged in {len(flagged)} steps; alarm raised during {len(alarmed)} steps"
                + (f" (first {alarmed[0]})" if alarmed else "")
            )
        out += ["", "(Charts: the HTML version.)", ""]
    else:
        out += ["No per-period counts in this period.", ""]
    out += ["## Calibrated alarm: events in the period", ""]
    al = doc["alarms"]
    if not al["available"]:
        out += [
            "Not available from this source (make the report from the running instance with `--url`).",
            "",
        ]
    elif not al["events_in_period"]:
        out += ["No alarm raised or cleared in the period.", ""]
    else:
        out += _table(
            ["time (UTC)", "event", "model", "feature", "disparity", "group", "rate", "why (at the raise)"],
            [
                [
                    iso(ev["ts"]),
                    ev["kind"],
                    ev["model"],
                    ev["feature"],
                    ev["disparity"],
                    ev["group"],
                    ev["rate"],
                    _why(ev),
                ]
                for ev in al["events_in_period"]
            ],
        )
    for name, sig in doc["signals"].items():
        out += [f"## {sig['title']}", ""]
        if not sig["available"]:
            out += [f"Not available: {sig['reason']}.", ""]
            continue
        if name == "label_free_estimates":
            out += ["*Estimated*: the values below are estimates made without outcomes.", ""]
        tables = _signal_tables(name, sig["data"])
        if tables is None:
            out += _table(["field", "value"], _signal_rows(sig["data"]))
        for caption, header, rows in tables or ():
            out += [caption, ""] + (_table(header, rows) if rows else [])
    u = doc["unknown"]
    out += ["## What is not known yet", ""]
    out += [
        f"- {n} predictions of {m} in the period still wait for their outcome."
        for m, n in u["pending_labels"].items()
    ]
    if u["groups_below_min_samples"]:
        out.append(
            "- Groups below min samples (shown, not judged): "
            + ", ".join(
                f"{g['feature']}={g['group']} ({g['labelled']})" for g in u["groups_below_min_samples"]
            )
        )
    if u["disparities_not_computable"]:
        out.append(f"- {len(u['disparities_not_computable'])} disparities cannot be computed yet.")
    out.append(
        "- Some values are estimated without outcomes (marked)."
        if u["estimated_values"]
        else "- No estimated values: every number is counted from observed outcomes."
    )
    if not u["alarm_log_available"]:
        out.append("- The alarm history is not available from this source.")
    out += [f"- {n}" for n in u["notes"]]
    out += ["", "## Definitions", ""]
    out += [f"- **{t}**: {d}" for t, d in DEFINITIONS.items()]
    out += ["", "## Audit trail", ""]
    out += _table(
        ["item", "value"],
        [
            ["software", f"{a['software']['name']} {a['software']['version']}"],
            ["config fingerprint", f"sha256 {a['config_fingerprint']['value']}"],
            ["source", a["source"]],
            ["data taken at", a["data_taken_at"]],
            [
                "data period (prediction time)",
                f"{a['period']['from'] or 'start'} to {a['period']['to'] or 'now'}",
            ],
            ["content hash", f"sha256 {a['content_hash']['value']}"],
            ["hashed", a["content_hash"]["covers"]],
        ],
    )
    out += _table(
        ["partition", "next offset: predictions", "next offset: outcomes", "from"],
        [[p["partition"], *(p.get("next_offsets") or [None, None]), p.get("source", a["source"])]
         for p in a["partitions"]],
    )  # fmt: skip
    if a.get("sources"):
        out += _table(
            ["source", "data taken at", "leader", "partitions used", "partitions dropped (duplicate)"],
            [
                [
                    src["source"], src["data_taken_at"], src["leader"],
                    ", ".join(f"{p['partition']} @ {p.get('next_offsets')}" for p in src["partitions_used"])
                    or "none",
                    ", ".join(f"{d['partition']} (from {d['kept_from']})" for d in src["partitions_dropped"])
                    or "none",
                ]
                for src in a["sources"]
            ],
        )  # fmt: skip
    out.append("Verify against the JSON export: `stream-fair report --verify report.json`.")
    return "\n".join(out) + "\n"


def to_json(doc: Mapping[str, Any]) -> str:
    return json.dumps(doc, indent=1, ensure_ascii=False) + "\n"
