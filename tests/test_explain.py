"""The shift decomposition and the drivers against independent recomputations on simulated streams.

The oracle here does not use stream_fair.explain: per-cell parameters are recounted from the raw
events with pandas, rates are written out per rate, and the Shapley components are the average
over the 3! switching orders (itertools.permutations), not the subset weights the module uses.
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
from fairlearn.metrics import true_positive_rate

from stream_fair.explain import FACTORS, decompose, decompose_gap, drivers, explain
from stream_fair.groups import FeatureKey, feature_keys
from tests.explain_streams import Events, Population, generate

ATTRS = {
    "sex": (("F", "M"), (0.5, 0.5)),
    "age": (("young", "mid", "old"), (0.3, 0.4, 0.3)),
    "region": (("n", "s"), (0.6, 0.4)),
}
ORDER = ["sex", "age", "region"]


# -- the oracle -----------------------------------------------------------------------------------
def frame(ev: Events) -> pd.DataFrame:
    return pd.DataFrame({**{n: ev.values[n] for n in ORDER}, "y": ev.label, "p": ev.predicted})


def cell_params(df: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    g = df.groupby(by)
    out = pd.DataFrame({"n": g.size()})
    out["s"] = out["n"] / out["n"].sum()
    out["pi"] = g["y"].mean()
    out["tpr"] = df[df.y == 1].groupby(by)["p"].mean()
    out["fpr"] = df[df.y == 0].groupby(by)["p"].mean()
    return out


def rate_of(s: np.ndarray, pi: np.ndarray, tpr: np.ndarray, fpr: np.ndarray, rate: str) -> float:
    if rate == "true_positive_rate":
        return float(np.sum(s * pi * tpr) / np.sum(s * pi))
    if rate == "false_positive_rate":
        return float(np.sum(s * (1 - pi) * fpr) / np.sum(s * (1 - pi)))
    assert rate == "selection_rate"
    return float(np.sum(s * (pi * tpr + (1 - pi) * fpr)))


def shapley_by_permutations(a: pd.DataFrame, b: pd.DataFrame, rate: str) -> dict[str, float]:
    """Average marginal effect of switching each factor from a to b over all 6 orders."""
    factors = {"traffic_mix": ["s"], "base_rate": ["pi"], "error_rates": ["tpr", "fpr"]}
    a, b = a.align(b, join="outer")
    out = dict.fromkeys(factors, 0.0)
    for order in itertools.permutations(factors):
        cur = a.copy()
        prev = rate_of(cur.s.values, cur.pi.values, cur.tpr.values, cur.fpr.values, rate)
        for f in order:
            cur[factors[f]] = b[factors[f]]
            now = rate_of(cur.s.values, cur.pi.values, cur.tpr.values, cur.fpr.values, rate)
            out[f] += (now - prev) / 6.0
            prev = now
    return out


def sub_cells(ev: Events, group: str) -> dict[str, tuple[int, int, int, int]]:
    """The module's input: sub-cells of sex=group labelled by the other attributes."""
    return {f"age={c[1]}, region={c[2]}": q for c, q in ev.cells(ORDER).items() if c[0] == group}


def population_params(pop: Population, group: str) -> pd.DataFrame:
    rows = []
    for age, pa in zip(*pop.attributes["age"], strict=True):
        for region, pr in zip(*pop.attributes["region"], strict=True):
            p = pop.params({"sex": group, "age": age, "region": region})
            rows.append(
                {
                    "age": age,
                    "region": region,
                    "s": pa * pr,
                    "pi": p["base"],
                    "tpr": p["tpr"],
                    "fpr": p["fpr"],
                }
            )
    df = pd.DataFrame(rows).set_index(["age", "region"])
    df["s"] /= df["s"].sum()
    return df


