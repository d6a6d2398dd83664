"""Labelled score histograms over recent windows: the input of calibration *drift*.

The calibration of :mod:`stream_fair.estimates` on all matured labels is diluted by a calibrated
history: a group whose ``P(label | score)`` moves after months of calibrated traffic takes months
to move its cumulative ECE. :class:`LabelWindows` keeps, per partition, per interned (model, cell)
(the index of :class:`~stream_fair.counts.PartitionCounts`) and per event-time *bucket* of the
**label's** time (``window_resolution`` seconds), the labelled pairs per score bin of
:data:`stream_fair.histograms.BINS`: label-1 counts then label-0 counts (``2 * NBINS`` ints). The
reliability bins' count, sum of labels and sum of scores (bin centres, as for the cumulative ECE)
are sums of these, so the ECE of a window is exact and computed by the one ECE code,
:func:`stream_fair.estimates.calibrations`.

A window ``w`` covers the buckets in ``(last - w / resolution, last]`` where ``last`` is the
newest label bucket the partition has seen (labels move it, as joined pairs move the realized
windows of :class:`stream_fair.aggregate.ModelCounts`). Windows are running sums per cell; a
bucket leaving a window is subtracted (river's ``revert``), buckets older than the longest window
are dropped, so memory is bounded by cells x (longest window / resolution + 1) rows of
``2 * NBINS`` ints, and only for (cell, bucket) pairs that received a label.

Why the label's time and not the prediction's: the question is "are the labels that matured
recently calibrated?". Bucketing by prediction time would leave the newest buckets with only the
fastest labels (a label-delay bias that differs by group); by label time every bucket is complete
when it closes.

Not persisted: after a restart or a partition move the windows refill as labels arrive (the
consumer of these windows falls back to the cumulative calibration while a window holds fewer
than ``min_labelled`` labels of a group).

>>> w = LabelWindows(resolution=60.0, windows=(120.0,), labels=("2m",))
>>> w.add(0, 1, 0.91, ts=0.0)
>>> w.add(0, 0, 0.91, ts=150.0)     # two buckets later: the first label left the 2m window
>>> row = w.sums[0][0]
>>> sum(row[:NBINS]), sum(row[NBINS:])
(0, 1)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from stream_fair.counts import Key
from stream_fair.groups import FeatureKey
from stream_fair.histograms import BINS, NBINS, grouped_sums

_index = BINS.index
WIDTH = 2 * NBINS
"""Length of a window row: label-1 counts per score bin, then label-0 counts per score bin."""


class LabelWindows:
    """One partition's labelled pairs per (cell, label-time bucket) and their running window sums."""

    __slots__ = ("resolution", "spans", "labels", "max_span", "buckets", "sums", "last", "unviewed", "_views")

    def __init__(self, resolution: float, windows: Sequence[float], labels: Sequence[str]) -> None:
        self.resolution = resolution
        self.spans = tuple(max(1, round(w / resolution)) for w in windows)
        self.labels = tuple(labels)
        self.max_span = max(self.spans, default=0)
        self.buckets: dict[int, dict[int, list[int]]] = {}  # bucket -> cell index -> row
        self.sums: list[dict[int, list[int]]] = [{} for _ in self.spans]  # window -> cell -> row
        self.last: int | None = None
        self.unviewed: set[int] = set()  # cells whose window rows changed since the last view
        self._views: list[dict[Key, tuple[int, ...]]] = [{} for _ in self.spans]

    def __repr__(self) -> str:
        return f"LabelWindows(buckets={len(self.buckets)}, cells={len(self.sums[0]) if self.sums else 0})"

    def add(self, i: int, label: int, score: float, ts: float) -> None:
        """Count a labelled pair of cell ``i`` with ``score`` whose label's event time is ``ts``."""
        spans = self.spans
        if not spans:
            return
        b = math.floor(ts / self.resolution)
        last = self.last
        if last is None or b > last:
            self._advance(b)
            last = b
        elif b <= last - self.max_span:
            return  # older than every window
        col = (0 if label else NBINS) + _index(score)
        buckets = self.buckets
        bucket = buckets.get(b)
        if bucket is None:
            bucket = buckets[b] = {}
        row = bucket.get(i)
        if row is None:
            row = bucket[i] = [0] * WIDTH
        row[col] += 1
        self.unviewed.add(i)
        for span, sums in zip(spans, self.sums):  # noqa: B905 (same length by construction)
            if b > last - span:
                s = sums.get(i)
                if s is None:
                    s = sums[i] = [0] * WIDTH
                s[col] += 1

    def _advance(self, new_last: int) -> None:
        last = self.last
        self.last = new_last
        if last is None:
            return
        for span, sums in zip(self.spans, self.sums, strict=True):
            # buckets in the window before (last - span, last] and not after (new_last - span, ...]
            for b in [b for b in self.buckets if last - span < b <= new_last - span]:
                for i, q in self.buckets[b].items():
                    s = sums[i] = [x - y for x, y in zip(sums[i], q, strict=True)]
                    self.unviewed.add(i)
                    if not any(s):
                        del sums[i]
        horizon = new_last - self.max_span
        for b in [b for b in self.buckets if b <= horizon]:
            del self.buckets[b]

    def view(self, keys: Sequence[Key]) -> dict[str, dict[Key, tuple[int, ...]]]:
        """Per window label, the window row of every (model, cell) with a label in it (new dicts;
        only the rows changed since the previous view are copied)."""
        for sums, cache in zip(self.sums, self._views, strict=True):
            for i in self.unviewed:
                row = sums.get(i)
                if row is None:
                    cache.pop(keys[i], None)
                else:
                    cache[keys[i]] = tuple(row)
        self.unviewed.clear()
        return {label: dict(cache) for label, cache in zip(self.labels, self._views, strict=True)}


@dataclass(frozen=True)
class LabelledHistogram:
    """Labelled pairs per score bin of one (model, feature, group) in one window: what
    :func:`stream_fair.estimates.calibrations` reads (as it reads a
    :class:`~stream_fair.histograms.ScoreHistogram`'s ``positives`` and ``negatives``)."""

    positives: NDArray[np.int64]
    negatives: NDArray[np.int64]

    @classmethod
    def from_row(cls, row: Sequence[int] | NDArray[np.int64]) -> LabelledHistogram:
        a = np.asarray(row, dtype=np.int64)
        return cls(a[:NBINS], a[NBINS:WIDTH])


def window_histograms(
    parts: Iterable[Mapping[Key, Sequence[int]]], keys: Sequence[FeatureKey]
) -> dict[str, dict[str, dict[str, LabelledHistogram]]]:
    """feature key name -> model -> group -> labelled histogram of one window, summed over the
    partitions' window rows (marginals and intersections are projections of the cells)."""
    sums = grouped_sums(parts, keys, WIDTH)
    return {
        name: {m: {g: LabelledHistogram.from_row(r) for g, r in by.items()} for m, by in models.items()}
        for name, models in sums.items()
    }


__all__ = ["WIDTH", "LabelWindows", "LabelledHistogram", "window_histograms"]
