"""Label delay: how long a group's outcomes take to arrive.

Slow labels hide a group's errors: its joined pairs lag behind, and its recent predictions are
under-represented in every window. Delays are kept per cell in a log-bucketed histogram (the
DDSketch idea, Masson, Rim & Lee, VLDB 2019): bucket :math:`i` holds delays in
:math:`[\\gamma^{i-1}, \\gamma^{i})` seconds, so every quantile is returned with relative error at
most :math:`(\\gamma - 1)/2`. It is hand-written because a group's quantile must be *merged* from
its cells at snapshot time and river's ``stats.Quantile`` (P²) cannot be merged; feeding one
river quantile per (feature, group, q) per event would cost 12 updates per event with three
features, an intersection and three quantiles.

>>> h = DelayHistogram()
>>> h.add([1.0, 10.0, 100.0, 1000.0])
>>> [round(q) for q in h.quantiles((0.25, 0.5, 1.0))]  # within 1%
[1, 10, 993]
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

GAMMA = 1.02
"""Bucket ratio: quantiles within 1% of the true delay."""

_LOG_GAMMA = math.log(GAMMA)
_BUCKETS = 1200  # gamma**1200 ~ 2e10 s: larger delays land in the last bucket


class DelayHistogram:
    """Mergeable log-bucketed histogram of delays in seconds (delays below 1 s share bucket 0)."""

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts = np.zeros(_BUCKETS, dtype=np.int64)

    def __repr__(self) -> str:
        q = self.quantiles((0.5,))
        return f"DelayHistogram(n={self.n}, median={q[0]:.3g})"

    @property
    def n(self) -> int:
        return int(self.counts.sum())

    def add(self, delays: Iterable[float]) -> None:
        d = np.maximum(np.asarray(list(delays), dtype=np.float64), 1.0)
        if d.size:
            idx = np.minimum(np.ceil(np.log(d) / _LOG_GAMMA - 1e-9), _BUCKETS - 1).astype(np.int64)
            self.counts += np.bincount(idx, minlength=_BUCKETS)

    def merge(self, other: DelayHistogram) -> None:
        self.counts += other.counts

    def quantiles(self, qs: Sequence[float]) -> list[float]:
        """Lower-nearest-rank quantiles, reported at the bucket's geometric midpoint."""
        total = self.counts.sum()
        if total == 0:
            return [math.nan for _ in qs]
        cum = np.cumsum(self.counts)
        out = []
        for q in qs:
            i = int(np.searchsorted(cum, max(1.0, math.ceil(q * total))))
            out.append(1.0 if i == 0 else GAMMA ** (i - 0.5))
        return out

    def to_state(self) -> dict[str, list[int]]:
        nz = np.flatnonzero(self.counts)
        return {"i": nz.tolist(), "n": self.counts[nz].tolist()}

    @classmethod
    def from_state(cls, state: dict[str, list[int]]) -> DelayHistogram:
        h = cls()
        h.counts[np.asarray(state["i"], dtype=np.int64)] = np.asarray(state["n"], dtype=np.int64)
        return h
