"""``stream-fair demo``: everything on one machine, no Docker, no internet.

Starts the embedded Tansu broker, produces the synthetic ``lending`` stream (bias hidden in one
intersectional cell, weak in both marginals), runs the detector and its exporter, and prints a live
per-group table with flagged disparities until Ctrl-C.
"""

from __future__ import annotations

import logging
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from stream_fair.config import Config

PREDICTIONS, OUTCOMES, DEAD_LETTERS = "predictions", "outcomes", "stream-fair-dead-letters"


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
            "windows": ["15m", "1h", "1d"],  # the alert rules judge the 1d window
            "window_resolution": "1m",
            "join": {"ttl": "2h"},
            "state": {"path": str(state_dir / "state.db"), "checkpoint_interval": "2s"},
            "exporter": {"host": "127.0.0.1", "port": port},
        }
    )


def _paced(
    events: Iterator[tuple[str, Any]], rate: float, stop: threading.Event
) -> Iterator[tuple[str, Any]]:
    """Release events at about ``rate`` predictions per second until ``stop``."""
    start = time.monotonic()
    sent = 0
    for kind, payload in events:
        if stop.is_set():
            return
        yield kind, payload
        if kind == "prediction":
            sent += 1
            ahead = sent / rate - (time.monotonic() - start)
            if ahead > 0.05:
                time.sleep(ahead)


def _table(detector: Any) -> str:
    from stream_fair.report import CUMULATIVE

    report, stats = detector.current()
    snap = report.snapshot
    lines = [
        f"consumed {snap.consumed['predictions']} predictions, {snap.consumed['outcomes']} outcomes; "
        f"joined {snap.fates['outcomes']['joined']}; pending {snap.pending['predictions']}; "
        f"rejected {snap.fates['predictions']['rejected'] + snap.fates['outcomes']['rejected']}",
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


def run_demo(
    seconds: float | None = None, port: int = 9800, rate: float = 2000.0, quiet: bool = False
) -> int:
    from stream_fair.app import Detector
    from stream_fair.dev import observability, simulate
    from stream_fair.dev.broker import EmbeddedBroker, create_topics, produce_events

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.ERROR)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory(prefix="stream-fair-demo-") as tmp:
        bootstrap = broker.bootstrap_servers
        create_topics(bootstrap, [PREDICTIONS, OUTCOMES, DEAD_LETTERS], partitions=1)
        detector = Detector(demo_config(bootstrap, Path(tmp), port))
        failure: list[BaseException] = []

        def consume() -> None:
            try:
                detector.run(stop)
            except BaseException as exc:  # surfaced below: the demo must not look alive
                failure.append(exc)
                stop.set()

        consumer = threading.Thread(target=consume, name="detector")
        consumer.start()
        # Event time runs faster than the wall clock (50 predictions per event-second, produced at
        # ``rate`` per second), so two minutes of label delay pass in a few seconds.
        scenario = simulate.SCENARIOS["lending"](label_delay_mean_s=120.0)
        events = simulate.messy(
            simulate.generate(scenario, 50_000_000, seed=7, start_ts=time.time() - 3600),
            seed=7,
            duplicate_rate=0.002,
            malformed_rate=0.001,
        )
        producer = threading.Thread(
            target=produce_events,
            args=(bootstrap, PREDICTIONS, OUTCOMES, _paced(events, rate, stop)),
            name="producer",
            daemon=True,
        )
        producer.start()
        url = f"http://127.0.0.1:{detector.port}"
        print(f"stream-fair demo: broker {bootstrap}; metrics {url}/metrics; status page {url}/", flush=True)
        print(f"ground truth: {simulate.ground_truth(scenario, 1000, seed=7).description}", flush=True)
        stack = observability.start_demo_stack(
            Path(tmp) / "observability",
            detector.port,
            fixed_ports=port != 0,
            out=lambda line: print(line, flush=True),
        )
        print("Ctrl-C stops everything.", flush=True)
        deadline = None if seconds is None else time.monotonic() + seconds
        try:
            while not stop.wait(2.0):
                if deadline is not None and time.monotonic() >= deadline:
                    break
                if not quiet:
                    print("\n" + _table(detector), flush=True)
        finally:
            stop.set()
            if stack is not None:
                stack.stop()
            consumer.join(timeout=30)
            producer.join(timeout=10)
    if failure:
        print(f"stream-fair demo: the detector failed: {failure[0]}", file=sys.stderr)
        return 1
    print("demo stopped.", file=sys.stderr)
    return 0
