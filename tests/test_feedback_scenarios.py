"""Loop indicator and coverage gap on the simulator's scenarios, against the disparity verdict."""

from __future__ import annotations

from stream_fair.dev.simulate import SCENARIOS, generate
from stream_fair.feedback import FeedbackMonitor, FeedbackSettings
from stream_fair.groups import feature_keys
from stream_fair.sequential import Counts, SequentialDisparity, SequentialSettings

QUAD = {(1, 1): 0, (1, 0): 1, (0, 0): 2, (0, 1): 3}


def _first_flags(name: str, n: int, seed: int, **kw: float) -> dict[str, int | None]:
    monitor = FeedbackMonitor(
        feature_keys(["group"], []), FeedbackSettings(period=100.0, reference_periods=2)
    )
    verdict = SequentialDisparity(SequentialSettings())
    pending: dict[str, tuple[tuple[str, ...], int, float]] = {}
    cum = {g: [0, 0, 0, 0] for g in "ABCDE"}
    first: dict[str, int | None] = {"coverage": None, "loop": None, "disparity": None}
    preds = 0
    for kind, ev in generate(SCENARIOS[name](**kw), n, seed=seed):
        if kind == "outcome":
            hit = pending.pop(ev["id"], None)
            if hit is not None:
                cell, p, ts = hit
                monitor.on_joined("m", cell, p, int(ev["label"]), ts, float(ev["ts"]))
                cum[cell[0]][QUAD[(p, int(ev["label"]))]] += 1
            continue
        cell, p, ts = (ev["attributes"]["group"],), int(ev["prediction"]), float(ev["ts"])
        pending[ev["id"]] = (cell, p, ts)
        monitor.on_prediction("m", cell, p, ts)
        preds += 1
        if preds % 5000:
            continue
        for key in [k for k, v in pending.items() if ts - v[2] > 1800.0]:
            c, _, t0 = pending.pop(key)
            monitor.on_expired("m", c, t0)
        f = monitor.snapshot().features[("m", "group")]
        if first["coverage"] is None and f.label_coverage_gap and f.label_coverage_gap.flagged:
            first["coverage"] = preds
        if first["loop"] is None and f.feedback_loop and f.feedback_loop.amplifying:
            first["loop"] = preds
        v = verdict.update({g: Counts(*c) for g, c in cum.items()})
        if first["disparity"] is None and any(v.flagged.values()):
            first["disparity"] = preds
    return first


def test_loop_indicator_flags_feedback_loop_before_disparity_verdict() -> None:
    first = _first_flags("feedback_loop", 100_000, seed=1, tpr_gap=0.03)
    assert first["loop"] is not None
    assert first["disparity"] is None or first["loop"] < first["disparity"]


def test_coverage_gap_flags_selective_labels_and_not_fair() -> None:
    assert _first_flags("selective_labels", 100_000, seed=1)["coverage"] is not None
    assert _first_flags("fair", 100_000, seed=1)["coverage"] is None


def test_label_arrival_flags_selective_labels_before_the_plain_differences() -> None:
    """The coverage flag does not wait for the time-to-live: it speaks while B has too few
    joined pairs for the plain (fixed-level) differences or the default alarm (whose slots and
    cohorts are shortened here to fit the 4-minute stream)."""
    from stream_fair.fairness import Counts as FCounts
    from stream_fair.fairness import FairnessSettings, evaluate_feature

    settings = FeedbackSettings(period=100.0, alarm_slot=10.0, cohort_period=60.0)
    monitor = FeedbackMonitor(feature_keys(["group"], []), settings)
    pending: dict[str, tuple[tuple[str, ...], int, float]] = {}
    cum = {g: [0, 0, 0, 0] for g in "ABCDE"}
    first: dict[str, int | None] = {"coverage": None, "plain": None, "alarm": None}
    preds = 0
    diffs = ("demographic_parity_difference", "equal_opportunity_difference", "equalized_odds_difference")
    for kind, ev in generate(SCENARIOS["selective_labels"](), 12_000, seed=2):
        if kind == "outcome":
            hit = pending.pop(ev["id"], None)
            if hit is not None:
                cell, p, ts = hit
                monitor.on_joined("m", cell, p, int(ev["label"]), ts, float(ev["ts"]))
                cum[cell[0]][QUAD[(p, int(ev["label"]))]] += 1
            continue
        cell, p = (ev["attributes"]["group"],), int(ev["prediction"])
        pending[ev["id"]] = (cell, p, float(ev["ts"]))
        monitor.on_prediction("m", cell, p, float(ev["ts"]))
        preds += 1
        if preds % 1000:
            continue
        f = monitor.snapshot().features[("m", "group")]
        report = evaluate_feature("group", {g: FCounts(*c) for g, c in cum.items()}, FairnessSettings())
        now = {
            "coverage": f.label_coverage_flagged,
            "plain": any(report.flagged.get((d, "between_groups"), False) for d in diffs),
            "alarm": any(a.flagged for a in f.alarms.values()),
        }
        for k, v in now.items():
            if v and first[k] is None:
                first[k] = preds
    assert first["coverage"] is not None and first["plain"] is not None and first["alarm"] is not None
    assert first["coverage"] < first["plain"] and first["coverage"] < first["alarm"]
    ratio = monitor.snapshot().groups[("m", "group", "B")].label_arrival_ratio
    assert ratio is not None and ratio < 0.5  # B keeps ~31% of its labels (approved only)
