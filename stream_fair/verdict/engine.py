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
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from stream_fair.fairness import is_reserved
from stream_fair.groups import Cell, FeatureKey
from stream_fair.sequential import DISPARITIES, RATES
from stream_fair.verdict.cusum import NEG, CohortCusum
from stream_fair.verdict.evidence import chain_log_lr, design_log_psi, proportional_odds_chain
from stream_fair.verdict.fisher import fisher_log_lr
from stream_fair.verdict.increments import (
    BINS_ERROR,
    VERSION,
    VERSION_ERROR,
    CellCounts,
    Increment,
)
from stream_fair.verdict.records import AlarmEvent, DetectorStatus, DisparityStatus
from stream_fair.verdict.settings import VerdictSettings

__all__ = ["VerdictEngine"]

FEATURES_ERROR = "state was saved for features {saved}, not {given}: restore with the same feature keys"

_LAB = 2  # labelled counts start at column 2, in sequential.Counts order (tp, fp, tn, fn)


def _rate_columns(rate: str, bins: int) -> tuple[list[int], list[int], slice | None]:
    """Row columns summed into successes and trials, and the score-histogram columns of a rate."""
    if rate == "selection_rate":  # from all predictions [n0, n1], not from labelled pairs
        return [1], [0, 1], None
    num, den = RATES[rate]
    hist = slice(6, 6 + bins) if rate == "true_positive_rate" else slice(6 + bins, 6 + 2 * bins)
    return [_LAB + i for i in num], [_LAB + i for i in den], hist if bins else None


def _sum_by(index: NDArray[np.int64], rows: NDArray[np.float64], size: int) -> NDArray[np.float64]:
    """Rows summed by ``index`` into ``size`` rows (a one-hot product: faster than ``np.add.at``)."""
    if size * index.size > 4_000_000:  # a huge slot: do not build a huge one-hot matrix
        out = np.zeros((size, rows.shape[1]))
        np.add.at(out, index, rows)
        return out
    onehot = np.zeros((size, index.size))
    onehot[index, np.arange(index.size)] = 1.0
    return np.asarray(onehot @ rows)


