"""The verdict engine's e-values and detector: exactness against brute force, after every step."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from stream_fair.verdict.cusum import NEG, CohortCusum
from stream_fair.verdict.evidence import chain_log_lr, design_log_psi, proportional_odds_chain
from stream_fair.verdict.fisher import fisher_log_lr


def _multivariate_hypergeometric(pooled: list[int], n: int) -> list[tuple[tuple[int, ...], float]]:
    """Every way the group's ``n`` items can fall into the bins, with its null probability."""
    total = math.comb(sum(pooled), n)
    out = []
    for x in itertools.product(*[range(k + 1) for k in pooled]):
        if sum(x) == n:
            out.append((x, math.prod(math.comb(k, v) for k, v in zip(pooled, x, strict=True)) / total))
    return out


@pytest.mark.parametrize(
    ("pooled", "n"), [([3, 2, 4], 4), ([1, 5, 0, 3], 3), ([6, 6], 5), ([2, 2, 2, 2, 2], 6)]
)
def test_score_chain_is_an_exact_e_value(pooled: list[int], n: int) -> None:
    """Under exchangeability E[exp(chain log LR)] = 1 exactly, for any predictable alternative."""
    rng = np.random.default_rng(len(pooled) * 10 + n)
    table = _multivariate_hypergeometric(pooled, n)
    group = np.array([x for x, _ in table], dtype=float)
    p = np.array([w for _, w in table])
    reference = rng.integers(0, 20, size=len(pooled)).astype(float)
    lp = proportional_odds_chain(np.tile(reference, (len(table), 1)), np.tile([[-0.7, 0.9]], (len(table), 1)))
    llr = chain_log_lr(group, np.tile(np.array(pooled, float), (len(table), 1)), lp)
    assert np.allclose((p[:, None] * np.exp(llr)).sum(axis=0), 1.0, atol=1e-12)
    # and it is informative: a group holding the lowest scores has evidence for the downward shift
    low = int(np.argmax(group @ np.arange(len(pooled), 0, -1)))
    assert llr[low, 0] > 0 > llr[low, 1]


def test_two_bins_chain_is_the_fisher_ratio_of_the_decisions() -> None:
    group = np.array([[3.0, 7.0]])  # below / at or above the threshold
    pooled = np.array([[20.0, 30.0]])
    lp = np.array([[[0.4, 0.0], [-0.3, 0.0]]])  # the last link is certain
    # first link: the group's share of the low bin, odds ratio exp(0.4) for "low"
    ref = fisher_log_lr([3.0], [10.0], [40.0], [20.0], [[0.4, -0.3]])
    assert np.allclose(chain_log_lr(group, pooled, lp), ref)


def test_proportional_odds_chain_multiplies_every_tail_odds_by_psi() -> None:
    reference = np.array([[5.0, 1.0, 0.0, 7.0, 3.0]])
    psi = 0.4
    links = proportional_odds_chain(reference, np.array([[math.log(psi)]]))[0, 0]
    f = (reference[0] + 0.5) / (reference[0] + 0.5).sum()
    # rebuild the alternative from its continuation ratios, bin by bin from the bottom
    left, g = 1.0, []
    for j in range(f.size):
        h_ref = f[j] / f[j:].sum()
        odds = math.exp(links[j]) * h_ref / (1 - h_ref) if j < f.size - 1 else math.inf
        h = 1.0 if math.isinf(odds) else odds / (1 + odds)
        g.append(left * h)
        left -= left * h
    g_tail = np.cumsum(np.array(g)[::-1])[::-1]
    f_tail = np.cumsum(f[::-1])[::-1]
    for j in range(1, f.size):
        odds_g = g_tail[j] / (1 - g_tail[j])
        odds_f = f_tail[j] / (1 - f_tail[j])
        assert odds_g == pytest.approx(psi * odds_f, rel=1e-9)


def test_design_odds_ratios_are_the_rate_shift() -> None:
    lp = design_log_psi(np.array([0.8, 0.05]), 0.1)
    odds = lambda p: p / (1 - p)  # noqa: E731
    assert lp[0, 0] == pytest.approx(math.log(odds(0.7) / odds(0.8)))
    assert lp[0, 1] == pytest.approx(math.log(odds(0.9) / odds(0.8)))
    assert lp[1, 0] == pytest.approx(math.log(odds(0.001) / odds(0.05)))  # clipped at 0.001


def _brute_force(records: list[tuple[int, float, float]], weights: dict[int, float]) -> float:
    """max over starts j of log w_j + sum of the llrs of cohorts >= j (the detector's definition)."""
    best = NEG
    for j, w in weights.items():
        if w > 0:
            best = max(best, math.log(w / 2) + sum(d for c, d, _ in records if c >= j))
    return best


