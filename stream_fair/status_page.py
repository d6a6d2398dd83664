"""A human-readable status page, server-rendered HTML with no external assets.

For people without Grafana: the live per-group table of every model and feature (cumulative),
the flagged disparities, the pipeline accounting, and links to ``/metrics``.
"""

from __future__ import annotations

import html
import math
import time

from stream_fair.exporter import PipelineStats
from stream_fair.report import CUMULATIVE, Report

_RATES = (
    ("selection_rate", "selection"),
    ("true_positive_rate", "TPR"),
    ("false_positive_rate", "FPR"),
    ("accuracy", "accuracy"),
)

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5rem;color:#1d2330}
h1{font-size:1.4rem;margin:0 0 .3rem} h2{font-size:1.1rem;margin:1.6rem 0 .4rem}
.muted{color:#667} table{border-collapse:collapse;margin:.3rem 0 1rem;font-size:.9rem}
th,td{padding:.25rem .6rem;border-bottom:1px solid #dde;text-align:right}
th:first-child,td:first-child{text-align:left} th{background:#f3f4f8}
.flag{background:#fde2e1;color:#8a1c17;font-weight:600;padding:.1rem .4rem;border-radius:.3rem}
.ok{background:#e2f5e6;color:#17692b;padding:.1rem .4rem;border-radius:.3rem}
.small{color:#a66b00} .ci{color:#778;font-size:.8rem}
"""


def _fmt(x: float) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def render(report: Report, stats: PipelineStats) -> str:
    """The whole page as one HTML string."""
    snap = report.snapshot
    e = html.escape
    out = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        "<meta http-equiv=refresh content=5><title>stream-fair status</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>stream-fair</h1>",
        f"<p class=muted>updated {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(snap.taken_at))} UTC · "
        "<a href=/metrics>/metrics</a> · <a href=/healthz>/healthz</a> · <a href=/readyz>/readyz</a></p>",
    ]
    flagged = [
        (v, d, m)
        for v in report.views
        if v.window == CUMULATIVE
        for (d, m), f in v.report.flagged.items()
        if f
    ]
    out.append("<h2>Flagged disparities</h2>")
    if flagged:
        out.append("<table><tr><th>model</th><th>feature</th><th>disparity</th><th>method</th>"
                   "<th>value</th><th>interval</th><th>threshold</th></tr>")
        for v, d, m in flagged:
            est = v.report.disparities[d, m]
            out.append(
                f"<tr><td>{e(v.model)}</td><td>{e(v.feature.name)}</td><td><span class=flag>{e(d)}</span></td>"
                f"<td>{e(m)}</td><td>{_fmt(est.value)}</td><td class=ci>[{_fmt(est.lower)}, {_fmt(est.upper)}]</td>"
                f"<td>{_fmt(report.settings.thresholds.get(d, float('nan')))}</td></tr>"
            )
        out.append("</table>")
    else:
        out.append("<p><span class=ok>none</span> — no disparity is credibly beyond its threshold.</p>")

    for v in report.views:
        if v.window != CUMULATIVE:
            continue
        fr = v.report
        ref = f" · reference <b>{e(fr.reference)}</b>" if fr.reference else ""
        out.append(f"<h2>{e(v.model)} · {e(v.feature.name)}{ref}</h2>")
        out.append("<table><tr><th>group</th><th>n</th>"
                   + "".join(f"<th>{label}</th>" for _, label in _RATES) + "<th></th></tr>")
        for g, gr in sorted(fr.groups.items(), key=lambda kv: -kv[1].counts.n):
            cells = []
            for rate, _ in _RATES:
                est = gr.rates.get(rate)
                cells.append(
                    "<td>–</td>" if est is None else
                    f"<td>{_fmt(est.value)} <span class=ci>[{_fmt(est.lower)}, {_fmt(est.upper)}]</span></td>"
                )
            note = "" if gr.eligible else "<span class=small>below min samples / excluded</span>"
            out.append(f"<tr><td>{e(g)}</td><td>{gr.counts.n}</td>{''.join(cells)}<td>{note}</td></tr>")
        out.append("</table>")

    out.append("<h2>Pipeline</h2><table><tr><th>topic</th><th>consumed</th><th>pending</th>"
               + "".join(f"<th>{f}</th>" for f in next(iter(snap.fates.values()), {})) + "</tr>")
    for t, fates in snap.fates.items():
        out.append(f"<tr><td>{t}</td><td>{snap.consumed[t]}</td><td>{snap.pending[t]}</td>"
                   + "".join(f"<td>{n}</td>" for n in fates.values()) + "</tr>")
    out.append("</table>")
    lag = sum(stats.lag.values())
    out.append(f"<p class=muted>consumer lag {lag} · dead letters {sum(stats.dead_letters.values())}</p>")
    out.append("</body></html>")
    return "".join(out)
