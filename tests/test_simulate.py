"""Each scenario produces what it claims, measured on the generated, joined stream."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from stream_fair.dev.simulate import (
    MALFORMED_KINDS,
    SCENARIOS,
    Scenario,
    expected_rates,
    generate,
    ground_truth,
    messy,
)


@dataclass
class Joined:
    """Generated predictions as arrays, with their outcome (label -1 when none arrived)."""

    index: np.ndarray
    ts: np.ndarray
    prediction: np.ndarray
    score: np.ndarray
    label: np.ndarray
    outcome_ts: np.ndarray
    attributes: list[dict[str, str]]

    def group(self, feature: str) -> np.ndarray:
        names = feature.split("&")
        return np.array(["&".join(a[n] for n in names) for a in self.attributes])


def join(events: list[tuple[str, dict[str, Any]]]) -> Joined:
    preds = [p for k, p in events if k == "prediction"]
    outcomes = {p["id"]: p for k, p in events if k == "outcome"}
    assert len(outcomes) == sum(k == "outcome" for k, _ in events), "duplicate outcome ids"
    return Joined(
        index=np.array([int(p["id"].removeprefix("req-")) for p in preds]),
        ts=np.array([p["ts"] for p in preds]),
        prediction=np.array([p["prediction"] for p in preds]),
        score=np.array([p["score"] for p in preds]),
        label=np.array([outcomes[p["id"]]["label"] if p["id"] in outcomes else -1 for p in preds]),
        outcome_ts=np.array([outcomes.get(p["id"], {"ts": np.nan})["ts"] for p in preds]),
        attributes=[p["attributes"] for p in preds],
    )


def rates(j: Joined, mask: np.ndarray) -> dict[str, float]:
    """Observed share, base rate, TPR, FPR, selection rate and label coverage on ``mask``."""
    labelled = mask & (j.label >= 0)
    pos, neg = labelled & (j.label == 1), labelled & (j.label == 0)
    return {
        "share": mask.mean(),
        "base_rate": j.label[labelled].mean(),
        "tpr": j.prediction[pos].mean(),
        "fpr": j.prediction[neg].mean(),
        "selection_rate": j.prediction[mask].mean(),
        "label_coverage": labelled.sum() / mask.sum(),
    }


def by_group(j: Joined, feature: str, mask: np.ndarray | None = None) -> dict[str, dict[str, float]]:
    groups = j.group(feature)
    base = np.ones(len(groups), bool) if mask is None else mask
    return {g: rates(j, base & (groups == g)) for g in sorted(set(groups))}


def within(p: float, m: int) -> float:
    """Four binomial standard errors: a deterministic seed, but a tolerance that means something."""
    return 4 * float(np.sqrt(p * (1 - p) / m))


def gap(per_group: dict[str, dict[str, float]], metric: str) -> float:
    values = [r[metric] for r in per_group.values()]
    return max(values) - min(values)


@pytest.fixture(scope="module")
def fair_events() -> list[tuple[str, dict[str, Any]]]:
    return list(generate(SCENARIOS["fair"](), 40_000, seed=11))


# -- the stream itself -------------------------------------------------------------------------
def test_schema_order_and_score_consistency(fair_events: list[tuple[str, dict[str, Any]]]) -> None:
    kinds = Counter(k for k, _ in fair_events)
    assert kinds["prediction"] == 40_000 and kinds["outcome"] == 40_000  # all labelled
    pred = next(p for k, p in fair_events if k == "prediction")
    assert set(pred) == {"id", "ts", "model", "prediction", "score", "attributes"}
    assert pred["model"] == "credit-v3" and set(pred["attributes"]) == {"group"}
    out = next(p for k, p in fair_events if k == "outcome")
    assert set(out) == {"id", "ts", "label"} and out["label"] in (0, 1)
    ts = [p["ts"] for _, p in fair_events]
    assert ts == sorted(ts)  # arrival order is event-time order
    seen: set[str] = set()
    for kind, payload in fair_events:
        if kind == "prediction":
            seen.add(payload["id"])
        else:
            assert payload["id"] in seen  # outcomes come after their prediction
    j = join(fair_events)
    assert np.array_equal(j.prediction, (j.score >= 0.5).astype(int))
    assert ((j.score >= 0) & (j.score <= 1)).all()
    assert (j.score[j.label == 1].mean() - j.score[j.label == 0].mean()) > 0.15
    assert sorted(j.index.tolist()) == list(range(40_000))
    assert (j.outcome_ts >= j.ts).all()
    assert j.ts[0] == 1_790_000_000.0
    assert 40_000 / (j.ts[-1] - j.ts[0]) == pytest.approx(50.0, rel=0.03)


def test_deterministic_per_seed() -> None:
    scenario = SCENARIOS["lending"]()
    first = list(generate(scenario, 9_000, seed=3))  # crosses a chunk boundary
    assert first == list(generate(scenario, 9_000, seed=3))
    assert first != list(generate(scenario, 9_000, seed=4))
    gt = ground_truth(SCENARIOS["bias_onset"](), 9_000, seed=3)
    assert gt == ground_truth(SCENARIOS["bias_onset"](), 9_000, seed=3)


def test_generation_is_lazy() -> None:
    stream = generate(SCENARIOS["fair"](), 10**10, seed=0)  # would never fit in memory
    assert next(stream)[0] == "prediction"


def test_label_delay_distribution() -> None:
    j = join(list(generate(SCENARIOS["fair"](label_delay_mean_s=120.0), 20_000, seed=2)))
    delay = j.outcome_ts - j.ts
    assert delay.mean() == pytest.approx(120.0, rel=0.05)
    assert np.median(delay) == pytest.approx(120.0 * np.log(2), rel=0.08)  # exponential
    fixed = SCENARIOS["fair"](label_delay="fixed", label_delay_mean_s=60.0)
    j = join(list(generate(fixed, 2_000, seed=2)))
    assert np.allclose(j.outcome_ts - j.ts, 60.0, atol=0.002)
    lognormal = SCENARIOS["fair"](label_delay="lognormal", label_delay_mean_s=100.0)
    j = join(list(generate(lognormal, 20_000, seed=2)))
    assert (j.outcome_ts - j.ts).mean() == pytest.approx(100.0, rel=0.08)
    assert np.median(j.outcome_ts - j.ts) == pytest.approx(100.0 * np.exp(-0.5), rel=0.08)
    per_group = SCENARIOS["fair"](label_delay_mean_by_cell={"group=A": 600.0})
    j = join(list(generate(per_group, 20_000, seed=2)))
    is_a = j.group("group") == "A"
    assert (j.outcome_ts - j.ts)[is_a].mean() == pytest.approx(600.0, rel=0.05)
    assert (j.outcome_ts - j.ts)[~is_a].mean() == pytest.approx(300.0, rel=0.05)


def test_scenario_validation_names_the_fix() -> None:
    with pytest.raises(ValueError, match="unknown cell 'group=Z'"):
        SCENARIOS["fair"](tpr_by_cell={"group=Z": 0.5})
    with pytest.raises(ValueError, match=r"tpr values must lie in \[0, 1\]"):
        SCENARIOS["fair"](tpr_by_cell={"group=A": 1.5})
    assert set(SCENARIOS) == {
        "lending",
        "fair",
        "bias_onset",
        "gradual_drift",
        "selective_labels",
        "feedback_loop",
        "bias_onset_delayed",
        "unequal_base_rates",
        "mix_shift",
        "group_delays",
        "label_delays",
        "model_change",
    }
    assert all(isinstance(factory(), Scenario) for factory in SCENARIOS.values())


def test_simulate_is_pure() -> None:
    code = "import sys, stream_fair.dev.simulate; assert 'kafka' not in sys.modules, 'kafka imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# -- scenarios ---------------------------------------------------------------------------------
def test_fair_is_fair(fair_events: list[tuple[str, dict[str, Any]]]) -> None:
    per_group = by_group(join(fair_events), "group")
    shares = {"A": 0.40, "B": 0.30, "C": 0.15, "D": 0.10, "E": 0.05}
    for g, r in per_group.items():
        assert r["share"] == pytest.approx(shares[g], abs=0.01)
        assert r["base_rate"] == pytest.approx(0.3, abs=0.03)
        assert r["tpr"] == pytest.approx(0.8, abs=0.05)
        assert r["fpr"] == pytest.approx(0.1, abs=0.03)
    assert gap(per_group, "tpr") < 0.06
    assert ground_truth(SCENARIOS["fair"](), 100).affected_group is None


def test_lending_bias_hides_in_the_marginals() -> None:
    scenario = SCENARIOS["lending"]()
    j = join(list(generate(scenario, 80_000, seed=7)))
    gt = ground_truth(scenario, 80_000, seed=7)
    assert (gt.affected_feature, gt.affected_group) == ("race&sex", "Black&Female")
    sex, race, cells = by_group(j, "sex"), by_group(j, "race"), by_group(j, "race&sex")
    assert sex["Female"]["share"] == pytest.approx(0.5, abs=0.01)
    assert race["White"]["share"] == pytest.approx(0.6, abs=0.01)
    assert set(by_group(j, "age")) == {"18-24", "25-44", "45+"}
    assert gap(sex, "tpr") < 0.08 and gap(race, "tpr") < 0.08  # weak in both marginals
    assert gap(sex, "selection_rate") < 0.08 and gap(race, "selection_rate") < 0.08
    assert gap(cells, "tpr") > 0.3  # clear in the intersection
    others = {g: r for g, r in cells.items() if g != "Black&Female"}
    assert cells["Black&Female"]["tpr"] < min(r["tpr"] for r in others.values()) - 0.1
    assert cells["Black&Female"]["selection_rate"] < min(r["selection_rate"] for r in others.values())
    assert cells["Black&Female"]["tpr"] == pytest.approx(0.50, abs=0.04)
    # Ground truth's model-implied rates match what was generated.
    for g, r in cells.items():
        assert r["tpr"] == pytest.approx(gt.extra["expected"][g]["tpr"], abs=0.05)
    for g, r in race.items():
        assert r["tpr"] == pytest.approx(gt.extra["expected_marginals"]["race"][g]["tpr"], abs=0.04)


def test_bias_onset_gap_appears_only_after_onset() -> None:
    scenario = SCENARIOS["bias_onset"]()
    n = 100_000
    j = join(list(generate(scenario, n, seed=5)))
    gt = ground_truth(scenario, n, seed=5)
    assert (gt.affected_feature, gt.affected_group, gt.onset_index) == ("group", "E", n // 2)
    assert gt.onset_ts == j.ts[j.index == n // 2][0]
    is_e = j.group("group") == "E"
    before, after = j.index < gt.onset_index, j.index >= gt.onset_index
    gap_before = rates(j, before & ~is_e)["tpr"] - rates(j, before & is_e)["tpr"]
    gap_after = rates(j, after & ~is_e)["tpr"] - rates(j, after & is_e)["tpr"]
    assert abs(gap_before) < 0.05
    assert gap_after == pytest.approx(0.10, abs=0.05)
    assert gt.extra["expected_at_end"]["E"]["tpr"] == pytest.approx(0.70)
    custom = ground_truth(SCENARIOS["bias_onset"](onset_index=123, tpr_drop=0.2), 1_000)
    assert custom.onset_index == 123 and custom.extra["tpr_drop"] == 0.2


def test_gradual_drift_declines_linearly() -> None:
    scenario = SCENARIOS["gradual_drift"]()
    n = 100_000
    j = join(list(generate(scenario, n, seed=9)))
    gt = ground_truth(scenario, n, seed=9)
    assert gt.affected_group == "C" and gt.onset_index == 30_000
    assert gt.extra["end_index"] == 70_000
    is_c = j.group("group") == "C"
    windows = [(0, 30_000), (40_000, 50_000), (50_000, 60_000), (70_000, 100_000)]
    tpr = [rates(j, is_c & (j.index >= lo) & (j.index < hi))["tpr"] for lo, hi in windows]
    assert tpr[0] == pytest.approx(0.80, abs=0.03)
    assert tpr[1] == pytest.approx(0.80 - 0.2 * 0.375, abs=0.05)
    assert tpr[2] == pytest.approx(0.80 - 0.2 * 0.625, abs=0.05)
    assert tpr[3] == pytest.approx(0.60, abs=0.03)
    assert rates(j, ~is_c & (j.index >= 70_000))["tpr"] == pytest.approx(0.80, abs=0.02)


def test_selective_labels_coverage() -> None:
    scenario = SCENARIOS["selective_labels"]()
    j = join(list(generate(scenario, 40_000, seed=4)))
    per_group = by_group(j, "group")
    is_b = j.group("group") == "B"
    labelled = j.label >= 0
    assert (j.prediction[is_b & labelled] == 1).all()  # only approved B applicants get labels
    assert per_group["B"]["label_coverage"] == pytest.approx(per_group["B"]["selection_rate"])
    assert per_group["B"]["label_coverage"] == pytest.approx(0.31, abs=0.02)
    assert labelled[~is_b].all()
    gt = ground_truth(scenario, 40_000, seed=4)
    assert gt.affected_group == "B"
    assert gt.extra["expected"]["B"]["label_coverage"] == pytest.approx(0.31)
    random_labels = SCENARIOS["selective_labels"](label_prob=0.3, approved_only=False)
    j = join(list(generate(random_labels, 40_000, seed=4)))
    is_b = j.group("group") == "B"
    assert rates(j, is_b)["label_coverage"] == pytest.approx(0.3, abs=0.02)
    assert (j.prediction[is_b & (j.label >= 0)] == 0).any()
    assert (j.label[~is_b] >= 0).all()


# late periods hold D at the 0.5 % share floor (~10 predictions), some without a positive label:
# their TPR is undefined (and not checked)
@pytest.mark.filterwarnings("ignore:Mean of empty slice", "ignore:invalid value encountered")
def test_feedback_loop_couples_selection_to_next_period() -> None:
    n = 80_000
    scenario = SCENARIOS["feedback_loop"]()
    j = join(list(generate(scenario, n, seed=6)))
    gt = ground_truth(scenario, n, seed=6)
    periods, coupling = gt.extra["periods"], gt.extra["coupling"]
    ref = coupling["reference_selection_rate"]
    assert gt.affected_group == "D" and len(periods) == 40 and gt.onset_index == n // 40
    is_d = j.group("group") == "D"
    observed = []
    for p in periods:
        in_period = (j.index >= p["start_index"]) & (j.index < p["end_index"])
        assert in_period.sum() == n // 40
        r = rates(j, in_period & is_d)
        observed.append(r)
        m = (in_period & is_d).sum()
        share = r["share"] / in_period.mean()
        assert share == pytest.approx(p["share"], abs=within(p["share"], n // 40))
        assert r["base_rate"] == pytest.approx(p["base_rate"], abs=within(p["base_rate"], m))
        assert r["selection_rate"] == pytest.approx(p["selection_rate"], abs=within(p["selection_rate"], m))
    # Under-approval (SR below the rest's) shrinks next period's share and base rate ...
    for k in range(len(periods) - 1):
        push = (periods[k]["selection_rate"] - ref) / ref
        assert push < 0
        assert periods[k + 1]["share"] == pytest.approx(
            max(periods[k]["share"] * (1 + coupling["share"] * push), scenario.min_share)
        )
        assert periods[k + 1]["base_rate"] == pytest.approx(
            periods[k]["base_rate"] * (1 + coupling["base_rate"] * push)
        )
    first, last = observed[0], observed[-1]
    assert last["share"] < 0.6 * first["share"]
    assert last["base_rate"] < first["base_rate"] - 0.08
    # ... and without coupling nothing moves: the decline is caused by the loop.
    static = SCENARIOS["feedback_loop"](share_coupling=0.0, base_rate_coupling=0.0)
    flat = ground_truth(static, n, seed=6).extra["periods"]
    assert {p["share"] for p in flat} == {0.10}
    assert len({round(p["base_rate"], 12) for p in flat}) == 1


def _logit(p: np.ndarray) -> np.ndarray:
    q = np.clip(p, 1e-4, 1 - 1e-4)
    return np.log(q / (1 - q))


def test_scores_are_logistic_per_label_and_a_tpr_drop_shifts_them() -> None:
    """score = sigmoid(z), z ~ Logistic(logit(rate)): decisions, medians and the shift of a drop."""
    scenario = SCENARIOS["bias_onset"](tpr_drop=0.2)
    n = 100_000
    j = join(list(generate(scenario, n, seed=8)))
    assert np.array_equal(j.prediction, (j.score >= 0.5).astype(int))
    is_e, after = j.group("group") == "E", j.index >= n // 2
    pos, neg = j.label == 1, j.label == 0
    z = _logit(j.score)
    assert np.median(z[pos & ~is_e]) == pytest.approx(np.log(0.8 / 0.2), abs=0.05)
    assert np.median(z[neg & ~is_e]) == pytest.approx(np.log(0.1 / 0.9), abs=0.05)
    # logistic scale: the interquartile range of z is 2 log 3
    q1, q3 = np.percentile(z[pos & ~is_e], [25, 75])
    assert q3 - q1 == pytest.approx(2 * np.log(3), abs=0.1)
    # E's TPR 0.8 -> 0.6: its positives' latent scores move down by logit(0.8) - logit(0.6)
    shift = np.median(z[pos & is_e & ~after]) - np.median(z[pos & is_e & after])
    assert shift == pytest.approx(np.log(4) - np.log(1.5), abs=0.2)
    assert np.median(z[neg & is_e & after]) == pytest.approx(np.log(0.1 / 0.9), abs=0.15)


def _delays_of(j: Joined, mask: np.ndarray) -> float:
    return float((j.outcome_ts - j.ts)[mask].mean())


HOUR = 3600.0


def test_delayed_scenarios_have_two_features_and_hours_of_delay() -> None:
    n = 40_000
    j = join(list(generate(SCENARIOS["bias_onset_delayed"](), n, seed=3)))
    sex, group = by_group(j, "sex"), by_group(j, "group")
    assert set(sex) == {"F", "M"} and set(group) == set("ABCDE")
    assert sex["F"]["share"] == pytest.approx(0.5, abs=0.01)
    assert _delays_of(j, j.label >= 0) == pytest.approx(4 * HOUR, rel=0.05)
    is_e, after = j.group("group") == "E", j.index >= n // 2
    assert rates(j, is_e & after)["tpr"] == pytest.approx(0.7, abs=0.05)
    assert rates(j, ~is_e & after)["tpr"] == pytest.approx(0.8, abs=0.02)
    gt = ground_truth(SCENARIOS["bias_onset_delayed"](), n, seed=3)
    assert (gt.affected_feature, gt.affected_group, gt.onset_index) == ("group", "E", n // 2)


def test_unequal_base_rates_keep_tpr_and_fpr_equal() -> None:
    per_group = by_group(join(list(generate(SCENARIOS["unequal_base_rates"](), 60_000, seed=4))), "group")
    for g, br in zip("ABCDE", (0.2, 0.3, 0.4, 0.5, 0.6), strict=True):
        assert per_group[g]["base_rate"] == pytest.approx(br, abs=0.03)
    assert gap(per_group, "tpr") < 0.06 and gap(per_group, "fpr") < 0.04
    assert gap(per_group, "selection_rate") > 0.25  # demographic parity is truly violated


def test_mix_shift_moves_traffic_only() -> None:
    n = 80_000
    scenario = SCENARIOS["mix_shift"]()
    j = join(list(generate(scenario, n, seed=5)))
    is_e = j.group("group") == "E"
    first, last = j.index < n // 40, j.index >= n - n // 40
    assert is_e[first].mean() == pytest.approx(0.05, abs=0.02)
    assert is_e[last].mean() == pytest.approx(0.05 * 1.04**39, abs=0.03)
    late = by_group(j, "group", last)
    assert gap(late, "tpr") < 0.12 and gap(late, "fpr") < 0.08
    periods = ground_truth(scenario, n, seed=5).extra["periods"]
    assert periods[-1]["share"] == pytest.approx(0.05 * 1.04**39)


def test_group_delays_depend_on_the_group_only() -> None:
    j = join(list(generate(SCENARIOS["group_delays"](), 40_000, seed=6)))
    groups = j.group("group")
    for g, mean in zip("ABCDE", (12, 4, 2, 1, 0.5), strict=True):
        assert _delays_of(j, groups == g) == pytest.approx(mean * HOUR, rel=0.1)
    assert gap(by_group(j, "group"), "tpr") < 0.06


def test_label_delays_depend_on_label_and_group() -> None:
    j = join(list(generate(SCENARIOS["label_delays"](), 60_000, seed=7)))
    groups = j.group("group")
    for g, factor in zip("ABCDE", (1, 2, 3, 4, 8), strict=True):
        neg = (groups == g) & (j.label == 0)
        pos = (groups == g) & (j.label == 1)
        assert _delays_of(j, neg) == pytest.approx(2 * HOUR, rel=0.1)
        assert _delays_of(j, pos) == pytest.approx(2 * HOUR * factor, rel=0.12)
    assert gap(by_group(j, "group"), "tpr") < 0.06


def test_model_change_moves_every_group_at_once() -> None:
    n = 60_000
    j = join(list(generate(SCENARIOS["model_change"](), n, seed=9)))
    groups, after = j.group("group"), j.index >= n // 2
    for g in "ABCDE":
        assert rates(j, (groups == g) & ~after)["tpr"] == pytest.approx(0.8, abs=0.06)
        assert rates(j, (groups == g) & after)["tpr"] == pytest.approx(0.7, abs=0.06)
    assert _delays_of(j, groups == "E") == pytest.approx(24 * HOUR, rel=0.1)
    assert _delays_of(j, groups != "E") == pytest.approx(20 * 24 * HOUR, rel=0.05)
    assert ground_truth(SCENARIOS["model_change"](), n).affected_group is None


def test_expected_rates_intersection_names() -> None:
    cells = expected_rates(SCENARIOS["lending"](), "race&sex")
    assert "Black&Female" in cells and len(cells) == 8
    assert sum(r["share"] for r in cells.values()) == pytest.approx(1.0)


# -- messy -------------------------------------------------------------------------------------
def _classify(kind: str, payload: dict[str, Any] | bytes) -> str:
    if isinstance(payload, bytes):
        return "not_json"
    if "id" not in payload:
        return "missing_id"
    if kind == "prediction" and payload["prediction"] not in (0, 1):
        return "bad_prediction"
    if not isinstance(payload["ts"], float):
        return "bad_timestamp"
    return "valid"


def test_messy_yields_every_perturbation_with_exact_fates() -> None:
    clean = list(generate(SCENARIOS["fair"](label_delay_mean_s=20.0), 5_000, seed=1))
    stream = messy(iter(clean), seed=2)
    out = list(stream)
    counts = stream.counts
    assert counts["input"] == len(clean) and counts["output"] == len(out)

    fates = Counter(_classify(k, p) for k, p in out)
    for kind in MALFORMED_KINDS:
        assert fates[kind] == counts[f"malformed_{kind}"] >= 1
    assert sum(fates[k] for k in MALFORMED_KINDS) == counts["malformed"]
    assert counts["malformed"] == pytest.approx(0.01 * len(clean), rel=0.3)

    valid = [(k, p) for k, p in out if isinstance(p, dict) and _classify(k, p) == "valid"]
    copies = Counter((k, p["id"]) for k, p in valid)
    assert set(copies) == {(k, p["id"]) for k, p in clean}  # nothing lost, nothing invented
    assert sum(copies.values()) - len(copies) == counts["duplicate"] >= 1
    assert counts["duplicate"] == pytest.approx(0.02 * len(clean), rel=0.3)
    by_key = {(k, p["id"]): p for k, p in clean}
    assert all(p == by_key[(k, p["id"])] for k, p in valid)  # re-sent verbatim

    seen: set[str] = set()
    early = 0
    for kind, payload in valid:
        if kind == "prediction":
            seen.add(payload["id"])
        elif payload["id"] not in seen:
            early += 1
    assert early == counts["early_outcome"] >= 1
    assert early == pytest.approx(0.05 * 5_000, rel=0.3)

    positions = {(k, p["id"]): i for i, (k, p) in enumerate(reversed(valid))}
    order = [len(valid) - 1 - positions[(k, p["id"])] for k, p in clean]
    assert order != sorted(order)  # locally shuffled
    assert out == list(messy(iter(clean), seed=2))  # deterministic per seed
    assert out != list(messy(iter(clean), seed=3))


def test_messy_with_everything_off_is_identity() -> None:
    clean = list(generate(SCENARIOS["fair"](), 500, seed=1))
    calm = messy(clean, seed=0, duplicate_rate=0, malformed_rate=0, early_outcome_rate=0, shuffle_window=0)
    assert list(calm) == clean
