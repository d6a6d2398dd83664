"""Inline SVG pictures for the status page: a forest plot of per-group rates, a disparity sparkline.

Hand-written strings, no plotting library and no external asset: the page must stay one
self-contained HTML response that any browser (or ``curl``) can read. Every text is escaped.
Colours are fixed so that a screenshot test can find each mark.

>>> svg = sparkline([(0.0, 0.05, 0.0, 0.1, False), (1.0, 0.2, 0.15, 0.25, True)], threshold=0.1)
>>> svg.startswith("<svg") and svg.count("<circle") == 1
True
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass

#: Mark colours (the screenshot test looks for them).
INTERVAL = "#3b6fd4"  # a group's credible interval and point
FLAGGED = "#c0392b"  # a group at an end of a flagged disparity; a raised alarm
MUTED = "#a0a6b4"  # a group below min_samples
REFERENCE = "#e08a00"  # the reference line
BAND = "#cfdcf5"  # a disparity's interval over time
LABELLED = "#2e8b57"  # label coverage: predictions with an outcome
EXPIRED = "#7f5aa8"  # label coverage: predictions whose outcome never came
PENDING = "#e6d8a8"  # label coverage: predictions still waiting for an outcome

_ROW, _LABEL, _PANEL, _PAD = 18, 150, 190, 10


@dataclass(frozen=True)
class ForestRow:
    """One group: its estimates per panel (``(value, lower, upper)`` or None), how to draw it."""

    group: str
    estimates: Sequence[tuple[float, float, float] | None]
    eligible: bool
    marked: frozenset[int] = frozenset()  # panel indices drawn as a flagged extreme


def _x(value: float, left: float) -> float:
    return left + _PAD + max(0.0, min(1.0, value)) * (_PANEL - 2 * _PAD)


def forest_plot(
    rows: Sequence[ForestRow],
    panels: Sequence[str],
    references: Sequence[float | None],
    reference_label: str,
) -> str:
    """Groups down, one panel per rate across (x from 0 to 1); a dashed line at each reference.

    ``references[i]`` is panel *i*'s reference rate (the reference group's, or all groups'
    pooled), ``None`` to leave the line out.
    """
    e = html.escape
    width = _LABEL + len(panels) * _PANEL
    bottom = 26 + _ROW * len(rows)
    height = bottom + 16
    out = [
        f'<svg class="forest" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'role="img" aria-label="per-group rates with credible intervals; dashed: {e(reference_label)}">'
    ]
    for p, name in enumerate(panels):
        left = _LABEL + p * _PANEL
        out.append(
            f'<text x="{left + _PANEL / 2:.0f}" y="13" text-anchor="middle" class="ax">{e(name)}</text>'
        )
        out.append(
            f'<rect x="{left + _PAD}" y="20" width="{_PANEL - 2 * _PAD}" height="{bottom - 20}" '
            'fill="#f7f8fb" stroke="#dddde8"/>'
        )
        for tick in (0.0, 0.5, 1.0):
            x = _x(tick, left)
            out.append(
                f'<text x="{x:.1f}" y="{height - 3}" text-anchor="middle" class="tick">{tick:g}</text>'
            )
        ref = references[p] if p < len(references) else None
        if ref is not None and math.isfinite(ref):
            x = _x(ref, left)
            out.append(
                f'<line class="ref" x1="{x:.1f}" x2="{x:.1f}" y1="20" y2="{bottom}" '
                f'stroke="{REFERENCE}" stroke-width="1.5" stroke-dasharray="4 3" '
                'shape-rendering="crispEdges"/>'
            )
    for r, row in enumerate(rows):
        y = 32 + r * _ROW
        colour = INTERVAL if row.eligible else MUTED
        out.append(f'<text x="{_LABEL - 6}" y="{y + 4}" text-anchor="end" class="lab">{e(row.group)}</text>')
        for p, est in enumerate(row.estimates):
            if est is None or not all(math.isfinite(v) for v in est):
                continue
            left = _LABEL + p * _PANEL
            c = FLAGGED if p in row.marked else colour
            value, lower, upper = est
            out.append(
                f'<line class="ci" x1="{_x(lower, left):.1f}" x2="{_x(upper, left):.1f}" y1="{y}" '
                f'y2="{y}" stroke="{c}" stroke-width="3"/>'
                f'<circle class="pt" cx="{_x(value, left):.1f}" cy="{y}" r="4" fill="{c}"/>'
            )
    out.append("</svg>")
    return "".join(out)


#: One sparkline point: (time, value, lower, upper, alarm raised).
Point = tuple[float, float, float, float, bool]


def sparkline(
    points: Sequence[Point], *, threshold: float | None = None, width: int = 180, height: int = 40
) -> str:
    """The disparity over time: its interval as a band, the value as a line, alarms as red dots.

    The y axis runs from 0 to the largest of the values, bounds and threshold; a dashed line
    marks the threshold.
    """
    pts = [p for p in points if all(math.isfinite(v) for v in p[:4])]
    top = max([threshold or 0.0, *(p[3] for p in pts), *(p[1] for p in pts), 1e-9])
    t0 = pts[0][0] if pts else 0.0
    span = (pts[-1][0] - t0) if len(pts) > 1 else 1.0

    def xy(t: float, v: float) -> tuple[float, float]:
        x = 2 + (t - t0) / span * (width - 4) if len(pts) > 1 else width / 2
        return x, height - 2 - max(0.0, v) / top * (height - 4)

    out = [f'<svg class="spark" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">']
    out.append(f'<rect width="{width}" height="{height}" fill="#f7f8fb"/>')
    if pts:
        upper = [xy(p[0], p[3]) for p in pts]
        lower = [xy(p[0], p[2]) for p in reversed(pts)]
        band = " ".join(f"{x:.1f},{y:.1f}" for x, y in upper + lower)
        out.append(f'<polygon class="band" points="{band}" fill="{BAND}"/>')
    if threshold is not None:
        _, y = xy(t0, threshold)
        out.append(
            f'<line class="thr" x1="0" x2="{width}" y1="{y:.1f}" y2="{y:.1f}" stroke="{REFERENCE}" '
            'stroke-dasharray="4 3" shape-rendering="crispEdges"/>'
        )
    if pts:
        line = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(p[0], p[1]) for p in pts))
        out.append(
            f'<polyline class="val" points="{line}" fill="none" stroke="{INTERVAL}" stroke-width="2"/>'
        )
        for p in pts:
            if p[4]:
                x, y = xy(p[0], p[1])
                out.append(f'<circle class="alarm" cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{FLAGGED}"/>')
    out.append("</svg>")
    return "".join(out)


@dataclass(frozen=True)
class CoverageRow:
    """One group's predictions split by what is known of their outcomes."""

    group: str
    labelled: int
    expired: int
    pending: int
    eligible: bool = True


