"""``stream-fair demo`` shows the bias it injects, within seconds, on its own /metrics, and says
truthfully what it injects.

The demo's lending stream under-approves Black women (TPR 0.50 against 0.70-0.95 elsewhere)
while keeping the marginal sex and race gaps small; the race&sex intersection must show it. Its
banner must match the generated cells, its event time the wall clock; SIGHUP (a closed terminal)
must stop everything and leave no file behind.
"""

from __future__ import annotations

import contextlib
import io
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from stream_fair.dev import demo, simulate
from tests.helpers import Scrape, cli_env, run_cli, scrape, stop_process, wait_for

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


@pytest.mark.integration
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


# -- the banner tells the truth -----------------------------------------------------------------
def _measured(events: list[tuple[str, Any]], feature: tuple[str, ...]) -> dict[str, tuple[float, float]]:
    """(TPR, FPR) per group of ``feature`` from the generated events themselves."""
    preds = {p["id"]: p for kind, p in events if kind == "prediction"}
    counts: dict[str, list[int]] = {}
    for kind, o in events:
        if kind != "outcome":
            continue
        p = preds[o["id"]]
        group = "&".join(p["attributes"][f] for f in feature)
        c = counts.setdefault(group, [0, 0, 0, 0])  # tp, fn, fp, tn
        c[(0 if p["prediction"] else 1) if o["label"] else (2 if p["prediction"] else 3)] += 1
    return {g: (tp / (tp + fn), fp / (fp + tn)) for g, (tp, fn, fp, tn) in counts.items()}


def test_banner_states_the_cells_the_stream_generates() -> None:
    scenario = simulate.SCENARIOS["lending"](label_delay_mean_s=demo.LABEL_DELAY_S)
    events = list(simulate.generate(scenario, 200_000, seed=demo.SEED))
    cells = _measured(events, ("race", "sex"))
    banner = " ".join(demo.injected_truth(scenario))
    stated_tpr = dict(re.findall(r"(\w+&\w+) (\d\.\d\d)", banner.split("false-positive rate")[0]))
    stated_fpr = dict(re.findall(r"(\w+&\w+) (\d\.\d\d)", banner.split("false-positive rate")[1]))
    other_tpr = float(re.search(r"every other cell (\d\.\d\d)", banner).group(1))  # type: ignore[union-attr]
    other_fpr = float(re.search(r"others (\d\.\d\d)", banner).group(1))  # type: ignore[union-attr]
    assert len(cells) == 8
    for group, (tpr, fpr) in cells.items():
        # ~3,000+ positives per cell: 0.03 is over 4 standard errors
        assert abs(tpr - float(stated_tpr.get(group, other_tpr))) < 0.03, (group, tpr, banner)
        assert abs(fpr - float(stated_fpr.get(group, other_fpr))) < 0.03, (group, fpr, banner)
    # the cells named are exactly those that differ
    differ = {g for g, (tpr, _) in cells.items() if abs(tpr - other_tpr) > 0.03}
    assert differ == set(stated_tpr), (differ, stated_tpr)
    # ... and the marginals hide it, as the banner says
    for feature in ("sex", "race"):
        tprs = [t for t, _ in _measured(events, (feature,)).values()]
        stated_gap = float(re.search(rf"{feature} (\d\.\d+)", banner.split("gaps stay small")[1]).group(1))  # type: ignore[union-attr]
        assert max(tprs) - min(tprs) < 0.03 and abs(max(tprs) - min(tprs) - stated_gap) < 0.02
    assert scenario.description.count("0.") >= 5  # the scenario's own description names every value
    for value in {*stated_tpr.values(), f"{other_tpr:.2f}"}:
        assert value in scenario.description, value


# -- the console ---------------------------------------------------------------------------------
class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


ALERT = "ALERT firing -> team-credit-risk-pager: StreamFairDisparityFlagged [critical] credit-v3: x"


def test_quiet_keeps_only_the_banner_and_the_alerts() -> None:
    out = io.StringIO()
    console = demo.Console(quiet=True, stream=out)
    console.banner("stream-fair demo: banner")
    console.table("feature group n\nsex Female 10")
    console.alert(ALERT)
    assert out.getvalue().splitlines() == ["stream-fair demo: banner", ALERT]


