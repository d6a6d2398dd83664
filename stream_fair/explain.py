"""Why a disparity: a shift decomposition between two periods, and the cells that drive a gap.

Pure numpy on confusion counts per cell (no Kafka, no Prometheus). Two questions:

**Decomposition** (:func:`decompose`, :func:`decompose_gap`). A group's rate over its labelled
pairs is a function of per-cell parameters, for the *sub-cells* ``c`` of the group (its pairs
split by the values of every other attribute): the traffic share :math:`s_c` (*traffic mix*), the
base rate :math:`\\pi_c` (*base rate*) and the error rates :math:`TPR_c, FPR_c` (*error rates*).
The confusion probabilities :math:`tp_c = s_c\\pi_c TPR_c`, :math:`fp_c = s_c(1-\\pi_c)FPR_c`, ...
give every rate of :data:`stream_fair.fairness.RATES` as (sum of numerator cells) / (sum of
denominator cells). The change of the rate between periods A and B is split into the three factors
by the **symmetric (Shapley) decomposition of Das Gupta (1993)**, the multi-factor generalisation
of Kitagawa's (1955) two-factor rate decomposition: a factor's component is its switch from A to B
averaged over the 3! orders in which the factors can be switched. The components add up exactly to
the change. Intervals are equal-tailed posterior intervals from draws of each period's counts
(a Dirichlet(counts + 1/2) over each cell's confusion slots, Gamma-sampled), i.e. the same Jeffreys
prior as the per-group rates. A gap (group minus the rest of its feature) decomposes as the
difference of the two decompositions.

The per-cell table (:class:`CellShift`) answers "which sub-cells grew": each sub-cell's share and
rate in both periods with Kitagawa's two-factor split on the rate's own denominator,
:math:`\\Delta r = \\sum_c \\Delta w_c\\,\\bar\\rho_c + \\sum_c \\bar w_c\\,\\Delta\\rho_c` (``mix`` +
``within``; for TPR, FPR and PPV the weight :math:`w_c` moves with the base rate too).

**Drivers** (:func:`drivers`). A group's gap to the rest of its feature,
:math:`r_g - r_{rest} = \\sum_{c \\in g} w_c (\\rho_c - r_{rest})` with :math:`w_c = m_c/m_g`,
is a sum of per-cell contributions :math:`(k_c - m_c r_{rest}) / m_g` (the cell's excess successes
over what the rest's rate predicts, per trial of the group). Summed by each value of the other
attributes and by the groups of the configured intersections, they rank what drives the gap.

>>> before = {"young": (40, 10, 40, 10), "old": (40, 10, 40, 10)}
>>> after = {"young": (40, 10, 40, 10), "old": (20, 10, 40, 30)}      # TPR of "old" fell
>>> d = decompose(before, after, "true_positive_rate", draws=200)
>>> round(d.before, 3), round(d.after, 3), round(d.change.value, 3)
(0.8, 0.6, -0.2)
>>> {k: round(v.value, 3) for k, v in d.components.items()}
{'traffic_mix': 0.0, 'base_rate': 0.0, 'error_rates': -0.2}
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from stream_fair.counts import CONFUSION, Key, Quad, confusion
from stream_fair.disparity import DISPARITY_RATES
from stream_fair.fairness import RATE_CELLS, Estimate, is_reserved, rate_parts
from stream_fair.groups import Cell, FeatureKey

__all__ = [
    "FACTORS",
    "CellShift",
    "Decomposition",
    "Driver",
    "Drivers",
    "decompose",
    "decompose_gap",
    "drivers",
    "explain",
    "format_explanation",
    "format_findings",
    "p_value",
    "top_drivers",
]

FACTORS: tuple[str, ...] = ("traffic_mix", "base_rate", "error_rates")
"""The decomposition's components, in order."""

UNKNOWN_RATE_ERROR = "unknown rate {rate!r}; choose one of {choices}"
UNKNOWN_DISPARITY_ERROR = "unknown disparity {name!r}; choose one of {choices}"

Array = NDArray[np.float64]
# Shapley weights for 3 factors by the size of the set switched before the factor: 1/3, 1/6, 1/3
_SHAPLEY = {0: 1.0 / 3.0, 1: 1.0 / 6.0, 2: 1.0 / 3.0}


