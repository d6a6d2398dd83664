"""Per (model, cell) confusion counts with river, cumulative and in event-time buckets.

One joined pair updates one river :class:`~river.metrics.ConfusionMatrix` for its cell (plus the one
of its event-time bucket); marginal features and intersections are sums over cells, computed at
snapshot time (see :mod:`stream_fair.groups`).

Windows: ``river.utils.TimeRolling`` would keep every event of the window in memory (a day at
1,000 events/s is 86 million entries) and could not be checkpointed cheaply, so windows are
running sums per window and cell, added to with each pair and reverted bucket by bucket as the
watermark slides (river's ``ConfusionMatrix.revert`` idea); fixed event-time buckets of
``resolution`` seconds remember what to revert. The window sums are plain ``[tp, fp, tn, fn]``
lists rather than river matrices: they sit on the per-event hot path, where each river update
costs about 1 us and the whole pipeline has a budget of a few. A window of width ``w`` covers the
``w / resolution`` buckets ending with the watermark's bucket.

>>> c = CellCounts(resolution=60, windows=(3600,))
>>> c.add_joined("m", ("F",), label=1, predicted=0, ts=30.0)
>>> c.add_joined("m", ("F",), label=1, predicted=1, ts=7200.0)
>>> c.cumulative()[("m", ("F",))]
(1, 0, 0, 1)
>>> c.window(0)[("m", ("F",))]
(1, 0, 0, 0)
"""

from __future__ import annotations

import math
from typing import Any

from river.metrics import ConfusionMatrix

from stream_fair.groups import Cell

Key = tuple[str, Cell]
Quad = tuple[int, int, int, int]  # tp, fp, tn, fn


def quad(cm: ConfusionMatrix) -> Quad:
    """(tp, fp, tn, fn) of a binary river confusion matrix."""
    d = cm.data
    one, zero = d.get(1, {}), d.get(0, {})
    return (
        int(one.get(1, 0)),
        int(zero.get(1, 0)),
        int(zero.get(0, 0)),
        int(one.get(0, 0)),
    )


def _matrix(q: Quad) -> ConfusionMatrix:
    cm = ConfusionMatrix()
    for (y, p), w in zip(_ORDER, q, strict=True):
        if w:
            cm.update(y, p, w=w)
    return cm


def add_quads(a: Quad, b: Quad) -> Quad:
    return (a[0] + b[0], a[1] + b[1], a[2] + b[2], a[3] + b[3])


class CellCounts:
    """Counts of one partition: joined confusion, predictions and expiries per (model, cell)."""

    def __init__(self, resolution: float, windows: tuple[float, ...] = ()) -> None:
        self.resolution = resolution
        self.spans = tuple(max(1, round(w / resolution)) for w in windows)  # buckets per window
        self.max_span = max(self.spans, default=0)
        self.confusion: dict[Key, ConfusionMatrix] = {}
        self.buckets: dict[int, dict[Key, list[int]]] = {}
        self.windows: list[dict[Key, list[int]]] = [{} for _ in self.spans]
        self.last_bucket: int | None = None  # the watermark's bucket
        self.predictions: dict[Key, list[int]] = {}  # [predicted 0, predicted 1]
        self.expired: dict[Key, int] = {}

    def add_prediction(self, model: str, cell: Cell, predicted: int) -> None:
        key = (model, cell)
        row = self.predictions.get(key)
        if row is None:
            row = self.predictions[key] = [0, 0]
        row[predicted] += 1

    def add_expired(self, model: str, cell: Cell) -> None:
        key = (model, cell)
        self.expired[key] = self.expired.get(key, 0) + 1

    def add_joined(self, model: str, cell: Cell, label: int, predicted: int, ts: float) -> None:
        """Count a joined pair at its prediction's event time ``ts``."""
        key = (model, cell)
        cm = self.confusion.get(key)
        if cm is None:
            cm = self.confusion[key] = ConfusionMatrix()
        cm.update(label, predicted)
        if not self.spans:
            return
        b = math.floor(ts / self.resolution)
        last = self.last_bucket
        if last is None or b > last:
            self.advance(ts)
            last = b
        if b <= last - self.max_span:
            return  # older than every window: cumulative only
        bucket = self.buckets.get(b)
        if bucket is None:
            bucket = self.buckets[b] = {}
        q = bucket.get(key)
        if q is None:
            q = bucket[key] = [0, 0, 0, 0]
        slot = _SLOT[label, predicted]
        q[slot] += 1
        for span, window in zip(self.spans, self.windows, strict=True):
            if b > last - span:
                w = window.get(key)
                if w is None:
                    w = window[key] = [0, 0, 0, 0]
                w[slot] += 1

    def advance(self, watermark: float) -> None:
        """Slide the windows to end at ``watermark``: buckets that fall out are reverted."""
        if not self.spans:
            return
        new_last = math.floor(watermark / self.resolution)
        last = self.last_bucket
        if last is not None and new_last <= last:
            return
        self.last_bucket = new_last
        if last is None:
            return
        for span, window in zip(self.spans, self.windows, strict=True):
            for b in range(last - span + 1, min(new_last - span, last) + 1):
                for key, q in self.buckets.get(b, {}).items():
                    w = window[key]
                    for i in range(4):
                        w[i] -= q[i]
                    if not any(w):
                        del window[key]
        horizon = new_last - self.max_span
        for b in [b for b in self.buckets if b <= horizon]:
            del self.buckets[b]

    # -- reads ------------------------------------------------------------------------------
    def cumulative(self) -> dict[Key, Quad]:
        return {k: quad(cm) for k, cm in self.confusion.items()}

    def window(self, index: int) -> dict[Key, Quad]:
        """Counts of the ``index``-th configured window (non-empty cells only)."""
        return {k: (w[0], w[1], w[2], w[3]) for k, w in self.windows[index].items() if any(w)}

    # -- persistence ------------------------------------------------------------------------
    def to_state(self) -> dict[str, Any]:
        return {
            "confusion": [[m, list(c), quad(cm)] for (m, c), cm in self.confusion.items()],
            "buckets": [[b, [[m, list(c), q] for (m, c), q in d.items()]] for b, d in self.buckets.items()],
            "last_bucket": self.last_bucket,
            "predictions": [[m, list(c), row] for (m, c), row in self.predictions.items()],
            "expired": [[m, list(c), n] for (m, c), n in self.expired.items()],
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.confusion = {(m, tuple(c)): _matrix(tuple(q)) for m, c, q in state["confusion"]}
        self.buckets = {int(b): {(m, tuple(c)): list(q) for m, c, q in rows} for b, rows in state["buckets"]}
        self.last_bucket = state["last_bucket"]
        self.predictions = {(m, tuple(c)): list(row) for m, c, row in state["predictions"]}
        self.expired = {(m, tuple(c)): int(n) for m, c, n in state["expired"]}
        # Windows are derived state: rebuild them from the buckets they cover.
        self.windows = [{} for _ in self.spans]
        if self.last_bucket is None:
            return
        for span, window in zip(self.spans, self.windows, strict=True):
            for b, bucket in self.buckets.items():
                if b > self.last_bucket - span:
                    for key, q in bucket.items():
                        w = window.setdefault(key, [0, 0, 0, 0])
                        for i in range(4):
                            w[i] += q[i]


_ORDER = ((1, 1), (0, 1), (0, 0), (1, 0))  # tp, fp, tn, fn as (label, predicted)
_SLOT = {yp: i for i, yp in enumerate(_ORDER)}