def test_on_a_terminal_the_latest_alerts_stay_below_the_table() -> None:
    out = _Terminal()
    console = demo.Console(quiet=False, stream=out)
    console.banner("stream-fair demo: banner")
    for i in range(demo.ALERTS_SHOWN + 3):
        console.alert(f"{ALERT} {i}")
    console.table("the table")
    screen = out.getvalue().rsplit("\x1b[2J", 1)[1].splitlines()  # the last redraw
    assert screen[0] == "stream-fair demo: banner" and "the table" in screen
    tail = screen[screen.index(f"latest alerts (last {demo.ALERTS_SHOWN}):") + 1 :]
    assert len(tail) == demo.ALERTS_SHOWN and tail[-1].endswith(f"{ALERT} {demo.ALERTS_SHOWN + 2}\x1b[0m")
    assert all(line.startswith("\x1b[1;31mALERT firing") for line in tail)  # firing alerts in red


def test_a_closed_terminal_stops_the_writes_not_the_demo() -> None:
    out = io.StringIO()
    out.close()
    console = demo.Console(quiet=False, stream=out)
    console.write("nobody reads this")  # no exception
    assert console._gone


# -- ports ----------------------------------------------------------------------------------------
def test_the_default_port_falls_back_to_a_free_one(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = holder.getsockname()[1]
        monkeypatch.setattr(demo, "DEFAULT_PORT", busy)
        said: list[str] = []
        port = demo._pick_port(None, said.append)
        assert port != busy and said == [
            f"port {busy} is in use (another demo or stream-fair?); the exporter uses port {port}"
        ]
        # an explicit port that is taken is a one-line error, before anything starts
        result = run_cli("demo", "--port", str(busy), "--seconds", "1")
    assert result.returncode == 2, result
    assert result.stdout == "" and len(result.stderr.splitlines()) == 1
    assert f"port {busy} on 127.0.0.1 is already in use" in result.stderr
    assert "pass another --port" in result.stderr and "exporter.port" not in result.stderr  # the demo's flag


# -- SIGHUP, wall-clock event time, no files left ---------------------------------------------
@pytest.mark.integration
def test_sighup_stops_everything_and_leaves_no_file(tmp_path: Path) -> None:
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "stream_fair", "demo", "--port", "0", "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        env=cli_env(TMPDIR=str(tmpdir)),
    )
    lines: list[str] = []

    def read() -> None:
        with contextlib.suppress(ValueError, OSError):  # the test closes the pipe: the "terminal" goes
            lines.extend(iter(proc.stdout.readline, ""))  # type: ignore[union-attr]

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        first = wait_for(lambda: lines[:1], 30, "the demo's banner")[0]
        broker = int(re.search(r"broker 127\.0\.0\.1:(\d+)", first).group(1))  # type: ignore[union-attr]
        port = int(re.search(r"metrics http://127\.0\.0\.1:(\d+)/metrics", first).group(1))  # type: ignore[union-attr]
        scenario = simulate.SCENARIOS["lending"](label_delay_mean_s=demo.LABEL_DELAY_S)
        wait_for(lambda: len(lines) >= 5, 30, "the whole banner")
        assert lines[1:3] == [line + "\n" for line in demo.injected_truth(scenario)]
        assert (
            "malformed" in lines[3]
            and "duplicate" in lines[3]
            and "StreamFairDeadLettersIncreasing" in lines[3]
        )

        def joined() -> Scrape | None:
            s = scrape(port)
            return (
                s
                if (s.get("stream_fair_event_fates_total", topic="outcomes", fate="joined") or 0) > 1000
                else None
            )

        s = wait_for(joined, 40, "joined pairs on the demo's /metrics", interval=0.5)
        newest = s.get("stream_fair_last_event_timestamp_seconds", topic="predictions")
        assert newest is not None and abs(newest - time.time()) < 60, newest - time.time()  # was ~1 h off
        servers = [int(p) for line in list(lines) for p in re.findall(r"http://127\.0\.0\.1:(\d+)", line)]
        assert any(tmpdir.iterdir())  # the demo's files are where they should be ...
        proc.stdout.close()  # type: ignore[union-attr]  # ... the terminal goes away ...
        proc.send_signal(signal.SIGHUP)  # ... and sends SIGHUP
        assert proc.wait(timeout=60) == 0
        for p in {broker, *servers}:  # broker, exporter, Prometheus, Alertmanager: all gone
            with pytest.raises(OSError), socket.create_connection(("127.0.0.1", p), timeout=1):
                pass
        assert list(tmpdir.iterdir()) == []  # ... and nothing is left behind
    finally:
        stop_process(proc)  # type: ignore[arg-type]
