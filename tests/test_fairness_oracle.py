"""Every-step oracle: incremental counts + stream_fair.fairness vs fairlearn on the joined pairs.

Streams carry two sensitive features (``sex``, ``race`` with a ``__missing__`` value) and their
intersection ``race&sex``. Counts are accumulated one pair at a time (``Counts.__add__`` for the
features, a river ``ConfusionMatrix`` per group for the intersection) and after every step (every
``CHECK_EVERY``-th step and the last one for the long seeded stream) every rate and every disparity
is compared with fairlearn on the prefix of the stream.

Zero-division conventions, handled explicitly:

* a rate whose denominator is 0 for a group (e.g. TPR without positives) is absent from our
  report; fairlearn (via scikit-learn) reports 0 there, so that (step, group, rate) is skipped;
* for the same reason a disparity uses only eligible groups with a non-zero denominator, and
  fairlearn is given exactly those groups' rows;
* a ratio 0/0 (every usable group at 0) is NaN in fairlearn and 1.0 (equal rates) here.

Cheap checks (our values vs fairlearn's ``MetricFrame.by_group``, disparities from those per-group
values) run at every step; the fairlearn disparity API (``MetricFrame.difference/ratio`` and the
``fairlearn.metrics`` functions on the restricted rows) runs at the last step of each stream and at
the checkpoints of the long one, because each fairlearn call costs tens of milliseconds.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import numpy as np
import pandas as pd
import pytest
from fairlearn.metrics import (
    MetricFrame,
    accuracy_score_difference,
    demographic_parity_difference,
    demographic_parity_ratio,
    equal_opportunity_difference,
    equal_opportunity_ratio,
    equalized_odds_difference,
    equalized_odds_ratio,
    false_negative_rate,
    false_positive_rate,
    false_positive_rate_difference,
    false_positive_rate_ratio,
    selection_rate,
    true_negative_rate,
    true_positive_rate,
    true_positive_rate_difference,
    true_positive_rate_ratio,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from river.metrics import ConfusionMatrix
from sklearn.metrics import accuracy_score, precision_score

from stream_fair.fairness import (
    DISPARITIES,
    RATES,
    Counts,
    FairnessSettings,
    FeatureReport,
    evaluate_feature,
    is_reserved,
)

SEX = ("F", "M")
RACE = ("A", "B", "C", "__missing__")
FEATURES = ("sex", "race", "race&sex")
REFERENCE = {"sex": "M", "race": "A", "race&sex": "A&M"}
MIN_SAMPLES = 2
SETTINGS = FairnessSettings(min_samples=MIN_SAMPLES)
CHECK_EVERY = 60

Event = tuple[int, int, str, str]  # y_true, y_pred, sex, race


def _base_rate(y_true: Any, y_pred: Any) -> float:
    return float(selection_rate(y_true, y_true))


RATE_METRICS: dict[str, Callable[..., Any]] = {
    "selection_rate": selection_rate,
    "base_rate": _base_rate,
    "true_positive_rate": true_positive_rate,
    "false_positive_rate": false_positive_rate,
    "false_negative_rate": false_negative_rate,
    "true_negative_rate": true_negative_rate,
    "positive_predictive_value": partial(precision_score, zero_division=np.nan),
    "negative_predictive_value": partial(precision_score, pos_label=0, zero_division=np.nan),
    "accuracy": accuracy_score,
}
assert tuple(RATE_METRICS) == RATES

# disparity -> (rate, kind); equalized odds is checked separately (two rates).
SINGLE_RATE = {
    "demographic_parity_difference": ("selection_rate", "difference"),
    "demographic_parity_ratio": ("selection_rate", "ratio"),
    "equal_opportunity_difference": ("true_positive_rate", "difference"),
    "equal_opportunity_ratio": ("true_positive_rate", "ratio"),
    "predictive_parity_difference": ("positive_predictive_value", "difference"),
    "accuracy_difference": ("accuracy", "difference"),
}
FAIRLEARN_FUNCTIONS: dict[str, Callable[..., float]] = {
    "demographic_parity_difference": demographic_parity_difference,
    "demographic_parity_ratio": demographic_parity_ratio,
    "equal_opportunity_difference": equal_opportunity_difference,
    "equal_opportunity_ratio": equal_opportunity_ratio,
    "accuracy_difference": accuracy_score_difference,
}


def group_of(feature: str, sex: str, race: str) -> str:
    return {"sex": sex, "race": race, "race&sex": f"{race}&{sex}"}[feature]


def denominator(c: Counts, rate: str) -> int:
    return {
        "true_positive_rate": c.tp + c.fn,
        "false_negative_rate": c.tp + c.fn,
        "false_positive_rate": c.fp + c.tn,
        "true_negative_rate": c.fp + c.tn,
        "positive_predictive_value": c.tp + c.fp,
        "negative_predictive_value": c.tn + c.fn,
    }.get(rate, c.n)


def ratio_or_one(num: float, den: float) -> float:
    """Our 0/0 convention; fairlearn's NaN is mapped here before comparing."""
    return 1.0 if num == 0 and den == 0 else num / den


