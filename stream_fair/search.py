"""Intersections nobody configured: a bounded search for worst-off cells, with Holm's correction.

Pure (no Kafka, no Prometheus). The count rows already hold every pair's full *cell* (all
configured features and the ``audit_only`` attributes), so any intersection of them is a
projection summed at read time: the search needs no state of its own.

**What is tested.** For one model, every combination of 2 (up to ``max_order``) of the carried
attributes that is not a configured intersection, and every ``audit_only`` attribute alone (it is
monitored by nobody); in each, every non-reserved group with at least ``min_samples`` labelled
pairs; for each rate of ``rates``: the group against the rest of the model's pairs (reserved
values left out), two-sided; a combination with two groups is one hypothesis (its smaller group
against the other). Hypotheses are enumerated lowest order first and capped at
``max_tests`` (the cap is reported as ``truncated``); memory is the projection of the count rows,
whose number the cardinality limits bound.

**The guarantee.** Each test's p-value is Fisher's exact test (conditional on the margins, so
super-uniform under "the group has the rest's rate"). Holm's step-down procedure is applied over
*all* ``m`` hypotheses tested in the search, so the family-wise error rate, P(at least one
reported finding where the group's rate equals the rest's), is at most ``alpha`` **under any
dependence between the tests** (overlapping cells, several rates on the same pairs); the false
discovery rate is bounded by the FWER, so it is at most ``alpha`` too. The guarantee is per
search (one look at one window's counts); a search repeated on every snapshot looks again at
overlapping data, so over many looks the chance of some spurious finding grows: read a finding
as evidence to check, and see ``docs/detection.md`` for the fresh-seed figures.

Fisher's test costs milliseconds, so it is computed only where it can matter: the pooled
two-proportion z-test screens every hypothesis and Fisher's p-value is computed for those that
Holm on the z-test's p-values rejects at level ``SCREEN * alpha``; the others get p = 1. Whatever
the screen, each p-value used is at least Fisher's, so it stays super-uniform and Holm stays valid:
the screen can cost power, never validity.

>>> cells = {("F", "young"): (30, 10, 90, 70), ("F", "old"): (70, 10, 90, 30),
...          ("M", "young"): (70, 10, 90, 30), ("M", "old"): (70, 10, 90, 30)}
>>> r = search(cells, [("sex", 0), ("age", 1)], configured=[], rates=("true_positive_rate",))
>>> r.tested, [(f.intersection, f.group, f.direction) for f in r.findings]
(4, [('sex&age', 'F&young', 'below')])
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import special, stats

from stream_fair.counts import Quad
from stream_fair.fairness import RATE_CELLS, is_reserved
from stream_fair.groups import SEPARATOR, Cell

__all__ = ["DEFAULT_RATES", "Finding", "SearchResult", "search"]

SCREEN = 10.0
"""Fisher's p-value is computed where Holm on the z-test's p-values rejects at ``SCREEN * alpha``."""

DEFAULT_RATES: tuple[str, ...] = ("selection_rate", "true_positive_rate", "false_positive_rate")


@dataclass(frozen=True)
class Finding:
    """A cell whose rate differs from the rest's, significant after Holm over the whole search."""

    intersection: str  # attribute names joined by "&", in carried order
    group: str
    rate: str
    direction: str  # "below" or "above" the rest
    value: float
    rest_value: float
    gap: float  # value - rest_value
    successes: int
    trials: int
    rest_successes: int
    rest_trials: int
    p_value: float  # Fisher's exact, two-sided
    adjusted_p_value: float  # Holm
    suggestion: str

    def to_json(self) -> dict[str, Any]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class SearchResult:
    tested: int  # hypotheses in the family Holm corrects over
    combinations: int  # attribute combinations searched
    truncated: bool  # max_tests was reached
    alpha: float
    findings: list[Finding] = field(default_factory=list)  # strongest evidence first

    def to_json(self) -> dict[str, Any]:
        return {
            "tested": self.tested,
            "combinations": self.combinations,
            "truncated": self.truncated,
            "alpha": self.alpha,
            "correction": "holm",
            "guarantee": "family-wise error rate (hence false discovery rate) <= alpha per search, "
            "under any dependence between tests",
            "findings": [f.to_json() for f in self.findings],
        }


def combinations(
    attributes: Sequence[str],
    configured: Collection[Collection[str]],
    audit_only: Collection[str],
    max_order: int,
) -> list[tuple[int, ...]]:
    """Positions (in ``attributes`` order) of every combination searched, lowest order first.

    >>> combinations(["race", "sex", "age"], [["race", "sex"]], ["age"], 2)
    [(2,), (0, 2), (1, 2)]
    """
    done = {frozenset(c) for c in configured}
    out: list[tuple[int, ...]] = [(i,) for i, a in enumerate(attributes) if a in audit_only]
    for order in range(2, max_order + 1):
        for combo in itertools.combinations(range(len(attributes)), order):
            if frozenset(attributes[i] for i in combo) not in done:
                out.append(combo)
    return out


