"""The simulator's scenarios as numpy arrays, and the verdict engine's increments from them.

:func:`draw` consumes the simulator's random streams exactly as
:func:`stream_fair.dev.simulate.generate` does (same chunks, same draws, same order), so its
arrays are the events ``generate`` would emit for the same seed -- without building a payload dict
per event, which is what lets ``bench/detection.py`` run hundreds of 1,000,000-event streams
(``tests/test_verdict_engine.py`` checks the equality). :func:`increments` counts them into the
verdict engine's :class:`~stream_fair.verdict.increments.CellCounts`, one increment per arrival
slot.

>>> from stream_fair.dev.simulate import SCENARIOS
>>> from stream_fair.verdict import VerdictSettings
>>> stream = draw(SCENARIOS["fair"](), 1_000, seed=1)
>>> incs = list(increments(stream, VerdictSettings()))
>>> sum(c.predictions[0] + c.predictions[1] for i in incs for c in i.counts)
1000
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from stream_fair.dev.simulate import (
    Scenario,
    _arrival_chunks,
    _Compiled,
    _delays,
    _period_shares,
    _scores,
    _timeline,
)
from stream_fair.verdict import CellCounts, Increment, VerdictSettings

START_TS = 1_790_000_000.0  # generate's default start


@dataclass(frozen=True)
class Stream:
    """One drawn stream: per prediction its time, cell, label, decision, score and outcome."""

    ts: np.ndarray
    cell: np.ndarray  # index into ``cells``
    label: np.ndarray
    pred: np.ndarray
    score: np.ndarray
    labelled: np.ndarray
    outcome_ts: np.ndarray  # NaN when never labelled
    cells: list[tuple[str, ...]]
    names: list[str]

    def group(self, feature: str) -> np.ndarray:
        """Each prediction's group of ``feature`` (a marginal)."""
        i = self.names.index(feature)
        return np.array([c[i] for c in self.cells])[self.cell]


def draw(scenario: Scenario, n: int, seed: int, rate_per_s: float = 1.0) -> Stream:
    """The events of ``generate(scenario, n, seed=seed, rate_per_s=rate_per_s)`` as arrays."""
    c = _Compiled(scenario)
    t = _timeline(scenario, c, n)
    rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(2)[1])
    parts: list[tuple[np.ndarray, ...]] = []
    lo = 0
    for ts in _arrival_chunks(seed, n, START_TS, rate_per_s):
        m = len(ts)
        index = np.arange(lo, lo + m)
        u = rng.random((len(c.names) + 6, m))
        period = index // t.period_len
        codes = np.zeros(m, np.int64)
        for f in range(len(c.names)):
            fcodes = np.empty(m, np.int64)
            for p in np.unique(period):
                sel = period == p
                cum = np.cumsum(_period_shares(c, t, int(p))[f])
                fcodes[sel] = np.minimum(np.searchsorted(cum, u[f][sel], side="right"), len(cum) - 1)
            codes += fcodes * c.radix[f]
        k = len(c.names)
        br = c.base_rate[codes]
        if c.feedback is not None:
            br = np.where(c.mask([c.feedback])[codes], np.clip(br * t.br_factor[period], 0, 1), br)
        tpr = np.clip(c.tpr[codes] - scenario.tpr_drop * t.ramp(index) * c.drift[codes], 0, 1)
        label = u[k + 1] < br
        rate = np.where(label, tpr, c.fpr[codes])
        pred = u[k + 2] < rate
        score = _scores(pred, u[k + 3], rate)
        observed = (u[k + 4] < c.label_prob[codes]) & ~(c.only_approved[codes] & ~pred)
        mean = c.delay_mean[codes] * np.where(label, c.positive_delay[codes], 1.0)
        delay = _delays(scenario.label_delay, mean, u[k + 5])
        parts.append((ts, codes, label, pred, score, observed, np.where(observed, ts + delay, np.nan)))
        lo += m
    ts, codes, label, pred, score, observed, out = (np.concatenate(a) for a in zip(*parts, strict=True))
    cells = [tuple(c.values[f][v] for f, v in enumerate(cell)) for cell in c.cells]
    return Stream(ts, codes, label, pred, score, observed, out, cells, list(c.names))


def increments(
    stream: Stream, settings: VerdictSettings, model: str = "m", source: str = "bench"
) -> Iterator[Increment]:
    """One :class:`Increment` per arrival slot, in slot order, its watermark the slot's end.

    The run ends with the last prediction: outcomes arriving later are not part of it.
    """
    s = settings
    bins = s.bins.count
    width = 6 + 2 * bins
    cohort = np.floor(stream.ts / s.period).astype(np.int64)
    lab = stream.labelled & (stream.outcome_ts <= stream.ts[-1])
    slot = np.concatenate([np.floor(stream.ts / s.slot), np.floor(stream.outcome_ts[lab] / s.slot)]).astype(
        np.int64
    )
    cell = np.concatenate([stream.cell, stream.cell[lab]])
    coh = np.concatenate([cohort, cohort[lab]])
    y, p = stream.label[lab], stream.pred[lab]
    col = [stream.pred.astype(np.int64), 2 + np.where(p, np.where(y, 0, 1), np.where(y, 3, 2))]
    when = [stream.ts, stream.outcome_ts[lab]]
    if bins:
        sbin = s.bins.indices(stream.score[lab]) + np.where(y, 6, 6 + bins)
        slot = np.concatenate([slot, slot[stream.ts.size :]])
        cell = np.concatenate([cell, cell[stream.ts.size :]])
        coh = np.concatenate([coh, coh[stream.ts.size :]])
        col.append(sbin)
        when.append(stream.outcome_ts[lab])
    column = np.concatenate(col)
    event_ts = np.concatenate(when)
    s0, c0 = int(slot.min()), int(coh.min())
    n_cells, n_coh = len(stream.cells), int(coh.max()) - c0 + 1
    key = ((slot - s0) * n_cells + cell) * n_coh + (coh - c0)
    ukey, inv = np.unique(key, return_inverse=True)
    counts = np.bincount(inv * width + column, minlength=ukey.size * width).reshape(ukey.size, width)
    max_ts = np.full(ukey.size, -np.inf)
    np.maximum.at(max_ts, inv, event_ts)
    u_slot = ukey // (n_cells * n_coh) + s0
    u_cell = (ukey // n_coh) % n_cells
    u_coh = ukey % n_coh + c0
    bounds = np.flatnonzero(np.diff(u_slot)) + 1
    rows = counts.tolist()
    for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, ukey.size], strict=True):
        batch = []
        for i in range(int(lo), int(hi)):
            r = rows[i]
            batch.append(
                CellCounts(
                    model,
                    stream.cells[u_cell[i]],
                    int(u_coh[i]),
                    int(u_slot[i]),
                    (r[0], r[1]),
                    (r[2], r[3], r[4], r[5]),
                    tuple(r[6 : 6 + bins]) if bins and any(r[6 : 6 + bins]) else (),
                    tuple(r[6 + bins :]) if bins and any(r[6 + bins :]) else (),
                    float(max_ts[i]),
                )
            )
        yield Increment(source, (int(u_slot[lo]) + 1) * s.slot, tuple(batch))