def coverage_bars(rows: Sequence[CoverageRow], width: int = 560) -> str:
    """One stacked bar per group, 0 to 100% of its predictions: labelled, expired, pending.

    >>> svg = coverage_bars([CoverageRow("A", 8, 1, 1), CoverageRow("B", 0, 0, 0)])
    >>> svg.count('class="cov-labelled"'), svg.count('class="cov-pending"')
    (1, 1)
    """
    e = html.escape
    bar = width - _LABEL - 90
    height = 26 + _ROW * len(rows) + 14
    out = [
        f'<svg class="coverage" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
        'aria-label="label coverage per group: labelled, expired, pending shares of predictions">'
    ]
    x = _LABEL
    for label, colour in (("labelled", LABELLED), ("expired", EXPIRED), ("pending", PENDING)):
        out.append(f'<rect x="{x}" y="4" width="10" height="10" fill="{colour}"/>')
        out.append(f'<text x="{x + 14}" y="13" class="tick">{label}</text>')
        x += 80
    for r, row in enumerate(rows):
        y = 22 + r * _ROW
        total = row.labelled + row.expired + row.pending
        out.append(f'<text x="{_LABEL - 6}" y="{y + 11}" text-anchor="end" class="lab">{e(row.group)}</text>')
        out.append(
            f'<rect x="{_LABEL}" y="{y + 2}" width="{bar}" height="12" fill="#f7f8fb" stroke="#dddde8"/>'
        )
        left = float(_LABEL)
        for name, n, colour in (
            ("labelled", row.labelled, LABELLED),
            ("expired", row.expired, EXPIRED),
            ("pending", row.pending, PENDING),
        ):
            if total <= 0 or n <= 0:
                continue
            w = bar * n / total
            out.append(
                f'<rect class="cov-{name}" x="{left:.1f}" y="{y + 2}" width="{w:.1f}" height="12" '
                f'fill="{colour}"/>'
            )
            left += w
        share = "no predictions" if total <= 0 else f"{row.labelled / total:.0%} labelled"
        out.append(f'<text x="{_LABEL + bar + 4}" y="{y + 11}" class="tick">{share}</text>')
    out.append("</svg>")
    return "".join(out)