def test_cusum_statistic_equals_the_max_over_starts_after_every_step() -> None:
    """Late strata of old cohorts, new cohorts, folding: the recursion is the definition."""
    rng = np.random.default_rng(3)
    det = CohortCusum()
    records: list[tuple[int, float, float]] = []
    weights: dict[int, float] = {}
    folded = None
    for step in range(400):
        newest = step // 10
        cohort = int(max(0, newest - rng.integers(0, 8)))  # labels of the last 8 cohorts
        down, up = rng.normal(-0.3, 1.0, 2)
        w = 0.0
        if det.wants_start(cohort):
            w = float(rng.uniform(0.01, 0.2))
            weights[cohort] = w
        det.add(cohort, (down, up, 0.0), (1, 2, 3, 4), w)
        # a late stratum of a folded cohort counts for every start in the prefix (j <= folded)
        records.append((cohort if folded is None or cohort > folded else folded, down, up))
        if step % 37 == 36:
            folded = newest - 4
            det.fold(folded)
        got_down, got_up = det._raise_tracks()
        want_down = _brute_force([(c, d, u) for c, d, u in records], weights)
        want_up = _brute_force([(c, u, d) for c, d, u in records], weights)
        assert got_down == pytest.approx(want_down, abs=1e-9)
        assert got_up == pytest.approx(want_up, abs=1e-9)
    assert folded is not None and min(det.open) > folded and det.prefix[0][0] > NEG


def test_cusum_raises_then_clears_only_on_evidence_after_the_raise() -> None:
    det = CohortCusum()
    for c in range(5):
        det.add(c, (3.0, -3.0, 0.0), (10, 30, 80, 100), weight=0.2)
    assert det.step(h=10.0, h_clear=5.0, ts=99.0, newest=4) == "raised"
    assert (det.side, det.raised_total, det.last_raised_ts, det.raised_segment[0]) == (-1, 1, 99.0, 0)
    # clear evidence in cohorts up to the raise does not count: clear starts come after it
    det.add(3, (0.0, 0.0, 50.0), (0, 0, 0, 0))
    assert det.clear_statistic() == NEG and det.step(10.0, 5.0, 100.0, 5) is None
    det.add(6, (0.0, 0.0, 2.0), (0, 0, 0, 0))
    det.add(7, (0.0, 0.0, 2.0), (0, 0, 0, 0))
    assert det.step(10.0, 5.0, 101.0, 7) is None and det.clear_statistic() == pytest.approx(4.0)
    det.add(8, (0.0, 0.0, 1.5), (0, 0, 0, 0))
    assert det.step(10.0, 5.0, 102.0, 8) == "cleared"
    assert (det.side, det.cleared_total, det.cleared_segment[0]) == (0, 1, 6)
    # after the clear, old cohorts are no starts: evidence there cannot raise again
    det.add(2, (100.0, 0.0, 0.0), (0, 0, 0, 0))
    assert det.statistic() == NEG and det.step(10.0, 5.0, 103.0, 8) is None
    assert det.wants_start(9) and not det.wants_start(8)


def test_wide_supports_are_cut_without_changing_the_ratio(monkeypatch: pytest.MonkeyPatch) -> None:
    """Busy strata (tens of thousands of trials): the cut support gives the full sums' result."""
    import stream_fair.verdict.fisher as fisher

    rng = np.random.default_rng(1)
    rows = 300
    n = rng.integers(300, 20_000, rows).astype(float)
    m = rng.integers(300, 40_000, rows).astype(float)
    s = np.round(rng.uniform(0.002, 0.998, rows) * (n + m))
    lo, hi = np.maximum(0, s - m), np.minimum(n, s)
    x = np.round(lo + rng.uniform(0, 1, rows) * (hi - lo))
    design = np.column_stack([rng.uniform(-0.6, -0.01, rows), rng.uniform(0.01, 0.8, rows)])
    extreme = np.column_stack([rng.uniform(-5, -0.01, rows), rng.uniform(0.01, 5, rows)])
    ints = [v.astype(int) for v in (n, m, s, lo, hi)]
    cut_lo, cut_hi = fisher._window(*ints, design)
    assert (cut_hi - cut_lo).mean() < 0.3 * (hi - lo).mean()  # the cut is real
    got = [fisher_log_lr(x, n, m, s, lp) for lp in (design, extreme)]
    monkeypatch.setattr(fisher, "_WIDE", 10**12)  # no cut: sums over the whole support
    for lp, cut in zip((design, extreme), got, strict=True):
        assert np.allclose(cut, fisher_log_lr(x, n, m, s, lp), rtol=0, atol=1e-9)
