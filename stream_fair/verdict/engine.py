"""The verdict engine: increments in, calibrated disparity alarms and their event log out.

:meth:`VerdictEngine.update` takes :class:`~.increments.Increment` messages from any number of
sources in any interleaving. Rows wait in their arrival *slot* until every source's watermark has
passed the slot's end; then the slot is evaluated: per model and feature, rows are summed into
strata ``(cohort, group)`` and every group is compared with the rest of its feature *within each
cohort* (:mod:`.evidence`), for

* ``selection_rate`` from all predictions (no labels, no censoring) -> demographic parity;
* ``true_positive_rate`` from labelled positives (their scores when every pair has one) ->
  equal opportunity and equalized odds;
* ``false_positive_rate`` from labelled negatives -> equalized odds.

Each (feature, group, rate) has a :class:`~.cusum.CohortCusum`. A disparity's alarm is raised
while any detector of its rates is raised (:data:`stream_fair.sequential.DISPARITIES`); its
transitions are logged as :class:`~.records.AlarmEvent` (``alarm_raised`` / ``alarm_cleared``)
at the event time of the evidence. Predictive parity and accuracy are not paged on: they move with
the base rate, which a label delay that depends on the label distorts.

**Multiplicity.** The raise level is ``h = log(horizon_cohorts * n_features / alpha)``; every
cohort (possible change point) has a budget of 1 per feature, spent on the detectors' start
weights: a group's weight is ``1 / max(share, min_share)`` normalised over the feature's tested
groups (traffic shares of the predictions before the slot), divided equally over rates and the
two sides. A feature with two groups is tested once (group one against group two is the same
hypothesis as two against one). Weighted Bonferroni with predictable weights: the expected number
of false raises of a model is at most ``alpha`` per ``horizon`` of cohorts (``docs/feedback.md``).

**Splits and replays.** A slot's strata are sums of rows, so they are the same however the stream
was split into sources or increments; only rows that arrive after their slot was evaluated (behind
the watermark) are moved to the next slot. The same increments in the same order give the same
state, alarms and events.

>>> from stream_fair.groups import feature_keys
>>> from stream_fair.verdict.increments import CellCounts, Increment, ScoreBins
>>> engine = VerdictEngine(feature_keys(["group"], []), VerdictSettings(bins=ScoreBins(count=0)))
>>> rows = []
>>> for hour in range(24):  # C's TPR falls from 0.8 to 0.5 at hour 12
...     for g, tp in (("A", 800), ("B", 800), ("C", 800 if hour < 12 else 500)):
...         labelled = (tp, 100, 900, 1000 - tp)
...         rows.append(CellCounts("m", (g,), hour, hour * 6, (690, 310), labelled, max_ts=3600.0 * hour))
>>> engine.update(Increment("p0", 86400.0, tuple(rows)))
>>> [(e.kind, e.disparity, e.group, e.direction) for e in engine.events]
[('alarm_raised', 'equal_opportunity_difference', 'C', 'below'), \
('alarm_raised', 'equalized_odds_difference', 'C', 'below')]
>>> engine.events[0].change_point_ts, engine.events[0].ts
(43200.0, 43200.0)
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from stream_fair.fairness import is_reserved
from stream_fair.groups import Cell, FeatureKey
from stream_fair.sequential import DISPARITIES
from stream_fair.verdict.cusum import NEG, CohortCusum
from stream_fair.verdict.increments import (
    BINS_ERROR,
    VERSION,
    VERSION_ERROR,
    CellCounts,
    Increment,
)
from stream_fair.verdict.records import AlarmEvent, DetectorStatus, DisparityStatus
from stream_fair.verdict.settings import VerdictSettings
from stream_fair.verdict.strata import RateColumns, Strata, feature_strata, slot_evidence, sum_by

__all__ = ["VerdictEngine"]

FEATURES_ERROR = "state was saved for features {saved}, not {given}: restore with the same feature keys"


class _Model:
    """Everything the engine keeps for one model."""

    __slots__ = ("cum", "detectors", "budget", "newest", "folded", "evidence_ts", "alarms")

    def __init__(self) -> None:
        # feature -> group -> cumulative row (all slots evaluated so far)
        self.cum: dict[str, dict[str, NDArray[np.float64]]] = {}
        self.detectors: dict[tuple[str, str, str], CohortCusum] = {}
        self.budget: dict[tuple[str, int], float] = {}
        self.newest: int | None = None
        self.folded: int | None = None  # cohorts up to this are folded in every detector
        self.evidence_ts = NEG
        # (feature, disparity) -> [raised_total, last_raised_ts, raised_by, last event]
        self.alarms: dict[tuple[str, str], list[Any]] = {}


class VerdictEngine:
    """Calibrated, cohort-stratified disparity alarms over an increment stream (module docstring)."""

    def __init__(self, features: Sequence[FeatureKey], settings: VerdictSettings | None = None) -> None:
        self.features = list(features)
        self.settings = settings or VerdictSettings()
        s = self.settings
        self._bins = s.bins.count
        self._width = 6 + 2 * self._bins
        self._zeros: tuple[int, ...] = (0,) * self._bins
        self._h = s.threshold(len(self.features))
        self._h_clear = s.clear_threshold
        self._sources: dict[str, float] = {}
        # slot -> (model, cell, cohort) -> the rows of every increment summed (bounded by the
        # cells, not by how many increments a slot collects before it closes)
        self._pending: dict[int, dict[tuple[str, Cell, int], CellCounts]] = {}
        # (model, feature, group, rate) of every detector changed since the owner last cleared it
        # (the feedback monitor checkpoints only those, see FeedbackMonitor.changes)
        self.touched: set[tuple[str, str, str, str]] = set()
        self._done: int | None = None
        self._models: dict[str, _Model] = {}
        self._events: deque[AlarmEvent] = deque(maxlen=s.max_events)
        self._seq = 0
        self._groups: dict[tuple[str, Cell], str | None] = {}
        self._columns = RateColumns(s.rates, self._bins)

    def __repr__(self) -> str:
        raised = sum(a[2] != () for m in self._models.values() for a in m.alarms.values())
        return f"VerdictEngine(models={len(self._models)}, alarms_raised={raised}, slot={self._done})"

    # -- input ---------------------------------------------------------------------------------
    def update(self, increment: Increment) -> None:
        """Queue the increment's rows, then evaluate every slot all sources have passed."""
        for c in increment.counts:
            slot = c.slot if self._done is None or c.slot > self._done else self._done + 1
            self._queue(slot, c)
        if increment.watermark is not None:
            old = self._sources.get(increment.source, NEG)
            self._sources[increment.source] = max(old, increment.watermark)
        self._advance()

    def _queue(self, slot: int, c: CellCounts) -> None:
        """Add a row to its slot's sums (from an increment or a restored state)."""
        for hist in (c.positive_scores, c.negative_scores):
            if hist and len(hist) != self._bins:  # summed, a wrong length would be cut silently
                raise ValueError(BINS_ERROR.format(got=len(hist), want=self._bins))
        rows = self._pending.setdefault(slot, {})
        key = (c.model, c.cell, c.cohort)
        old = rows.get(key)
        rows[key] = c if old is None else old.plus(c)

    def hold(self, source: str, watermark: float) -> None:
        """Set ``source``'s watermark to exactly this (lower included), then evaluate what it allows.

        For a caller that lifts a source's watermark for a while and must be able to take the lift
        back (:mod:`.fold`); slots already evaluated stay evaluated.
        """
        self._sources[source] = watermark
        self._advance()

    def retire(self, source: str) -> None:
        """Stop waiting for ``source`` (its partition was revoked or went idle)."""
        self._sources.pop(source, None)
        self._advance()

    def flush(self) -> None:
        """Evaluate every pending slot now (end of stream, or a test)."""
        for slot in sorted(self._pending):
            self._evaluate(slot, list(self._pending.pop(slot).values()))
            self._done = slot

    @property
    def sources(self) -> dict[str, float]:
        """Each source's watermark (a copy)."""
        return dict(self._sources)

    @property
    def watermark(self) -> float | None:
        """The smallest source watermark: slots ending before it have been evaluated."""
        return min(self._sources.values()) if self._sources else None

    def _advance(self) -> None:
        wm = self.watermark
        if wm is None or math.isinf(wm):
            return
        closed = math.floor(wm / self.settings.slot) - 1
        for slot in sorted(s for s in self._pending if s <= closed):
            self._evaluate(slot, list(self._pending.pop(slot).values()))
        if self._done is None or closed > self._done:
            self._done = closed

    # -- one slot ------------------------------------------------------------------------------
    def _evaluate(self, slot: int, rows: list[CellCounts]) -> None:
        by_model: dict[str, list[CellCounts]] = {}
        for c in rows:
            by_model.setdefault(c.model, []).append(c)
        for model in sorted(by_model):
            self._evaluate_model(model, by_model[model])

    def _evaluate_model(self, model: str, rows: list[CellCounts]) -> None:
        ms = self._models.get(model)
        if ms is None:
            ms = self._models[model] = _Model()
        z = self._zeros
        index: dict[tuple[Cell, int], int] = {}
        for c in rows:
            index.setdefault((c.cell, c.cohort), len(index))
        flat = np.array(
            [c.predictions + c.labelled + (c.positive_scores or z) + (c.negative_scores or z) for c in rows],
            dtype=np.float64,
        ).reshape(len(rows), self._width)
        agg = sum_by(np.array([index[(c.cell, c.cohort)] for c in rows]), flat, len(index))
        keys = list(index)
        ms.evidence_ts = max(ms.evidence_ts, max(c.max_ts for c in rows))
        newest = max(k[1] for k in keys)
        if ms.newest is None or newest > ms.newest:
            ms.newest = newest
        folded = ms.folded
        self._fold(ms)
        if ms.folded != folded:  # every detector folded a cohort
            self.touched.update((model, *k) for k in ms.detectors)
        strata = [st for f in self.features if (st := self._strata(ms, f, keys, agg)) is not None]
        touched = self._feed(ms, strata) if strata else []
        self.touched.update((model, *k) for k in touched)
        self._decide(model, ms, touched)

    def _group_of(self, f: FeatureKey, cell: Cell) -> str | None:
        key = (f.name, cell)
        g = self._groups.get(key, "")
        if g == "":
            name = f.group(cell)
            g = self._groups[key] = None if is_reserved(name) else name
        return g

    def _strata(
        self, ms: _Model, f: FeatureKey, keys: list[tuple[Cell, int]], agg: NDArray[np.float64]
    ) -> Strata | None:
        found = [(i, g) for i, (cell, _) in enumerate(keys) if (g := self._group_of(f, cell)) is not None]
        if not found:
            return None
        s = self.settings
        cum = ms.cum.setdefault(f.name, {})
        return feature_strata(f.name, found, [c for _, c in keys], agg, cum, s.weighting, s.min_share)

    def _feed(self, ms: _Model, strata: list[Strata]) -> list[tuple[str, str, str]]:
        """Every stratum's e-values, added to its detector; the detectors touched."""
        s = self.settings
        ev = slot_evidence(strata, self._columns, s.min_effect, s.use_scores)
        if ev is None:
            return []
        rates = s.rates
        # detector of each row: (feature, group) index times the number of rates plus the rate
        names = [(st.feature, g) for st in strata for g in st.groups]
        ids, inv = np.unique(ev.pair * len(rates) + ev.col, return_inverse=True)
        dets: list[tuple[tuple[str, str, str], CohortCusum]] = []
        for i in ids.tolist():
            dkey = (*names[i // len(rates)], rates[i % len(rates)])
            det = ms.detectors.get(dkey)
            if det is None:
                det = ms.detectors[dkey] = CohortCusum()
                if ms.folded is not None:
                    det.fold(ms.folded)
            dets.append((dkey, det))
        side = np.array([d.side for _, d in dets])[inv]
        values = np.column_stack([ev.raise_llr, ev.clear_llr(side, s.clear_effect), ev.x, ev.n, ev.xr, ev.nr])
        folded = ms.folded if ms.folded is not None else int(ev.cohort.min()) - 1
        late = ev.cohort <= folded
        if late.any():  # strata of folded cohorts all go to the detectors' prefixes: sum them first
            # ... but only into the tracks that cover their cohorts: the raise tracks start after
            # the last clear (a recurrence is new evidence), the clear track after the raise (late
            # labels from before a change must not clear it)
            lo = np.iinfo(np.int64).min
            start_after = np.array([lo if d.start_after is None else d.start_after for _, d in dets])[inv]
            clear_after = np.array([lo if d.clear_after is None else d.clear_after for _, d in dets])[inv]
            values[late & (ev.cohort <= start_after), 0:2] = 0.0
            values[late & (ev.cohort <= clear_after), 2] = 0.0
            summed = sum_by(inv[late], values[late], ids.size)
            for u in np.unique(inv[late]).tolist():
                v = summed[u].tolist()
                dets[u][1].add(folded, v[:3], v[3:])
        for i in np.flatnonzero(~late).tolist():
            dkey, det = dets[inv[i]]
            c = int(ev.cohort[i])
            w = self._take(ms, dkey[0], c, float(ev.weight[i]) / len(rates)) if det.wants_start(c) else 0.0
            v = values[i].tolist()
            det.add(c, v[:3], v[3:], w)
        return sorted(d[0] for d in dets)

    @staticmethod
    def _take(ms: _Model, feature: str, cohort: int, want: float) -> float:
        """Spend start weight from the (feature, cohort) budget of 1 (never more than is left)."""
        key = (feature, cohort)
        left = ms.budget.get(key, 1.0)
        got = min(want, left)
        ms.budget[key] = left - got
        return got

    # -- decisions -----------------------------------------------------------------------------
    def _decide(self, model: str, ms: _Model, touched: list[tuple[str, str, str]]) -> None:
        changed: dict[tuple[str, str, str], str] = {}
        for key in touched:
            what = ms.detectors[key].step(self._h, self._h_clear, ms.evidence_ts, ms.newest)
            if what is not None:
                changed[key] = what
        if not changed:
            return
        for fname in sorted({k[0] for k in changed}):
            for name, rates in DISPARITIES.items():
                mine = {k: v for k, v in changed.items() if k[0] == fname and k[2] in rates}
                if mine:
                    self._transition(model, ms, fname, name, rates, mine)

    def _transition(
        self,
        model: str,
        ms: _Model,
        feature: str,
        disparity: str,
        rates: tuple[str, ...],
        changed: dict[tuple[str, str, str], str],
    ) -> None:
        state = ms.alarms.setdefault((feature, disparity), [0, None, (), None])
        raised_by = tuple(
            sorted((g, r) for (f, g, r), d in ms.detectors.items() if f == feature and r in rates and d.side)
        )
        was, now = bool(state[2]), bool(raised_by)
        state[2] = raised_by
        if was == now:
            return
        if now:
            key = max(
                (k for k, v in changed.items() if v == "raised"),
                key=lambda k: (ms.detectors[k].raised_statistic, k),
            )
            det = ms.detectors[key]
            event = self._event(
                "alarm_raised", model, ms, feature, disparity, key, det.raised_statistic, self._h
            )
            state[0] += 1
            state[1] = event.ts
        else:
            key = max(k for k, v in changed.items() if v == "cleared")
            det = ms.detectors[key]
            event = self._event(
                "alarm_cleared", model, ms, feature, disparity, key, det.cleared_statistic, self._h_clear
            )
        state[3] = event
        self._events.append(event)

    def _event(
        self,
        kind: str,
        model: str,
        ms: _Model,
        feature: str,
        disparity: str,
        key: tuple[str, str, str],
        statistic: float,
        threshold: float,
    ) -> AlarmEvent:
        det = ms.detectors[key]
        start, cnt = det.raised_segment if kind == "alarm_raised" else det.cleared_segment
        self._seq += 1
        xg, ng, xr, nr = (int(v) for v in cnt)
        return AlarmEvent(
            seq=self._seq,
            kind=kind,  # type: ignore[arg-type]
            ts=ms.evidence_ts,
            model=model,
            feature=feature,
            disparity=disparity,
            group=key[1],
            rate=key[2],
            direction="below" if det.raised_side < 0 else "above",
            statistic=statistic,
            threshold=threshold,
            change_point_ts=None if start is None else start * self.settings.period,
            group_value=xg / ng if ng else None,
            rest_value=xr / nr if nr else None,
            evidence={"group_successes": xg, "group_trials": ng, "rest_successes": xr, "rest_trials": nr},
        )

    def _fold(self, ms: _Model) -> None:
        """Fold cohorts older than ``open_cohorts`` behind the newest into every detector's prefix."""
        if ms.newest is None:
            return
        upto = ms.newest - self.settings.open_cohorts
        if ms.folded is not None and upto <= ms.folded:
            return
        ms.folded = upto
        for det in ms.detectors.values():
            det.fold(upto)
        for key in [k for k in ms.budget if k[1] <= upto]:
            del ms.budget[key]

    # -- output --------------------------------------------------------------------------------
    @property
    def events(self) -> tuple[AlarmEvent, ...]:
        """The alarm event log, oldest first (the last ``settings.max_events``)."""
        return tuple(self._events)

    def events_after(self, seq: int) -> list[AlarmEvent]:
        """Events with a sequence number above ``seq`` (what a consumer has not seen yet)."""
        return [e for e in self._events if e.seq > seq]

    def alarms(self) -> dict[tuple[str, str, str], DisparityStatus]:
        """``{(model, feature, disparity): DisparityStatus}`` for every disparity with a detector."""
        out: dict[tuple[str, str, str], DisparityStatus] = {}
        for model, ms in sorted(self._models.items()):
            names = sorted({f for f, _, _ in ms.detectors})
            for fname in names:
                for name, rates in DISPARITIES.items():
                    if not any(f == fname and r in rates for f, _, r in ms.detectors):
                        continue
                    total, last_ts, raised_by, last = ms.alarms.get((fname, name), [0, None, (), None])
                    out[(model, fname, name)] = DisparityStatus(
                        bool(raised_by), total, last_ts, raised_by, last
                    )
        return out

    def detectors(self) -> dict[tuple[str, str, str, str], DetectorStatus]:
        """``{(model, feature, group, rate): DetectorStatus}`` for every detector fed so far."""
        out: dict[tuple[str, str, str, str], DetectorStatus] = {}
        for model, ms in sorted(self._models.items()):
            for (fname, group, rate), d in sorted(ms.detectors.items()):
                clear = d.clear_statistic()
                out[(model, fname, group, rate)] = DetectorStatus(
                    flagged=bool(d.side),
                    direction=None if not d.side else ("below" if d.side < 0 else "above"),
                    statistic=max(0.0, d.statistic()),
                    threshold=self._h,
                    clear_statistic=max(0.0, clear) if d.side else None,
                    clear_threshold=self._h_clear,
                    raised_total=d.raised_total,
                    cleared_total=d.cleared_total,
                    last_raised_ts=d.last_raised_ts,
                    last_cleared_ts=d.last_cleared_ts,
                )
        return out

    # -- state ---------------------------------------------------------------------------------
    def to_state(self, detectors: bool = True) -> dict[str, Any]:
        """Versioned, JSON-able state (no pickles); :meth:`from_state` restores it exactly.

        ``detectors=False``: without the detectors' states (``[]``), which the caller stores one by
        one (:meth:`detector_state`) and puts back into ``models[model]["detectors"]``."""
        models = {}
        for name, ms in self._models.items():
            models[name] = {
                "cum": [[f, g, row.tolist()] for f, by in ms.cum.items() for g, row in by.items()],
                "detectors": [[*k, d.to_state()] for k, d in ms.detectors.items()] if detectors else [],
                "budget": [[f, c, v] for (f, c), v in ms.budget.items()],
                "newest": ms.newest,
                "folded": ms.folded,
                "evidence_ts": None if math.isinf(ms.evidence_ts) else ms.evidence_ts,
                "alarms": [
                    [f, d, a[0], a[1], [list(x) for x in a[2]], None if a[3] is None else a[3].to_json()]
                    for (f, d), a in ms.alarms.items()
                ],
            }
        return {
            "version": VERSION,
            "features": [f.name for f in self.features],
            "sources": dict(self._sources),
            "done": self._done,
            "pending": [[slot, [c.to_json() for c in rows.values()]] for slot, rows in self._pending.items()],
            "models": models,
            "events": [e.to_json() for e in self._events],
            "seq": self._seq,
        }

    def detector_keys(self) -> list[tuple[str, str, str, str]]:
        """``(model, feature, group, rate)`` of every detector."""
        return [(m, *k) for m, ms in self._models.items() for k in ms.detectors]

    def detector_state(self, key: tuple[str, str, str, str]) -> Any:
        """The state of the detector ``(model, feature, group, rate)`` (as in :meth:`to_state`)."""
        model, *rest = key
        return self._models[model].detectors[tuple(rest)].to_state()  # type: ignore[index]

    @classmethod
    def from_state(
        cls, state: dict[str, Any], features: Sequence[FeatureKey], settings: VerdictSettings | None = None
    ) -> VerdictEngine:
        if state.get("version") != VERSION:
            raise ValueError(VERSION_ERROR.format(got=state.get("version"), want=VERSION))
        e = cls(features, settings)
        names = [f.name for f in e.features]
        if state["features"] != names:
            raise ValueError(FEATURES_ERROR.format(saved=state["features"], given=names))
        e._sources = {k: float(v) for k, v in state["sources"].items()}
        e._done = state["done"]
        for slot, rows in state["pending"]:  # a state saved before rows were summed is summed here
            for r in rows:
                e._queue(int(slot), CellCounts.from_json(r))
        for name, m in state["models"].items():
            ms = e._models[name] = _Model()
            for f, g, row in m["cum"]:
                ms.cum.setdefault(f, {})[g] = np.array(row, dtype=np.float64)
            ms.detectors = {(f, g, r): CohortCusum.from_state(d) for f, g, r, d in m["detectors"]}
            ms.budget = {(f, int(c)): float(v) for f, c, v in m["budget"]}
            ms.newest = m["newest"]
            ms.folded = m["folded"]
            ms.evidence_ts = NEG if m["evidence_ts"] is None else float(m["evidence_ts"])
            for f, d, total, last_ts, raised_by, last in m["alarms"]:
                event = None if last is None else AlarmEvent.from_json(last)
                ms.alarms[(f, d)] = [int(total), last_ts, tuple(tuple(x) for x in raised_by), event]
        e._events.extend(AlarmEvent.from_json(x) for x in state["events"])
        e._seq = int(state["seq"])
        return e
