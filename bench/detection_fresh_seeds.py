"""Re-check the default alarm on fresh seeds (never used to choose a setting).

    python bench/detection_fresh_seeds.py    # ~5 minutes on 2 cores

Fair runs use seeds 30,000-30,019 and onset runs 40,000-40,019 (the table in docs/detection.md
uses 10,000+ and 20,000+), with the same ``draw`` / ``alert_flags`` / ``delay`` functions as
``bench/detection.py``: false-flag runs on the fair stream, and the delay (events of the 5% group
after onset) of the default alarm on equal opportunity.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import detection as d  # noqa: E402  (the sibling benchmark module)

RUNS = 20
EVENTS = 1_000_000


def main() -> None:
    onset = EVENTS // 2
    false_runs, false_checks, delays = 0, 0, []
    for seed in range(RUNS):
        g, quad = d.draw(30_000 + seed, EVENTS, None)
        fair = d.alert_flags(d.cumulative(g, quad), None)["alarm_eo"]
        false_checks += int(fair.sum())
        false_runs += bool(fair.any())
        g, quad = d.draw(40_000 + seed, EVENTS, onset)
        flags = d.alert_flags(d.cumulative(g, quad), onset)["alarm_eo"]
        delays.append(d.delay(flags, g, onset))
        print(f"seed {seed}: false-flag runs so far {false_runs}, delay {delays[-1]}", file=sys.stderr)
    dl = np.array(delays, dtype=float)
    print(
        f"fresh seeds: false-flag runs {false_runs}/{RUNS} ({false_checks} flagged checks); delay "
        f"median {np.nanmedian(dl):.0f}, p90 {np.nanpercentile(dl, 90):.0f}, max {np.nanmax(dl):.0f}, "
        f"missed {int(np.isnan(dl).sum())}"
    )


if __name__ == "__main__":
    main()
