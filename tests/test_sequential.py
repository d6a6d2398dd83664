"""The time-uniform verdict: bounds against brute force, coverage under continuous monitoring."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.special import betaln, xlogy

from stream_fair.sequential import (
    Counts,
    SequentialDisparity,
    SequentialSettings,
    disparity_verdict,
    rate_bounds,
)


def test_rate_bounds_match_brute_force_grid() -> None:
    rng = np.random.default_rng(0)
    grid = np.linspace(1e-6, 1 - 1e-6, 400_001)
    for _ in range(5):
        n = int(rng.integers(1, 3000))
        s = int(rng.integers(0, n + 1))
        lo, hi = rate_bounds([s], [n], alpha=0.01)
        log_m = betaln(1 + s, 1 + n - s) - betaln(1, 1) - (xlogy(s, grid) + xlogy(n - s, 1 - grid))
        inside = grid[log_m < np.log(100)]
        assert abs(lo[0] - inside.min()) < 1e-5 and abs(hi[0] - inside.max()) < 1e-5


def _two_pass_bounds(s: np.ndarray, n: np.ndarray, alpha: float, iterations: int = 40) -> tuple[Any, ...]:
    """The bisection as first written: the lower end, then the upper end, each on its own."""
    log_mix = betaln(1 + s, 1 + n - s) - betaln(1, 1)
    bar = np.log(1.0 / alpha)
    p_hat = np.where(n > 0, s / np.maximum(n, 1.0), 0.5)

    def outside(p: np.ndarray) -> np.ndarray:
        return log_mix - (xlogy(s, p) + xlogy(n - s, 1.0 - p)) >= bar

    ends = []
    for inside, out in ((p_hat.copy(), np.zeros_like(p_hat)), (p_hat.copy(), np.ones_like(p_hat))):
        for _ in range(iterations):
            mid = 0.5 * (inside + out)
            o = outside(mid)
            out, inside = np.where(o, mid, out), np.where(o, inside, mid)
        ends.append(out)
    return np.where(n <= 0, 0.0, ends[0]), np.where(n <= 0, 1.0, ends[1])


def test_both_ends_bisected_at_once_are_the_two_searches_bit_for_bit() -> None:
    rng = np.random.default_rng(3)
    n = rng.integers(0, 5000, size=(7, 9)).astype(np.float64)
    n[0, :3] = 0  # no trials yet: (0, 1)
    s = np.floor(rng.random((7, 9)) * (n + 1))
    for alpha in (0.05, 0.01 / 12):
        lo, hi = rate_bounds(s, n, alpha)
        want_lo, want_hi = _two_pass_bounds(s, n, alpha)
        assert lo.shape == hi.shape == (7, 9) and (n == 0).any()
        assert np.array_equal(lo, want_lo) and np.array_equal(hi, want_hi)


def test_confidence_sequence_covers_at_every_step() -> None:
    """P(the truth ever leaves the sequence) <= alpha: checked after every single trial."""
    rng = np.random.default_rng(1)
    p, alpha, runs, n = 0.3, 0.1, 200, 2000
    s = np.cumsum(rng.random((runs, n)) < p, axis=1)
    trials = np.broadcast_to(np.arange(1, n + 1), s.shape)
    lo, hi = rate_bounds(s, trials, alpha)
    ever_missed = ((lo > p) | (hi < p)).any(axis=1).mean()
    assert ever_missed <= alpha  # observed ~0.01: Ville's inequality is conservative


def test_verdict_against_hand_computed_difference() -> None:
    counts = {"A": Counts(80, 10, 90, 20), "B": Counts(50, 10, 90, 50)}
    v = disparity_verdict(counts, SequentialSettings(min_samples=10), alpha=0.05)
    eo = v.disparities["equal_opportunity_difference"]
    assert abs(eo.value - (0.8 - 0.5)) < 1e-12
    a, b = v.rates[("true_positive_rate", "A")], v.rates[("true_positive_rate", "B")]
    assert abs(eo.lower - max(0.0, a.lower - b.upper)) < 1e-12
    assert abs(eo.upper - (a.upper - b.lower)) < 1e-12
    lo, hi = rate_bounds([80], [100], 0.05 / 6)  # 2 groups x 3 rates share alpha
    assert abs(a.lower - lo[0]) < 1e-12 and abs(a.upper - hi[0]) < 1e-12


def test_no_false_flag_on_fair_stream_checked_every_500_events() -> None:
    rng = np.random.default_rng(7)
    shares = np.array([0.4, 0.3, 0.15, 0.1, 0.05])
    tracker = SequentialDisparity(SequentialSettings(threshold=0.0))
    n = 300_000
    g = rng.choice(5, n, p=shares)
    y = rng.random(n) < 0.3
    yhat = np.where(y, rng.random(n) < 0.8, rng.random(n) < 0.1)
    quad = np.where(yhat, np.where(y, 0, 1), np.where(y, 3, 2))
    cum = np.bincount(np.arange(n) // 500 * 20 + g * 4 + quad).reshape(-1, 5, 4).cumsum(0)
    for row in cum:
        v = tracker.update({"ABCDE"[k]: Counts(*map(int, row[k])) for k in range(5)})
        assert not any(v.flagged.values())


def test_epoch_verdict_flags_an_onset_the_cumulative_counts_dilute() -> None:
    rng = np.random.default_rng(3)
    settings = SequentialSettings(threshold=0.05, epoch_events=5_000, epochs_alive=4)
    tracker = SequentialDisparity(settings)
    cum = {"A": np.zeros(4, int), "B": np.zeros(4, int)}
    flagged_at = None
    for step in range(200):
        for grp, share in (("A", 500), ("B", 500)):
            tpr = 0.5 if grp == "B" and step >= 100 else 0.8
            y = rng.random(share) < 0.5
            yhat = np.where(y, rng.random(share) < tpr, rng.random(share) < 0.1)
            cum[grp] += [np.sum(yhat & y), np.sum(yhat & ~y), np.sum(~yhat & ~y), np.sum(~yhat & y)]
        v = tracker.update({k: Counts(*map(int, c)) for k, c in cum.items()})
        if v.flagged["equal_opportunity_difference"]:
            flagged_at = step
            break
    assert flagged_at is not None and 100 <= flagged_at < 115


def test_state_round_trip() -> None:
    s = SequentialSettings(epoch_events=100)
    t = SequentialDisparity(s)
    t.update({"A": Counts(60, 10, 30, 20), "B": Counts(40, 20, 20, 40)})
    t2 = SequentialDisparity.from_state(t.to_state(), s)
    c = {"A": Counts(120, 20, 60, 40), "B": Counts(80, 40, 40, 80)}
    assert t.update(c) == t2.update(c)


def test_for_cells_splits_alpha() -> None:
    assert SequentialSettings(alpha=0.1).for_cells(4).alpha == 0.025