def _z(k: np.ndarray, m: np.ndarray, k2: np.ndarray, m2: np.ndarray) -> np.ndarray:
    """|z| of the pooled two-proportion z-test (the screen; its two-sided p is erfc(|z|/sqrt 2))."""
    p = (k + k2) / (m + m2)
    se = np.sqrt(p * (1 - p) * (1 / m + 1 / m2))
    return np.divide(np.abs(k / m - k2 / m2), se, out=np.zeros_like(se), where=se > 0)


def _holm(p: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Holm's adjusted p-values and rejections."""
    m = p.size
    order = np.argsort(p, kind="stable")
    adj = np.minimum(1.0, np.maximum.accumulate(p[order] * (m - np.arange(m))))
    out = np.empty(m)
    out[order] = adj
    return out, out <= alpha


def search(
    cells: Mapping[Cell, Quad],
    attributes: Sequence[tuple[str, int]],
    configured: Collection[Collection[str]],
    *,
    audit_only: Collection[str] = (),
    max_order: int = 2,
    rates: Sequence[str] = DEFAULT_RATES,
    min_samples: int = 100,
    alpha: float = 0.05,
    max_tests: int = 5000,
    top: int = 10,
) -> SearchResult:
    """Search one model's cells (``cell -> (tp, fp, tn, fn)``); see the module docstring.

    ``attributes`` are ``(name, position in the cell)`` of every carried attribute.
    """
    names = [a for a, _ in attributes]
    combos = combinations(names, configured, audit_only, max_order)
    quads = np.array(list(cells.values()), dtype=np.float64).reshape(-1, 4)
    # each attribute's values as integer codes, so a projection is one bincount (not a Python loop)
    values: list[list[str]] = []
    codes: list[np.ndarray] = []
    for _, pos in attributes:
        index: dict[str, int] = {}
        codes.append(np.array([index.setdefault(c[pos], len(index)) for c in cells], dtype=np.int64))
        values.append(list(index))
    cols = [(list(RATE_CELLS[r][0]), list(RATE_CELLS[r][1])) for r in rates]
    hyp: list[tuple[str, str, str, float, float, float, float]] = []
    searched = 0
    truncated = False
    for combo in combos:
        if truncated:
            break
        searched += 1
        label = SEPARATOR.join(names[i] for i in combo)
        dims = tuple(len(values[i]) for i in combo)
        flat = np.ravel_multi_index(tuple(codes[i] for i in combo), dims) if quads.size else np.zeros(0, int)
        size = math.prod(dims)
        sums = np.stack([np.bincount(flat, weights=quads[:, j], minlength=size) for j in range(4)], axis=1)
        groups: dict[str, np.ndarray] = {}
        for f in np.flatnonzero(sums.sum(axis=1) > 0):
            parts = np.unravel_index(int(f), dims)
            groups[SEPARATOR.join(values[i][int(v)] for i, v in zip(combo, parts, strict=True))] = sums[f]
        usable = {g: q for g, q in groups.items() if not is_reserved(g)}
        total = sum(usable.values(), np.zeros(4))
        tested = sorted(usable.items())
        if len(tested) == 2:  # one group against the other either way round: one hypothesis, the smaller
            tested = [min(tested, key=lambda gq: gq[1].sum())]
        for g, q in tested:
            if q.sum() < min_samples:
                continue
            rest = total - q
            for rate, (num, den) in zip(rates, cols, strict=True):
                m, m2 = q[den].sum(), rest[den].sum()
                if m == 0 or m2 == 0:
                    continue
                if len(hyp) >= max_tests:
                    truncated = True
                    break
                hyp.append((label, g, rate, q[num].sum(), m, rest[num].sum(), m2))
            if truncated:
                break
    if not hyp:
        return SearchResult(0, searched, truncated, alpha)
    arr = np.array([h[3:] for h in hyp], dtype=np.float64)
    k, m, k2, m2 = arr.T
    z = _z(k, m, k2, m2)
    p = np.ones(len(hyp))
    _, screened = _holm(special.erfc(z / math.sqrt(2.0)), min(1.0, SCREEN * alpha))
    for i in np.flatnonzero(screened):
        table = [[k[i], m[i] - k[i]], [k2[i], m2[i] - k2[i]]]
        p[i] = float(stats.fisher_exact(np.array(table, dtype=np.int64)).pvalue)
    adjusted, reject = _holm(p, alpha)
    found = []
    # strongest evidence first: the largest |z| (Fisher's p underflows to 0 for all big gaps alike)
    for i in sorted(np.flatnonzero(reject), key=lambda i: -z[i]):
        label, g, rate = hyp[i][:3]
        value, rest_value = k[i] / m[i], k2[i] / m2[i]
        found.append(
            Finding(
                label,
                g,
                rate,
                "below" if value < rest_value else "above",
                float(value),
                float(rest_value),
                float(value - rest_value),
                int(k[i]),
                int(m[i]),
                int(k2[i]),
                int(m2[i]),
                float(p[i]),
                float(adjusted[i]),
                f"add [{', '.join(repr(n) for n in label.split(SEPARATOR))}] to fairness.intersections"
                if SEPARATOR in label
                else f"move {label!r} from fairness.audit_only to fairness.features",
            )
        )
    return SearchResult(len(hyp), searched, truncated, alpha, found[:top])
