"""Which signal speaks first on the simulator's event stream, and what a monitor hook costs.

Used by ``bench/detection.py`` (``--part race`` and ``--hooks``): the simulator's events go
through :class:`stream_fair.feedback.FeedbackMonitor` one by one, as the tracker feeds it.
"""

from __future__ import annotations

import random
import time

from stream_fair.dev.simulate import SCENARIOS, generate
from stream_fair.fairness import Counts, FairnessSettings, evaluate_feature
from stream_fair.feedback import FeedbackMonitor, FeedbackSettings
from stream_fair.groups import feature_keys

DIFFERENCES = ("demographic_parity_difference", "equal_opportunity_difference", "equalized_odds_difference")
QUAD = {(1, 1): 0, (1, 0): 1, (0, 0): 2, (0, 1): 3}
SIGNALS = ("coverage", "loop", "alarm", "plain", "plain_diff")


def scenario_race(name: str, n: int, seed: int) -> dict[str, int | None]:
    """First prediction index at which each signal is flagged, checked every 1,000 predictions.

    The monitor's coverage flag, loop test and default alarm (the verdict engine, any disparity)
    against the *plain* fixed-level verdict (``fairness.evaluate_feature(...).flagged`` at default
    settings, any between-groups disparity; ``plain_diff``: the differences only) on the
    cumulative joined pairs. Expiry after 30 minutes; the simulator's 50 predictions/s.
    """
    scenario = SCENARIOS[name]()
    # the stream is 67 minutes long: the monitor's periods and the engine's cohorts and slots are
    # scaled down with it (a cohort per period, five slots per cohort)
    settings = FeedbackSettings(period=100.0, cohort_period=100.0, alarm_slot=20.0)
    monitor = FeedbackMonitor(feature_keys(["group"], []), settings)
    pending: dict[str, tuple[tuple[str, ...], int, float, float]] = {}
    cum = {g: [0, 0, 0, 0] for g in "ABCDE"}
    first: dict[str, int | None] = dict.fromkeys(SIGNALS)
    preds = 0
    for kind, ev in generate(scenario, n, seed=seed):
        if kind == "outcome":
            hit = pending.pop(ev["id"], None)
            if hit is not None:
                cell, p, pts, score = hit
                label = int(ev["label"])
                monitor.on_joined("m", cell, p, label, pts, float(ev["ts"]), score)
                cum[cell[0]][QUAD[(p, label)]] += 1
            continue
        cell = (str(ev["attributes"]["group"]),)
        ts = float(ev["ts"])
        pending[ev["id"]] = (cell, int(ev["prediction"]), ts, float(ev["score"]))
        monitor.on_prediction("m", cell, int(ev["prediction"]), ts)
        preds += 1
        if preds % 1_000:
            continue
        for key in [k for k, v in pending.items() if ts - v[2] > 1800.0]:
            c, _, t0, _ = pending.pop(key)
            monitor.on_expired("m", c, t0)
        f = monitor.snapshot().features[("m", "group")]
        report = evaluate_feature("group", {g: Counts(*c) for g, c in cum.items()}, FairnessSettings())
        now = {
            "coverage": f.label_coverage_flagged,
            "loop": bool(f.feedback_loop and f.feedback_loop.amplifying),
            "alarm": any(a.flagged for a in f.alarms.values()),
            "plain": any(v for (_, method), v in report.flagged.items() if method == "between_groups"),
            "plain_diff": any(report.flagged.get((d, "between_groups"), False) for d in DIFFERENCES),
        }
        for k, v in now.items():
            if v and first[k] is None:
                first[k] = preds
    return first


def hook_cost(n: int = 300_000) -> float:
    """Mean cost of one ``on_*`` hook call (µs): 3 features + 1 intersection, 30 cells, scores."""
    keys = feature_keys(["sex", "race", "age"], [["race", "sex"]])
    monitor = FeedbackMonitor(keys, FeedbackSettings(period=600.0))
    rng = random.Random(0)
    cells = [(s, r, a) for s in "FM" for r in "ABCDE" for a in ("young", "mid", "old")]
    events = [
        (rng.choice(cells), int(rng.random() < 0.4), i * 0.01, int(rng.random() < 0.5), rng.random())
        for i in range(n)
    ]
    t0 = time.perf_counter()
    for cell, p, ts, y, score in events:
        monitor.on_prediction("m", cell, p, ts)
        monitor.on_joined("m", cell, p, y, ts, ts + 100.0, score)
    t1 = time.perf_counter()
    for _ in events:
        pass
    t2 = time.perf_counter()
    return ((t1 - t0) - (t2 - t1)) / (2 * n) * 1e6
