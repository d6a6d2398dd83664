"""A human-readable status page, server-rendered HTML with no external assets.

For people without Grafana: a one-line verdict, the flagged disparities, the live per-group table
of every model and feature (cumulative window) with the groups that make a flagged disparity
marked, the pipeline accounting, and links to ``/metrics``. It refreshes itself every 5 s.
"""

from __future__ import annotations

import html
import math
import time

from stream_fair.exporter import PipelineStats
from stream_fair.report import CUMULATIVE, FeatureView, Report

_RATES = (
    ("selection_rate", "selection"),
    ("true_positive_rate", "TPR"),
    ("false_positive_rate", "FPR"),
    ("accuracy", "accuracy"),
)

#: The per-group rates a disparity compares (fairlearn's definitions), for marking its extremes.
_COMPARES = {
    "demographic_parity": ("selection_rate",),
    "equal_opportunity": ("true_positive_rate",),
    "equalized_odds": ("true_positive_rate", "false_positive_rate"),
    "accuracy": ("accuracy",),
}

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5rem;color:#1d2330;
max-width:70rem}
h1{font-size:1.4rem;margin:0 0 .3rem} h2{font-size:1.1rem;margin:1.6rem 0 .4rem}
.muted{color:#667} table{border-collapse:collapse;margin:.3rem 0 1rem;font-size:.9rem}
th,td{padding:.25rem .6rem;border-bottom:1px solid #dde;text-align:right}
th.l,td.l{text-align:left} th{background:#f3f4f8}
.flag{background:#fde2e1;color:#8a1c17;font-weight:600;padding:.1rem .4rem;border-radius:.3rem}
.ok{background:#e2f5e6;color:#17692b;font-weight:600;padding:.1rem .4rem;border-radius:.3rem}
td.ext{background:#fde2e1;color:#8a1c17;font-weight:600}
.verdict{font-size:1rem;margin:.8rem 0} .small{color:#a66b00} .ci{color:#778;font-size:.8rem}
"""


def _fmt(x: float | None) -> str:
    return "–" if x is None or math.isnan(x) else f"{x:.3f}"


def _extremes(view: FeatureView) -> set[tuple[str, str]]:
    """``(group, rate)`` cells at the minimum or maximum of a flagged between-groups disparity."""
    fr, marked = view.report, set()
    for (d, method), flagged in fr.flagged.items():
        base = d.rsplit("_", 1)[0]
        if not flagged or method != "between_groups" or base not in _COMPARES:
            continue
        for rate in _COMPARES[base]:
            values = {
                g: gr.rates[rate].value for g, gr in fr.groups.items() if gr.eligible and rate in gr.rates
            }
            if len(values) >= 2:
                marked |= {
                    (min(values, key=values.__getitem__), rate),
                    (max(values, key=values.__getitem__), rate),
                }
    return marked


def render(report: Report, stats: PipelineStats) -> str:
    """The whole page as one HTML string."""
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
    out.append(
        f"<p class=muted>Cumulative window. <span class=ci>[lower, upper]</span>: "
        f"{settings.credible_level:.0%} credible interval. A disparity is flagged when its whole "
        f"interval lies beyond the threshold; groups with fewer than {settings.min_samples} "
        "joined pairs are shown but take no part. Marked cells: the groups at both ends of a "
        "flagged disparity.</p>"
    )

    out.append("<h2>Flagged disparities</h2>")
    if flagged:
        out.append(
            "<table><tr><th class=l>model</th><th class=l>feature</th>"
            "<th class=l>disparity</th><th class=l>method</th><th>value</th>"
            "<th>interval</th><th>threshold</th></tr>"
        )
        for v, d, m in flagged:
            gap = v.report.disparities[d, m]
            out.append(
                f"<tr><td class=l>{e(v.model)}</td><td class=l>{e(v.feature.name)}</td>"
                f"<td class=l><span class=flag>{e(d)}</span></td><td class=l>{e(m)}</td>"
                f"<td>{_fmt(gap.value)}</td>"
                f"<td class=ci>[{_fmt(gap.lower)}, {_fmt(gap.upper)}]</td>"
                f"<td>{_fmt(settings.thresholds.get(d, math.nan))}</td></tr>"
            )
        out.append("</table>")
    else:
        out.append("<p>None: no disparity is credibly beyond its threshold.</p>")

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
    out.append("</body></html>")
    return "".join(out)
