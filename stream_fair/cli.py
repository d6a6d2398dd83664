"""``stream-fair`` commands: run, check-config, simulate, demo.

Exit status 2 with one line on stderr for a bad config or an unreachable broker; 0 after a clean
stop (SIGTERM or Ctrl-C).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

import yaml

from stream_fair import __version__
from stream_fair.errors import StreamFairError


def _stop_on_signals(stop: threading.Event) -> None:
    def handler(signum: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def _logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("kafka").setLevel(logging.WARNING)


def cmd_run(args: argparse.Namespace) -> int:
    from stream_fair import config as config_mod
    from stream_fair.app import Detector

    cfg = config_mod.load(args.config)
    _logging(cfg.log_level)
    stop = threading.Event()
    _stop_on_signals(stop)
    Detector(cfg).run(stop)
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    from stream_fair import config as config_mod

    cfg = config_mod.load(args.config)
    print(yaml.safe_dump(config_mod.redacted(cfg), sort_keys=False), end="")
    return 0


def _overrides(pairs: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise StreamFairError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set tpr_drop=0.2")
        out[key.strip()] = yaml.safe_load(value)
    return out


def cmd_simulate(args: argparse.Namespace) -> int:
    from stream_fair.dev import simulate
    from stream_fair.dev.broker import create_topics, produce_events

    factory = simulate.SCENARIOS.get(args.scenario)
    if factory is None:
        raise StreamFairError(
            f"--scenario {args.scenario!r} is unknown: choose one of {', '.join(sorted(simulate.SCENARIOS))}"
        )
    try:
        scenario = factory(**_overrides(args.set))
    except (TypeError, ValueError) as exc:
        raise StreamFairError(f"--set: {exc}") from None
    if args.create_topics:
        create_topics(
            args.bootstrap_servers,
            [args.predictions_topic, args.outcomes_topic],
            partitions=args.partitions,
        )
    events: Any = simulate.generate(scenario, args.events, seed=args.seed)
    if args.messy:
        events = simulate.messy(events, seed=args.seed)
    n = produce_events(args.bootstrap_servers, args.predictions_topic, args.outcomes_topic, events)
    truth = simulate.ground_truth(scenario, args.events, seed=args.seed)
    print(f"produced {n} records ({args.scenario}, seed {args.seed}); ground truth: {truth.description}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from stream_fair.dev.demo import run_demo

    return run_demo(seconds=args.seconds, port=args.port, rate=args.rate, quiet=args.quiet)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stream-fair", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"stream-fair {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="consume predictions and outcomes, export fairness metrics")
    run.add_argument("--config", "-c", help="YAML config file (environment STREAM_FAIR_* overrides it)")
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check-config", help="validate a config and print it, secrets masked")
    check.add_argument("--config", "-c")
    check.set_defaults(func=cmd_check_config)

    sim = sub.add_parser("simulate", help="produce a synthetic stream with known ground truth")
    sim.add_argument("--bootstrap-servers", required=True)
    sim.add_argument("--scenario", default="lending")
    sim.add_argument("--events", type=int, default=10_000, help="number of predictions")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="scenario parameter, e.g. --set tpr_drop=0.2 (repeatable)",
    )
    sim.add_argument(
        "--messy",
        action="store_true",
        help="add duplicates, early outcomes, shuffling and malformed records",
    )
    sim.add_argument("--predictions-topic", default="predictions")
    sim.add_argument("--outcomes-topic", default="outcomes")
    sim.add_argument("--create-topics", action="store_true")
    sim.add_argument("--partitions", type=int, default=1)
    sim.set_defaults(func=cmd_simulate)

    demo = sub.add_parser("demo", help="embedded broker + biased lending stream + detector + live table")
    demo.add_argument("--seconds", type=float, default=None, help="stop after this long (default: Ctrl-C)")
    demo.add_argument("--port", type=int, default=9800, help="exporter port (0 picks a free one)")
    demo.add_argument("--rate", type=float, default=2000.0, help="predictions per second to produce")
    demo.add_argument("--quiet", action="store_true", help="no live table (for scripts)")
    demo.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args))
    except StreamFairError as exc:
        print(f"stream-fair: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