@dataclass
class _Strata:
    """One feature's strata of one slot: row ``i`` is ``groups[group[i]]`` in cohort ``cohort[i]``."""

    feature: str
    groups: list[str]
    cohort: NDArray[np.int64]
    group: NDArray[np.int64]
    own: NDArray[np.float64]
    rest: NDArray[np.float64]  # the rest of the feature in the same cohort and slot
    rest_before: NDArray[np.float64]  # the rest's cumulative row before the slot
    weight: NDArray[np.float64]  # the group's start weight (0: not tested)


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
        self._pending: dict[int, list[CellCounts]] = {}
        self._done: int | None = None
        self._models: dict[str, _Model] = {}
        self._events: deque[AlarmEvent] = deque(maxlen=s.max_events)
        self._seq = 0
        self._groups: dict[tuple[str, Cell], str | None] = {}
        # rate columns as matrices: row @ num = successes, row @ den = trials (one column per rate)
        self._num = np.zeros((self._width, len(s.rates)))
        self._den = np.zeros((self._width, len(s.rates)))
        self._hist_of_rate = np.full(len(s.rates), -1, dtype=np.int64)
        for j, rate in enumerate(s.rates):
            num, den, hist = _rate_columns(rate, self._bins)
            self._num[num, j] = 1.0
            self._den[den, j] = 1.0
            if hist is not None:
                self._hist_of_rate[j] = hist.start

    def __repr__(self) -> str:
        raised = sum(a[2] != () for m in self._models.values() for a in m.alarms.values())
        return f"VerdictEngine(models={len(self._models)}, alarms_raised={raised}, slot={self._done})"

    # -- input ---------------------------------------------------------------------------------
    def update(self, increment: Increment) -> None:
        """Queue the increment's rows, then evaluate every slot all sources have passed."""
        for c in increment.counts:
            for hist in (c.positive_scores, c.negative_scores):
                if hist and len(hist) != self._bins:
                    raise ValueError(BINS_ERROR.format(got=len(hist), want=self._bins))
            slot = c.slot if self._done is None or c.slot > self._done else self._done + 1
            self._pending.setdefault(slot, []).append(c)
        if increment.watermark is not None:
            old = self._sources.get(increment.source, NEG)
            self._sources[increment.source] = max(old, increment.watermark)
        self._advance()

    def retire(self, source: str) -> None:
        """Stop waiting for ``source`` (its partition was revoked or went idle)."""
        self._sources.pop(source, None)
        self._advance()

    def flush(self) -> None:
        """Evaluate every pending slot now (end of stream, or a test)."""
        for slot in sorted(self._pending):
            self._evaluate(slot, self._pending.pop(slot))
            self._done = slot

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
            self._evaluate(slot, self._pending.pop(slot))
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
        agg = _sum_by(np.array([index[(c.cell, c.cohort)] for c in rows]), flat, len(index))
        keys = list(index)
        ms.evidence_ts = max(ms.evidence_ts, max(c.max_ts for c in rows))
        newest = max(k[1] for k in keys)
        if ms.newest is None or newest > ms.newest:
            ms.newest = newest
        self._fold(ms)
        strata = [st for f in self.features if (st := self._strata(ms, f, keys, agg)) is not None]
        touched = self._feed(ms, strata) if strata else []
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
    ) -> _Strata | None:
        """Sum the slot's rows of feature ``f`` into (cohort, group) strata; update its totals."""
        found = [(i, g) for i, (cell, _) in enumerate(keys) if (g := self._group_of(f, cell)) is not None]
        if not found:
            return None
        keep = [i for i, _ in found]
        cum = ms.cum.setdefault(f.name, {})
        groups = sorted(set(cum) | {g for _, g in found})
        gid = {g: i for i, g in enumerate(groups)}
        big = len(groups)
        key = np.array([keys[i][1] * big + gid[g] for i, g in found], dtype=np.int64)
        ukey, inv = np.unique(key, return_inverse=True)
        own = _sum_by(inv, agg[keep], ukey.size)
        cohort, g_idx = ukey // big, ukey % big
        ucoh, cinv = np.unique(cohort, return_inverse=True)
        totals = _sum_by(cinv, own, ucoh.size)
        zero = np.zeros(self._width)
        before = np.array([cum.get(g, zero) for g in groups])
        added = _sum_by(g_idx, own, big)
        for i in np.flatnonzero(added.any(axis=1)).tolist():
            cum[groups[i]] = before[i] + added[i]
        return _Strata(
            feature=f.name,
            groups=groups,
            cohort=cohort,
            group=g_idx,
            own=own,
            rest=totals[cinv] - own,
            rest_before=before.sum(axis=0)[None, :] - before[g_idx],
            weight=self._weights(groups, before)[g_idx],
        )

    def _weights(self, groups: list[str], before: NDArray[np.float64]) -> NDArray[np.float64]:
        """Start weight of each group (0 when untested), summing to 1 over the tested groups.

        Two groups are one hypothesis (group one against two is two against one): only the first
        is tested.
        """
        s = self.settings
        tested = 1 if len(groups) == 2 else len(groups)
        w = np.zeros(len(groups))
        if s.weighting == "uniform" or tested == 1:
            w[:tested] = 1.0 / tested
            return w
        n = before[:, :2].sum(axis=1)
        share = n / n.sum() if n.sum() > 0 else np.zeros(len(groups))
        inv = 1.0 / np.maximum(share, s.min_share)
        return np.asarray(inv / inv.sum())

    def _feed(self, ms: _Model, strata: list[_Strata]) -> list[tuple[str, str, str]]:
        """Every stratum's e-values, added to its detector; the detectors touched."""
        s = self.settings
        own = np.concatenate([st.own for st in strata])
        rest = np.concatenate([st.rest for st in strata])
        num, den = self._num, self._den
        x_all, n_all, xr_all, nr_all = own @ num, own @ den, rest @ num, rest @ den
        rest_before = np.concatenate([st.rest_before for st in strata])
        cx, cn = rest_before @ num, rest_before @ den
        weight = np.concatenate([st.weight for st in strata])
        row, col = np.nonzero((n_all > 0) & (nr_all > 0) & (weight[:, None] > 0))
        if row.size == 0:
            return []
        x, n, xr, nr = x_all[row, col], n_all[row, col], xr_all[row, col], nr_all[row, col]
        # the rest's rate before this slot; the stratum's pooled rate (a margin) until known
        known = cn[row, col] >= 20
        ref = np.where(known, cx[row, col] / np.maximum(cn[row, col], 1.0), (x + xr) / (n + nr))
        lp = design_log_psi(ref, s.min_effect)
        raise_llr = np.zeros((row.size, 2))
        scored = self._score_chains(own, rest, rest_before, row, col, n, nr, lp, raise_llr)
        plain = np.flatnonzero(~scored)
        if plain.size:
            raise_llr[plain] = fisher_log_lr(x[plain], n[plain], nr[plain], x[plain] + xr[plain], lp[plain])
        # detector of each row: (feature, group) index times the number of rates plus the rate
        base = np.cumsum([0] + [len(st.groups) for st in strata])
        pair = np.concatenate([base[k] + st.group for k, st in enumerate(strata)])
        det_id = pair[row] * len(s.rates) + col
        names = [(st.feature, g) for st in strata for g in st.groups]
        ids, inv = np.unique(det_id, return_inverse=True)
        dets: list[tuple[tuple[str, str, str], CohortCusum]] = []
        for i in ids.tolist():
            dkey = (*names[i // len(s.rates)], s.rates[i % len(s.rates)])
            det = ms.detectors.get(dkey)
            if det is None:
                det = ms.detectors[dkey] = CohortCusum()
                if ms.folded is not None:
                    det.fold(ms.folded)
            dets.append((dkey, det))
        clear = np.zeros(row.size)
        raised = np.array([d.side for _, d in dets])[inv]
        up = np.flatnonzero(raised)
        if up.size:
            side = (raised[up] > 0).astype(int)  # column 0: the group below the rest, 1: above
            psi_clear = design_log_psi(ref[up], s.clear_effect)[np.arange(up.size), side]
            clear[up] = -fisher_log_lr(x[up], n[up], nr[up], x[up] + xr[up], psi_clear)
        cohort = np.concatenate([st.cohort for st in strata])[row]
        values = np.column_stack([raise_llr, clear, x, n, xr, nr])
        folded = ms.folded if ms.folded is not None else int(cohort.min()) - 1
        late = cohort <= folded
        if late.any():  # strata of folded cohorts all go to the detectors' prefixes: sum them first
            summed = _sum_by(inv[late], values[late], ids.size)
            for u in np.unique(inv[late]).tolist():
                v = summed[u].tolist()
                dets[u][1].add(folded, v[:3], v[3:])
        weight = np.concatenate([st.weight for st in strata])[row] / len(s.rates)
        for i in np.flatnonzero(~late).tolist():
            dkey, det = dets[inv[i]]
            c = int(cohort[i])
            w = self._take(ms, dkey[0], c, float(weight[i])) if det.wants_start(c) else 0.0
            v = values[i].tolist()
            det.add(c, v[:3], v[3:], w)
        return sorted(d[0] for d in dets)

    def _score_chains(
        self,
        own: NDArray[np.float64],
        rest: NDArray[np.float64],
        rest_before: NDArray[np.float64],
        row: NDArray[np.int64],
        col: NDArray[np.int64],
        n: NDArray[np.float64],
        nr: NDArray[np.float64],
        lp: NDArray[np.float64],
        raise_llr: NDArray[np.float64],
    ) -> NDArray[np.bool_]:
        """Raise e-values of the score chain where every pair of a stratum has a score.

        Writes them into ``raise_llr`` and returns which rows got one.
        """
        done = np.zeros(row.size, dtype=bool)
        if not (self.settings.use_scores and self._bins):
            return done
        start = self._hist_of_rate[col]  # first histogram column of the row's rate, or -1
        pos = np.flatnonzero(start >= 0)
        if pos.size == 0:
            return done
        cols = start[pos][:, None] + np.arange(self._bins)[None, :]
        hg = own[row[pos][:, None], cols]
        ht = hg + rest[row[pos][:, None], cols]
        scored = (hg.sum(axis=1) == n[pos]) & (ht.sum(axis=1) == n[pos] + nr[pos])
        pos, hg, ht, cols = pos[scored], hg[scored], ht[scored], cols[scored]
        if pos.size == 0:
            return done
        # reference: the rest's score histogram before the slot
        chain = proportional_odds_chain(rest_before[row[pos][:, None], cols], lp[pos])
        raise_llr[pos] = chain_log_lr(hg, ht, chain)
        done[pos] = True
        return done

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
    def to_state(self) -> dict[str, Any]:
        """Versioned, JSON-able state (no pickles); :meth:`from_state` restores it exactly."""
        models = {}
        for name, ms in self._models.items():
            models[name] = {
                "cum": [[f, g, row.tolist()] for f, by in ms.cum.items() for g, row in by.items()],
                "detectors": [[*k, d.to_state()] for k, d in ms.detectors.items()],
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
            "pending": [[slot, [c.to_json() for c in rows]] for slot, rows in self._pending.items()],
            "models": models,
            "events": [e.to_json() for e in self._events],
            "seq": self._seq,
        }

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
        e._pending = {int(slot): [CellCounts.from_json(r) for r in rows] for slot, rows in state["pending"]}
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
