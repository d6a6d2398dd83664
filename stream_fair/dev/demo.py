"""``stream-fair demo``: everything on one machine, no Docker, no internet.

Starts the embedded Tansu broker, produces the synthetic ``lending`` stream (its bias hidden in
the race&sex intersection, small in both marginals) in real time, runs the detector and its
exporter, and shows a live per-group table with the flagged disparities and, at the bottom, the
latest alert notifications, until Ctrl-C, SIGTERM or SIGHUP. The banner states everything the
stream injects, so no alert comes as a surprise. Every file (broker log, state, Prometheus data)
lives in one temporary directory that is removed on exit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from stream_fair.config import Config

PREDICTIONS, OUTCOMES, DEAD_LETTERS = "predictions", "outcomes", "stream-fair-dead-letters"
DEFAULT_PORT = 9800
#: What the demo's stream injects besides the bias (stated in the banner).
DUPLICATE_RATE, MALFORMED_RATE, EARLY_OUTCOME_RATE = 0.002, 0.001, 0.05
LABEL_DELAY_S = 3.0  # mean seconds from a decision to its outcome: joined pairs within seconds
SEED = 7
ALERTS_SHOWN = 8


def demo_config(bootstrap: str, state_dir: Path, port: int) -> Config:
    """The demo's configuration, also a readable example of a real one."""
    return Config.model_validate(
        {
            "kafka": {
                "bootstrap_servers": bootstrap,
                "group_id": "stream-fair-demo",
                # Tansu completes group joins quickly only with short timeouts.
                "session_timeout_ms": 6000,
                "heartbeat_interval_ms": 2000,
                "max_poll_interval_ms": 10000,
            },
            "topics": {"predictions": PREDICTIONS, "outcomes": OUTCOMES, "dead_letters": DEAD_LETTERS},
            "fairness": {
                "features": [
                    {"name": "sex", "reference": "Male"},
                    {"name": "race", "reference": "White"},
                    {"name": "age"},
                ],
                "intersections": [["race", "sex"]],
                "min_samples": 100,
            },
            # the simulated model decides score >= 0.5; threshold what-ifs (/whatif) start from it
            "schema": {"score_threshold": 0.5},
            "windows": ["15m", "1h", "1d"],  # the alert rules judge the 1d window
            "window_resolution": "1m",
            "join": {"ttl": "2h"},
            # The calibrated alarm compares prediction-time cohorts and evaluates arrival slots once
            # every partition has passed them: hour cohorts and 10-minute slots by default. The demo
            # runs for minutes, so it uses 1-minute cohorts and 10-second slots.
            # Decisions only (use_scores off: the exact equal-opportunity null). The default score
            # test compares whole score distributions, and a race&sex bias hidden at the 0.5
            # threshold leaves Black positives' scores spread wider than the rest's (TPR at 0.9:
            # 0.39 against 0.25), so with scores the marginal race would page too, on and off
            # (docs/feedback.md, "Scores").
            "feedback": {"cohort_period": "1m", "alarm_slot": "10s", "use_scores": False},
            "state": {"path": str(state_dir / "state"), "checkpoint_interval": "2s"},
            "exporter": {"host": "127.0.0.1", "port": port},
        }
    )


def _in_real_time(events: Iterator[tuple[str, Any]], stop: threading.Event) -> Iterator[tuple[str, Any]]:
    """Release each event once the wall clock reaches its event time, until ``stop``.

    So event time tracks the clock: the lag alerts stay quiet, windows mean what they say.
    """
    for kind, payload in events:
        if stop.is_set():
            return
        ts = payload.get("ts") if isinstance(payload, dict) else None
        if isinstance(ts, int | float):
            ahead = ts - time.time()
            if ahead > 0.02 and stop.wait(ahead):
                return
        yield kind, payload


def injected_truth(scenario: Any) -> list[str]:
    """The banner's account of the bias, from the scenario's own expected rates (not a copy)."""
    from stream_fair.dev import simulate

    cells = simulate.expected_rates(scenario, "race&sex")
    tpr = {g: r["tpr"] for g, r in cells.items() if abs(r["tpr"] - scenario.tpr) > 1e-9}
    fpr = {g: r["fpr"] for g, r in cells.items() if abs(r["fpr"] - scenario.fpr) > 1e-9}
    gaps = {}
    for feature in ("sex", "race"):
        rates = [r["tpr"] for r in simulate.expected_rates(scenario, feature).values()]
        gaps[feature] = max(rates) - min(rates)
    return [
        "injected bias (credit-v3): true-positive rate by race&sex "
        + ", ".join(f"{g} {v:.2f}" for g, v in sorted(tpr.items(), key=lambda kv: kv[1]))
        + f", every other cell {scenario.tpr:.2f}; false-positive rate "
        + ", ".join(f"{g} {v:.2f}" for g, v in sorted(fpr.items(), key=lambda kv: kv[1]))
        + f", others {scenario.fpr:.2f}.",
        f"  The marginal TPR gaps stay small (sex {gaps['sex']:.3f}, race {gaps['race']:.3f}): only "
        f"race&sex is flagged, and each of the {len(tpr)} cells above may raise a change alarm.",
    ]