@dataclass(frozen=True)
class CellShift:
    """One sub-cell of a group in both periods (``None``: no pairs in that period)."""

    cell: str
    trials_before: int
    trials_after: int
    share_before: float
    share_after: float
    rate_before: float | None
    rate_after: float | None
    mix: float  # Kitagawa: change of the rate-denominator share x mean rate
    within: float  # Kitagawa: mean share x change of the cell's rate


@dataclass(frozen=True)
class Decomposition:
    """A rate's (or gap's) change from ``before`` to ``after`` and its components (they add up)."""

    rate: str
    before: float
    after: float
    change: Estimate
    components: dict[str, Estimate]
    cells: list[CellShift] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "rate": self.rate,
            "before": _num(self.before),
            "after": _num(self.after),
            "change": _est(self.change),
            "components": {k: _est(v) for k, v in self.components.items()},
            "cells": [
                {k: _num(v) if isinstance(v, float) else v for k, v in c.__dict__.items()} for c in self.cells
            ],
        }


def _num(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 6)


def _est(e: Estimate) -> dict[str, float | None]:
    return {"value": _num(e.value), "lower": _num(e.lower), "upper": _num(e.upper)}


def _columns(rate: str) -> tuple[list[int], list[int]]:
    if rate not in RATE_CELLS:
        raise ValueError(UNKNOWN_RATE_ERROR.format(rate=rate, choices=tuple(RATE_CELLS)))
    num, den = RATE_CELLS[rate]
    return list(num), list(den)


def _div(a: Array, b: Array) -> Array:
    out = np.full(np.broadcast(a, b).shape, np.nan)
    np.divide(a, b, out=out, where=b > 0)
    return out


def _params(p: Array) -> tuple[Array, Array, Array, Array]:
    """``(s, pi, tpr, fpr)`` per cell from confusion probabilities ``p[..., cell, tp fp tn fn]``."""
    return (
        p.sum(axis=-1),
        _div(*rate_parts("base_rate", p)),
        _div(*rate_parts("true_positive_rate", p)),
        _div(*rate_parts("false_positive_rate", p)),
    )


def _fill(a: Array, b: Array) -> Array:
    """``a`` with its undefined entries taken from ``b`` (the other period), else 0 (weightless)."""
    return np.nan_to_num(np.where(np.isnan(a), b, a), nan=0.0)


def _rate(s: Array, pi: Array, tpr: Array, fpr: Array, num: list[int], den: list[int]) -> Array:
    cells = {
        "tp": s * pi * tpr,
        "fp": s * (1 - pi) * fpr,
        "tn": s * (1 - pi) * (1 - fpr),
        "fn": s * pi * (1 - tpr),
    }
    q = np.stack([cells[c] for c in CONFUSION], axis=-1)
    return _div(q[..., num].sum(axis=(-1, -2)), q[..., den].sum(axis=(-1, -2)))


def _shapley(pa: Array, pb: Array, rate: str) -> Array:
    """``[change, traffic_mix, base_rate, error_rates]`` along the last axis, from probabilities."""
    num, den = _columns(rate)
    sa, pia, ta, fa = _params(pa)
    sb, pib, tb, fb = _params(pb)
    a = (sa, _fill(pia, pib), _fill(ta, tb), _fill(fa, fb))
    b = (sb, _fill(pib, pia), _fill(tb, ta), _fill(fb, fa))
    value = {}
    for mask in range(8):  # bit 0: mix, bit 1: base rate, bit 2: error rates switched to B
        s = b[0] if mask & 1 else a[0]
        pi = b[1] if mask & 2 else a[1]
        t, f = (b[2], b[3]) if mask & 4 else (a[2], a[3])
        value[mask] = _rate(s, pi, t, f, num, den)
    parts = [value[7] - value[0]]
    for i in range(3):
        bit = 1 << i
        phi = np.zeros_like(value[0])
        for mask in range(8):
            if not mask & bit:
                phi = phi + _SHAPLEY[bin(mask).count("1")] * (value[mask | bit] - value[mask])
        parts.append(phi)
    return np.stack(parts, axis=-1)


def _matrix(counts: Mapping[str, Quad], cells: Sequence[str]) -> Array:
    return np.array([counts.get(c, (0, 0, 0, 0)) for c in cells], dtype=np.float64).reshape(-1, 4)


