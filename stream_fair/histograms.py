"""Per-cell score histograms: the count row of :mod:`stream_fair.counts`, split by score bin.

A histogram row is, for one (model, cell) of one partition, the columns of
:data:`stream_fair.counts.ROW` (predictions by predicted value, the joined pairs' confusion slots,
expired predictions) and one more, :data:`EXPIRED1` (the expired predictions that predicted 1),
counted per score bin over fixed bins :data:`BINS` (50 equal-width bins over ``[0, 1]``), followed
by one count of out-of-range scores. Only predictions that carry a score are
counted; summed over the bins a column equals the count row's column restricted to scored events,
so the histogram of predictions still *pending* a label is derived, exactly, as
``predicted - joined - expired`` per bin (:meth:`ScoreHistogram.pending`).

Integers only, so histograms are mergeable exactly: a marginal feature's or an intersection's
histogram is the sum of its cells', a model's the sum over partitions, in any order. They live
in the partition's state and are checkpointed like the count rows (changed rows only, key space
``0x07`` of :mod:`stream_fair.state.codec`), so they follow a partition to another replica.

Why fixed bins and not a sketch (t-digest, KLL): the consumers (label-free estimates,
calibration, threshold what-ifs) need counts per score *interval* split by label and predicted
value, merged across partitions without error; fixed bins give exactly that at two list
increments per event, a sketch gives approximate quantiles of one distribution. Bins of width
0.02 put a threshold what-if within 0.01 of any requested threshold.

**Out-of-range scores** (a score is a probability by contract; the decoder already rejects NaN
and infinities): a score below 0 counts in the first bin, above 1 in the last (as
:class:`~stream_fair.verdict.increments.ScoreBins` does), and once more in the row's
``out_of_range`` count (predictions only, not again when labelled or expired), exported as
``stream_fair_scores_out_of_range_total`` so a model emitting logits instead of probabilities
is visible.

>>> h = PartitionHistograms()
>>> h.add(0, PRED1, 0.93)
>>> h.add(0, TP, 0.93)
>>> h.add(0, PRED0, 1.7)          # out of range: last bin, and counted
>>> row = h.rows[0]
>>> hist = ScoreHistogram.from_row(row)
>>> int(hist.column(PRED1)[46]), int(hist.positives.sum()), hist.out_of_range
(1, 1, 1)
>>> int(hist.pending(predicted=0)[49]), int(hist.pending(predicted=1).sum())
(1, 0)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import sparse

from stream_fair.counts import EXPIRED, FN, FP, PRED0, PRED1, ROW, SLOT, TN, TP, WIDTH, Key
from stream_fair.groups import FeatureKey
from stream_fair.verdict.increments import ScoreBins

BINS = ScoreBins(0.0, 1.0, 50)
"""The histogram bins: 50 equal-width bins over [0, 1]."""

NBINS = BINS.count
COLUMNS: tuple[str, ...] = (*ROW, "expired_predicted_1")
"""Columns of a histogram row: the count row's, then the expired predictions that predicted 1."""
EXPIRED1 = WIDTH
NCOLS = len(COLUMNS)
ROW_LENGTH = NCOLS * NBINS + 1
"""Length of a histogram row: per :data:`COLUMNS` column ``NBINS`` counts
(column-major: column ``c``'s bins are ``row[c * NBINS:(c + 1) * NBINS]``), then out-of-range."""
OUT_OF_RANGE = ROW_LENGTH - 1

_LOW, _HIGH = BINS.low, BINS.high
_index = BINS.index
_SPAN, _TOP = _HIGH - _LOW, NBINS - 1
_EDGES: tuple[float, ...] = BINS._edges  # type: ignore[attr-defined]  # noqa: SLF001 - index() inlined


def edges() -> NDArray[np.float64]:
    """The ``NBINS + 1`` bin edges; bin ``b`` is ``[edges[b], edges[b + 1])``, the last one closed."""
    return BINS.edges()


class PartitionHistograms:
    """One partition's histogram rows, indexed like :class:`~stream_fair.counts.PartitionCounts`
    (the same interned cell index), with the rows changed since the last checkpoint."""

    __slots__ = ("rows", "dirty", "unviewed")

    def __init__(self) -> None:
        self.rows: list[list[int]] = []
        self.dirty: set[int] = set()  # changed since the last checkpoint
        self.unviewed: set[int] = set()  # changed since the last read-only view was taken

    def __repr__(self) -> str:
        return f"PartitionHistograms(cells={len(self.rows)}, changed={len(self.dirty)})"

    def add(self, i: int, column: int, score: float) -> None:
        """Count one event of count-row ``column`` (``PRED0``..``EXPIRED``) with ``score`` in cell ``i``."""
        rows = self.rows
        while len(rows) <= i:
            rows.append([0] * ROW_LENGTH)
        row = rows[i]
        if column <= PRED1 and (score < _LOW or score > _HIGH):  # predictions only
            row[OUT_OF_RANGE] += 1
        b = int((score - _LOW) / _SPAN * NBINS)  # ScoreBins.index, inlined (the same arithmetic)
        if b < 0:
            b = 0
        elif b > _TOP:
            b = _TOP
        elif b < _TOP and score >= _EDGES[b + 1]:
            b += 1
        elif b > 0 and score < _EDGES[b]:
            b -= 1
        row[column * NBINS + b] += 1
        self.dirty.add(i)
        self.unviewed.add(i)

    def touch(self, i: int) -> None:
        """Mark cell ``i``'s row for the next checkpoint (a zero row if it has none)."""
        while len(self.rows) <= i:
            self.rows.append([0] * ROW_LENGTH)
        self.dirty.add(i)

    def add_joined(self, i: int, label: int, predicted: int, score: float) -> None:
        self.add(i, TP + SLOT[label, predicted], score)

    def add_expired(self, i: int, predicted: int, score: float) -> None:
        self.add(i, EXPIRED, score)
        if predicted:
            self.add(i, EXPIRED1, score)

    # -- checkpoint (the same document shape as a count row) ---------------------------------------
    def row_document(self, i: int, key: Key) -> list[Any]:
        model, cell = key
        return [model, list(cell), NBINS, self.rows[i]]

    def load_row(self, i: int, doc: list[Any]) -> None:
        _model, _cell, nbins, row = doc
        if int(nbins) != NBINS or len(row) != ROW_LENGTH:
            return  # written with other bins: dropped (the histograms restart; counts are unaffected)
        while len(self.rows) <= i:
            self.rows.append([0] * ROW_LENGTH)
        self.rows[i] = [int(x) for x in row]