def _banner(url: str, bootstrap: str, scenario: Any, rate: float) -> list[str]:
    return [
        f"stream-fair demo: broker {bootstrap}; metrics {url}/metrics; status page {url}/",
        *injected_truth(scenario),
        f"injected noise: about {DUPLICATE_RATE:.1%} duplicate records, {MALFORMED_RATE:.1%} malformed "
        f"records (rejected and dead-lettered, so StreamFairDeadLettersIncreasing fires on purpose), "
        f"{EARLY_OUTCOME_RATE:.0%} of outcomes before their prediction.",
        f"event time is the wall clock: {rate:g} decisions per second, outcomes about "
        f"{LABEL_DELAY_S:g} s later.",
        f"threshold what-ifs: stream-fair whatif --url {url} --model {scenario.models[0]} "
        "--feature 'race&sex' --criterion equal_opportunity",
    ]


def _table(detector: Any, injected: dict[str, int]) -> str:
    from stream_fair.report import CUMULATIVE

    report, _ = detector.current()
    snap = report.snapshot
    lines = [
        f"consumed {snap.consumed['predictions']} predictions, {snap.consumed['outcomes']} outcomes; "
        f"joined {snap.fates['outcomes']['joined']}; pending {snap.pending['predictions']}; "
        f"rejected {snap.fates['predictions']['rejected'] + snap.fates['outcomes']['rejected']} "
        f"(injected so far: {injected.get('malformed', 0)} malformed, "
        f"{injected.get('duplicate', 0)} duplicates)",
        f"{'feature':<10} {'group':<16} {'n':>7} {'sel':>6} {'TPR':>6} {'FPR':>6}",
    ]
    flags = []
    for v in report.views:
        if v.window != CUMULATIVE:
            continue
        for g, gr in sorted(v.report.groups.items()):
            r = gr.rates
            cols = [
                f"{r[k].value:6.3f}" if k in r else "     –"
                for k in ("selection_rate", "true_positive_rate", "false_positive_rate")
            ]
            mark = "" if gr.eligible else "  (few samples)"
            lines.append(f"{v.feature.name:<10} {g:<16} {gr.counts.n:>7} {' '.join(cols)}{mark}")
        for (d, m), f in v.report.flagged.items():
            if f and m == "between_groups":
                est = v.report.disparities[d, m]
                flags.append(
                    f"  FLAGGED {v.feature.name}: {d} = {est.value:.3f} [{est.lower:.3f}, {est.upper:.3f}]"
                )
    lines.append("flagged disparities:" if flags else "flagged disparities: none yet")
    return "\n".join(lines + flags)


def _silence_stdio() -> None:
    """The terminal is gone: send fds 1 and 2 to /dev/null so shutdown and exit stay clean."""
    with contextlib.suppress(OSError):
        null = os.open(os.devnull, os.O_WRONLY)
        for fd in (1, 2):
            os.dup2(null, fd)
        os.close(null)


class Console:
    """Where the demo writes: survives a closed terminal, and keeps alerts in view.

    On a terminal the table is redrawn in place every refresh with the last alerts below it, so
    they never scroll away; elsewhere (a pipe, a log) tables are printed less often and alerts
    as they arrive. ``quiet`` prints only the banner and the alerts.
    """

    def __init__(self, quiet: bool, stream: Any = None) -> None:
        self.stream = stream or sys.stdout
        self.quiet = quiet
        try:
            self.tty = bool(self.stream.isatty()) and not quiet
        except (OSError, ValueError):
            self.tty = False
        self.alerts: deque[str] = deque(maxlen=ALERTS_SHOWN)
        self.header: list[str] = []
        self._lock = threading.Lock()
        self._gone = False  # the terminal was closed (SIGHUP): stop writing, keep shutting down

    def write(self, text: str) -> None:
        with self._lock:
            if self._gone:
                return
            try:
                self.stream.write(text + "\n")
                self.stream.flush()
            except (OSError, ValueError):
                self._gone = True
                if self.stream is sys.stdout:
                    _silence_stdio()

    def banner(self, line: str) -> None:
        self.header.append(line)
        self.write(line)

    def alert(self, line: str) -> None:
        firing = "firing" in line.split(":", 1)[0]
        shown = f"\x1b[1;31m{line}\x1b[0m" if self.tty and firing else line
        self.alerts.append(shown)
        if not self.tty:
            self.write(line)  # on a terminal the next redraw shows it at the bottom

    def table(self, text: str) -> None:
        if self.quiet:
            return
        if not self.tty:
            self.write("\n" + text)
            return
        alerts = list(self.alerts) or ["(none yet)"]
        screen = [*self.header, "", text, "", f"latest alerts (last {ALERTS_SHOWN}):", *alerts]
        self.write("\x1b[H\x1b[2J" + "\n".join(screen))