def fairlearn_ratio(value: float) -> float:
    return 1.0 if math.isnan(value) else value


def sub_one(x: float) -> float:
    """fairlearn's ``ratio_sub_one`` for a ratio to a reference (``to_overall``)."""
    return 1.0 / x if x > 1 else x


class StreamState:
    """Incremental per-feature counts, updated one joined pair at a time."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.counts: dict[str, dict[str, Counts]] = {"sex": {}, "race": {}}
        self.matrices: dict[str, ConfusionMatrix] = {}

    def update(self, event: Event) -> None:
        y, p, sex, race = event
        self.events.append(event)
        one = Counts.from_labels([y], [p])
        for feature, group in (("sex", sex), ("race", race)):
            per = self.counts[feature]
            per[group] = per.get(group, Counts(0, 0, 0, 0)) + one
        self.matrices.setdefault(f"{race}&{sex}", ConfusionMatrix()).update(y, p)

    def feature_counts(self, feature: str) -> dict[str, Counts]:
        if feature == "race&sex":
            return {g: Counts.from_confusion(cm) for g, cm in self.matrices.items()}
        return dict(self.counts[feature])

    def arrays(self, feature: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        y = np.array([e[0] for e in self.events])
        p = np.array([e[1] for e in self.events])
        sf = np.array([group_of(feature, e[2], e[3]) for e in self.events])
        return y, p, sf


def check_step(state: StreamState, full_api: bool) -> None:
    for feature in FEATURES:
        counts = state.feature_counts(feature)
        report = evaluate_feature(feature, counts, SETTINGS, reference=REFERENCE[feature])
        y, p, sf = state.arrays(feature)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            by_group = MetricFrame(
                metrics=RATE_METRICS, y_true=y, y_pred=p, sensitive_features=pd.Series(sf)
            ).by_group
        check_rates(report, counts, y, p, sf, by_group)
        check_disparities(report, counts, by_group)
        if full_api:
            check_fairlearn_api(report, counts, y, p, sf)


def check_rates(
    report: FeatureReport,
    counts: dict[str, Counts],
    y: np.ndarray,
    p: np.ndarray,
    sf: np.ndarray,
    by_group: pd.DataFrame,
) -> None:
    assert set(report.groups) == set(np.unique(sf)) == set(counts)
    for g, gr in report.groups.items():
        rows = sf == g
        assert gr.counts == Counts.from_labels(y[rows], p[rows])
        assert gr.eligible == (gr.counts.n >= MIN_SAMPLES and not is_reserved(g))
        for rate in RATES:
            if denominator(gr.counts, rate) == 0:
                assert rate not in gr.rates  # fairlearn's zero-division value: skipped
                continue
            est = gr.rates[rate]
            assert est.value == by_group.loc[g, rate], (g, rate)
            assert 0.0 <= est.lower <= est.value <= est.upper <= 1.0


def usable(report: FeatureReport, counts: dict[str, Counts], rate: str) -> list[str]:
    return [g for g, gr in report.groups.items() if gr.eligible and denominator(counts[g], rate) > 0]


def expected_from_by_group(
    report: FeatureReport, counts: dict[str, Counts], by_group: pd.DataFrame
) -> dict[tuple[str, str], float]:
    """Disparities from fairlearn's per-group values restricted to the usable groups."""
    out: dict[tuple[str, str], float] = {}
    per_rate: dict[str, dict[str, tuple[float, float]]] = {}
    ref = report.reference
    for rate in (
        "selection_rate",
        "true_positive_rate",
        "false_positive_rate",
        "positive_predictive_value",
        "accuracy",
    ):
        groups = usable(report, counts, rate)
        if len(groups) < 2:
            continue
        v = by_group.loc[groups, rate].astype(float)
        per_rate.setdefault("between_groups", {})[rate] = (
            float(v.max() - v.min()),
            ratio_or_one(float(v.min()), float(v.max())),
        )
        if ref in groups:
            r = float(v[ref])
            per_rate.setdefault("to_reference", {})[rate] = (
                max(abs(float(x) - r) for x in v),
                min(ratio_or_one(min(float(x), r), max(float(x), r)) for x in v),
            )
    for method, rates in per_rate.items():
        for disparity, (rate, kind) in SINGLE_RATE.items():
            if rate in rates:
                out[(disparity, method)] = rates[rate][kind == "ratio"]
        if "true_positive_rate" in rates and "false_positive_rate" in rates:
            tpr, fpr = rates["true_positive_rate"], rates["false_positive_rate"]
            out[("equalized_odds_difference", method)] = max(tpr[0], fpr[0])
            out[("equalized_odds_ratio", method)] = min(tpr[1], fpr[1])
    return out


def check_disparities(report: FeatureReport, counts: dict[str, Counts], by_group: pd.DataFrame) -> None:
    expected = expected_from_by_group(report, counts, by_group)
    assert set(report.disparities) == set(expected)
    assert set(report.flagged) == set(expected)
    for key, value in expected.items():
        est = report.disparities[key]
        assert est.value == value, key
        assert est.lower <= est.upper
        assert key[0] in DISPARITIES


