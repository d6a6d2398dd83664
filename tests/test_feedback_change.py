"""Change detectors and the default alarm: exact LR, null expectation, fair silence, onset delay."""

from __future__ import annotations

import math

import numpy as np
import orjson

from stream_fair.feedback.alert import AlertCondition
from stream_fair.feedback.change import ChangeDetectors, ChangeSettings
from stream_fair.feedback.coverage import arrival_ratios
from stream_fair.sequential import SequentialSettings, rate_bounds
from stream_fair.verdict.fisher import fisher_log_lr

SHARES = np.array([0.4, 0.3, 0.15, 0.1, 0.05])
GROUPS = "ABCDE"


def _weights(n: int, m: int, s: int, psi: float) -> dict[int, float]:
    return {k: math.comb(n, k) * math.comb(m, s - k) * psi**k for k in range(max(0, s - m), min(n, s) + 1)}


def test_fisher_log_lr_matches_brute_force_and_has_null_mean_one() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        n, m = int(rng.integers(1, 60)), int(rng.integers(1, 200))
        s = int(rng.integers(0, n + m + 1))
        psis = (float(rng.uniform(0.2, 0.9)), float(rng.uniform(1.1, 4.0)))
        w1 = _weights(n, m, s, 1.0)
        support = sorted(w1)
        got = fisher_log_lr(
            [float(x) for x in support], [n] * len(support), [m] * len(support),
            [s] * len(support), [[math.log(p) for p in psis]] * len(support),
        )  # fmt: skip
        for j, psi in enumerate(psis):
            wp = _weights(n, m, s, psi)
            z1, zp = sum(w1.values()), sum(wp.values())
            for i, x in enumerate(support):
                ref = math.log((wp[x] / zp) / (w1[x] / z1))
                assert abs(got[i, j] - ref) < 1e-9
            # E_{psi=1}[L] = 1: the product of batch LRs is a martingale under equal rates
            mean = sum(w1[x] / z1 * math.exp(got[i, j]) for i, x in enumerate(support))
            assert abs(mean - 1.0) < 1e-9


def _cumulative(seed: int, n: int, onset: int | None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    g = rng.choice(5, n, p=SHARES)
    y = rng.random(n) < 0.3
    tpr = np.full(n, 0.8)
    if onset is not None:
        tpr[(g == 4) & (np.arange(n) >= onset)] -= 0.10
    yhat = np.where(y, rng.random(n) < tpr, rng.random(n) < 0.1)
    quad = np.where(yhat, np.where(y, 0, 1), np.where(y, 3, 2))
    flat = np.bincount(np.arange(n) // 1000 * 20 + g * 4 + quad, minlength=(n // 1000) * 20)
    return flat.reshape(-1, 5, 4).cumsum(axis=0)


def test_silent_on_fair_stream_and_raises_for_the_changed_group_only() -> None:
    det = ChangeDetectors(ChangeSettings())
    for row in _cumulative(5, 300_000, None):
        det.update({GROUPS[k]: row[k] for k in range(5)}, ts=0.0)
        assert not any(a.flagged for a in det.alarms().values())
    assert len(det.alarms()) == 15  # 5 groups x 3 rates
    onset, n = 100_000, 200_000
    cum = _cumulative(6, n, onset)
    det = ChangeDetectors(ChangeSettings())
    raised_at = None
    for i, row in enumerate(cum):
        det.update({GROUPS[k]: row[k] for k in range(5)}, ts=float(i))
        flagged = [k for k, a in det.alarms().items() if a.flagged]
        if flagged:
            raised_at = i
            break
    assert flagged == [("E", "true_positive_rate")]
    # E has 5% of traffic: the raise came within 2,500 of its events after onset (~1,500 typical)
    assert raised_at is not None and onset <= raised_at * 1000 <= onset + 50_000
    a = det.alarms()[("E", "true_positive_rate")]
    assert a.raised_total == 1 and a.last_raised_ts == raised_at and a.statistic >= a.threshold


def test_clears_and_restarts_when_the_change_goes_away() -> None:
    det = ChangeDetectors(ChangeSettings(batch=100, horizon=10_000))
    cum = {"A": [0, 0, 0, 0], "B": [0, 0, 0, 0]}
    rng = np.random.default_rng(2)
    states = []
    for step in range(600):
        for g in "AB":
            tpr = 0.4 if g == "B" and 100 <= step < 300 else 0.8
            y = rng.random(100) < 0.5
            yhat = np.where(y, rng.random(100) < tpr, rng.random(100) < 0.1)
            cum[g] = [a + int(b) for a, b in zip(cum[g], (
                (yhat & y).sum(), (yhat & ~y).sum(), (~yhat & ~y).sum(), (~yhat & y).sum()
            ), strict=True)]  # fmt: skip
        det.update(cum, ts=float(step))
        states.append(det.alarms().get(("B", "true_positive_rate")))
    assert states[0] is None  # no reference rate before the first batch
    assert not states[99].flagged and states[150].flagged and not states[-1].flagged
    assert states[-1].raised_total == 1 and states[-1].statistic < states[-1].threshold


def test_threshold_formula_and_state_round_trip() -> None:
    s = ChangeSettings(alpha=0.05, horizon=250_000, batch=1000)
    det = ChangeDetectors(s)
    assert math.isclose(det.threshold(5), math.log(2 * 3 * 5 * 250 / 0.05))
    cum = _cumulative(3, 20_000, None)
    for row in cum[:10]:
        det.update({GROUPS[k]: row[k] for k in range(5)}, ts=1.0)
    twin = ChangeDetectors.from_state(orjson.loads(orjson.dumps(det.to_state())), s)
    for row in cum[10:]:
        for d in (det, twin):
            d.update({GROUPS[k]: row[k] for k in range(5)}, ts=2.0)
    assert det.alarms() == twin.alarms()


def test_alert_condition_reasons_and_raise_counting() -> None:
    alert = AlertCondition(SequentialSettings(), ChangeSettings())
    cum = _cumulative(6, 200_000, 100_000)
    raises = []
    for i, row in enumerate(cum):
        alarms = alert.check({GROUPS[k]: row[k] for k in range(5)}, ts=float(i))
        raises.append(alarms["equal_opportunity_difference"].raised_total)
        if alarms["equal_opportunity_difference"].flagged:
            break
    eo = alarms["equal_opportunity_difference"]
    assert eo.reason == "change: E true_positive_rate" and eo.last_raised_ts == i
    assert raises[-1] == 1 and set(raises[:-1]) == {0}
    assert alarms["equalized_odds_difference"].flagged  # built from the TPR too
    assert not alarms["demographic_parity_difference"].flagged
    assert eo.lower is not None and eo.upper is not None and eo.lower <= 0.1 <= eo.upper


def test_arrival_ratios_against_hand_computed_bounds() -> None:
    by_group = {"A": (4000, 1200), "B": (3000, 300), "C": (50, 40)}
    arr = arrival_ratios(by_group, min_samples=100, threshold=0.8, alpha=0.01)
    assert set(arr.ratios) == {"A", "B"}  # C has too few predictions
    labels, share_b = 1500, 3000 / 7000
    assert math.isclose(arr.ratios["B"], (300 / labels) / share_b)
    lo, hi = rate_bounds([300], [labels], 0.01 / 2)
    assert hi[0] / share_b < 0.8 and arr.flagged_groups == ("A", "B")
    fair = arrival_ratios({"A": (4000, 2000), "B": (3000, 1490)}, 100, 0.8, 0.01)
    assert not fair.flagged and abs(fair.ratios["B"] - 1.0) < 0.02
