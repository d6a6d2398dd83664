"""What the verdict engine reads: increments of counts by prediction-time cohort and arrival slot.

A replica (or the single-process monitor) counts what it sees into rows keyed by
``(model, cell, cohort, slot)``:

* ``cohort`` = ``floor(prediction_ts / period)``: the prediction-time period the event belongs
  to. Labelled pairs are counted at their *prediction's* cohort, whenever the label arrives.
* ``slot`` = ``floor(arrival_ts / slot)``: the event-time slot in which the count arrived (the
  prediction's time for a prediction, the outcome's time for a labelled pair). The engine
  evaluates a slot once every source's watermark has passed its end, so the data it compares in a
  slot do not depend on how the stream was split into partitions or batches.

A row carries predictions by predicted value ``[n0, n1]``, labelled pairs in the confusion order
of :class:`stream_fair.sequential.Counts` ``(tp, fp, tn, fn)``, and optional score histograms of
labelled positives and negatives over fixed :class:`ScoreBins` (empty when events carry no
score). An :class:`Increment` is one message: the rows of one source plus that source's
watermark. Everything serialises to plain JSON-able data with a version; nothing is pickled.

>>> b = IncrementBuilder(period=3600.0, slot=300.0, bins=ScoreBins(count=4))
>>> b.add_prediction("m", ("F",), predicted=1, ts=10.0)
>>> b.add_labelled("m", ("F",), predicted=1, label=1, prediction_ts=10.0, outcome_ts=400.0, score=0.8)
>>> inc = b.build(source="p0", watermark=400.0)
>>> [(c.cohort, c.slot, c.predictions, c.labelled, c.positive_scores) for c in inc.counts]
[(0, 0, (0, 1), (0, 0, 0, 0), ()), (0, 1, (0, 0), (1, 0, 0, 0), (0, 0, 0, 1))]
>>> Increment.from_json(inc.to_json()) == inc
True
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from operator import add
from typing import Any

import numpy as np
from numpy.typing import NDArray

from stream_fair.counts import SLOT
from stream_fair.groups import Cell

__all__ = ["VERSION", "ScoreBins", "CellCounts", "Increment", "IncrementBuilder"]

VERSION = 1
"""Version of the JSON form of :class:`Increment` (and of the engine's state)."""

VERSION_ERROR = "unsupported increment version {got!r}: this stream-fair reads version {want}"
BINS_ERROR = "a score histogram has {got} bins; the engine's ScoreBins has {want}: configure the same bins"


@dataclass(frozen=True)
class ScoreBins:
    """Fixed equal-width bins of the prediction score over ``[low, high]``.

    Scores outside the range fall into the first or last bin. ``count = 0`` disables scores.

    >>> ScoreBins(0.0, 1.0, 4).index(0.5), ScoreBins(0.0, 1.0, 4).index(7.0)
    (2, 3)
    """

    low: float = 0.0
    high: float = 1.0
    count: int = 20

    def __post_init__(self) -> None:
        if self.count < 0 or (self.count and not self.high > self.low):
            raise ValueError("ScoreBins needs high > low and count >= 0, e.g. ScoreBins(0.0, 1.0, 20)")
        # the edges are the one definition: a score exactly on an edge is in the bin above it
        # (``score >= edge``, as a threshold reads it), whatever the float rounding of the scaling.
        # ``low + span * (i / count)``, not ``np.linspace``: on [0, 1] in 50 bins linspace gives
        # 0.7000000000000001 for 0.7 (35 * 0.02), so a score of exactly 0.7 fell below "its" edge
        # and a what-if at 0.7 counted score > 0.7; i / count is the nearest float to the decimal.
        span = self.high - self.low
        edges = [self.low + span * (i / self.count) for i in range(self.count)] + [self.high]
        if not self.count:  # no bins (scores not kept): one edge, as np.linspace gave
            edges = [self.low]
        object.__setattr__(self, "_edges", tuple(edges))

    def edges(self) -> NDArray[np.float64]:
        """The ``count + 1`` edges; bin ``b`` is ``[edges[b], edges[b + 1])``, the last one closed."""
        return np.asarray(self._edges, dtype=np.float64)  # type: ignore[attr-defined]

    def index(self, score: float) -> int:
        """Bin of one score.

        >>> ScoreBins(0.0, 1.0, 50).index(0.58)  # 0.58 * 50 is 28.999999999999996 in floats
        29
        """
        top = self.count - 1
        i = int((score - self.low) / (self.high - self.low) * self.count)
        if i < 0:
            return 0
        if i > top:
            return top
        edges = self._edges  # type: ignore[attr-defined]
        if i < top and score >= edges[i + 1]:
            return i + 1
        if i > 0 and score < edges[i]:
            return i - 1
        return i

    def indices(self, scores: NDArray[np.float64]) -> NDArray[np.int64]:
        """Bins of many scores (vectorised :meth:`index`)."""
        i = np.searchsorted(self.edges(), np.asarray(scores, dtype=np.float64), side="right") - 1
        return np.clip(i, 0, self.count - 1).astype(np.int64)


def _bins_sum(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    """Two score histograms added (``()`` is all zeros)."""
    return tuple(map(add, a, b)) if a and b else a or b


@dataclass(frozen=True)
class CellCounts:
    """Counts of one ``(model, cell, cohort, slot)``; see the module docstring.

    ``max_ts`` is the largest event time counted in the row (prediction time of a prediction,
    outcome time of a labelled pair): the engine reports a raise at the event time of its
    evidence, not at a watermark.
    """

    model: str
    cell: Cell
    cohort: int
    slot: int
    predictions: tuple[int, int] = (0, 0)
    labelled: tuple[int, int, int, int] = (0, 0, 0, 0)
    positive_scores: tuple[int, ...] = ()
    negative_scores: tuple[int, ...] = ()
    max_ts: float = -math.inf

    def to_json(self) -> list[Any]:
        ts = None if math.isinf(self.max_ts) else self.max_ts
        return [
            self.model,
            list(self.cell),
            self.cohort,
            self.slot,
            list(self.predictions),
            list(self.labelled),
            list(self.positive_scores),
            list(self.negative_scores),
            ts,
        ]

    def plus(self, other: CellCounts) -> CellCounts:
        """This row and ``other`` (same model, cell and cohort) summed: counts and score bins
        added, the larger ``max_ts``; ``slot`` stays this row's."""
        return replace(
            self,
            predictions=tuple(map(add, self.predictions, other.predictions)),  # type: ignore[arg-type]
            labelled=tuple(map(add, self.labelled, other.labelled)),  # type: ignore[arg-type]
            positive_scores=_bins_sum(self.positive_scores, other.positive_scores),
            negative_scores=_bins_sum(self.negative_scores, other.negative_scores),
            max_ts=max(self.max_ts, other.max_ts),
        )

    @classmethod
    def from_json(cls, row: list[Any]) -> CellCounts:
        model, cell, cohort, slot, pred, lab, pos, neg, ts = row
        return cls(
            str(model),
            tuple(str(v) for v in cell),
            int(cohort),
            int(slot),
            (int(pred[0]), int(pred[1])),
            (int(lab[0]), int(lab[1]), int(lab[2]), int(lab[3])),
            tuple(int(v) for v in pos),
            tuple(int(v) for v in neg),
            -math.inf if ts is None else float(ts),
        )


@dataclass(frozen=True)
class Increment:
    """One message to the engine: rows counted by one ``source`` since its last increment.

    ``watermark`` promises that the source will send no more rows of slots ending at or before
    it (rows that break the promise still count, in the engine's next slot); None makes no
    promise.
    """

    source: str
    watermark: float | None
    counts: tuple[CellCounts, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "source": self.source,
            "watermark": self.watermark,
            "counts": [c.to_json() for c in self.counts],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Increment:
        if data.get("version") != VERSION:
            raise ValueError(VERSION_ERROR.format(got=data.get("version"), want=VERSION))
        wm = data["watermark"]
        return cls(
            str(data["source"]),
            None if wm is None else float(wm),
            tuple(CellCounts.from_json(r) for r in data["counts"]),
        )


# row layout of the builder: n0 n1, the confusion counts (stream_fair.counts.CONFUSION order),
# positive-score bins, negative-score bins; (label, predicted) -> column
_COLUMN = {lp: 2 + i for lp, i in SLOT.items()}


class IncrementBuilder:
    """Counts events into :class:`CellCounts` rows until :meth:`build` hands them over.

    ``period`` and ``slot`` (seconds) and ``bins`` must be the engine's
    (:class:`~stream_fair.verdict.settings.VerdictSettings`). Costs one dict lookup per event.
    """

    __slots__ = ("period", "slot", "bins", "_rows", "_width", "_index", "_top")

    def __init__(self, period: float, slot: float, bins: ScoreBins) -> None:
        self.period, self.slot, self.bins = period, slot, bins
        self._width = 6 + 2 * bins.count
        self._rows: dict[tuple[str, Cell, int, int], list[float]] = {}
        self._index, self._top = bins.index, bins.count - 1

    def __len__(self) -> int:
        return len(self._rows)

    def __repr__(self) -> str:
        return f"IncrementBuilder(rows={len(self._rows)}, period={self.period:g}, slot={self.slot:g})"

    def add_prediction(self, model: str, cell: Cell, predicted: int, ts: float) -> None:
        """Count one prediction (``predicted`` 0 or 1) made at event time ``ts``."""
        key = (model, cell, math.floor(ts / self.period), math.floor(ts / self.slot))
        row = self._rows.get(key)
        if row is None:
            row = self._rows[key] = [0] * self._width + [-math.inf]
        row[1 if predicted else 0] += 1
        if ts > row[-1]:
            row[-1] = ts

    def add_labelled(
        self,
        model: str,
        cell: Cell,
        predicted: int,
        label: int,
        prediction_ts: float,
        outcome_ts: float,
        score: float | None = None,
    ) -> None:
        """Count one joined pair at its prediction's cohort and its outcome's slot."""
        key = (model, cell, math.floor(prediction_ts / self.period), math.floor(outcome_ts / self.slot))
        row = self._rows.get(key)
        if row is None:
            row = self._rows[key] = [0] * self._width + [-math.inf]
        row[_COLUMN[1 if label else 0, 1 if predicted else 0]] += 1
        if score is not None and self._top >= 0:  # the histograms' bin (ScoreBins.index, edges exact)
            row[(6 if label else 7 + self._top) + self._index(score)] += 1
        if outcome_ts > row[-1]:
            row[-1] = outcome_ts

    def build(self, source: str, watermark: float | None) -> Increment:
        """The rows counted so far as one :class:`Increment`; the builder starts empty again."""
        b = self.bins.count
        counts = []
        for (model, cell, cohort, slot), r in self._rows.items():
            ints = [int(v) for v in r[: self._width]]
            counts.append(
                CellCounts(
                    model,
                    cell,
                    cohort,
                    slot,
                    (ints[0], ints[1]),
                    (ints[2], ints[3], ints[4], ints[5]),
                    tuple(ints[6 : 6 + b]) if any(ints[6 : 6 + b]) else (),
                    tuple(ints[6 + b :]) if any(ints[6 + b :]) else (),
                    float(r[-1]),
                )
            )
        self._rows = {}
        return Increment(source, watermark, tuple(counts))
