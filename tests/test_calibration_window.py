"""Calibration over recent windows (stream_fair.label_windows): the window ECE against numpy on the
same events through the real tracker, and the drift it exists for: a group whose P(label | score)
moves late in a long calibrated stream, which the cumulative ECE cannot see.

The streams here are not the simulator's: label delays differ by group and, for one group, depend
on the label; a share of the labels never arrives."""

from __future__ import annotations

import numpy as np
import orjson

from stream_fair.config import Config
from stream_fair.exporter import PipelineStats, registry_for
from stream_fair.report import build_report
from tests.helpers import LocalTracker
from tests.test_estimates import numpy_ece

DAY = 86400.0
HOUR = 3600.0
THRESHOLD = 0.05


def config(min_samples: int = 100) -> Config:
    return Config.model_validate(
        {
            "fairness": {"features": ["g"], "min_samples": min_samples},
            "join": {"ttl": 200 * DAY},
            "schema": {"prediction": {"prediction": None}, "score_threshold": 0.5},
            "windows": ["1d", "7d"],
            "window_resolution": "1h",
        }
    )


def stream(
    rng: np.random.Generator, days: float, per_day: int, shift_at: float | None = None
) -> dict[str, np.ndarray]:
    """Groups A, B, C with Beta(2, 2) scores; labels ~ Bernoulli(score), except group B's
    predictions made after ``shift_at`` (days), whose labels are Bernoulli(0.75 * score) (the same
    score now means less risk: ECE 0.125). Label delays: A 1 day, B 2 days, C 1 day for label 0 and
    3 days for label 1 (label-dependent), each with exponential jitter; 20% of labels never arrive."""
    n = int(days * per_day)
    ts = np.sort(rng.uniform(0, days * DAY, n)) + 10 * DAY
    g = rng.choice(np.array(["A", "B", "C"]), size=n)
    s = rng.beta(2.0, 2.0, n)
    p = s.copy()
    if shift_at is not None:
        late = (g == "B") & (ts >= 10 * DAY + shift_at * DAY)
        p[late] = 0.75 * s[late]
    y = (rng.random(n) < p).astype(int)
    base = np.where(g == "A", 1.0, np.where(g == "B", 2.0, np.where(y == 1, 3.0, 1.0)))
    delay = (base + rng.exponential(0.25, n)) * DAY
    labelled = rng.random(n) < 0.8
    return {"ts": ts, "g": g, "s": s, "y": y, "outcome_ts": ts + delay, "labelled": labelled}


def feed(ev: dict[str, np.ndarray], cfg: Config, every: float | None = None):
    """Feed the events in arrival order through the real tracker; yield (stream time, report)
    every ``every`` seconds of stream time (before the arrivals at that time) and once at the end."""
    t = LocalTracker(cfg)
    n = len(ev["ts"])
    arrivals = [(float(ev["ts"][i]), 0, i) for i in range(n)]
    arrivals += [(float(ev["outcome_ts"][i]), 1, i) for i in range(n) if ev["labelled"][i]]
    arrivals.sort()
    next_report = arrivals[0][0] + every if every else None
    for offset, (at, kind, i) in enumerate(arrivals, start=1):
        if next_report is not None and at >= next_report:
            yield next_report, build_report(t.snapshot(), cfg)
            next_report += every  # type: ignore[operator]
        if kind == 0:
            score, attributes = float(ev["s"][i]), {"g": ev["g"][i]}
            doc = {"id": f"r{i}", "ts": at, "model": "m", "score": score, "attributes": attributes}
            t.update_prediction(0, orjson.dumps(doc), offset)
        else:
            t.update_outcome(0, orjson.dumps({"id": f"r{i}", "ts": at, "label": int(ev["y"][i])}), offset)
    yield float(np.nextafter(arrivals[-1][0], np.inf)), build_report(t.snapshot(), cfg)  # after every arrival


