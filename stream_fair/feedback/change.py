"""Calibrated change detectors: has one group's rate moved away from the rest of its feature?

A verdict built on cumulative counts dilutes a recent change into all of history; a change
detector looks at post-change data only. For every group :math:`g` and rate (``selection_rate``,
``true_positive_rate``, ``false_positive_rate``) two one-sided CUSUMs compare :math:`g` with the
pooled rest of the feature, batch by batch.

**The e-value of one batch** (written by hand: river's detectors carry no false-alarm guarantee
over a stream). In a batch group :math:`g` has :math:`x` successes in :math:`n` trials (TP out of
TP+FN for the TPR, ...), the rest :math:`y` in :math:`m`. Conditional on the margins
:math:`s = x + y`, :math:`x` follows Fisher's noncentral hypergeometric law with odds ratio
:math:`\\psi` (the odds of :math:`g` over the odds of the rest); under equal rates
:math:`\\psi = 1`, *whatever the common rate is*, even if it moves between batches (a model update
that touches every group is not a disparity). The likelihood ratio

.. math:: L(\\psi_1) = \\frac{\\psi_1^{x} \\,/\\, \\sum_k \\binom{n}{k}\\binom{m}{s-k}\\psi_1^k}
                           {1 \\,/\\, \\sum_k \\binom{n}{k}\\binom{m}{s-k}}

has expectation 1 under :math:`\\psi = 1` (and at most 1 on the far side of 1, the likelihood
ratio being monotone in :math:`x`). The alternatives are set to the design shift ``min_effect``
:math:`\\delta` (default 0.10) from the rest's rate :math:`r` measured *before* the batch:
:math:`\\psi_1^{\\pm} = \\mathrm{odds}(r \\pm \\delta) / \\mathrm{odds}(r)` (clipped to
[0.001, 0.999]), so the choice is predictable and cannot break validity.

**CUSUM and its guarantee.** :math:`W_k = \\max(0, W_{k-1} + \\log L_k)`; it raises when
:math:`W_k \\ge h`. :math:`e^{W_k} = \\max_j \\prod_{i=j}^{k} L_i` is a maximum of products each
of which is a non-negative (super)martingale started at 1 under the null, so by Ville's inequality
each start crosses :math:`e^h` with probability at most :math:`e^{-h}`, and by the union bound

.. math:: P(\\text{a detector raises within its first } N \\text{ batches}) \\le N e^{-h}

(an e-detector, Shin, Ramdas & Rinaldo 2023; Lorden 1971: average run length
:math:`\\ge e^h` batches). With :math:`K = 2 R G` detectors in a feature (two sides, R rates,
G groups) and a horizon of ``horizon`` labelled events (at most ``horizon / batch`` batches),

.. math:: h = \\log \\frac{2 R G \\cdot \\mathrm{horizon} / \\mathrm{batch}}{\\alpha}

gives **P(any false raise in the feature within ``horizon`` labelled events) <= alpha**, and at
most :math:`K e^{-h}` expected false raises per batch at any time (each detector's average run
length is at least :math:`e^h` batches). Defaults (alpha 0.05, horizon 2,000,000, batch 1,000,
3 rates, 5 groups): h = log(1.2e6) = 14.0 nats, at most 0.025 expected false raises per 10^6
labelled events (a bound; ``docs/detection.md`` measures it). G is the number of non-reserved
groups seen so far (the threshold rises as groups appear). A false raise is a raise while group
and rest have equal rates in every batch; a small persistent difference (below ``min_effect``)
is *not* covered: such a detector drifts up slowly and may raise, which is a true (small)
difference, not a false alarm.

**After a raise** the detector stays raised while :math:`W \\ge h` (W is capped at ``2h`` so a
change that goes away clears within about h nats of evidence); when it falls below h it clears
and both sides restart at 0, so the next raise needs fresh evidence and keeps the guarantee.

>>> det = ChangeDetectors(ChangeSettings(batch=100, horizon=250_000))
>>> round(det.threshold(2), 2)
13.3
>>> import random
>>> rng = random.Random(0)
>>> cum = {"A": [0, 0, 0, 0], "B": [0, 0, 0, 0]}
>>> for step in range(2000):
...     for g, tpr in (("A", 0.8), ("B", 0.8 if step < 1000 else 0.6)):
...         y = rng.random() < 0.5
...         yhat = rng.random() < (tpr if y else 0.1)
...         cum[g][(0 if y else 1) if yhat else (3 if y else 2)] += 1
...     _ = det.update(cum, ts=float(step))
>>> det.alarms()[("B", "true_positive_rate")].flagged
True
>>> det.alarms()[("A", "false_positive_rate")].flagged
False
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from stream_fair.fairness import is_reserved
from stream_fair.feedback.alarms import ChangeAlarm
from stream_fair.sequential import RATES
from stream_fair.verdict.fisher import fisher_log_lr

__all__ = ["ChangeSettings", "ChangeDetectors"]


@dataclass(frozen=True)
class ChangeSettings:
    """Settings of the change detectors of one (model, feature).

    Parameters
    ----------
    min_effect
        Design shift: the rate difference (group vs rest) the CUSUMs are tuned to.
    alpha
        P(any false raise of the feature's detectors within ``horizon`` labelled events).
    horizon
        Labelled events of the feature over which ``alpha`` is spent.
    batch
        Labelled events of the feature per batch (a batch is fed once at least this many arrived).
    rates
        Rates watched (fairlearn names).
    """

    min_effect: float = 0.10
    alpha: float = 0.05
    horizon: int = 2_000_000
    batch: int = 1_000
    rates: tuple[str, ...] = ("selection_rate", "true_positive_rate", "false_positive_rate")

    def __post_init__(self) -> None:
        if not 0.0 < self.min_effect < 1.0:
            raise ValueError("min_effect must lie in (0, 1), e.g. ChangeSettings(min_effect=0.1)")
        if not 0.0 < self.alpha < 1.0:
            raise ValueError("alpha must lie in (0, 1), e.g. ChangeSettings(alpha=0.05)")
        if self.batch < 1 or self.horizon < self.batch:
            raise ValueError("need 1 <= batch <= horizon, e.g. batch=1000, horizon=1_000_000")


def _odds(p: float) -> float:
    return p / (1.0 - p)


class ChangeDetectors:
    """Two one-sided Fisher-CUSUMs per (group, rate) of one (model, feature).

    :meth:`update` takes the feature's *cumulative* ``{group: (tp, fp, tn, fn)}`` whenever
    convenient and feeds one batch once at least ``settings.batch`` labelled events arrived
    since the last one (batch boundaries depend on arrival counts only, never on labels).
    """

    __slots__ = ("settings", "_base", "_w", "_flagged", "_raised", "_last_ts")

    def __init__(self, settings: ChangeSettings) -> None:
        self.settings = settings
        self._base: dict[str, list[int]] = {}
        self._w: dict[tuple[str, str], list[float]] = {}  # (group, rate) -> [down, up]
        self._flagged: dict[tuple[str, str], bool] = {}
        self._raised: dict[tuple[str, str], int] = {}
        self._last_ts: dict[tuple[str, str], float] = {}

    def __repr__(self) -> str:
        raised = sorted(k for k, v in self._flagged.items() if v)
        return f"ChangeDetectors(groups={len(self._base)}, raised={raised})"

    def threshold(self, groups: int) -> float:
        """``h = log(2 R G (horizon / batch) / alpha)`` nats, G at least 2."""
        s = self.settings
        return math.log(2 * len(s.rates) * max(2, groups) * (s.horizon / s.batch) / s.alpha)

    def update(self, cumulative: Mapping[str, Sequence[int]], ts: float) -> bool:
        """Feed a batch if enough labelled events arrived; True when one was fed."""
        s = self.settings
        cum = {g: [int(v) for v in c] for g, c in cumulative.items() if not is_reserved(g)}
        total = sum(sum(c) for c in cum.values())
        if total - sum(sum(c) for c in self._base.values()) < s.batch:
            return False
        zero = [0, 0, 0, 0]
        groups = sorted(cum)
        now = np.array([cum[g] for g in groups], dtype=np.float64).reshape(-1, 4)
        before = np.array([self._base.get(g, zero) for g in groups], dtype=np.float64)
        before = before.reshape(-1, 4)
        delta = now - before
        h = self.threshold(len(groups))
        rows: list[tuple[str, str]] = []
        args: list[tuple[float, float, float, float, float, float]] = []
        for rate in s.rates:
            num, den = (list(ix) for ix in RATES[rate])
            x, n = delta[:, num].sum(axis=1), delta[:, den].sum(axis=1)
            x0, n0 = before[:, num].sum(axis=1), before[:, den].sum(axis=1)
            for i, g in enumerate(groups):
                m, y = n.sum() - n[i], x.sum() - x[i]
                m0 = n0.sum() - n0[i]
                if n[i] <= 0 or m <= 0 or m0 <= 0:
                    continue  # nothing to compare in this batch, or no reference rate yet
                r = min(max((x0.sum() - x0[i]) / m0, 0.001), 0.999)
                down, up = (min(max(r + d, 0.001), 0.999) for d in (-s.min_effect, s.min_effect))
                lpsi = (math.log(_odds(down) / _odds(r)), math.log(_odds(up) / _odds(r)))
                args.append((x[i], n[i], m, x[i] + y, *lpsi))
                rows.append((g, rate))
        if args:
            a = np.array(args)
            llr = fisher_log_lr(a[:, 0], a[:, 1], a[:, 2], a[:, 3], a[:, 4:6])
            for key, v in zip(rows, llr.tolist(), strict=True):
                w = self._w.setdefault(key, [0.0, 0.0])
                for side in (0, 1):
                    w[side] = min(max(0.0, w[side] + v[side]), 2.0 * h)
        for key, w in self._w.items():
            stat = max(w)
            if not self._flagged.get(key, False) and stat >= h:
                self._flagged[key] = True
                self._raised[key] = self._raised.get(key, 0) + 1
                self._last_ts[key] = ts
            elif self._flagged.get(key, False) and stat < h:
                self._flagged[key] = False
                w[0] = w[1] = 0.0
        self._base = cum
        return True

    def alarms(self) -> dict[tuple[str, str], ChangeAlarm]:
        """``{(group, rate): ChangeAlarm}`` for every detector fed so far."""
        h = self.threshold(len(self._base))
        return {
            key: ChangeAlarm(
                flagged=self._flagged.get(key, False),
                statistic=max(w),
                threshold=h,
                raised_total=self._raised.get(key, 0),
                last_raised_ts=self._last_ts.get(key),
            )
            for key, w in self._w.items()
        }

    def to_state(self) -> dict:
        return {
            "base": self._base,
            "det": [
                [g, r, w, self._flagged.get((g, r), False), self._raised.get((g, r), 0),
                 self._last_ts.get((g, r))]
                for (g, r), w in self._w.items()
            ],
        }  # fmt: skip

    @classmethod
    def from_state(cls, state: dict, settings: ChangeSettings) -> ChangeDetectors:
        d = cls(settings)
        d._base = {g: [int(v) for v in c] for g, c in state["base"].items()}
        for g, r, w, flagged, raised, ts in state["det"]:
            d._w[(g, r)] = [float(w[0]), float(w[1])]
            d._flagged[(g, r)] = bool(flagged)
            d._raised[(g, r)] = int(raised)
            if ts is not None:
                d._last_ts[(g, r)] = float(ts)
        return d