def _draw(m: Array, draws: int, rng: np.random.Generator) -> Array:
    """Posterior draws of the confusion probabilities: Dirichlet(counts + 1/2) over a period's
    non-empty cells (an empty cell keeps probability 0: it had no traffic)."""
    shape = m + 0.5 * (m.sum(axis=1, keepdims=True) > 0)
    g = rng.gamma(np.broadcast_to(shape, (draws, *shape.shape)))
    total = g.sum(axis=(1, 2), keepdims=True)
    return np.asarray(g / np.where(total > 0, total, 1.0))


def _sampled(
    before: Mapping[str, Quad], after: Mapping[str, Quad], rate: str, draws: int, rng: np.random.Generator
) -> tuple[list[str], Array, Array]:
    cells = sorted(set(before) | set(after))
    a, b = _matrix(before, cells), _matrix(after, cells)
    point = _shapley(a / max(a.sum(), 1.0), b / max(b.sum(), 1.0), rate)
    return cells, point, _shapley(_draw(a, draws, rng), _draw(b, draws, rng), rate)


def _estimates(point: Array, sample: Array, level: float) -> tuple[Estimate, dict[str, Estimate]]:
    tail = (1.0 - level) / 2.0
    ok = np.all(np.isfinite(sample), axis=1)
    lo = np.quantile(sample[ok], tail, axis=0) if ok.any() else np.full(4, np.nan)
    hi = np.quantile(sample[ok], 1.0 - tail, axis=0) if ok.any() else np.full(4, np.nan)
    ests = [
        Estimate(float(point[i]), float(min(lo[i], point[i])), float(max(hi[i], point[i]))) for i in range(4)
    ]
    return ests[0], dict(zip(FACTORS, ests[1:], strict=True))


def _cell_shifts(before: Mapping[str, Quad], after: Mapping[str, Quad], rate: str) -> list[CellShift]:
    num, den = _columns(rate)
    cells = sorted(set(before) | set(after))
    a, b = _matrix(before, cells), _matrix(after, cells)
    ka, ma, kb, mb = a[:, num].sum(1), a[:, den].sum(1), b[:, num].sum(1), b[:, den].sum(1)
    wa, wb = ma / max(ma.sum(), 1.0), mb / max(mb.sum(), 1.0)
    ra, rb = _div(ka, ma), _div(kb, mb)
    ra_f, rb_f = _fill(ra, rb), _fill(rb, ra)
    mix = (wb - wa) * (ra_f + rb_f) / 2.0
    within = (wa + wb) / 2.0 * (rb_f - ra_f)
    na, nb = a.sum(1), b.sum(1)
    out = [
        CellShift(
            c,
            int(na[i]),
            int(nb[i]),
            float(na[i] / max(na.sum(), 1.0)),
            float(nb[i] / max(nb.sum(), 1.0)),
            None if math.isnan(ra[i]) else float(ra[i]),
            None if math.isnan(rb[i]) else float(rb[i]),
            float(mix[i]),
            float(within[i]),
        )
        for i, c in enumerate(cells)
    ]
    return sorted(out, key=lambda c: -abs(c.mix + c.within))


def decompose(
    before: Mapping[str, Quad],
    after: Mapping[str, Quad],
    rate: str,
    *,
    level: float = 0.95,
    draws: int = 400,
    seed: int = 0,
) -> Decomposition:
    """Decompose the change of ``rate`` over one group's sub-cells (``label -> (tp, fp, tn, fn)``).

    Components (module docstring) add up to ``change``; ``[lower, upper]`` are equal-tailed
    posterior intervals at ``level`` from ``draws`` draws (fixed ``seed``: same counts, same answer).
    """
    _, point, sample = _sampled(before, after, rate, draws, np.random.default_rng(seed))
    change, comps = _estimates(point, sample, level)
    return Decomposition(
        rate, _total(before, rate), _total(after, rate), change, comps, _cell_shifts(before, after, rate)
    )


