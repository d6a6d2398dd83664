"""The one count store: per (model, cell) rows of plain ints, and the confusion-cell order.

Every other module takes the cell order, the row layout and the (label, predicted) slots from
here. A *cell* is the tuple of all sensitive-feature values (see :mod:`stream_fair.groups`); a
marginal feature or an intersection is a projection of it, summed at read time, so each event
costs one row update however many features are configured.

A row holds, in :data:`ROW` order: predictions by predicted value, the joined pairs' confusion
counts (:data:`CONFUSION` order) and the predictions that expired unlabelled.

:class:`PartitionCounts` keeps one partition's cumulative rows (exported as counters) and, since
the last checkpoint, the same increments bucketed by the prediction's event-time *period*
(:attr:`PartitionCounts.increments`), which the model-wide aggregator folds.

River's ``ConfusionMatrix.update`` costs about 1 us per call and a row update about 0.1 us; the
rows are converted to river matrices only where river's API is wanted (:func:`to_river`).

>>> c = PartitionCounts(period=60.0)
>>> i = c.cell("m", ("F",))
>>> c.add_prediction(i, predicted=1, ts=30.0)
>>> c.add_joined(i, label=1, predicted=1, ts=30.0)
>>> c.rows[i]
[0, 1, 1, 0, 0, 0, 0]
>>> sorted(c.increments.items())
[((0, 0), [0, 1, 1, 0, 0, 0, 0])]
>>> int(to_river(confusion(c.rows[i]))[1][1])
1
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from river.metrics import ConfusionMatrix

from stream_fair.groups import Cell

CONFUSION: tuple[str, ...] = ("tp", "fp", "tn", "fn")
"""The confusion-cell order used everywhere: true positive, false positive, true negative, false negative."""

ACTUAL_PREDICTED: tuple[tuple[int, int], ...] = ((1, 1), (0, 1), (0, 0), (1, 0))
"""(label, predicted) of each :data:`CONFUSION` slot."""

SLOT: dict[tuple[int, int], int] = {lp: i for i, lp in enumerate(ACTUAL_PREDICTED)}
"""(label, predicted) -> index in :data:`CONFUSION`."""

ROW: tuple[str, ...] = ("predicted_0", "predicted_1", *CONFUSION, "expired")
"""Columns of a count row."""

PRED0, PRED1, TP, FP, TN, FN, EXPIRED = range(len(ROW))
"""Column indexes of a row."""
WIDTH = len(ROW)

Key = tuple[str, Cell]  # (model, cell)
Quad = tuple[int, int, int, int]  # CONFUSION order


def confusion(row: list[int]) -> Quad:
    """The row's confusion counts in :data:`CONFUSION` order."""
    return (row[TP], row[FP], row[TN], row[FN])


def add_rows(a: list[int], b: Sequence[int]) -> None:
    """``a += b`` elementwise."""
    for i, v in enumerate(b):
        a[i] += v


def to_river(q: Quad) -> ConfusionMatrix:
    """A river confusion matrix with these counts (``cm[label][predicted]``)."""
    cm = ConfusionMatrix()
    for (y, p), w in zip(ACTUAL_PREDICTED, q, strict=True):
        if w:
            cm.update(y, p, w=w)
    return cm


class PartitionCounts:
    """Cumulative rows per interned (model, cell) and per-period increments since the checkpoint."""

    __slots__ = ("period", "keys", "index", "rows", "dirty", "increments")

    def __init__(self, period: float) -> None:
        self.period = period
        self.keys: list[Key] = []  # cell index -> (model, cell)
        self.index: dict[Key, int] = {}
        self.rows: list[list[int]] = []
        self.dirty: set[int] = set()
        # (cell index, period index) -> row of increments since the last checkpoint
        self.increments: dict[tuple[int, int], list[int]] = {}

    def __repr__(self) -> str:
        return f"PartitionCounts(cells={len(self.rows)}, changed={len(self.dirty)})"

    def cell(self, model: str, cell: Cell) -> int:
        """The index of (model, cell), interned on first use."""
        key = (model, cell)
        i = self.index.get(key)
        if i is None:
            i = self.index[key] = len(self.keys)
            self.keys.append(key)
            self.rows.append([0] * WIDTH)
        return i

    def _bump(self, i: int, column: int, ts: float) -> None:
        self.rows[i][column] += 1
        self.dirty.add(i)
        k = (i, math.floor(ts / self.period))
        inc = self.increments.get(k)
        if inc is None:
            inc = self.increments[k] = [0] * WIDTH
        inc[column] += 1

    def add_prediction(self, i: int, predicted: int, ts: float) -> None:
        self._bump(i, PRED1 if predicted else PRED0, ts)

    def add_joined(self, i: int, label: int, predicted: int, ts: float) -> None:
        """Count a joined pair at its prediction's event time ``ts``."""
        self._bump(i, TP + SLOT[label, predicted], ts)

    def add_expired(self, i: int, ts: float) -> None:
        self._bump(i, EXPIRED, ts)

    # -- checkpoint -----------------------------------------------------------------------------
    def row_document(self, i: int) -> list[Any]:
        model, cell = self.keys[i]
        return [model, list(cell), list(self.rows[i])]

    def load_row(self, i: int, doc: list[Any]) -> None:
        model, cell, row = doc
        while len(self.keys) <= i:  # indexes are dense; fill in order
            self.keys.append(("", ()))
            self.rows.append([0] * WIDTH)
        key = (str(model), tuple(cell))
        self.keys[i] = key
        self.index[key] = i
        self.rows[i] = [int(x) for x in row] + [0] * (WIDTH - len(row))


__all__ = [
    "ACTUAL_PREDICTED", "CONFUSION", "ROW", "SLOT", "WIDTH", "Key", "Quad", "PartitionCounts",
    "add_rows", "confusion", "to_river",
]  # fmt: skip