DEMO_PORT_FIX = "pass another --port (0 picks a free one)"


def _pick_port(port: int | None, say: Callable[[str], None]) -> int:
    """``port`` as asked; by default 9800, or a free port when 9800 is taken (and say so)."""
    from stream_fair.cli import check_port_free
    from stream_fair.dev.observability import free_port

    if port is not None:
        check_port_free("127.0.0.1", port, DEMO_PORT_FIX)  # an explicit port that is busy: one line
        return port
    chosen = free_port(DEFAULT_PORT)
    if chosen != DEFAULT_PORT:
        say(f"port {DEFAULT_PORT} is in use (another demo or stream-fair?); the exporter uses port {chosen}")
    return chosen


def run_demo(
    seconds: float | None = None, port: int | None = None, rate: float = 2000.0, quiet: bool = False
) -> int:
    """Run the demo until ``seconds`` pass or a stop signal; 0 after a clean stop."""
    from stream_fair.app import Detector
    from stream_fair.cli import exporter_error
    from stream_fair.dev import observability, simulate
    from stream_fair.dev.broker import EmbeddedBroker, create_topics, produce_events

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.ERROR)
    console = Console(quiet)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    exporter_port = _pick_port(port, console.banner)
    failure: list[BaseException] = []
    with (
        tempfile.TemporaryDirectory(prefix="stream-fair-demo-") as tmp,
        EmbeddedBroker(log_path=Path(tmp) / "tansu.log") as broker,
    ):
        bootstrap = broker.bootstrap_servers
        create_topics(bootstrap, [PREDICTIONS, OUTCOMES, DEAD_LETTERS], partitions=1)
        try:
            detector = Detector(demo_config(bootstrap, Path(tmp), exporter_port))
        except OSError as exc:  # the port was taken since it was picked
            raise exporter_error("127.0.0.1", exporter_port, exc, DEMO_PORT_FIX) from None

        def consume() -> None:
            try:
                detector.run(stop)
            except BaseException as exc:  # surfaced below: the demo must not look alive
                failure.append(exc)
                stop.set()

        consumer = threading.Thread(target=consume, name="detector")
        consumer.start()
        scenario = simulate.SCENARIOS["lending"](label_delay_mean_s=LABEL_DELAY_S)
        events = simulate.messy(
            simulate.generate(scenario, 50_000_000, seed=SEED, start_ts=time.time(), rate_per_s=rate),
            seed=SEED,
            duplicate_rate=DUPLICATE_RATE,
            malformed_rate=MALFORMED_RATE,
            early_outcome_rate=EARLY_OUTCOME_RATE,
        )
        producer = threading.Thread(
            target=produce_events,
            args=(bootstrap, PREDICTIONS, OUTCOMES, _in_real_time(events, stop)),
            name="producer",
            daemon=True,
        )
        producer.start()
        for line in _banner(f"http://127.0.0.1:{detector.port}", bootstrap, scenario, rate):
            console.banner(line)
        stack = observability.start_demo_stack(
            Path(tmp) / "observability",
            detector.port,
            fixed_ports=port != 0,
            out=console.banner,  # the Prometheus and Alertmanager URLs stay on a redrawn screen
            on_alert=console.alert,
        )
        console.banner("Ctrl-C stops everything (--quiet: alerts only).")
        deadline = None if seconds is None else time.monotonic() + seconds
        every = 2.0 if console.tty else 10.0
        try:
            while not stop.wait(
                every if deadline is None else min(every, max(0.0, deadline - time.monotonic()))
            ):
                if deadline is not None and time.monotonic() >= deadline:
                    break
                injected = {k: events.counts.get(k, 0) for k in ("malformed", "duplicate")}
                console.table(_table(detector, injected))
        finally:
            stop.set()
            consumer.join(timeout=30)  # the exporter first: no scrape is cut off mid-response
            if stack is not None:
                stack.stop()
            producer.join(timeout=10)
    if failure:
        print(f"stream-fair demo: the detector failed: {failure[0]}", file=sys.stderr)
        return 1
    try:
        print("demo stopped.", file=sys.stderr, flush=True)
    except OSError:  # the terminal is gone (SIGHUP)
        _silence_stdio()
    return 0