def decompose_gap(
    group: tuple[Mapping[str, Quad], Mapping[str, Quad]],
    rest: tuple[Mapping[str, Quad], Mapping[str, Quad]],
    rate: str,
    *,
    level: float = 0.95,
    draws: int = 400,
    seed: int = 0,
) -> Decomposition:
    """Decompose the change of the gap ``rate(group) - rate(rest)``: the group's components minus
    the rest's (each ``(before, after)`` sub-cell counts); intervals from joint draws."""
    rng = np.random.default_rng(seed)
    _, pg, sg = _sampled(*group, rate, draws, rng)
    _, pr, sr = _sampled(*rest, rate, draws, rng)
    change, comps = _estimates(pg - pr, sg - sr, level)
    g_before, g_after = _total(group[0], rate), _total(group[1], rate)
    r_before, r_after = _total(rest[0], rate), _total(rest[1], rate)
    return Decomposition(rate, g_before - r_before, g_after - r_after, change, comps)


def _total(counts: Mapping[str, Quad], rate: str) -> float:
    num, den = _columns(rate)
    m = _matrix(counts, sorted(counts))
    return float(_div(m[:, num].sum(), m[:, den].sum()))


# -- drivers ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Driver:
    """A set of the group's pairs (one value of another attribute, or one cell) and its share of the gap."""

    by: str  # attribute or intersection name, or "cell"
    value: str
    trials: int
    successes: int
    rate: float | None
    share: float  # of the group's trials
    contribution: float  # (successes - trials * rest_rate) / group trials; they sum to the gap


@dataclass(frozen=True)
class Drivers:
    rate: str
    group: str
    group_rate: float | None
    rest_rate: float | None
    gap: float | None
    group_trials: int
    rest_trials: int
    ranked: list[Driver]
    cells: list[Driver]

    def to_json(self) -> dict[str, Any]:
        def row(d: Driver) -> dict[str, Any]:
            return {
                **d.__dict__,
                "rate": _num(d.rate),
                "share": _num(d.share),
                "contribution": _num(d.contribution),
            }

        return {
            "rate": self.rate,
            "group": self.group,
            "group_rate": _num(self.group_rate),
            "rest_rate": _num(self.rest_rate),
            "gap": _num(self.gap),
            "group_trials": self.group_trials,
            "rest_trials": self.rest_trials,
            "ranked": [row(d) for d in self.ranked],
            "cells": [row(d) for d in self.cells],
        }


def sub_cell_label(cell: Cell, key: FeatureKey, attributes: Sequence[tuple[str, int]]) -> str:
    """``name=value`` of every attribute outside ``key``, joined by ``, `` (``(all)`` if none)."""
    parts = [f"{name}={cell[i]}" for name, i in attributes if i not in key.indices]
    return ", ".join(parts) or "(all)"


def drivers(
    cells: Mapping[Cell, Quad],
    key: FeatureKey,
    group: str,
    rate: str,
    attributes: Sequence[tuple[str, int]],
    intersections: Sequence[FeatureKey] = (),
    top: int = 10,
) -> Drivers:
    """Rank what drives ``group``'s gap to the rest of ``key`` (module docstring), for one model.

    ``attributes`` are ``(name, position in the cell)`` of every attribute carried in the cell
    (configured features and ``audit_only`` ones); ``intersections`` the configured ones. Ranked
    by contribution in the gap's direction, with counts; reserved values are left out of the rest.

    >>> cells = {("F", "young"): (30, 0, 50, 20), ("F", "old"): (45, 0, 50, 5),
    ...          ("M", "young"): (45, 0, 50, 5), ("M", "old"): (45, 0, 50, 5)}
    >>> keys = [FeatureKey("sex", (0,)), FeatureKey("age", (1,))]
    >>> d = drivers(cells, keys[0], "F", "true_positive_rate", [("sex", 0), ("age", 1)])
    >>> round(d.gap, 3), d.ranked[0].by, d.ranked[0].value, round(d.ranked[0].contribution, 3)
    (-0.15, 'age', 'young', -0.15)
    """
    num, den = _columns(rate)
    k_rest = m_rest = 0
    sub: dict[Cell, tuple[int, int]] = {}
    for cell, q in cells.items():
        g = key.group(cell)
        k, m = sum(q[i] for i in num), sum(q[i] for i in den)
        if g == group:
            pk, pm = sub.get(cell, (0, 0))
            sub[cell] = (pk + k, pm + m)
        elif not is_reserved(g):
            k_rest, m_rest = k_rest + k, m_rest + m
    k_g = sum(k for k, _ in sub.values())
    m_g = sum(m for _, m in sub.values())
    r_rest = k_rest / m_rest if m_rest else None
    r_g = k_g / m_g if m_g else None
    gap = None if r_g is None or r_rest is None else r_g - r_rest
    sign = -1.0 if gap is not None and gap < 0 else 1.0

    def make(by: str, value: str, k: int, m: int) -> Driver:
        contribution = (k - m * (r_rest or 0.0)) / m_g if m_g else 0.0
        return Driver(by, value, m, k, k / m if m else None, m / m_g if m_g else 0.0, contribution)

    groups: dict[tuple[str, str], list[int]] = {}
    for cell, (k, m) in sub.items():
        for name, i in attributes:
            if i not in key.indices:
                acc = groups.setdefault((name, cell[i]), [0, 0])
                acc[0] += k
                acc[1] += m
        for ik in intersections:
            if ik.name != key.name and not set(key.indices) >= set(ik.indices):
                acc = groups.setdefault((ik.name, ik.group(cell)), [0, 0])
                acc[0] += k
                acc[1] += m
    ranked = sorted(
        (make(by, value, k, m) for (by, value), (k, m) in groups.items() if m),
        key=lambda d: (-sign * d.contribution, d.by, d.value),
    )
    by_cell: dict[str, list[int]] = {}
    for cell, (k, m) in sub.items():
        acc = by_cell.setdefault(sub_cell_label(cell, key, attributes), [0, 0])
        acc[0] += k
        acc[1] += m
    finest = sorted(
        (make("cell", label, k, m) for label, (k, m) in by_cell.items() if m),
        key=lambda d: (-sign * d.contribution, d.value),
    )
    return Drivers(rate, group, r_g, r_rest, gap, m_g, m_rest, ranked[:top], finest[:top])


