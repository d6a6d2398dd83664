"""Threshold what-ifs against independent computations: numpy on the raw pairs, a brute-force search
over every combination of thresholds, and fairlearn's ThresholdOptimizer on the same data."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from fairlearn.postprocessing import ThresholdOptimizer
from sklearn.base import BaseEstimator

from stream_fair.errors import WhatIfError
from stream_fair.fairness import FairnessSettings
from stream_fair.whatif import (
    CRITERIA,
    TOO_FEW_GROUPS_ERROR,
    UNKNOWN_CRITERION_ERROR,
    UNKNOWN_GROUP_ERROR,
    LabelledHistogram,
    _expected_cells,
    optimize,
    what_if,
)

SETTINGS = FairnessSettings(min_samples=20)


def _stream(seed: int, groups: dict[str, tuple[int, float, float]]) -> tuple[np.ndarray, ...]:
    """Pairs per group: (n, base rate, score separation); scores in [0, 1), never on the top edge."""
    rng = np.random.default_rng(seed)
    s, y, a = [], [], []
    for g, (n, base, sep) in groups.items():
        label = (rng.random(n) < base).astype(int)
        z = rng.normal(loc=sep * (label - 0.5), scale=1.0)
        s.append(np.clip(1 / (1 + np.exp(-z)), 0.0, 0.999999))
        y.append(label)
        a.append(np.full(n, g))
    return np.concatenate(s), np.concatenate(y), np.concatenate(a)


def _hists(s: np.ndarray, y: np.ndarray, a: np.ndarray, edges: np.ndarray) -> dict[str, LabelledHistogram]:
    return {
        g: LabelledHistogram(
            edges,
            np.histogram(s[(a == g) & (y == 1)], edges)[0],
            np.histogram(s[(a == g) & (y == 0)], edges)[0],
        )
        for g in np.unique(a)
    }


def _np_rates(s: np.ndarray, y: np.ndarray, t: float) -> dict[str, float]:
    d = s >= t
    return {
        "selection_rate": d.mean(),
        "true_positive_rate": d[y == 1].mean(),
        "false_positive_rate": d[y == 0].mean(),
        "accuracy": (d == (y == 1)).mean(),
    }


GROUPS = {"a": (400, 0.5, 2.5), "b": (300, 0.3, 1.5), "c": (250, 0.2, 1.0)}
_KEY = {
    "demographic_parity": ("selection_rate",),
    "equal_opportunity": ("true_positive_rate",),
    "equalized_odds": ("true_positive_rate", "false_positive_rate"),
}


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("tol", [0.0, 0.05, 0.15])
@pytest.mark.parametrize("seed", [11, 12])
def test_deterministic_is_the_brute_force_optimum(criterion: str, tol: float, seed: int) -> None:
    s, y, a = _stream(seed, GROUPS)
    edges = np.linspace(0.0, 1.0, 9)
    w = optimize(_hists(s, y, a, edges), criterion, 0.5, SETTINGS, tolerance=tol)
    # brute force over every combination of edge thresholds, rates by numpy on the raw pairs
    table = {g: [_np_rates(s[a == g], y[a == g], t) for t in edges] for g in GROUPS}
    best = -1.0
    for combo in itertools.product(range(edges.size), repeat=len(GROUPS)):
        rs = [table[g][k] for g, k in zip(GROUPS, combo, strict=True)]
        spread = max(max(r[m] for r in rs) - min(r[m] for r in rs) for m in _KEY[criterion])
        if spread <= tol + 1e-12:
            correct = sum(r["accuracy"] * GROUPS[g][0] for g, r in zip(GROUPS, rs, strict=True))
            best = max(best, correct / len(s))
    assert w.met is True
    assert w.overall["accuracy"].value == pytest.approx(best, abs=1e-12)
    chosen = {g: _np_rates(s[a == g], y[a == g], w.groups[g].rule.thresholds[0]) for g in GROUPS}
    for m in _KEY[criterion]:
        assert max(r[m] for r in chosen.values()) - min(r[m] for r in chosen.values()) <= tol + 1e-12
    for g, r in w.groups.items():
        for name, value in chosen[g].items():
            assert r.rates[name].value == pytest.approx(value, abs=1e-12)
            assert r.rates[name].lower <= value <= r.rates[name].upper


def test_plain_what_if_and_overcorrection_match_numpy() -> None:
    s, y, a = _stream(3, GROUPS)
    edges = np.linspace(0.0, 1.0, 21)
    w = what_if("sex", _hists(s, y, a, edges), {"b": 0.3}, 0.5, SETTINGS, criterion="equal_opportunity")
    (tb,) = w.groups["b"].rule.thresholds
    assert tb == pytest.approx(0.3)
    for g in GROUPS:
        m = a == g
        t = tb if g == "b" else 0.5
        new, old = _np_rates(s[m], y[m], t), _np_rates(s[m], y[m], 0.5)
        assert w.groups[g].rates["true_positive_rate"].value == pytest.approx(new["true_positive_rate"])
        assert w.groups[g].current_rates["accuracy"].value == pytest.approx(old["accuracy"])
        change = w.groups[g].accuracy_change
        assert change.value == pytest.approx(new["accuracy"] - old["accuracy"])
        assert change.lower <= change.value <= change.upper
    assert w.groups["b"].accuracy_change.value < 0  # lowering b's threshold costs b accuracy here
    assert w.groups["a"].accuracy_change.value == 0.0
    overall_new = np.mean(np.where(a == "b", s >= tb, s >= 0.5) == (y == 1))
    overall_old = np.mean((s >= 0.5) == (y == 1))
    assert w.overall["accuracy"].value == pytest.approx(overall_new)
    assert w.accuracy_change.value == pytest.approx(overall_new - overall_old)
    selected_new = np.mean(np.where(a == "b", s >= tb, s >= 0.5))
    assert w.selection_change.value == pytest.approx(selected_new - np.mean(s >= 0.5))
    assert w.selection_change.lower < w.selection_change.value < w.selection_change.upper
    sel_b = w.groups["b"].selection_change.value
    assert sel_b == pytest.approx(np.mean(s[a == "b"] >= tb) - np.mean(s[a == "b"] >= 0.5))
    tprs = [
        np.mean(np.where(a == g, s >= (tb if g == "b" else 0.5), False)[(a == g) & (y == 1)]) for g in GROUPS
    ]
    assert w.disparities["equal_opportunity_difference"].value == pytest.approx(max(tprs) - min(tprs))
    assert w.met == (max(tprs) - min(tprs) <= 0.1)
    json.dumps(w.to_json())  # serializable as served


def test_threshold_between_edges_moves_to_the_nearest_edge() -> None:
    s, y, a = _stream(4, GROUPS)
    w = what_if("f", _hists(s, y, a, np.linspace(0, 1, 11)), {"a": 0.33}, 0.52, SETTINGS)
    assert w.groups["a"].rule.thresholds == pytest.approx((0.3,))
    assert w.groups["b"].current == 0.5


class _Scores(BaseEstimator):
    """A prefit 'model' whose prediction is the score column, so fairlearn thresholds our scores."""

    def fit(self, X: np.ndarray, y: np.ndarray) -> _Scores:
        self.fitted_ = True
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(X)[:, 0]


_FAIRLEARN = {
    "demographic_parity": "demographic_parity",
    "equal_opportunity": "true_positive_rate_parity",
    "equalized_odds": "equalized_odds",
}


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("seed", [21, 22, 23])
def test_randomized_agrees_with_fairlearn_threshold_optimizer(criterion: str, seed: int) -> None:
    s, y, a = _stream(seed, GROUPS)
    edges = np.linspace(0.0, 1.0, 21)
    # one score per bin (its lower edge), so fairlearn's candidate thresholds are exactly ours
    s = edges[np.searchsorted(edges, s, side="right") - 1]
    hists = _hists(s, y, a, edges)
    w = optimize(hists, criterion, 0.5, SETTINGS, mode="randomized")
    opt = ThresholdOptimizer(
        estimator=_Scores().fit(None, None),
        constraints=_FAIRLEARN[criterion],
        prefit=True,
        predict_method="predict",
    )
    X = s[:, None]
    opt.fit(X, y, sensitive_features=a)
    p = opt._pmf_predict(X, sensitive_features=a)[:, 1]
    overall = np.mean(p * y + (1 - p) * (1 - y))
    assert w.overall["accuracy"].value == pytest.approx(overall, abs=1e-3)  # rounded counts
    # the changes use the exact expectations (the coin's flips included)
    now = s >= 0.5
    assert w.accuracy_change.value == pytest.approx(overall - np.mean(now == (y == 1)), abs=1e-12)
    assert w.selection_change.value == pytest.approx(np.mean(p) - np.mean(now), abs=1e-12)
    for g in GROUPS:
        m = a == g
        ours = _expected_cells(hists[g], w.groups[g].rule)
        theirs = [np.sum(p[m] * y[m]), np.sum(p[m] * (1 - y[m]))]
        np.testing.assert_allclose(ours[:2], theirs, rtol=1e-9, atol=1e-6)
    assert w.met is True


def test_randomized_equalized_odds_is_exact_where_single_thresholds_are_degenerate() -> None:
    # two groups whose ROC curves do not cross away from the corners
    s, y, a = _stream(5, {"x": (500, 0.5, 3.0), "y": (500, 0.5, 0.6)})
    hists = _hists(s, y, a, np.linspace(0, 1, 11))
    det = optimize(hists, "equalized_odds", 0.5, SETTINGS, tolerance=0.0)
    rnd = optimize(hists, "equalized_odds", 0.5, SETTINGS, mode="randomized")
    assert det.degenerate and det.notes
    assert not rnd.degenerate
    cells = {g: _expected_cells(hists[g], rnd.groups[g].rule) for g in hists}
    tpr = [c[0] / (c[0] + c[3]) for c in cells.values()]
    fpr = [c[1] / (c[1] + c[2]) for c in cells.values()]
    assert tpr[0] == pytest.approx(tpr[1], abs=1e-9) and fpr[0] == pytest.approx(fpr[1], abs=1e-9)
    assert rnd.overall["accuracy"].value > det.overall["accuracy"].value
    assert rnd.groups["x"].rule.randomized or rnd.groups["y"].rule.randomized


def test_errors_name_the_problem() -> None:
    s, y, a = _stream(6, {"big": (300, 0.4, 2.0), "small": (10, 0.4, 2.0), "__other__": (300, 0.4, 2.0)})
    hists = _hists(s, y, a, np.linspace(0, 1, 11))
    with pytest.raises(WhatIfError) as e:
        optimize(hists, "demographic_parity", 0.5, SETTINGS)
    assert str(e.value).startswith(TOO_FEW_GROUPS_ERROR.split("{")[0])
    assert "small" in str(e.value) and "__other__" in str(e.value)
    with pytest.raises(WhatIfError, match=UNKNOWN_CRITERION_ERROR.split("{")[0]):
        optimize(hists, "statistical_parity", 0.5, SETTINGS)
    with pytest.raises(WhatIfError, match=UNKNOWN_GROUP_ERROR.split("{")[0]):
        what_if("f", hists, {"nobody": 0.4}, 0.5, SETTINGS)
    # an unknown criterion next to thresholds: a KeyError (HTTP 500) before, the same error now
    with pytest.raises(WhatIfError, match=UNKNOWN_CRITERION_ERROR.split("{")[0]):
        what_if("f", hists, {"big": 0.4}, 0.5, SETTINGS, criterion="bogus")
    # the small group is reported as excluded, not silently constrained, once two groups qualify
    hists["big2"] = hists["big"]
    w = optimize(hists, "demographic_parity", 0.5, SETTINGS)
    assert set(w.groups) == {"big", "big2"} and set(w.excluded) == {"small", "__other__"}


def test_whatif_core_loads_neither_kafka_nor_prometheus() -> None:
    import subprocess
    import sys

    code = (
        "import sys, stream_fair.whatif, stream_fair.whatif_query, stream_fair.whatif_client; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('kafka', 'prometheus_client')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_query_statuses() -> None:
    from stream_fair.whatif_query import NO_CURRENT_ERROR, answer

    s, y, a = _stream(8, {**GROUPS, "tiny": (10, 0.5, 2.0)})
    hists = _hists(s, y, a, np.linspace(0, 1, 51))
    store = {("m", "grp"): (hists["a"].edges, {g: (h.positives, h.negatives) for g, h in hists.items()})}

    def ask(configured: float | None = 0.5, **q: str | list[str]) -> tuple[int, dict]:
        query = {k: v if isinstance(v, list) else [v] for k, v in q.items()}
        return answer(query, lambda m, f: store.get((m, f)), SETTINGS, configured, lambda: sorted(store))

    code, doc = ask(model="m", feature="grp", criterion="equal_opportunity")
    assert (
        code == 200
        and doc["model"] == "m"
        and doc["excluded"] == {"tiny": "10 labelled pairs < min_samples=20"}
    )
    assert ask(model="m", feature="nope", criterion="equal_opportunity")[0] == 404
    assert ask(model="m", feature="grp", criterion="parity")[0] == 400
    assert ask(model="m", feature="grp", criterion="equal_opportunity", tolerance="1.5")[0] == 400
    assert ask(model="m", feature="grp", threshold="b0.4")[0] == 400
    assert ask(model="m", feature="grp", criterion="equal_opportunity", mode="exact")[0] == 400
    assert ask(model="m", feature="grp", threshold="a:0.4", mode="randomized")[0] == 400
    assert ask(model="m", feature="grp", threshold="a:0.4", current=["zz:0.4"])[0] == 400
    assert ask(model="m", feature="grp", threshold="tiny:0.4")[0] == 422
    assert ask(None, model="m", feature="grp", criterion="demographic_parity") == (
        400,
        {"error": NO_CURRENT_ERROR},
    )
    # per-group current thresholds, the rest from schema.score_threshold
    code, doc = ask(model="m", feature="grp", threshold="a:0.6", current=["b:0.4"])
    assert code == 200 and doc["groups"]["b"]["current_threshold"] == pytest.approx(0.4)
    assert doc["groups"]["c"]["current_threshold"] == pytest.approx(0.5)
    assert ask(None, model="m", feature="grp", threshold="a:0.6", current=["b:0.4"])[0] == 400


def test_cli_choices_are_the_cores() -> None:
    from stream_fair.cli import parser
    from stream_fair.whatif import MODES

    sub = next(a for a in parser(dev=False)._actions if a.dest == "command").choices["whatif"]  # type: ignore[union-attr]
    choices = {a.dest: tuple(a.choices) for a in sub._actions if a.choices}
    assert choices == {"criterion": CRITERIA, "mode": MODES}


def test_current_threshold_checked_against_the_recorded_decisions() -> None:
    from stream_fair.whatif import MISMATCH_NOTE

    s, y, a = _stream(9, GROUPS)
    edges = np.linspace(0, 1, 51)
    decided = s >= np.where(a == "c", 0.6, 0.5)  # group c is really decided at 0.6
    hists = {
        g: LabelledHistogram(
            edges,
            np.histogram(s[(a == g) & (y == 1)], edges)[0],
            np.histogram(s[(a == g) & (y == 0)], edges)[0],
            np.histogram(s[(a == g) & decided], edges)[0],
        )
        for g in GROUPS
    }
    w = what_if("f", hists, {"a": 0.4}, 0.5, SETTINGS)
    m = a == "c"
    assert {g: r.current_mismatch for g, r in w.groups.items()} == {
        "a": 0,
        "b": 0,
        "c": int(np.sum((s[m] >= 0.5) & (s[m] < 0.6))),
    }
    assert w.notes == [
        MISMATCH_NOTE.format(group="c", share=w.groups["c"].current_mismatch / 250, threshold=0.5)
    ]
    fixed = what_if("f", hists, {"a": 0.4}, {"a": 0.5, "b": 0.5, "c": 0.6}, SETTINGS)
    assert fixed.groups["c"].current_mismatch == 0 and fixed.notes == []
    now = fixed.groups["c"].current_rates["selection_rate"].value
    assert now == pytest.approx(decided[m].mean())  # the realized selection rate


def test_a_score_exactly_on_a_decimal_threshold_counts_as_above_it() -> None:
    """Review finding: the bin edges came from np.linspace, which gives 0.7000000000000001 for
    0.7 on [0, 1] in 50 bins (also 0.82 and 0.94): a score of exactly 0.7 fell in the bin below,
    and a what-if at 0.7 (or the current threshold 0.7) counted score > 0.7 instead of >= 0.7,
    against the docs' promise that every projected count on an edge is exact."""
    from stream_fair.verdict.increments import ScoreBins

    bins = ScoreBins(0.0, 1.0, 50)
    for i in range(51):
        decimal = float(f"{i / 50:.2f}")
        assert bins.edges()[i] == decimal
        assert bins.index(decimal) == min(i, 49)
    s, y, a = _stream(9, GROUPS)
    s = np.round(s, 2)  # many scores exactly on the edges, as a model rounding its scores gives
    edges = bins.edges()
    hists = {
        g: LabelledHistogram(
            edges,
            np.bincount(bins.indices(s[(a == g) & (y == 1)]), minlength=50),
            np.bincount(bins.indices(s[(a == g) & (y == 0)]), minlength=50),
        )
        for g in GROUPS
    }
    for t in (0.7, 0.82, 0.94):
        w = what_if("f", hists, {"b": t}, 0.5, SETTINGS)
        assert w.groups["b"].rule.thresholds == (t,)
        m = a == "b"
        assert np.sum(s[m] == t) > 0  # the case: scores exactly on the threshold
        want = _np_rates(s[m], y[m], t)
        assert w.groups["b"].rates["true_positive_rate"].value == pytest.approx(
            want["true_positive_rate"], abs=1e-12
        )
        assert w.groups["b"].rates["selection_rate"].value == pytest.approx(want["selection_rate"], abs=1e-12)
