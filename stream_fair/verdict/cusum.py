"""A cohort-ordered e-detector with hysteresis: raise on evidence of a gap, clear on evidence of none.

Written by hand: river's drift detectors carry no false-alarm guarantee over a stream, and none
is indexed by prediction time while its data arrive in label time.

One detector watches one (feature, group, rate). Its data arrive as stratum log e-values
:math:`\\ell_{c,t}` (cohort :math:`c`, slot :math:`t`; :mod:`.evidence`), each with conditional
mean at most 0 in the exponent (``E[exp(l)] <= 1``) under the detector's null given everything
before. Late labels keep arriving for old cohorts, so the detector is indexed by *prediction
time*: with :math:`S_c(t) = \\sum_{u \\le t} \\ell_{c,u}` and a start weight :math:`w_j`,

.. math:: U(t) = \\max_j \\Big( \\log w_j + \\sum_{c \\ge j} S_c(t) \\Big),

computed by the CUSUM recursion :math:`U_c = S_c + \\max(\\log w_c, U_{c-1})` over the open
cohorts. For each start :math:`j`, :math:`M^j_t = \\exp \\sum_{c \\ge j} S_c(t)` is a product of
e-values over strata chosen before their data were seen, hence a non-negative supermartingale in
slot time started at 1; by Ville's inequality :math:`P(\\sup_t w_j M^j_t \\ge e^h) \\le w_j
e^{-h}`. Summed over starts and detectors with :math:`\\sum w \\le 1` per start (the engine's
budget), **the expected number of false raises per cohort is at most** :math:`e^{-h}` **for all the
detectors that share the budget**. A start at cohort :math:`j` sees only predictions made in or
after :math:`j`: labels of older predictions that arrive after a change do not dilute it.

Cohorts older than ``open_cohorts`` are folded into one prefix (bounded memory): the prefix keeps
the best start among them, and late strata of folded cohorts are added to it, which every start
in the prefix includes -- still a product of e-values chosen in advance.

**Hysteresis.** When a side reaches ``h`` the detector is raised; from then on the raise
statistics are frozen and a *clear* statistic runs, over starts at cohorts newer than the raise
only, on stratum log e-values of "no gap" (odds ratio 1) against "gap of ``clear_effect``"
(:math:`-\\log` of the Fisher ratio at that odds ratio). Under a persisting gap of at least
``clear_effect`` those are e-values (monotone likelihood ratio), so **P(the alarm clears while the
gap stays at least clear_effect in every cohort after the raise) <= e^{-h_c}** per start. On clear
everything restarts, with starts only at cohorts newer than the clear.

>>> det = CohortCusum()
>>> for cohort in range(3):
...     det.add(cohort, (1.0, -1.0, 0.0), (10, 20, 100, 100), weight=0.5)
>>> round(det.statistic(), 4)  # log(0.5 / 2) + 3 nats
1.6137
>>> det.step(h=1.5, h_clear=5.0, ts=42.0, newest=2)
'raised'
>>> det.side, det.raised_total, det.raised_segment[0]
(-1, 1, 0)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = ["CohortCusum"]

NEG = -math.inf
_DOWN, _UP, _CLEAR, _W, _WC, _XG, _NG, _XR, _NR = range(9)
_LOG2 = math.log(2.0)

Segment = tuple[int | None, list[float]]


def _enc(x: float) -> float | None:
    return None if math.isinf(x) else x


def _dec(x: float | None) -> float:
    return NEG if x is None else float(x)


class CohortCusum:
    """Two one-sided raise statistics and one clear statistic over prediction-time cohorts."""

    __slots__ = (
        "open",
        "prefix",
        "folded_upto",
        "side",
        "start_after",
        "clear_after",
        "raised_total",
        "cleared_total",
        "last_raised_ts",
        "last_cleared_ts",
        "raised_side",
        "raised_statistic",
        "raised_segment",
        "cleared_statistic",
        "cleared_segment",
    )

    def __init__(self) -> None:
        # cohort -> [S_down, S_up, S_clear, log w (per side), log w (clear), xg, ng, xr, nr]
        self.open: dict[int, list[float]] = {}
        # per track (down, up, clear): [value, start cohort, counts]
        self.prefix: list[list[Any]] = [[NEG, None, [0.0] * 4] for _ in range(3)]
        self.folded_upto: int | None = None
        self.side = 0  # 0 quiet, -1 raised with the group below the rest, +1 above
        self.start_after: int | None = None  # raise starts only at cohorts after this
        self.clear_after: int | None = None  # clear starts only at cohorts after this
        self.raised_total = 0
        self.cleared_total = 0
        self.last_raised_ts: float | None = None
        self.last_cleared_ts: float | None = None
        self.raised_side = 0  # side of the last raise (kept after the clear)
        self.raised_statistic = NEG
        self.raised_segment: Segment = (None, [0.0] * 4)
        self.cleared_statistic = NEG
        self.cleared_segment: Segment = (None, [0.0] * 4)

    def __repr__(self) -> str:
        state = {0: "quiet", -1: "raised (below)", 1: "raised (above)"}[self.side]
        return f"CohortCusum({state}, statistic={self.statistic():.2f}, open={len(self.open)})"

    def wants_start(self, cohort: int) -> bool:
        """True when data of ``cohort`` would open a new raise start (the engine then spends weight)."""
        return (
            self.side == 0
            and cohort not in self.open
            and (self.folded_upto is None or cohort > self.folded_upto)
            and (self.start_after is None or cohort > self.start_after)
        )

    def add(self, cohort: int, llr: Sequence[float], counts: Sequence[float], weight: float = 0.0) -> None:
        """Add one stratum: log e-values ``(down, up, clear)`` and counts ``(xg, ng, xr, nr)``.

        ``weight`` is the start weight granted when :meth:`wants_start` was True (shared by the
        two sides); it is ignored otherwise.
        """
        if self.folded_upto is not None and cohort <= self.folded_upto:
            for t in range(3):
                p = self.prefix[t]
                if p[0] > NEG:
                    p[0] += llr[t]
                    for i in range(4):
                        p[2][i] += counts[i]
            return
        rec = self.open.get(cohort)
        if rec is None:
            start = weight > 0.0 and self.wants_start(cohort)
            lw = math.log(weight) - _LOG2 if start else NEG
            clear_ok = self.side != 0 and (self.clear_after is None or cohort > self.clear_after)
            rec = self.open[cohort] = [0.0, 0.0, 0.0, lw, 0.0 if clear_ok else NEG, 0.0, 0.0, 0.0, 0.0]
        rec[_DOWN] += llr[0]
        rec[_UP] += llr[1]
        rec[_CLEAR] += llr[2]
        rec[_XG] += counts[0]
        rec[_NG] += counts[1]
        rec[_XR] += counts[2]
        rec[_NR] += counts[3]

    def _track(self, t: int) -> tuple[float, int | None, list[float]]:
        value, start, cnt = self.prefix[t][0], self.prefix[t][1], list(self.prefix[t][2])
        w = _W if t < 2 else _WC
        for c in sorted(self.open):
            rec = self.open[c]
            if rec[w] > NEG and rec[w] >= value:
                value, start, cnt = rec[w], c, [0.0] * 4
            value += rec[t]
            for i in range(4):
                cnt[i] += rec[_XG + i]
        return value, start, cnt

    def _raise_tracks(self) -> tuple[float, float]:
        """Values of the two raise tracks in one pass (the hot path of :meth:`step`)."""
        down, up = self.prefix[_DOWN][0], self.prefix[_UP][0]
        for c in sorted(self.open):
            rec = self.open[c]
            w = rec[_W]
            if w > NEG:
                if w >= down:
                    down = w
                if w >= up:
                    up = w
            down += rec[_DOWN]
            up += rec[_UP]
        return down, up

    def statistic(self) -> float:
        """The larger raise statistic (frozen at the raise while raised); -inf before any start."""
        if self.side:
            return self.raised_statistic
        return max(self._raise_tracks())

    def clear_statistic(self) -> float:
        """The clear statistic while raised, else -inf."""
        return self._track(_CLEAR)[0] if self.side else NEG

    def step(self, h: float, h_clear: float, ts: float, newest: int | None) -> str | None:
        """Raise or clear if a statistic reached its level; ``'raised'``, ``'cleared'`` or None.

        ``ts`` is the event time of the evidence, ``newest`` the newest cohort seen so far.
        """
        if self.side == 0:
            if max(self._raise_tracks()) < h:
                return None
            down, up = self._track(_DOWN), self._track(_UP)
            best, side = (down, -1) if down[0] >= up[0] else (up, 1)
            self.side, self.raised_side = side, side
            self.raised_total, self.last_raised_ts = self.raised_total + 1, ts
            self.raised_statistic, self.raised_segment = best[0], (best[1], best[2])
            self.clear_after = newest
            for rec in self.open.values():
                rec[_CLEAR], rec[_WC] = 0.0, NEG
            self.prefix[_CLEAR] = [NEG, None, [0.0] * 4]
            return "raised"
        clear = self._track(_CLEAR)
        if clear[0] < h_clear:
            return None
        self.cleared_statistic, self.cleared_segment = clear[0], (clear[1], clear[2])
        self.side, self.cleared_total, self.last_cleared_ts = 0, self.cleared_total + 1, ts
        self.start_after = newest
        for rec in self.open.values():
            rec[_DOWN] = rec[_UP] = rec[_CLEAR] = 0.0
            rec[_W] = rec[_WC] = NEG
        self.prefix = [[NEG, None, [0.0] * 4] for _ in range(3)]
        return "cleared"

    def fold(self, upto: int) -> None:
        """Fold open cohorts ``<= upto`` into the prefix (they stop being separate starts)."""
        if self.folded_upto is not None and upto <= self.folded_upto:
            return
        old = sorted(c for c in self.open if c <= upto)
        for c in old:
            rec = self.open.pop(c)
            for t in range(3):
                p = self.prefix[t]
                w = rec[_W if t < 2 else _WC]
                if w > NEG and w >= p[0]:
                    p[0], p[1], p[2] = w, c, [0.0] * 4
                p[0] += rec[t]
                for i in range(4):
                    p[2][i] += rec[_XG + i]
        self.folded_upto = upto

    # -- state -------------------------------------------------------------------------------
    def to_state(self) -> dict[str, Any]:
        return {
            "open": [[c, *(_enc(v) for v in rec)] for c, rec in sorted(self.open.items())],
            "prefix": [[_enc(p[0]), p[1], list(p[2])] for p in self.prefix],
            "folded_upto": self.folded_upto,
            "side": self.side,
            "start_after": self.start_after,
            "clear_after": self.clear_after,
            "raised_total": self.raised_total,
            "cleared_total": self.cleared_total,
            "last_raised_ts": self.last_raised_ts,
            "last_cleared_ts": self.last_cleared_ts,
            "raised_side": self.raised_side,
            "raised_statistic": _enc(self.raised_statistic),
            "raised_segment": [self.raised_segment[0], list(self.raised_segment[1])],
            "cleared_statistic": _enc(self.cleared_statistic),
            "cleared_segment": [self.cleared_segment[0], list(self.cleared_segment[1])],
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> CohortCusum:
        d = cls()
        d.open = {int(r[0]): [_dec(v) for v in r[1:]] for r in state["open"]}
        d.prefix = [[_dec(p[0]), p[1], [float(v) for v in p[2]]] for p in state["prefix"]]
        d.folded_upto = state["folded_upto"]
        d.side = int(state["side"])
        d.start_after, d.clear_after = state["start_after"], state["clear_after"]
        d.raised_total, d.cleared_total = int(state["raised_total"]), int(state["cleared_total"])
        d.last_raised_ts, d.last_cleared_ts = state["last_raised_ts"], state["last_cleared_ts"]
        d.raised_side = int(state["raised_side"])
        d.raised_statistic = _dec(state["raised_statistic"])
        start, cnt = state["raised_segment"]
        d.raised_segment = (start, [float(v) for v in cnt])
        d.cleared_statistic = _dec(state["cleared_statistic"])
        start, cnt = state["cleared_segment"]
        d.cleared_segment = (start, [float(v) for v in cnt])
        return d
