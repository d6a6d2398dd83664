"""Statistical and behavioural checks of stream_fair.fairness (fairlearn oracle: elsewhere)."""

from __future__ import annotations

import ast
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from stream_fair import disparity, fairness
from stream_fair.fairness import (
    DISPARITIES,
    METHODS,
    RATES,
    Counts,
    FairnessSettings,
    evaluate_feature,
    group_rates,
)

SETTINGS = FairnessSettings(min_samples=100)


def binomial_counts(rng: np.random.Generator, n: int, p_sel: float) -> Counts:
    """A group whose selection rate is ``p_sel`` (outcomes independent, base rate 0.4)."""
    sel = int(rng.binomial(n, p_sel))
    tp = int(rng.binomial(sel, 0.4))
    fn = int(rng.binomial(n - sel, 0.4))
    return Counts(tp=tp, fp=sel - tp, tn=n - sel - fn, fn=fn)


def test_pure_core_imports_neither_kafka_nor_prometheus() -> None:
    for module in (fairness, disparity):
        tree = ast.parse(Path(str(module.__file__)).read_text())
        names = {
            alias.name.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.Import | ast.ImportFrom)
            for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])
        }
        assert not names & {"kafka", "prometheus_client"}


@pytest.mark.parametrize("prior", ["jeffreys", "uniform"])
def test_interval_coverage_is_close_to_nominal(prior: str) -> None:
    rng = np.random.default_rng(7)
    settings = FairnessSettings(prior=prior)  # type: ignore[arg-type]
    trials, n, p = 2000, 200, 0.3
    sel = rng.binomial(n, p, size=trials)
    covered = 0
    for k in sel:
        e = group_rates(Counts(tp=int(k), fp=0, tn=0, fn=n - int(k)), settings)["true_positive_rate"]
        covered += e.lower <= p <= e.upper
    assert 0.93 <= covered / trials <= 0.97


def test_interval_is_the_beta_posterior_quantiles() -> None:
    e = group_rates(Counts(tp=30, fp=0, tn=0, fn=70), FairnessSettings())["true_positive_rate"]
    assert e.value == 0.3
    assert e.lower == pytest.approx(stats.beta.ppf(0.025, 30.5, 70.5), rel=1e-10)
    assert e.upper == pytest.approx(stats.beta.ppf(0.975, 30.5, 70.5), rel=1e-10)
    flat = group_rates(Counts(30, 0, 0, 70), FairnessSettings(), prior=(1.0, 1.0))
    assert flat["true_positive_rate"].upper == pytest.approx(stats.beta.ppf(0.975, 31, 71))


def test_boundary_counts_keep_the_observed_rate_inside_the_interval() -> None:
    e = group_rates(Counts(tp=0, fp=0, tn=50, fn=10), FairnessSettings())["selection_rate"]
    assert (e.value, e.lower) == (0.0, 0.0) and 0 < e.upper < 0.1
    e = group_rates(Counts(tp=10, fp=0, tn=0, fn=0), FairnessSettings())["accuracy"]
    assert (e.value, e.upper) == (1.0, 1.0) and e.lower > 0.7


