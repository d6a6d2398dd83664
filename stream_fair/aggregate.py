"""Counts folded from partition increments: cumulative rows and event-time windows per (model, cell).

Each checkpoint of a partition yields an *increment*: the rows it added since the previous
checkpoint, bucketed by the prediction's event-time period (``window_resolution`` seconds; see
:class:`stream_fair.counts.PartitionCounts`). :class:`ModelCounts` folds increments into

* ``cumulative``: every row since the start, per (model, cell);
* ``windows``: per configured window ``w``, the rows whose period lies in the ``w / resolution``
  periods ending with the newest period seen (the *last bucket*), kept as running sums that are
  reverted bucket by bucket as the last bucket moves (river's ``revert`` idea; ``utils.TimeRolling``
  would keep every event of a day in memory).

Folding is commutative within the window horizon, so the result does not depend on how the
stream was split into partitions. Persistence is incremental: :meth:`ModelCounts.changes` yields
only the cumulative rows and buckets that changed.

>>> m = ModelCounts(resolution=60.0, windows=(3600.0,))
>>> m.fold([(("m", ("F",)), 0, [0, 1, 1, 0, 0, 0, 0])])
>>> m.fold([(("m", ("F",)), 120, [0, 1, 0, 0, 0, 1, 0])])     # two hours later
>>> m.cumulative[("m", ("F",))], m.windows[0][("m", ("F",))]
([0, 2, 1, 0, 0, 1, 0], [0, 1, 0, 0, 0, 1, 0])
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from stream_fair.counts import FN, TP, WIDTH, Key, Quad, add_rows, confusion


class ModelCounts:
    """Cumulative and windowed rows per (model, cell), folded from period increments."""

    def __init__(self, resolution: float, windows: tuple[float, ...] = ()) -> None:
        self.resolution = resolution
        self.spans = tuple(max(1, round(w / resolution)) for w in windows)
        self.max_span = max(self.spans, default=0)
        self.cumulative: dict[Key, list[int]] = {}
        self.buckets: dict[int, dict[Key, list[int]]] = {}
        self.windows: list[dict[Key, list[int]]] = [{} for _ in self.spans]
        self.last_bucket: int | None = None
        self._dirty_cells: set[Key] = set()
        self._dirty_buckets: set[int] = set()

    def __repr__(self) -> str:
        return f"ModelCounts(cells={len(self.cumulative)}, buckets={len(self.buckets)})"

    def fold(self, rows: Iterable[tuple[Key, int, Sequence[int]]]) -> None:
        """Add ``(key, period, row)`` increments (period = ``floor(ts / resolution)``)."""
        for key, b, row in rows:
            cum = self.cumulative.get(key)
            if cum is None:
                cum = self.cumulative[key] = [0] * WIDTH
            add_rows(cum, row)
            self._dirty_cells.add(key)
            if not self.spans:
                continue
            # joined pairs move the windows (a lone far-future prediction must not slide them away)
            if (self.last_bucket is None or b > self.last_bucket) and any(row[TP : FN + 1]):
                self.advance_to(b)
            last = self.last_bucket
            if last is None:
                last = b
            if b <= last - self.max_span:
                continue  # older than every window: cumulative only
            bucket = self.buckets.setdefault(b, {})
            acc = bucket.get(key)
            if acc is None:
                acc = bucket[key] = [0] * WIDTH
            add_rows(acc, row)
            self._dirty_buckets.add(b)
            for span, window in zip(self.spans, self.windows, strict=True):
                if b > last - span:
                    w = window.get(key)
                    if w is None:
                        w = window[key] = [0] * WIDTH
                    add_rows(w, row)

    def fold_increment(self, increment: dict[str, Any]) -> None:
        """Fold one partition checkpoint's increment document (see ``Tracker.checkpoint``)."""
        cells = [(str(m), tuple(c)) for m, c in increment["cells"]]
        self.fold((cells[r], int(period), row) for r, period, row in increment["rows"])
        if increment.get("watermark") is not None:
            self.advance(float(increment["watermark"]))

    def window_quads(self, labels: Sequence[str]) -> dict[str, dict[Key, Quad]]:
        """Per window label, the confusion counts of every (model, cell) with a pair in it."""
        return {
            label: {k: q for k, row in w.items() if any(q := confusion(row))}
            for label, w in zip(labels, self.windows, strict=True)
        }

    def advance(self, watermark: float) -> None:
        """Slide the windows to end at the period of ``watermark`` (never backwards)."""
        self.advance_to(int(watermark // self.resolution))

    def advance_to(self, new_last: int) -> None:
        if not self.spans:
            return
        last = self.last_bucket
        if last is not None and new_last <= last:
            return
        self.last_bucket = new_last
        if last is None:
            return
        for span, window in zip(self.spans, self.windows, strict=True):
            for b in range(
                max(last - span + 1, min(self.buckets, default=last)), min(new_last - span, last) + 1
            ):
                for key, q in self.buckets.get(b, {}).items():
                    w = window[key]
                    for i in range(WIDTH):
                        w[i] -= q[i]
                    if not any(w):
                        del window[key]
        horizon = new_last - self.max_span
        for b in [b for b in self.buckets if b <= horizon]:
            del self.buckets[b]
            self._dirty_buckets.add(b)

    # -- persistence ------------------------------------------------------------------------------
    def changes(self) -> tuple[dict[Key, list[int]], dict[int, dict[Key, list[int]] | None]]:
        """Cumulative rows and buckets (None: dropped) changed since the last call."""
        cells = {k: list(self.cumulative[k]) for k in self._dirty_cells}
        buckets = {
            b: ({k: list(v) for k, v in self.buckets[b].items()} if b in self.buckets else None)
            for b in self._dirty_buckets
        }
        self._dirty_cells.clear()
        self._dirty_buckets.clear()
        return cells, buckets

    @property
    def unsaved_buckets(self) -> bool:
        """Buckets changed since the last :meth:`changes` (or returned by :meth:`unsaved`)."""
        return bool(self._dirty_buckets)

    def unsaved(self, buckets: Iterable[int]) -> None:
        """Buckets returned by :meth:`changes` whose write failed: returned again by the next call."""
        self._dirty_buckets.update(buckets)

    def load(
        self, cells: dict[Key, list[int]], buckets: dict[int, dict[Key, list[int]]], last_bucket: int | None
    ) -> None:
        """Restore rows and buckets; the windows are derived from the buckets."""
        self.cumulative = {k: list(v) for k, v in cells.items()}
        self.buckets = {b: {k: list(v) for k, v in d.items()} for b, d in buckets.items()}
        self.last_bucket = last_bucket
        self.windows = [{} for _ in self.spans]
        if last_bucket is None:
            return
        for span, window in zip(self.spans, self.windows, strict=True):
            for b, bucket in self.buckets.items():
                if b > last_bucket - span:
                    for key, row in bucket.items():
                        add_rows(window.setdefault(key, [0] * WIDTH), row)
        for window in self.windows:
            for key in [k for k, v in window.items() if not any(v)]:
                del window[key]

    def state_meta(self) -> dict[str, Any]:
        return {"last_bucket": self.last_bucket}