def restricted(groups: Sequence[str], y: np.ndarray, p: np.ndarray, sf: np.ndarray) -> dict[str, Any]:
    rows = np.isin(sf, list(groups))
    # a Series: fairlearn misreads a length-1 array of strings as two-dimensional
    return {"y_true": y[rows], "y_pred": p[rows], "sensitive_features": pd.Series(sf[rows])}


def check_fairlearn_api(
    report: FeatureReport, counts: dict[str, Counts], y: np.ndarray, p: np.ndarray, sf: np.ndarray
) -> None:
    """between_groups disparities against fairlearn's own disparity API on the usable rows."""
    got = {d: e.value for (d, m), e in report.disparities.items() if m == "between_groups"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for disparity, (rate, kind) in SINGLE_RATE.items():
            groups = usable(report, counts, rate)
            if len(groups) < 2:
                assert disparity not in got
                continue
            data = restricted(groups, y, p, sf)
            frame = MetricFrame(metrics={rate: RATE_METRICS[rate]}, **data)
            if kind == "difference":
                want = float(frame.difference(method="between_groups")[rate])
            else:
                want = fairlearn_ratio(float(frame.ratio(method="between_groups")[rate]))
            assert got[disparity] == want, disparity
            if disparity in FAIRLEARN_FUNCTIONS:
                value = float(FAIRLEARN_FUNCTIONS[disparity](**data))
                assert got[disparity] == (fairlearn_ratio(value) if kind == "ratio" else value)
        tpr_groups = usable(report, counts, "true_positive_rate")
        fpr_groups = usable(report, counts, "false_positive_rate")
        if min(len(tpr_groups), len(fpr_groups)) < 2:
            assert "equalized_odds_difference" not in got
            return
        if tpr_groups == fpr_groups:
            data = restricted(tpr_groups, y, p, sf)
            want_diff = float(equalized_odds_difference(**data))
            want_ratio = float(equalized_odds_ratio(**data))
            if math.isnan(want_ratio):  # fairlearn: min over (TPR, FPR) ratios with NaN
                tpr_ratio = fairlearn_ratio(float(true_positive_rate_ratio(**data)))
                fpr_ratio = fairlearn_ratio(float(false_positive_rate_ratio(**data)))
                want_ratio = min(tpr_ratio, fpr_ratio)
        else:  # different usable groups per rate: the worst of the two fairlearn disparities
            tpr_data = restricted(tpr_groups, y, p, sf)
            fpr_data = restricted(fpr_groups, y, p, sf)
            want_diff = max(
                float(true_positive_rate_difference(**tpr_data)),
                float(false_positive_rate_difference(**fpr_data)),
            )
            want_ratio = min(
                fairlearn_ratio(float(true_positive_rate_ratio(**tpr_data))),
                fairlearn_ratio(float(false_positive_rate_ratio(**fpr_data))),
            )
        assert got["equalized_odds_difference"] == want_diff
        assert got["equalized_odds_ratio"] == want_ratio


events_strategy = st.lists(
    st.tuples(st.integers(0, 1), st.integers(0, 1), st.sampled_from(SEX), st.sampled_from(RACE)),
    min_size=1,
    max_size=9,
)


@settings(max_examples=5, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=events_strategy)
def test_every_step_matches_fairlearn(events: list[Event]) -> None:
    state = StreamState()
    for i, event in enumerate(events):
        state.update(event)
        check_step(state, full_api=i == len(events) - 1)


@pytest.mark.parametrize("seed", [0, 1])
def test_long_seeded_stream_matches_fairlearn(seed: int) -> None:
    """A longer stream with real disparities; checked every ``CHECK_EVERY`` steps and at the end."""
    rng = np.random.default_rng(seed)
    n = 241
    race = rng.choice(RACE, size=n, p=[0.5, 0.3, 0.15, 0.05])
    sex = rng.choice(SEX, size=n)
    y = rng.random(n) < np.where(race == "B", 0.6, 0.35)
    p = np.where(y, rng.random(n) < 0.8, rng.random(n) < np.where(sex == "F", 0.1, 0.3))
    state = StreamState()
    for i in range(n):
        state.update((int(y[i]), int(p[i]), str(sex[i]), str(race[i])))
        if (i + 1) % CHECK_EVERY == 0 or i == n - 1:
            check_step(state, full_api=True)


def test_all_zero_rates_ratio_is_one_where_fairlearn_gives_nan() -> None:
    """The one deliberate difference from fairlearn: 0/0 ratios are 1 (equal rates), not NaN."""
    y = np.array([1, 0, 1, 0])
    p = np.array([0, 0, 0, 0])
    sf = np.array(["F", "F", "M", "M"])
    assert math.isnan(demographic_parity_ratio(y, p, sensitive_features=sf))
    counts = {g: Counts.from_labels(y[sf == g], p[sf == g]) for g in ("F", "M")}
    report = evaluate_feature("sex", counts, FairnessSettings(min_samples=1), reference="M")
    for method in ("between_groups", "to_reference"):
        assert report.disparities[("demographic_parity_ratio", method)].value == 1.0
        assert report.disparities[("demographic_parity_difference", method)].value == 0.0
