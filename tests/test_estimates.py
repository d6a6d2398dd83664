"""Label-free estimates and calibration by group, against independent numpy computations on the
same events (fed through the real tracker and report)."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from stream_fair.config import Config
from stream_fair.estimates import VIEWS, EstimateSettings, calibrations
from stream_fair.fairness import Counts, FairnessSettings, group_rates
from stream_fair.label_windows import LabelledHistogram
from stream_fair.report import EstimateView, build_report
from tests.helpers import LocalTracker

TTL = 10_000_000.0


def config(**fairness: object) -> Config:
    return Config.model_validate(
        {
            "fairness": {"features": ["g"], "min_samples": 50, **fairness},
            "join": {"ttl": TTL},
            "schema": {"prediction": {"prediction": None}, "score_threshold": 0.5},
        }
    )


def events(
    rng: np.random.Generator,
    groups: dict[str, tuple[float, float]],
    n: int,
    labelled: float,
    link: str = "calibrated",
) -> dict[str, np.ndarray]:
    """Scores ~ Beta(a, b) per group, labels ~ Bernoulli(score) (or score**2 for group "X" when
    link="miscalibrated_X"), a share ``labelled`` of them labelled."""
    names = np.array(sorted(groups))
    g = rng.choice(names, size=n)
    a = np.array([groups[x][0] for x in g])
    b = np.array([groups[x][1] for x in g])
    s = rng.beta(a, b)
    p = np.where((g == "X") & (link == "miscalibrated_X"), s**3, s)
    y = (rng.random(n) < p).astype(int)
    lab = rng.random(n) < labelled
    return {"g": g, "s": s, "y": y, "d": (s >= 0.5).astype(int), "labelled": lab}


def run(cfg: Config, ev: dict[str, np.ndarray]) -> EstimateView:
    t = LocalTracker(cfg)
    for i in range(len(ev["s"])):
        doc = {
            "id": f"r{i}",
            "ts": 1000.0 + i,
            "model": "m",
            "score": float(ev["s"][i]),
            "attributes": {"g": ev["g"][i]},
        }
        t.update_prediction(0, orjson.dumps(doc), 2 * i)
        if ev["labelled"][i]:
            t.update_outcome(
                0, orjson.dumps({"id": f"r{i}", "ts": 1000.5 + i, "label": int(ev["y"][i])}), 2 * i + 1
            )
    report = build_report(t.snapshot(), cfg)
    (view,) = [v for v in report.estimates if v.feature.name == "g"]
    return view


def centre(s: np.ndarray) -> np.ndarray:
    """The score bin centre numpy-side: 50 bins over [0, 1]."""
    return (np.clip(np.floor(s * 50), 0, 49) + 0.5) / 50


def numpy_rate(soft: np.ndarray, num: list[int], den: list[int]) -> tuple[float, float]:
    """Ratio estimator and its linearised variance over per-item soft confusion rows (tp fp tn fn)."""
    n, m = soft[:, num].sum(axis=1), soft[:, den].sum(axis=1)
    r = n.sum() / m.sum()
    return r, float(((n - r * m) ** 2).sum() / m.sum() ** 2)


def soft_rows(ev: dict[str, np.ndarray], mask: np.ndarray, realized: bool) -> np.ndarray:
    q, d = centre(ev["s"][mask]), ev["d"][mask]
    pend = ~ev["labelled"][mask]
    rows = np.zeros((mask.sum(), 4))
    rows[:, 0] = np.where(pend, d * q, 0)
    rows[:, 1] = np.where(pend, d * (1 - q), 0)
    rows[:, 2] = np.where(pend, (1 - d) * (1 - q), 0)
    rows[:, 3] = np.where(pend, (1 - d) * q, 0)
    if realized:
        y = ev["y"][mask]
        lab = ~pend
        rows[:, 0] += lab & (y == 1) & (d == 1)
        rows[:, 1] += lab & (y == 0) & (d == 1)
        rows[:, 2] += lab & (y == 0) & (d == 0)
        rows[:, 3] += lab & (y == 1) & (d == 0)
    else:
        rows = rows[pend]
    return rows


CELLS = {
    "selection_rate": ([0, 1], [0, 1, 2, 3]),
    "true_positive_rate": ([0], [0, 3]),
    "false_positive_rate": ([1], [1, 2]),
    "accuracy": ([0, 2], [0, 1, 2, 3]),
}


def test_expected_counts_rates_and_variances_match_numpy() -> None:
    rng = np.random.default_rng(11)
    ev = events(rng, {"A": (2.0, 3.0), "B": (3.0, 2.0), "C": (1.0, 1.0)}, 6000, labelled=0.4)
    view = run(config(), ev)
    fe = view.estimates
    for g in ("A", "B", "C"):
        mask = ev["g"] == g
        assert fe.pending[g] == int((~ev["labelled"][mask]).sum())
        for vname, realized in (("pending", False), ("combined", True)):
            rows = soft_rows(ev, mask, realized)
            ge = fe.groups[vname][g]
            np.testing.assert_allclose(ge.expected, rows.sum(axis=0), rtol=1e-12, atol=1e-9)
            for rate, (num, den) in CELLS.items():
                r, v = numpy_rate(rows, num, den)
                est = ge.rates[rate]
                assert est.value == pytest.approx(r, abs=1e-12), (g, vname, rate)
                # the interval is a Beta matched to (r, v): its width ~ 2 * 1.96 * sd
                assert est.upper - est.lower == pytest.approx(2 * 1.96 * np.sqrt(v), rel=0.08), (
                    g,
                    vname,
                    rate,
                )
        # bin centres: each expected count is within 0.01 per prediction of the exact score sum
        pend = mask & ~ev["labelled"]
        exact_tp = float((ev["s"][pend] * ev["d"][pend]).sum())
        assert abs(fe.groups["pending"][g].expected[0] - exact_tp) <= 0.01 * pend.sum()


def test_combined_view_converges_to_realized_when_every_label_has_arrived() -> None:
    rng = np.random.default_rng(5)
    ev = events(rng, {"A": (2.0, 3.0), "B": (3.0, 2.0)}, 3000, labelled=1.0)
    view = run(config(), ev)
    fe = view.estimates
    assert fe.pending == {"A": 0, "B": 0}
    for g in ("A", "B"):
        m = ev["g"] == g
        c = Counts.from_labels(ev["y"][m], ev["d"][m])
        want = group_rates(c, FairnessSettings())
        for rate in CELLS:
            assert fe.groups["combined"][g].rates[rate].value == pytest.approx(want[rate].value, abs=1e-12)
        assert g not in fe.groups["pending"]  # nothing pending, no pending estimate


def numpy_ece(s: np.ndarray, y: np.ndarray) -> float:
    fine = centre(s)
    b = np.clip(np.floor(s * 10), 0, 9).astype(int)
    total = 0.0
    for k in range(10):
        m = b == k
        if m.any():
            total += m.sum() / len(s) * abs(y[m].mean() - fine[m].mean())
    return total


def test_calibration_matches_numpy_and_flags_the_miscalibrated_group_only() -> None:
    rng = np.random.default_rng(3)
    ev = events(rng, {"A": (2.0, 2.0), "X": (2.0, 2.0)}, 8000, labelled=0.6, link="miscalibrated_X")
    view = run(config(), ev)
    cal = view.estimates.calibration
    for g in ("A", "X"):
        m = (ev["g"] == g) & ev["labelled"]
        assert cal[g].samples == int(m.sum())
        assert cal[g].ece is not None
        assert cal[g].ece.value == pytest.approx(numpy_ece(ev["s"][m], ev["y"][m]), abs=1e-12)
        # against the raw scores' mean per reliability bin, the centres are off by < 0.01
        assert cal[g].ece.value == pytest.approx(numpy_ece(ev["s"][m], ev["y"][m]), abs=0.01)
        counts = np.bincount(np.clip(np.floor(ev["s"][m] * 10), 0, 9).astype(int), minlength=10)
        assert [b.count for b in cal[g].bins] == counts.tolist()
    assert cal["A"].trusted and not cal["A"].alarm
    assert cal["X"].alarm and not cal["X"].trusted and cal["X"].reason == "miscalibrated"
    # the untrusted group takes no part in the estimated disparities: with one trusted group left
    # there is nothing to compare
    assert view.estimates.disparities["pending"] == {}
    assert view.estimates.groups["pending"]["X"].trusted is False


def exact_binomial_interval(
    pos: np.ndarray, neg: np.ndarray, draws: int, rng: np.random.Generator
) -> tuple[float, float]:
    """The calibration interval by the book: a basic bootstrap whose every reliability bin's
    label-1 count is redrawn Binomial(n_b, frequency_b) (exact draws, many of them); the interval
    always holds the plug-in ECE."""
    p, q = pos.reshape(10, 5), neg.reshape(10, 5)
    n, k = (p + q).sum(axis=1), p.sum(axis=1)
    centres = (np.arange(50) + 0.5).reshape(10, 5) / 50
    mean = np.where(n > 0, ((p + q) * centres).sum(axis=1) / np.maximum(n, 1), 0.0)
    f = np.where(n > 0, k / np.maximum(n, 1), 0.0)
    w = n / n.sum()
    ece = float(np.sum(w * np.abs(f - mean)))
    star = np.abs(rng.binomial(n, f, size=(draws, 10)) / np.maximum(n, 1) - mean) @ w
    lo, hi = np.quantile(star, [0.025, 0.975])
    # the reported interval always holds the estimate itself
    return min(max(0.0, 2 * ece - hi), ece), max(2 * ece - lo, ece)


@pytest.mark.parametrize("size", [300, 1000, 5000])
@pytest.mark.parametrize("shift", [0.0, 0.04, 0.1])
def test_calibration_interval_agrees_with_an_exact_binomial_bootstrap(size: int, shift: float) -> None:
    """The report's bootstrap (normal draws shared by every group, vectorised) gives the interval of
    an exact binomial bootstrap: each bound within a fifth of the interval's width, for small and
    large groups, calibrated or not (a bound that drifted, or a bootstrap that ignored the bins'
    spread, would be off by a whole width)."""
    rng = np.random.default_rng(int(size + 1000 * shift))
    hists = {}
    for g in range(12):
        scores = rng.integers(0, 50, size)
        lab = rng.random(size) < np.clip((scores + 0.5) / 50 + shift, 0, 1)
        hists[str(g)] = LabelledHistogram(
            np.bincount(scores[lab], minlength=50), np.bincount(scores[~lab], minlength=50)
        )
    cal = calibrations(hists, EstimateSettings(min_labelled=50))
    for g, h in hists.items():
        est = cal[g].ece
        assert est is not None
        lower, upper = exact_binomial_interval(h.positives, h.negatives, 20_000, rng)
        width = upper - lower
        assert width > 0
        assert abs(est.lower - lower) <= 0.2 * width, (g, est, lower, upper)
        assert abs(est.upper - upper) <= 0.2 * width, (g, est, lower, upper)


def test_too_few_matured_labels_leave_a_group_untrusted() -> None:
    rng = np.random.default_rng(8)
    ev = events(rng, {"A": (2.0, 2.0), "B": (2.0, 2.0)}, 2000, labelled=0.02)
    view = run(config(min_samples=100), ev)
    assert all(c.reason == "too_few_labels" and not c.trusted for c in view.estimates.calibration.values())


def test_pending_tpr_interval_covers_the_labels_that_later_arrive() -> None:
    """Calibrated scores: the pending-view TPR interval covers the TPR the pending predictions'
    labels turn out to have (drawn after the estimate), on fresh seeds."""
    covered = 0
    runs = 40
    for seed in range(1000, 1000 + runs):
        rng = np.random.default_rng(seed)
        ev = events(rng, {"A": (2.0, 3.0), "B": (3.0, 2.0)}, 1500, labelled=0.3)
        fe = run(config(), ev).estimates
        m = (ev["g"] == "A") & ~ev["labelled"]
        y, d = ev["y"][m], ev["d"][m]
        truth = (y & d).sum() / y.sum()
        est = fe.groups["pending"]["A"].rates["true_positive_rate"]
        covered += est.lower <= truth <= est.upper
    assert covered / runs >= 0.85, covered


def test_a_score_shift_in_one_group_moves_the_estimated_gap_and_flags_it() -> None:
    rng = np.random.default_rng(21)
    fair = events(rng, {"A": (2.0, 2.0), "B": (2.0, 2.0)}, 6000, labelled=0.5)
    fe = run(config(), fair).estimates
    for view in VIEWS:
        assert not any(fe.flagged[view].values()), (view, fe.disparities[view])
    # group B's scores move down (fewer selected, lower TPR); its calibration still holds
    ev = events(rng, {"A": (2.0, 2.0), "B": (1.2, 2.8)}, 6000, labelled=0.0)
    both = {k: np.concatenate([fair[k], ev[k]]) for k in fair}
    fe = run(config(), both).estimates
    assert fe.calibration["B"].trusted
    assert fe.flagged["pending"]["demographic_parity_difference", "between_groups"]
    eo = fe.disparities["pending"]["equal_opportunity_difference", "between_groups"]
    m = ~both["labelled"]
    truth = []
    for g in ("A", "B"):
        k = m & (both["g"] == g)
        truth.append((both["s"][k] * both["d"][k]).sum() / both["s"][k].sum())
    assert eo.value == pytest.approx(abs(truth[0] - truth[1]), abs=0.01)


def test_exported_estimates_are_the_reports_and_never_use_realized_names() -> None:
    from prometheus_client import generate_latest

    from stream_fair.exporter import PipelineStats, registry_for

    rng = np.random.default_rng(17)
    ev = events(rng, {"A": (2.0, 3.0), "B": (3.0, 2.0)}, 3000, labelled=0.5)
    cfg = config()
    t = LocalTracker(cfg)
    for i in range(len(ev["s"])):
        ts, score = 1000.0 + i, float(ev["s"][i])
        doc = {"id": f"r{i}", "ts": ts, "model": "m", "score": score, "attributes": {"g": ev["g"][i]}}
        t.update_prediction(0, orjson.dumps(doc), 2 * i)
        if ev["labelled"][i]:
            t.update_outcome(
                0, orjson.dumps({"id": f"r{i}", "ts": ts + 0.5, "label": int(ev["y"][i])}), 2 * i + 1
            )
    report = build_report(t.snapshot(), cfg)
    reg = registry_for(lambda: (report, PipelineStats()))
    (view,) = [v for v in report.estimates if v.feature.name == "g"]
    fe = view.estimates
    get = reg.get_sample_value
    for g in ("A", "B"):
        for v in VIEWS:
            labels = {"model": "m", "feature": "g", "group": g, "view": v}
            e = fe.groups[v][g].rates["true_positive_rate"]
            assert get("stream_fair_estimated_true_positive_rate", labels) == e.value
            assert get("stream_fair_estimated_true_positive_rate_lower", labels) == e.lower
            tp = get("stream_fair_estimated_confusion", {**labels, "actual": "1", "predicted": "1"})
            assert tp == fe.groups[v][g].expected[0]
        gl = {"model": "m", "feature": "g", "group": g}
        assert get("stream_fair_estimated_pending_predictions", gl) == int(
            (~ev["labelled"] & (ev["g"] == g)).sum()
        )
        assert get("stream_fair_calibration_error", gl) == fe.calibration[g].ece.value  # type: ignore[union-attr]
        assert get("stream_fair_estimated_group_trusted", gl) == 1.0
        # the realized TPR is the labelled pairs' only, whatever is pending
        m = (ev["g"] == g) & ev["labelled"]
        realized = Counts.from_labels(ev["y"][m], ev["d"][m])
        want = realized.tp / (realized.tp + realized.fn)
        got = get("stream_fair_true_positive_rate", {**gl, "window": "cumulative"})
        assert got == pytest.approx(want, abs=1e-12)
    d = fe.disparities["pending"]["equal_opportunity_difference", "between_groups"]
    fl = {"model": "m", "feature": "g", "view": "pending", "method": "between_groups"}
    assert get("stream_fair_estimated_equal_opportunity_difference", fl) == d.value
    flagged = get(
        "stream_fair_estimated_disparity_flagged", {**fl, "disparity": "equal_opportunity_difference"}
    )
    assert flagged == float(fe.flagged["pending"]["equal_opportunity_difference", "between_groups"])
    text = generate_latest(reg).decode()
    assert 'view="' not in "\n".join(
        x for x in text.splitlines() if x.startswith("stream_fair_true_positive_rate")
    )


def test_status_page_shows_estimates_calibration_and_the_flagged_estimated_gap() -> None:
    from stream_fair.exporter import PipelineStats
    from stream_fair.status_page import render

    rng = np.random.default_rng(21)
    fair = events(
        rng, {"A": (2.0, 2.0), "B": (2.0, 2.0), "X": (2.0, 2.0)}, 6000, labelled=0.5, link="miscalibrated_X"
    )
    shifted = events(rng, {"A": (2.0, 2.0), "B": (1.2, 2.8), "X": (2.0, 2.0)}, 6000, labelled=0.0)
    ev = {k: np.concatenate([fair[k], shifted[k]]) for k in fair}
    cfg = config()
    t = LocalTracker(cfg)
    for i in range(len(ev["s"])):
        ts, score = 1000.0 + i, float(ev["s"][i])
        doc = {"id": f"r{i}", "ts": ts, "model": "m", "score": score, "attributes": {"g": ev["g"][i]}}
        t.update_prediction(0, orjson.dumps(doc), 2 * i)
        if ev["labelled"][i]:
            t.update_outcome(
                0, orjson.dumps({"id": f"r{i}", "ts": ts + 0.5, "label": int(ev["y"][i])}), 2 * i + 1
            )
    report = build_report(t.snapshot(), cfg)
    html = render(report, PipelineStats())
    section = html.split("Before the labels arrive", 1)[1]
    fe = report.estimates[0].estimates
    assert fe.flagged["pending"]["demographic_parity_difference", "between_groups"]
    assert "<span class=flag>demographic_parity_difference</span>" in section
    for g in ("A", "B", "X"):
        assert f"<td class=l>{g}</td><td>{fe.pending[g]}</td>" in section
    # X only, decided by its most recent calibration (the 1h window holds enough of its labels)
    assert section.count("<span class=flag>miscalibrated in the last 1h</span>") == 1
    assert fe.trust["X"] == (False, "1h")
    assert section.count("<td class=l>trusted</td>") == 2


def test_scores_on_an_intersection_of_two_50_value_features_stay_under_the_series_budget() -> None:
    """The estimates add about 40 series per group; with scores the worst case of
    test_cardinality (2,500 cells, 201 groups) must stay under its budget."""
    import itertools

    from prometheus_client import generate_latest

    from stream_fair.exporter import PipelineStats, registry_for
    from tests.test_cardinality import SERIES_BUDGET, _series

    cfg = Config.model_validate({"fairness": {"features": ["a", "b"], "intersections": [["a", "b"]]}})
    t = LocalTracker(cfg)
    rng = np.random.default_rng(2)
    for i, (x, y) in enumerate(itertools.product(range(50), repeat=2)):
        p = {"id": f"r{i}", "ts": 1e6 + i, "model": "m", "prediction": i % 2, "score": float(rng.random())}
        p["attributes"] = {"a": f"a{x}", "b": f"b{y}"}
        t.update_prediction(0, orjson.dumps(p), i)
        if i % 3:
            t.update_outcome(0, orjson.dumps({"id": f"r{i}", "ts": 1e6 + i + 1, "label": (i // 2) % 2}), i)
    registry = registry_for(lambda: (build_report(t.snapshot(), cfg), PipelineStats()))
    text = generate_latest(registry).decode()
    assert "stream_fair_estimated_true_positive_rate{" in text
    assert _series(text) < SERIES_BUDGET, _series(text)