def top_drivers(
    cells: Mapping[Cell, Quad],
    key: FeatureKey,
    disparity: str,
    attributes: Sequence[tuple[str, int]],
    intersections: Sequence[FeatureKey] = (),
    min_samples: int = 100,
    top: int = 3,
) -> Drivers | None:
    """The drivers of a disparity's widest group-to-rest gap (the group and rate farthest from
    the rest among the disparity's rates), or None when no group has ``min_samples`` pairs."""
    if disparity not in DISPARITY_RATES:
        raise ValueError(UNKNOWN_DISPARITY_ERROR.format(name=disparity, choices=tuple(DISPARITY_RATES)))
    best: Drivers | None = None
    for rate in DISPARITY_RATES[disparity]:
        group = _worst_group(cells, key, rate, min_samples)
        if group is None:
            continue
        d = drivers(cells, key, group, rate, attributes, intersections, top)
        if best is None or abs(d.gap or 0.0) > abs(best.gap or 0.0):
            best = d
    return best


# -- on demand, from the state's event-time buckets -------------------------------------------
def _accumulate(out: dict[Any, Quad], key: Any, q: Quad) -> None:
    p = out.get(key)
    out[key] = q if p is None else (p[0] + q[0], p[1] + q[1], p[2] + q[2], p[3] + q[3])


def _merge(buckets: Mapping[int, Mapping[Key, Sequence[int]]], keep: Any, model: str) -> dict[Cell, Quad]:
    """One model's confusion counts per cell, summed over the buckets ``keep`` accepts."""
    out: dict[Cell, Quad] = {}
    for b, rows in buckets.items():
        if keep(b):
            for (m, cell), row in rows.items():
                if m == model:
                    _accumulate(out, cell, confusion(list(row)))
    return out


def _split(
    cells: Mapping[Cell, Quad], key: FeatureKey, group: str, attributes: Sequence[tuple[str, int]]
) -> tuple[dict[str, Quad], dict[str, Quad]]:
    """The group's and the rest's (non-reserved groups) sub-cells, labelled by the other attributes."""
    mine: dict[str, Quad] = {}
    rest: dict[str, Quad] = {}
    for cell, q in cells.items():
        g = key.group(cell)
        if g == group:
            _accumulate(mine, sub_cell_label(cell, key, attributes), q)
        elif not is_reserved(g):
            _accumulate(rest, f"{key.name}={g}, {sub_cell_label(cell, key, attributes)}", q)
    return mine, rest