SCENARIOS: dict[str, tuple[str, Population, Population, str]] = {
    # name: (rate, period A, period B, the component that carries the change)
    "error_rates": (
        "true_positive_rate",
        Population(dict(ATTRS)),
        Population(dict(ATTRS), overrides=[({"sex": "F", "age": "young"}, {"tpr": 0.4})]),
        "error_rates",
    ),
    "traffic_mix": (  # young F (TPR 0.4 throughout) grows from 30% to 70% of F's traffic
        "true_positive_rate",
        Population(dict(ATTRS), overrides=[({"sex": "F", "age": "young"}, {"tpr": 0.4})]),
        Population(
            {**ATTRS, "age": (("young", "mid", "old"), (0.7, 0.15, 0.15))},
            overrides=[({"sex": "F", "age": "young"}, {"tpr": 0.4})],
        ),
        "traffic_mix",
    ),
    "base_rate": (  # the selection rate follows a prevalence change at fixed TPR / FPR
        "selection_rate",
        Population(dict(ATTRS), base=0.3),
        Population(dict(ATTRS), base=0.6),
        "base_rate",
    ),
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_components_match_the_permutation_oracle_and_name_the_cause(name: str) -> None:
    rate, pop_a, pop_b, cause = SCENARIOS[name]
    rng = np.random.default_rng(7)
    ea, eb = generate(pop_a, 40_000, rng), generate(pop_b, 40_000, rng)
    fa, fb = frame(ea), frame(eb)
    fa, fb = fa[fa.sex == "F"], fb[fb.sex == "F"]
    oracle = shapley_by_permutations(
        cell_params(fa, ["age", "region"]), cell_params(fb, ["age", "region"]), rate
    )
    d = decompose(sub_cells(ea, "F"), sub_cells(eb, "F"), rate)
    for f in FACTORS:
        assert d.components[f].value == pytest.approx(oracle[f], abs=1e-9), f
    direct = {
        "true_positive_rate": lambda df: df[df.y == 1].p.mean(),
        "selection_rate": lambda df: df.p.mean(),
    }
    assert d.before == pytest.approx(direct[rate](fa)) and d.after == pytest.approx(direct[rate](fb))
    assert sum(c.value for c in d.components.values()) == pytest.approx(d.change.value, abs=1e-12)
    assert d.change.value == pytest.approx(d.after - d.before, abs=1e-12)
    # the cause's interval excludes 0, the others' include it
    for f, e in d.components.items():
        assert (e.lower > 0 or e.upper < 0) == (f == cause), (f, e)
    # Kitagawa per-cell split adds up to the change too
    assert sum(c.mix + c.within for c in d.cells) == pytest.approx(d.change.value, abs=1e-9)


def test_intervals_cover_the_true_components_on_fresh_seeds() -> None:
    """95% intervals against the population's components (oracle), over 40 fresh seeds."""
    covered = total = 0
    for rate, pop_a, pop_b, _ in SCENARIOS.values():
        truth = shapley_by_permutations(population_params(pop_a, "F"), population_params(pop_b, "F"), rate)
        for seed in range(1000, 1040):
            rng = np.random.default_rng(seed)
            ea, eb = generate(pop_a, 8_000, rng), generate(pop_b, 8_000, rng)
            d = decompose(sub_cells(ea, "F"), sub_cells(eb, "F"), rate, seed=seed)
            for f in FACTORS:
                total += 1
                covered += d.components[f].lower <= truth[f] <= d.components[f].upper
    coverage = covered / total
    print(f"decomposition interval coverage: {covered}/{total} = {coverage:.3f}")
    assert coverage >= 0.9, coverage


def test_gap_decomposition_is_the_difference_of_group_and_rest() -> None:
    rate, pop_a, pop_b, _ = SCENARIOS["error_rates"]
    rng = np.random.default_rng(3)
    ea, eb = generate(pop_a, 30_000, rng), generate(pop_b, 30_000, rng)
    g = decompose(sub_cells(ea, "F"), sub_cells(eb, "F"), rate)
    r = decompose(sub_cells(ea, "M"), sub_cells(eb, "M"), rate)
    gap = decompose_gap(
        (sub_cells(ea, "F"), sub_cells(eb, "F")), (sub_cells(ea, "M"), sub_cells(eb, "M")), rate
    )
    assert gap.before == pytest.approx(g.before - r.before) and gap.after == pytest.approx(g.after - r.after)
    for f in FACTORS:
        assert gap.components[f].value == pytest.approx(g.components[f].value - r.components[f].value)
    assert gap.components["error_rates"].upper < 0 < gap.components["traffic_mix"].upper


def test_drivers_rank_the_injected_sub_cell_first_and_sum_to_the_gap() -> None:
    pop = Population(dict(ATTRS), overrides=[({"sex": "F", "age": "young"}, {"tpr": 0.35})])
    ev = generate(pop, 60_000, np.random.default_rng(11))
    cells = ev.cells(ORDER)
    keys = feature_keys(ORDER, [["age", "region"]])
    attrs = [(n, i) for i, n in enumerate(ORDER)]
    cells3 = {(*c, ""): q for c, q in cells.items()}  # the intersection's fold flag, as the guard adds
    d = drivers(cells3, keys[0], "F", "true_positive_rate", attrs, [keys[3]], top=50)
    sel = ev.values["sex"] == "F"
    expected_gap = true_positive_rate(ev.label[sel], ev.predicted[sel]) - true_positive_rate(
        ev.label[~sel], ev.predicted[~sel]
    )
    assert d.gap == pytest.approx(expected_gap)
    assert (d.ranked[0].by, d.ranked[0].value) == ("age", "young")
    assert d.cells[0].value.startswith("age=young")
    # one attribute's values partition the group: their contributions add up to the gap
    for name in ("age", "region", "age&region"):
        assert sum(x.contribution for x in d.ranked if x.by == name) == pytest.approx(d.gap), name
    young = (ev.values["age"] == "young") & sel & (ev.label == 1)
    assert d.ranked[0].trials == int(young.sum()) and d.ranked[0].successes == int(ev.predicted[young].sum())


def buckets_from(
    periods: list[Events], model: str = "m"
) -> dict[int, dict[tuple[str, tuple[str, ...]], list[int]]]:
    out: dict[int, dict[tuple[str, tuple[str, ...]], list[int]]] = {}
    for b, ev in enumerate(periods):
        out[b] = {(model, c): [0, 0, *q, 0] for c, q in ev.cells(ORDER).items()}
    return out


def test_explain_document_from_buckets_uses_the_split_and_finds_the_cause() -> None:
    rate, pop_a, pop_b, _ = SCENARIOS["error_rates"]
    rng = np.random.default_rng(5)
    periods = [generate(pop_a, 5_000, rng) for _ in range(4)] + [
        generate(pop_b, 5_000, rng) for _ in range(4)
    ]
    key = FeatureKey("sex", (0,))
    attrs = [(n, i) for i, n in enumerate(ORDER)]
    doc = explain(
        buckets_from(periods), model="m", key=key, disparity="equal_opportunity_difference",
        attributes=attrs, resolution=300.0, split_ts=4 * 300.0, split_source="alarm",
    )  # fmt: skip
    assert doc["group"] == "F" and doc["rate"] == "true_positive_rate"
    assert doc["periods"]["before"]["end"] == 1200.0 and doc["periods"]["after"]["pairs"] == 20_000
    comps = doc["decomposition"]["group"]["components"]
    assert (
        comps["error_rates"]["upper"] < 0
        and comps["traffic_mix"]["lower"] <= 0 <= comps["traffic_mix"]["upper"]
    )
    assert doc["drivers"]["ranked"][0]["value"] == "young"
    mid = explain(
        buckets_from(periods), model="m", key=key, disparity="equal_opportunity_difference",
        attributes=attrs, resolution=300.0,
    )  # fmt: skip
    assert mid["periods"]["split_source"] == "midpoint" and mid["periods"]["before"]["end"] == 1200.0
    old = explain(
        buckets_from(periods), model="m", key=key, disparity="equal_opportunity_difference",
        attributes=attrs, resolution=300.0, split_ts=-3600.0, split_source="alarm",
    )  # fmt: skip
    assert old["periods"]["split_source"].startswith("midpoint (alarm split at -3600 left a period empty")
    assert old["periods"]["before"]["pairs"] == 20_000
    assert explain({}, model="m", key=key, disparity="equal_opportunity_difference", attributes=attrs,
                   resolution=300.0)["error"]  # fmt: skip
    with pytest.raises(ValueError, match="unknown disparity"):
        explain(
            buckets_from(periods), model="m", key=key, disparity="nope", attributes=attrs, resolution=300.0
        )


def test_an_alarm_in_the_only_bucket_held_is_summarised_without_a_change() -> None:
    """Review finding (the demo's first alarm): with one window_resolution bucket held, the alarm's
    split leaves the before period empty and the midpoint cannot split one bucket; the summary
    logged and shown with the alarm read "gap to the rest None -> -0.125 (alarm split): ;". It now
    says the gap and that there is nothing before the split to compare with."""
    from stream_fair.app import alarm_explanation

    rate, pop_a, _, _ = SCENARIOS["error_rates"]
    one = buckets_from([generate(pop_a, 5_000, np.random.default_rng(7))])
    key = FeatureKey("sex", (0,))
    attrs = [(n, i) for i, n in enumerate(ORDER)]
    doc = explain(
        one, model="m", key=key, disparity="equal_opportunity_difference",
        attributes=attrs, resolution=300.0, split_ts=100.0, split_source="alarm",
    )  # fmt: skip
    assert doc["periods"]["before"]["pairs"] == 0 and doc["decomposition"]["gap"]["before"] is None
    summary = alarm_explanation(doc)["summary"]
    assert "None" not in summary and "): ;" not in summary, summary
    after = doc["decomposition"]["gap"]["after"]
    assert f"gap to the rest {after:+.3f} now" in summary
    assert "too few labelled pairs before the alarm split" in summary, summary
    # with both periods, the change and its components as before
    two = buckets_from([generate(pop_a, 5_000, np.random.default_rng(s)) for s in (7, 8)])
    both = explain(
        two, model="m", key=key, disparity="equal_opportunity_difference",
        attributes=attrs, resolution=300.0, split_ts=300.0, split_source="alarm",
    )  # fmt: skip
    full = alarm_explanation(both)["summary"]
    assert "(alarm split): traffic_mix" in full and " -> " in full, full