def test_window_ece_matches_numpy_on_the_labels_of_each_window() -> None:
    rng = np.random.default_rng(5)
    ev = stream(rng, days=12, per_day=900, shift_at=6)
    cfg = config()
    bucket = np.floor(ev["outcome_ts"] / HOUR)
    checked = 0
    for at, report in feed(ev, cfg, every=2.5 * DAY):
        fe = next(v for v in report.estimates if v.feature.name == "g").estimates
        lab = ev["labelled"] & (ev["outcome_ts"] < at)  # the labels fed so far
        if not lab.any():
            continue
        last = np.floor(ev["outcome_ts"][lab].max() / HOUR)
        assert set(fe.window_calibration) == {"1d", "1w"}
        for window, span in (("1d", 24), ("1w", 168)):
            for g in ("A", "B", "C"):
                m = lab & (ev["g"] == g) & (bucket > last - span) & (bucket <= last)
                cal = fe.window_calibration[window].get(g)
                if not m.any():
                    assert cal is None
                    continue
                assert cal is not None and cal.samples == int(m.sum())
                assert cal.ece is not None
                assert abs(cal.ece.value - numpy_ece(ev["s"][m], ev["y"][m])) < 1e-9
                assert cal.ece.lower <= cal.ece.value <= cal.ece.upper
                counts = np.bincount(np.clip(np.floor(ev["s"][m] * 10), 0, 9).astype(int), minlength=10)
                assert [b.count for b in cal.bins] == counts.tolist()
                checked += 1
        # the cumulative calibration is still all matured labels
        for g in ("A", "B", "C"):
            m = lab & (ev["g"] == g)
            cum = fe.calibration[g].ece
            assert fe.calibration[g].samples == int(m.sum())
            assert cum is not None and abs(cum.value - numpy_ece(ev["s"][m], ev["y"][m])) < 1e-9
    assert checked >= 20


def test_a_late_calibration_shift_alarms_in_the_window_while_the_cumulative_ece_stays_below() -> None:
    rng = np.random.default_rng(np.random.SeedSequence(20261130).spawn(1)[0])
    days, shift = 40.0, 32.0  # the shift starts after 80% of the stream
    ev = stream(rng, days=days, per_day=2400, shift_at=shift)
    cfg = config()
    first: dict[str, float] = {}
    final = final_report = None
    for at, report in feed(ev, cfg, every=6 * HOUR):
        if at < 10 * DAY + 20 * DAY or at > 10 * DAY + days * DAY:
            continue  # after the predictions stop, see the calibrated test
        fe = next(v for v in report.estimates if v.feature.name == "g").estimates
        for w, cals in fe.window_calibration.items():
            for g, cal in cals.items():
                if cal.alarm:
                    first.setdefault(f"{g}/{w}", (at - 10 * DAY) / DAY)
        final, final_report = fe, report
    assert final is not None and final_report is not None
    # the failure being fixed: B's cumulative ECE stays below the threshold, no cumulative alarm
    assert final.calibration["B"].ece is not None and final.calibration["B"].ece.value < THRESHOLD
    assert not final.calibration["B"].alarm
    # the recent window sees it, for B only, and B's estimates stop counting
    assert "B/1d" in first, first
    assert first["B/1d"] > shift
    assert not [k for k in first if not k.startswith("B/")], first
    assert final.trust["B"] == (False, "1d")
    assert final.trust["A"][0] and final.trust["C"][0]
    # exported as the report has it, next to the cumulative series (the alert's input)
    reg = registry_for(lambda: (final_report, PipelineStats()))
    for g in ("A", "B", "C"):
        cal = final.window_calibration["1d"][g]
        labels = {"model": "m", "feature": "g", "group": g, "window": "1d"}
        assert cal.ece is not None
        assert reg.get_sample_value("stream_fair_window_calibration_alarm", labels) == float(g == "B")
        assert reg.get_sample_value("stream_fair_window_calibration_error_lower", labels) == cal.ece.lower
        assert reg.get_sample_value("stream_fair_window_calibration_samples", labels) == cal.samples
        gl = {"model": "m", "feature": "g", "group": g}
        assert reg.get_sample_value("stream_fair_calibration_alarm", gl) == 0.0
        assert reg.get_sample_value("stream_fair_estimated_group_trusted", gl) == float(g != "B")
    print(f"\nfirst window alarms (day of stream; shift at day {shift}): {first}")


def test_a_calibrated_stream_raises_no_window_alarm_on_fresh_seeds() -> None:
    cfg = config()
    alarms, checks, seeds = 0, 0, []
    # four seeds spawned from a fixed root (not the late-shift test's stream): CI must not depend
    # on the entropy of the run; fresh-seed figures are bench/calibration_drift.py's to report
    for child in np.random.SeedSequence(20261130).spawn(5)[1:]:
        seed = child.spawn_key
        seeds.append(seed)
        ev = stream(np.random.default_rng(child), days=24, per_day=2400)
        for at, report in feed(ev, cfg, every=12 * HOUR):
            if at < 10 * DAY + 11 * DAY or at > 10 * DAY + 24 * DAY:
                # in steady traffic: while it starts (until the longest delay plus the longest
                # window) and once it stops, C's label-dependent delays make the labels of a
                # window a label-selected sample (docs/estimates.md)
                continue
            fe = next(v for v in report.estimates if v.feature.name == "g").estimates
            for cals in fe.window_calibration.values():
                for cal in cals.values():
                    checks += 1
                    alarms += cal.alarm
            assert all(ok for ok, _ in fe.trust.values()), (seed, fe.trust)
    print(f"\nfalse window alarms: {alarms} of {checks} checks (seeds {seeds})")
    assert alarms == 0, seeds
