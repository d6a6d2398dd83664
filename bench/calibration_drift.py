"""Calibration drift: how soon the window ECE alarm sees a late P(label | score) shift, and how
often it alarms on calibrated streams (fresh seeds; the real core through the real tracker).

    PYTHONPATH=. python bench/calibration_drift.py [runs]

The streams are the test's (tests/test_calibration_window.py; not the product's simulator):
three groups, 2,400 predictions a day, label delays 1 day (A), 2 days (B), 1 or 3 days by label
(C), 20% of labels never arrive; from day 32 of 40 group B's labels are Bernoulli(0.75 * score).
Reports every 6 hours of event time; windows 1d and 1w at 1h resolution.
"""

from __future__ import annotations

import sys

import numpy as np

from tests.test_calibration_window import DAY, config, feed, stream


def main(runs: int) -> None:
    cfg = config()
    for _ in range(runs):
        seed = np.random.SeedSequence().entropy
        ev = stream(np.random.default_rng(seed), days=40, per_day=2400, shift_at=32)
        first: dict[str, float] = {}
        cum_max = 0.0
        other = 0
        for at, report in feed(ev, cfg, every=6 * 3600.0):
            day = (at - 10 * DAY) / DAY
            if day < 11 or day > 40:
                continue
            fe = next(v for v in report.estimates if v.feature.name == "g").estimates
            b = fe.calibration["B"]
            cum_max = max(cum_max, b.ece.value if b.ece else 0.0)
            for w, cals in fe.window_calibration.items():
                for g, cal in cals.items():
                    if cal.alarm and g == "B" and day >= 32:
                        first.setdefault(w, day)
                    elif cal.alarm:
                        other += 1
            if b.alarm:
                first.setdefault("cumulative", day)
        print(
            f"seed {seed}: B window alarm first at day {first.get('1d')} (1d), {first.get('1w')} (1w); "
            f"cumulative alarm {first.get('cumulative', 'never')}; B cumulative ECE max {cum_max:.3f}; "
            f"other alarms {other}",
            flush=True,
        )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