@dataclass(frozen=True)
class ScoreHistogram:
    """Integer counts per score bin of one (model, feature, group), summed over cells and partitions.

    ``counts[c]`` is column ``c`` of :data:`COLUMNS` per bin (shape ``(NCOLS, NBINS)``).
    """

    counts: NDArray[np.int64]
    out_of_range: int = 0

    @classmethod
    def empty(cls) -> ScoreHistogram:
        return cls(np.zeros((NCOLS, NBINS), dtype=np.int64), 0)

    @classmethod
    def from_row(cls, row: Sequence[int] | NDArray[np.int64]) -> ScoreHistogram:
        a = np.asarray(row[: NCOLS * NBINS], dtype=np.int64).reshape(NCOLS, NBINS)
        return cls(a, int(row[OUT_OF_RANGE]))

    def __add__(self, other: ScoreHistogram) -> ScoreHistogram:
        return ScoreHistogram(self.counts + other.counts, self.out_of_range + other.out_of_range)

    @property
    def edges(self) -> NDArray[np.float64]:
        return edges()

    def column(self, c: int) -> NDArray[np.int64]:
        return self.counts[c]

    @property
    def predictions(self) -> NDArray[np.int64]:
        """All scored predictions per bin (duplicates excluded), labelled or not."""
        return self.counts[PRED0] + self.counts[PRED1]

    @property
    def positives(self) -> NDArray[np.int64]:
        """Labelled pairs with label 1 per bin (tp + fn)."""
        return self.counts[TP] + self.counts[FN]

    @property
    def negatives(self) -> NDArray[np.int64]:
        """Labelled pairs with label 0 per bin (fp + tn)."""
        return self.counts[FP] + self.counts[TN]

    @property
    def expired(self) -> NDArray[np.int64]:
        return self.counts[EXPIRED]

    def pending(self, predicted: int | None = None) -> NDArray[np.int64]:
        """Scored predictions still waiting for a label per bin: predicted - joined - expired.

        With ``predicted`` 0 or 1, only those with that predicted value;
        ``pending(0) + pending(1) == pending()``.
        """
        c = self.counts
        if predicted is None:
            return c[PRED0] + c[PRED1] - c[TP] - c[FP] - c[TN] - c[FN] - c[EXPIRED]
        if predicted:
            return c[PRED1] - c[TP] - c[FP] - c[EXPIRED1]
        return c[PRED0] - c[TN] - c[FN] - (c[EXPIRED] - c[EXPIRED1])


def feature_histograms(
    parts: Iterable[Mapping[Key, Sequence[int]]], keys: Sequence[FeatureKey]
) -> dict[str, dict[str, dict[str, ScoreHistogram]]]:
    """feature key name -> model -> group -> histogram, from every partition's rows at once
    (one matrix, one grouped sum per key: what a scrape uses for every feature)."""
    sums = grouped_sums(parts, keys, ROW_LENGTH)
    return {
        name: {m: {g: ScoreHistogram.from_row(r) for g, r in by.items()} for m, by in models.items()}
        for name, models in sums.items()
    }


def grouped_sums(
    parts: Iterable[Mapping[Key, Sequence[int]]], keys: Sequence[FeatureKey], width: int
) -> dict[str, dict[str, dict[str, NDArray[np.int64]]]]:
    """feature key name -> model -> group -> the sum of the rows (of ``width`` ints) of its cells
    over every partition: the one projection of cell rows onto groups for per-cell int rows."""
    cells: list[Key] = []
    rows: list[Sequence[int]] = []
    for part in parts:
        for k, row in part.items():
            cells.append(k)
            rows.append(row)
    if not rows:
        return {key.name: {} for key in keys}
    matrix = np.array(rows, dtype=np.int64)
    out: dict[str, dict[str, dict[str, NDArray[np.int64]]]] = {}
    ones = np.ones(len(cells), dtype=np.int64)
    columns = np.arange(len(cells))
    for key in keys:
        index: dict[tuple[str, str], int] = {}
        group = key.group
        idx = np.fromiter(
            (index.setdefault((m, group(c)), len(index)) for m, c in cells),
            dtype=np.int64,
            count=len(cells),
        )
        # sum the rows of each group: a 0/1 (groups x cells) matrix times the rows (exact in
        # int64, several times faster than np.add.at)
        assign = sparse.csr_matrix((ones, (idx, columns)), shape=(len(index), len(cells)))
        sums = np.asarray(assign @ matrix)
        by: dict[str, dict[str, NDArray[np.int64]]] = {}
        for (m, g), i in index.items():
            by.setdefault(m, {})[g] = sums[i]
        out[key.name] = by
    return out


__all__ = [
    "BINS", "COLUMNS", "EXPIRED1", "NBINS", "NCOLS", "OUT_OF_RANGE", "ROW_LENGTH", "PartitionHistograms",
    "ScoreHistogram", "edges", "feature_histograms", "grouped_sums",
]  # fmt: skip
