"""The search of unconfigured intersections on simulated streams with a known cause, and its
family-wise error guarantee measured on fair streams over fresh seeds.

Independent checks: counts are recounted from the raw events with numpy; p-values with
scipy's Fisher test on those counts; Holm is recomputed by hand (statsmodels is not a dependency).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from scipy import stats

from stream_fair.search import combinations, search
from tests.explain_streams import Events, Population, generate

ATTRS = {
    "race": (("A", "B", "C", "D"), (0.55, 0.2, 0.15, 0.1)),
    "sex": (("F", "M"), (0.5, 0.5)),
    "age": (("young", "mid", "old"), (0.3, 0.45, 0.25)),
    "region": (("n", "s"), (0.7, 0.3)),  # audit_only: carried, not monitored
}
ORDER = list(ATTRS)
CONFIGURED = [["race", "sex"]]
ATTRIBUTES = [(n, i) for i, n in enumerate(ORDER)]


def labelled(ev: Events, rng: np.random.Generator, keep_pos: float = 1.0, keep_neg: float = 1.0) -> Events:
    """The pairs labelled so far: positives kept w.p. keep_pos, negatives keep_neg (label-dependent delay)."""
    keep = rng.random(ev.label.size) < np.where(ev.label == 1, keep_pos, keep_neg)
    return Events(ev.names, {k: v[keep] for k, v in ev.values.items()}, ev.label[keep], ev.predicted[keep])


def run(ev: Events, **kw: object):  # type: ignore[no-untyped-def]
    return search(ev.cells(ORDER), ATTRIBUTES, CONFIGURED, audit_only=["region"], **kw)  # type: ignore[arg-type]


def test_combinations_cover_unconfigured_pairs_and_audit_attributes() -> None:
    combos = combinations(ORDER, CONFIGURED, ["region"], 2)
    assert combos[0] == (3,)  # region alone: nobody monitors it
    assert (0, 1) not in combos and len(combos) == 1 + 5  # 6 pairs minus the configured one
    assert len(combinations(ORDER, CONFIGURED, ["region"], 3)) == 1 + 5 + 4


def test_bias_in_an_unconfigured_intersection_is_found_and_ranked_first() -> None:
    pop = Population(dict(ATTRS), overrides=[({"race": "B", "age": "young"}, {"tpr": 0.45})])
    rng = np.random.default_rng(21)
    ev = generate(pop, 60_000, rng)
    r = run(ev)
    top = r.findings[0]
    assert (top.intersection, top.group, top.rate, top.direction) == (
        "race&age",
        "B&young",
        "true_positive_rate",
        "below",
    )
    sel = (ev.values["race"] == "B") & (ev.values["age"] == "young") & (ev.label == 1)
    rest = ~((ev.values["race"] == "B") & (ev.values["age"] == "young")) & (ev.label == 1)
    assert (top.trials, top.successes) == (int(sel.sum()), int(ev.predicted[sel].sum()))
    assert (top.rest_trials, top.rest_successes) == (int(rest.sum()), int(ev.predicted[rest].sum()))
    table = [
        [top.successes, top.trials - top.successes],
        [top.rest_successes, top.rest_trials - top.rest_successes],
    ]
    assert top.p_value == pytest.approx(stats.fisher_exact(table).pvalue, rel=1e-9)
    assert top.adjusted_p_value <= r.alpha and "fairness.intersections" in top.suggestion
    assert "'race', 'age'" in top.suggestion


def test_audit_only_attribute_alone_is_searched() -> None:
    pop = Population(dict(ATTRS), overrides=[({"region": "s"}, {"fpr": 0.32})])
    r = run(generate(pop, 40_000, np.random.default_rng(4)))
    top = r.findings[0]
    assert (top.intersection, top.group, top.rate, top.direction) == (
        "region",
        "s",
        "false_positive_rate",
        "above",
    )
    assert "audit_only" in top.suggestion


def test_holm_adjustment_matches_a_hand_computation() -> None:
    pop = Population(dict(ATTRS), overrides=[({"race": "B", "age": "young"}, {"tpr": 0.55})])
    ev = generate(pop, 30_000, np.random.default_rng(8))
    r = run(ev, top=1000)
    for f in r.findings:  # Holm: adjusted p of rank i is max_{j<=i} (m - j + 1) p_(j); >= m... bounds
        assert f.p_value <= f.adjusted_p_value <= min(1.0, r.tested * f.p_value) + 1e-12
    smallest = min(f.p_value for f in r.findings)
    first = next(f for f in r.findings if f.p_value == smallest)
    assert first.adjusted_p_value == pytest.approx(min(1.0, r.tested * smallest))


def test_max_tests_bounds_the_search() -> None:
    ev = generate(Population(dict(ATTRS)), 20_000, np.random.default_rng(2))
    r = run(ev, max_tests=10, max_order=3)
    assert r.tested == 10 and r.truncated


FAIR_SEEDS = 200


@pytest.mark.parametrize(
    "label_delay",
    [pytest.param((1.0, 1.0), id="all-labelled"), pytest.param((0.6, 0.9), id="label-dependent-delay")],
)
def test_family_wise_error_on_fair_streams_over_fresh_seeds(label_delay: tuple[float, float]) -> None:
    """Fair streams (equal rates in every cell, skewed group sizes): P(any finding) <= alpha.

    The guarantee is FWER <= 0.05 per search. 200 fresh seeds; the assertion allows the binomial
    99% upper quantile of Bin(200, 0.05) so a correct procedure fails it about 1% of the time at most.
    """
    started = time.perf_counter()
    any_finding = 0
    tested = []
    for seed in range(50_000, 50_000 + FAIR_SEEDS):
        rng = np.random.default_rng(seed)
        ev = labelled(generate(Population(dict(ATTRS)), 20_000, rng), rng, *label_delay)
        r = run(ev, max_order=3)
        tested.append(r.tested)
        any_finding += bool(r.findings)
    bound = int(stats.binom.ppf(0.99, FAIR_SEEDS, 0.05))
    elapsed = time.perf_counter() - started
    print(
        f"fair streams {label_delay}: {any_finding}/{FAIR_SEEDS} seeds with a finding "
        f"(FWER {any_finding / FAIR_SEEDS:.3f}, alpha 0.05), median tests {int(np.median(tested))}, "
        f"{elapsed / FAIR_SEEDS * 1000:.0f} ms per search"
    )
    assert any_finding <= bound


def test_audit_only_attribute_flows_through_the_tracker_into_report_and_metrics() -> None:
    """Decoded like a feature, kept with the pending prediction, searched, never exported per group."""
    import orjson

    from stream_fair.config import Config
    from stream_fair.exporter import PipelineStats, registry_for
    from stream_fair.report import build_report
    from tests.helpers import LocalTracker

    cfg = Config.model_validate(
        {
            "fairness": {
                "features": ["race", "sex"],
                "intersections": [["race", "sex"]],
                "audit_only": [{"name": "region", "path": "context.region"}],
            },
            "windows": ["1h"],
            "window_resolution": "1m",
        }
    )
    pop = Population(
        {"race": ATTRS["race"], "sex": ATTRS["sex"], "region": ATTRS["region"]},
        overrides=[({"race": "B", "region": "s"}, {"tpr": 0.35})],
    )
    ev = generate(pop, 12_000, np.random.default_rng(31))
    tracker = LocalTracker(cfg)
    for i in range(ev.label.size):  # every outcome after every prediction: the join must carry region
        attrs = {"race": str(ev.values["race"][i]), "sex": str(ev.values["sex"][i])}
        p = {"id": f"r{i}", "ts": 1000.0 + i * 0.1, "model": "m", "prediction": int(ev.predicted[i]),
             "attributes": attrs, "context": {"region": str(ev.values["region"][i])}}  # fmt: skip
        tracker.update_prediction(0, orjson.dumps(p), i)
    for i in range(ev.label.size):
        o = {"id": f"r{i}", "ts": 1000.0 + i * 0.1 + 60, "label": int(ev.label[i])}
        tracker.update_outcome(0, orjson.dumps(o), i)
    report = build_report(tracker.snapshot(), cfg)
    assert {v.feature.name for v in report.views} == {"race", "sex", "race&sex"}
    (sv,) = report.searches
    top = sv.result.findings[0]
    assert (sv.window, top.intersection, top.group, top.rate) == (
        "1h",
        "race&region",
        "B&s",
        "true_positive_rate",
    )
    sel = (ev.values["race"] == "B") & (ev.values["region"] == "s") & (ev.label == 1)
    assert (top.trials, top.successes) == (int(sel.sum()), int(ev.predicted[sel].sum()))
    reg = registry_for(lambda: (report, PipelineStats()))
    labels = {"model": "m", "window": "1h", "intersection": "race&region", "group": "B&s", "rate": top.rate}
    assert reg.get_sample_value("stream_fair_search_finding_gap", labels) == pytest.approx(top.gap)
    assert (
        reg.get_sample_value("stream_fair_search_hypotheses", {"model": "m", "window": "1h"})
        == sv.result.tested
    )
    assert reg.get_sample_value("stream_fair_group_samples", {"model": "m", "feature": "region", "group": "s",
                                                               "window": "cumulative"}) is None  # fmt: skip