def _worst_group(cells: Mapping[Cell, Quad], key: FeatureKey, rate: str, min_samples: int) -> str | None:
    """The non-reserved group with the largest gap to the rest (``min_samples`` pairs or more)."""
    num, den = _columns(rate)
    tot: dict[str, list[int]] = {}
    for cell, q in cells.items():
        g = key.group(cell)
        if not is_reserved(g):
            acc = tot.setdefault(g, [0, 0, 0])
            acc[0] += sum(q[i] for i in num)
            acc[1] += sum(q[i] for i in den)
            acc[2] += sum(q)
    k_all, m_all = sum(v[0] for v in tot.values()), sum(v[1] for v in tot.values())
    best, best_gap = None, -1.0
    for g, (k, m, n) in sorted(tot.items()):
        if n < min_samples or not m or m_all - m <= 0:
            continue
        gap = abs(k / m - (k_all - k) / (m_all - m))
        if gap > best_gap:
            best, best_gap = g, gap
    return best


def explain(
    buckets: Mapping[int, Mapping[Key, Sequence[int]]],
    *,
    model: str,
    key: FeatureKey,
    disparity: str,
    attributes: Sequence[tuple[str, int]],
    intersections: Sequence[FeatureKey] = (),
    resolution: float,
    split_ts: float | None = None,
    split_source: str = "request",
    group: str | None = None,
    rate: str | None = None,
    min_samples: int = 100,
    level: float = 0.95,
    draws: int = 400,
    named: frozenset[str] = frozenset({"group", "rate"}),
) -> dict[str, Any]:
    """The ``/explain`` document for one (model, feature, disparity) from event-time buckets.

    ``named`` says which of ``group`` and ``rate`` a person asked for: those are checked (a group
    without labelled pairs, or a rate of another disparity, is a ValueError: HTTP 400); the
    others came from an alarm and are explained as they are.

    ``buckets`` are period index -> count rows (:class:`stream_fair.aggregate.ModelCounts`'s
    buckets, ``resolution`` seconds each). The periods are *before* and *after* ``split_ts``
    (the alarm's change point when one is raised), else the two halves of the buckets held.
    ``group`` defaults to the group farthest from the rest in the after period, ``rate`` to the
    disparity's rate with the larger gap. Drivers are those of the after period.
    """
    if disparity not in DISPARITY_RATES:
        raise ValueError(UNKNOWN_DISPARITY_ERROR.format(name=disparity, choices=tuple(DISPARITY_RATES)))
    held = sorted(buckets)
    doc: dict[str, Any] = {"model": model, "feature": key.name, "disparity": disparity}
    if not held:
        return {**doc, "error": "no event-time buckets held yet: no labelled pairs in the windows"}
    midpoint = (held[0] + held[-1] + 1) // 2
    split = midpoint if split_ts is None else math.floor(split_ts / resolution)
    if split_ts is None:
        split_source = "midpoint"
    elif not held[0] < split <= held[-1] and held[0] < midpoint:
        # the split leaves a period empty (a change point older than the buckets held, i.e. the
        # longest window, or inside the first bucket of window_resolution): compare the halves
        split, split_source = (
            midpoint,
            f"midpoint ({split_source} split at {split_ts:.0f} left a period empty)",
        )
    before = _merge(buckets, lambda b: b < split, model)
    after = _merge(buckets, lambda b: b >= split, model)
    if "rate" in named and rate is not None and rate not in DISPARITY_RATES[disparity]:
        raise ValueError(
            f"rate {rate!r} is not a rate of {disparity}: "
            f"choose one of {', '.join(DISPARITY_RATES[disparity])}"
        )
    if "group" in named and group is not None:
        known = sorted({key.group(cell) for cell in (*before, *after)})
        if group not in known:
            raise ValueError(f"group {group!r} of {key.name} has no labelled pairs: choose one of {known}")
    rates = [rate] if rate is not None else list(DISPARITY_RATES[disparity])
    if group is None:
        worst = [(r, _worst_group(after, key, r, min_samples)) for r in rates]
        choice = [(r, g) for r, g in worst if g is not None]
        if not choice:
            return {
                **doc,
                "error": f"no group of {key.name} has {min_samples} labelled pairs after the split",
            }
        gaps = [abs(drivers(after, key, g, r, attributes).gap or 0.0) for r, g in choice]
        rate, group = choice[int(np.argmax(gaps))]
    elif rate is None:
        gaps = [abs(drivers(after, key, group, r, attributes).gap or 0.0) for r in rates]
        rate = rates[int(np.argmax(gaps))]
    assert rate is not None and group is not None
    opts: dict[str, Any] = {"level": level, "draws": draws}
    g_before, r_before = _split(before, key, group, attributes)
    g_after, r_after = _split(after, key, group, attributes)
    lo, hi = held[0] * resolution, (held[-1] + 1) * resolution
    cut = min(max(split * resolution, lo), hi)
    return {
        **doc,
        "group": group,
        "rate": rate,
        "reference": "rest",
        "level": level,
        "periods": {
            "split_source": split_source,
            "before": {"start": lo, "end": cut, "pairs": sum(sum(q) for q in before.values())},
            "after": {"start": cut, "end": hi, "pairs": sum(sum(q) for q in after.values())},
        },
        "decomposition": {
            "method": "shapley (Das Gupta 1993; Kitagawa 1955 for two factors)",
            "group": decompose(g_before, g_after, rate, **opts).to_json(),
            "rest": _without_cells(decompose(r_before, r_after, rate, seed=1, **opts)),
            "gap": _without_cells(decompose_gap((g_before, g_after), (r_before, r_after), rate, **opts)),
        },
        "drivers": drivers(after, key, group, rate, attributes, intersections).to_json(),
    }