def test_intervals_shrink_with_n() -> None:
    widths = []
    for n in (50, 500, 5000):
        e = group_rates(Counts(tp=n // 5, fp=n // 5, tn=2 * n // 5, fn=n // 5), SETTINGS)
        widths.append(e["selection_rate"].upper - e["selection_rate"].lower)
    assert widths[0] > 2.5 * widths[1] > 2.5**2 * widths[2]


def test_rates_with_zero_denominator_are_absent() -> None:
    rates = group_rates(Counts(tp=0, fp=0, tn=5, fn=0), SETTINGS)
    assert set(rates) == {
        "selection_rate",
        "base_rate",
        "false_positive_rate",
        "true_negative_rate",
        "negative_predictive_value",
        "accuracy",
    }
    assert set(RATES) >= set(rates)


def test_pooling_shrinks_a_tiny_group_and_leaves_large_groups_alone() -> None:
    rng = np.random.default_rng(3)
    counts = {g: binomial_counts(rng, 5000, p) for g, p in zip("ABCD", (0.3, 0.32, 0.28, 0.31), strict=True)}
    counts["tiny"] = Counts(tp=4, fp=4, tn=1, fn=1)  # selection rate 0.8 on 10 pairs
    plain = evaluate_feature("f", counts, SETTINGS)
    pooled = evaluate_feature("f", counts, FairnessSettings(min_samples=100, pooling="empirical_bayes"))
    overall = sum(c.tp + c.fp for c in counts.values()) / sum(c.n for c in counts.values())
    tiny, tiny_pooled = (r.groups["tiny"].rates["selection_rate"] for r in (plain, pooled))
    assert tiny_pooled.value == tiny.value == 0.8  # value stays the observed rate
    mid = (tiny.lower + tiny.upper) / 2
    mid_pooled = (tiny_pooled.lower + tiny_pooled.upper) / 2
    assert abs(mid_pooled - overall) < 0.25 * abs(mid - overall)
    assert tiny_pooled.upper - tiny_pooled.lower < 0.5 * (tiny.upper - tiny.lower)
    for g in "ABCD":
        a, b = (r.groups[g].rates["selection_rate"] for r in (plain, pooled))
        width = a.upper - a.lower
        assert abs(a.lower - b.lower) < 0.25 * width and abs(a.upper - b.upper) < 0.25 * width
        assert (b.upper - b.lower) == pytest.approx(width, rel=0.1)


def test_pooling_falls_back_to_the_base_prior() -> None:
    base = (0.5, 0.5)
    two_groups = fairness.empirical_bayes_prior(np.array([3, 5]), np.array([10, 10]), base)
    all_zero = fairness.empirical_bayes_prior(np.zeros(4, int), np.full(4, 10), base)
    assert two_groups == all_zero == base
    # homogeneous groups: the prior is capped at the feature's total sample size
    a, b = fairness.empirical_bayes_prior(np.full(5, 50), np.full(5, 100), base)
    assert a + b == pytest.approx(500)


def test_small_groups_are_reported_but_not_eligible_and_never_flagged() -> None:
    counts = {
        "A": Counts(tp=100, fp=100, tn=300, fn=100),
        "B": Counts(tp=100, fp=100, tn=300, fn=100),
        "small": Counts(tp=40, fp=50, tn=0, fn=0),  # selection rate 1.0, n = 90 < 100
    }
    report = evaluate_feature("f", counts, SETTINGS)
    assert not report.groups["small"].eligible
    assert report.groups["small"].rates["selection_rate"].value == 1.0
    assert report.disparities[("demographic_parity_difference", "between_groups")].value == 0.0
    assert not any(report.flagged.values())


def test_reserved_groups_are_reported_but_excluded() -> None:
    counts = {
        "A": Counts(tp=100, fp=100, tn=300, fn=100),
        "__missing__": Counts(tp=500, fp=500, tn=0, fn=0),
        "__other__": Counts(tp=0, fp=0, tn=500, fn=500),
        "A&__other__": Counts(tp=0, fp=0, tn=500, fn=500),
    }
    report = evaluate_feature("f", counts, SETTINGS)
    assert [g for g, r in report.groups.items() if r.eligible] == ["A"]
    assert report.groups["__missing__"].rates["selection_rate"].value == 1.0
    assert report.disparities == {} and report.flagged == {}


def test_flagged_only_when_the_interval_clears_the_threshold() -> None:
    rng = np.random.default_rng(11)
    # true difference 0.2, large n: interval well above 0.1 -> flagged
    big = {"A": binomial_counts(rng, 20000, 0.3), "B": binomial_counts(rng, 20000, 0.5)}
    # the same observed difference on 120 pairs per group: interval straddles 0.1 -> not flagged
    small = {"A": Counts(tp=18, fp=18, tn=60, fn=24), "B": Counts(tp=30, fp=30, tn=40, fn=20)}
    key = ("demographic_parity_difference", "between_groups")
    r_big, r_small = (evaluate_feature("f", c, SETTINGS) for c in (big, small))
    assert r_big.disparities[key].lower > 0.1 and r_big.flagged[key]
    assert r_small.disparities[key].value == pytest.approx(0.2)
    assert r_small.disparities[key].lower < 0.1 and not r_small.flagged[key]
    ratio = ("demographic_parity_ratio", "between_groups")
    assert r_big.disparities[ratio].upper < 0.8 and r_big.flagged[ratio]
    assert r_small.disparities[ratio].upper > 0.8 and not r_small.flagged[ratio]
    # a custom threshold moves the verdict
    loose = FairnessSettings(min_samples=100, thresholds={"demographic_parity_difference": 0.3})
    assert not evaluate_feature("f", big, loose).flagged[key]


def test_verdict_function() -> None:
    assert disparity.is_flagged("equalized_odds_difference", 0.11, 0.2, 0.1)
    assert not disparity.is_flagged("equalized_odds_difference", 0.1, 0.2, 0.1)
    assert disparity.is_flagged("equalized_odds_ratio", 0.5, 0.79, 0.8)
    assert not disparity.is_flagged("equalized_odds_ratio", 0.5, 0.8, 0.8)


def test_disparity_interval_covers_the_true_difference() -> None:
    """Simultaneous bounds are conservative: they cover at least the nominal 95%."""
    rng = np.random.default_rng(5)
    covered, trials = 0, 200
    key = ("demographic_parity_difference", "between_groups")
    for _ in range(trials):
        counts = {g: binomial_counts(rng, 800, p) for g, p in zip("ABC", (0.3, 0.4, 0.35), strict=True)}
        est = evaluate_feature("f", counts, SETTINGS).disparities[key]
        covered += est.lower <= 0.1 <= est.upper
    assert covered / trials >= 0.95


def test_fair_data_with_many_small_groups_is_not_flagged() -> None:
    """The max - min of many small noisy groups is biased away from 0; the verdict must not be.

    With 8 groups of 120 and identical rates, the difference's point estimate often exceeds 0.1,
    yet no disparity may be flagged in more than 5% of the trials.
    """
    rng = np.random.default_rng(11)
    flagged_trials, big_estimates, trials = 0, 0, 200
    for _ in range(trials):
        counts = {g: binomial_counts(rng, 120, 0.3) for g in "ABCDEFGH"}
        report = evaluate_feature("f", counts, SETTINGS)
        flagged_trials += any(report.flagged.values())
        big_estimates += report.disparities["demographic_parity_difference", "between_groups"].value > 0.1
    assert big_estimates > trials // 4  # the naive point estimate would cry wolf
    assert flagged_trials / trials <= 0.05


def test_to_reference() -> None:
    counts = {
        "ref": Counts(tp=100, fp=100, tn=150, fn=150),  # selection 0.4
        "hi": Counts(tp=150, fp=100, tn=150, fn=100),  # 0.5
        "lo": Counts(tp=50, fp=50, tn=250, fn=150),  # 0.2
    }
    report = evaluate_feature("f", counts, SETTINGS, reference="ref")
    d = report.disparities
    assert d[("demographic_parity_difference", "to_reference")].value == pytest.approx(0.2)
    assert d[("demographic_parity_ratio", "to_reference")].value == pytest.approx(0.5)
    assert d[("demographic_parity_difference", "between_groups")].value == pytest.approx(0.3)
    assert d[("demographic_parity_ratio", "between_groups")].value == pytest.approx(0.4)
    for key, est in d.items():
        assert est.lower <= est.upper, key
    # no reference, or an ineligible one: only between_groups
    for ref in (None, "absent", "tiny"):
        more = {**counts, "tiny": Counts(1, 1, 1, 1)}
        keys = evaluate_feature("f", more, SETTINGS, reference=ref).disparities
        assert {m for _, m in keys} == {"between_groups"}
    full = {(dd, m) for dd in DISPARITIES for m in METHODS}
    assert set(d) == full


def test_ratio_edge_cases_with_zero_rates() -> None:
    counts = {
        "A": Counts(tp=0, fp=0, tn=300, fn=0),  # selects nobody
        "B": Counts(tp=0, fp=0, tn=300, fn=0),
        "C": Counts(tp=30, fp=0, tn=270, fn=0),  # selects 10%
    }
    d = evaluate_feature("f", counts, SETTINGS, reference="A").disparities
    assert d[("demographic_parity_ratio", "between_groups")].value == 0.0
    assert d[("demographic_parity_ratio", "to_reference")].value == 0.0
    # simultaneous bounds: upper = min U / max L over the groups' Bonferroni intervals
    ratio = d[("demographic_parity_ratio", "between_groups")]
    assert ratio.lower == 0.0 and 0.0 < ratio.upper < 0.8
    report = evaluate_feature("f", counts, SETTINGS, reference="A")
    assert report.flagged[("demographic_parity_ratio", "between_groups")]
    # TPR: only C has positives -> fewer than two usable groups, no equal opportunity
    assert ("equal_opportunity_difference", "between_groups") not in d
    assert ("equalized_odds_ratio", "between_groups") not in d
    both_zero = {"A": counts["A"], "B": counts["B"]}
    d0 = evaluate_feature("f", both_zero, SETTINGS).disparities
    assert d0[("demographic_parity_ratio", "between_groups")].value == 1.0


def test_deterministic() -> None:
    rng = np.random.default_rng(2)
    counts = {g: binomial_counts(rng, 300, 0.3) for g in "ABCDE"}
    assert evaluate_feature("f", counts, SETTINGS) == evaluate_feature("f", counts, SETTINGS)


def test_settings_validation_messages() -> None:
    with pytest.raises(ValueError, match="credible_level"):
        FairnessSettings(credible_level=1.5)
    with pytest.raises(ValueError, match="unknown disparity 'dp'"):
        FairnessSettings(thresholds={"dp": 0.1})
    with pytest.raises(ValueError, match="non-negative"):
        Counts(tp=-1, fp=0, tn=0, fn=0)
    with pytest.raises(ValueError) as err:
        FairnessSettings(min_samples=0)
    assert str(err.value) == fairness.MIN_SAMPLES_ERROR.format(value=0)


def test_fifty_groups_are_fast() -> None:
    rng = np.random.default_rng(0)
    counts = {f"g{i}": binomial_counts(rng, 2000, rng.uniform(0.2, 0.4)) for i in range(50)}
    settings = FairnessSettings()
    evaluate_feature("f", counts, settings, reference="g0")  # warm the caches
    start = time.perf_counter()
    for _ in range(10):
        evaluate_feature("f", counts, settings, reference="g0")
    per_call = (time.perf_counter() - start) / 10
    assert per_call < 0.05  # ~6 ms on an idle core; generous for shared CI runners
