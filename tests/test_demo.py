"""``stream-fair demo`` shows the bias it injects, within seconds, on its own /metrics.

The demo's lending stream under-approves Black women (TPR 0.50 against 0.70-0.95 elsewhere)
while keeping the marginal sex and race gaps small; the race&sex intersection must show it.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.helpers import Scrape, cli_env, scrape, stop_process, wait_for

pytestmark = pytest.mark.integration

MODEL = "credit-v3"
RACE_SEX = [f"{r}&{s}" for r in ("White", "Black", "Hispanic", "Asian") for s in ("Female", "Male")]
SERIES_WITHIN = 30.0  # seconds from start until per-group series exist
MIN_GROUP_SAMPLES = 500  # every race&sex group, before the disparity is judged


def _eod(s: Scrape, feature: str) -> float | None:
    return s.get(
        "stream_fair_equal_opportunity_difference",
        model=MODEL,
        feature=feature,
        window="cumulative",
        method="between_groups",
    )


def _read_url(proc: subprocess.Popen[str], timeout: float) -> int:
    """The exporter port from the demo's first line (it may have picked a free one)."""
    found: list[str] = []
    reader = threading.Thread(
        target=lambda: found.append(proc.stdout.readline()),  # type: ignore[union-attr]
        daemon=True,
    )
    reader.start()
    reader.join(timeout)
    assert found, f"the demo printed nothing in {timeout} s"
    match = re.search(r"metrics http://127\.0\.0\.1:(\d+)/metrics", found[0])
    assert match, found[0]
    return int(match.group(1))


def test_demo_shows_the_intersectional_disparity() -> None:
    start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "stream_fair", "demo", "--seconds", "50", "--port", "0", "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        env=cli_env(),
    )
    try:
        port = _read_url(proc, timeout=20)

        def per_group_series() -> Scrape | None:
            assert proc.poll() is None, "the demo exited early"
            s = scrape(port)
            rs = s.by(
                "stream_fair_group_samples", ["group"], model=MODEL, feature="race&sex", window="cumulative"
            )
            sex = s.by(
                "stream_fair_group_samples", ["group"], model=MODEL, feature="sex", window="cumulative"
            )
            return s if len(rs) == 8 and set(sex) == {("Female",), ("Male",)} else None

        wait_for(
            per_group_series,
            SERIES_WITHIN - (time.monotonic() - start),
            "per-group series on the demo's /metrics",
            interval=0.5,
        )
        assert time.monotonic() - start < SERIES_WITHIN

        def enough_samples() -> Scrape | None:
            assert proc.poll() is None, "the demo exited early"
            s = scrape(port)
            n = s.by(
                "stream_fair_group_samples", ["group"], model=MODEL, feature="race&sex", window="cumulative"
            )
            return s if len(n) == 8 and min(n.values()) >= MIN_GROUP_SAMPLES else None

        s = wait_for(
            enough_samples,
            45 - (time.monotonic() - start),
            f"{MIN_GROUP_SAMPLES} joined pairs in every race&sex group",
            interval=0.5,
        )

        eod = {f: _eod(s, f) for f in ("sex", "race", "race&sex")}
        assert None not in eod.values(), eod
        assert eod["race&sex"] > eod["sex"] and eod["race&sex"] > eod["race"], eod  # type: ignore[operator]

        below = s.by(
            "stream_fair_group_below_min_samples",
            ["group"],
            model=MODEL,
            feature="race&sex",
            window="cumulative",
        )
        eligible = [g for (g,), flag in below.items() if flag == 0.0]
        assert sorted(eligible) == sorted(RACE_SEX)
        tpr = {
            g: s.get(
                "stream_fair_true_positive_rate",
                model=MODEL,
                feature="race&sex",
                group=g,
                window="cumulative",
            )
            for g in eligible
        }
        assert min(tpr, key=lambda g: tpr[g]) == "Black&Female", tpr  # type: ignore[arg-type, return-value]

        def flagged(feature: str) -> float | None:
            return s.get(
                "stream_fair_disparity_flagged",
                model=MODEL,
                feature=feature,
                window="cumulative",
                method="between_groups",
                disparity="equal_opportunity_difference",
            )

        assert flagged("race&sex") == 1.0  # interval entirely above the threshold
        assert flagged("sex") == 0.0  # the marginal hides it

        proc.send_signal(signal.SIGTERM)  # the demo stops cleanly on SIGTERM
        assert proc.wait(timeout=40) == 0
        assert time.monotonic() - start < 60
    finally:
        stop_process(proc)  # type: ignore[arg-type]