def _without_cells(d: Decomposition) -> dict[str, Any]:
    doc = d.to_json()
    del doc["cells"]
    return doc


# -- text, for the CLI ---------------------------------------------------------------------------
def _f(x: float | None, sign: bool = True) -> str:
    return "n/a" if x is None else (f"{x:+.3f}" if sign else f"{x:.3f}")


def format_explanation(doc: Mapping[str, Any]) -> str:
    """An ``/explain`` document as a few lines of plain text."""
    head = f"{doc['model']} · {doc['feature']} · {doc['disparity']}"
    if "error" in doc:
        return f"{head}: {doc['error']}"
    p = doc["periods"]
    lines = [
        f"{head}: group {doc['group']}, {doc['rate']} against the rest",
        f"periods ({p['split_source']} split): before {p['before']['start']:.0f}-{p['before']['end']:.0f} "
        f"({p['before']['pairs']} pairs), after {p['after']['start']:.0f}-{p['after']['end']:.0f} "
        f"({p['after']['pairs']} pairs)",
    ]
    for part in ("gap", "group", "rest"):
        d = doc["decomposition"][part]
        lines.append(
            f"{part:>5}: {_f(d['before'], part == 'gap')} -> {_f(d['after'], part == 'gap')}, change "
            f"{_f(d['change']['value'])} [{_f(d['change']['lower'])}, {_f(d['change']['upper'])}]"
        )
        for name, c in d["components"].items():
            lines.append(f"         {name:<12} {_f(c['value'])} [{_f(c['lower'])}, {_f(c['upper'])}]")
    dr = doc["drivers"]
    lines.append(
        f"drivers of the gap after the split ({_f(dr['gap'])} = {_f(dr['group_rate'], False)} - "
        f"{_f(dr['rest_rate'], False)}; contributions add up to it):"
    )
    for d in dr["ranked"]:
        lines.append(
            f"  {d['by']}={d['value']}: {_f(d['contribution'])}  rate {_f(d['rate'], False)} "
            f"({d['successes']}/{d['trials']}), {d['share']:.0%} of the group"
        )
    return "\n".join(lines)


def p_value(p: float) -> str:
    """A p-value for people: two digits, or how small when it underflows to 0.

    >>> p_value(0.0123), p_value(0.0)
    ('0.012', '<1e-300')
    """
    return f"{p:.2g}" if p > 0 else "<1e-300"


def format_findings(doc: Mapping[str, Any]) -> str:
    """A ``/search`` document as plain text."""
    lines = []
    for model, r in sorted(doc.get("models", {}).items()):
        lines.append(
            f"{model}: {r['tested']} hypotheses in {r['combinations']} combinations "
            f"(window {r['window']}{', truncated' if r['truncated'] else ''}), Holm at alpha {r['alpha']}: "
            f"{len(r['findings'])} found"
        )
        for f in r["findings"]:
            lines.append(
                f"  {f['intersection']}={f['group']} {f['rate']} {f['value']:.3f} "
                f"({f['successes']}/{f['trials']}) vs rest {f['rest_value']:.3f}, adjusted p "
                f"{p_value(f['adjusted_p_value'])}: {f['suggestion']}"
            )
    return "\n".join(lines) or "no model searched yet"
