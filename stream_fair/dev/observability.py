"""A local Prometheus and Alertmanager with the project's rules and routes (demo, end-to-end tests).

Runs Debian's ``prometheus`` and ``prometheus-alertmanager`` binaries as subprocesses on loopback
ports, with their data in a directory the caller owns, scraping one stream-fair exporter the way
the Kubernetes PodMonitor does (``job="stream-fair"``, the target's ``model`` label filling the
gap under ``honor_labels``). Alertmanager gets ``deploy/alertmanager/alertmanager.yml`` with every
webhook pointed at a :class:`WebhookReceiver` in this process (same paths), so nothing leaves the
machine. Edges only: no part of the core imports this module.

>>> shorten_for("      - alert: A\\n        for: 1h\\n        labels: {}\\n", "2s")
'      - alert: A\\n        for: 2s\\n        labels: {}\\n'
>>> _with_base("http://alert-webhook.monitoring.svc:8080/credit-risk/page", "http://127.0.0.1:5")
'http://127.0.0.1:5/credit-risk/page'
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from stream_fair.assets import asset
from stream_fair.errors import StreamFairError

PROMETHEUS_BIN = "prometheus"
ALERTMANAGER_BIN = "prometheus-alertmanager"  # Debian's name for the alertmanager binary
JOB = "stream-fair"

#: ``deploy/`` of a source checkout, or its copy inside an installed wheel (see stream_fair.assets).
DEPLOY = asset("deploy")
RULE_FILES = ("recording_rules.yml", "alert_rules.yml")
ALERTMANAGER_CONFIG = DEPLOY / "alertmanager" / "alertmanager.yml"

_FOR = re.compile(r"^(\s+)for:\s*\S+\s*$", re.MULTILINE)


class ObservabilityError(StreamFairError):
    """Prometheus or Alertmanager is missing, did not start, or is not ready."""


def binaries_available() -> bool:
    """Both ``prometheus`` and ``prometheus-alertmanager`` are on ``PATH``."""
    return all(shutil.which(b) for b in (PROMETHEUS_BIN, ALERTMANAGER_BIN))


def rules_available() -> bool:
    return all((DEPLOY / "prometheus" / f).is_file() for f in RULE_FILES) and (ALERTMANAGER_CONFIG.is_file())


def free_port(preferred: int = 0) -> int:
    """``preferred`` if it can be bound on loopback, else any free port."""
    for port in (preferred, 0) if preferred else (0,):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    raise ObservabilityError("no free loopback port")  # pragma: no cover


# -- configuration --------------------------------------------------------------------------
def shorten_for(rules_text: str, duration: str) -> str:
    """The rule file with every alert's ``for:`` set to ``duration``; nothing else changes."""
    return _FOR.sub(lambda m: f"{m.group(1)}for: {duration}", rules_text)


def write_rule_files(workdir: Path, for_duration: str | None = None) -> list[Path]:
    """Copies of the project's rule files in ``workdir`` (``for:`` shortened when asked)."""
    out = []
    for name in RULE_FILES:
        text = (DEPLOY / "prometheus" / name).read_text(encoding="utf-8")
        if for_duration is not None:
            text = shorten_for(text, for_duration)
        path = workdir / name
        path.write_text(text, encoding="utf-8")
        out.append(path)
    return out


def prometheus_config(
    target: str,
    rule_files: Sequence[Path],
    *,
    model: str | None = None,
    alertmanager: str | None = None,
    interval: str = "1s",
) -> dict[str, Any]:
    """Scrape ``target`` (``host:port``) as job ``stream-fair``; evaluate ``rule_files``."""
    static: dict[str, Any] = {"targets": [target]}
    if model is not None:
        static["labels"] = {"model": model}
    cfg: dict[str, Any] = {
        "global": {
            "scrape_interval": interval,
            "scrape_timeout": interval,
            "evaluation_interval": interval,
        },
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": [
            {"job_name": JOB, "metrics_path": "/metrics", "honor_labels": True, "static_configs": [static]},
        ],
    }
    if alertmanager is not None:
        cfg["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]}
    return cfg


def _with_base(url: str, base: str) -> str:
    return base.rstrip("/") + (urlsplit(url).path or "/")


def alertmanager_config(
    webhook_base: str,
    *,
    group_wait: str = "1s",
    group_interval: str | None = None,
    repeat_interval: str | None = None,
    source: Path = ALERTMANAGER_CONFIG,
) -> dict[str, Any]:
    """The project's routes, receivers and inhibitions with webhooks on ``webhook_base``.

    ``group_interval`` / ``repeat_interval``, when given, replace the values of every route.
    """
    cfg = yaml.safe_load(source.read_text(encoding="utf-8"))
    for receiver in cfg.get("receivers", []):
        for hook in receiver.get("webhook_configs", []):
            hook["url"] = _with_base(hook["url"], webhook_base)

    def tune(route: dict[str, Any]) -> None:
        overrides = (("group_interval", group_interval), ("repeat_interval", repeat_interval))
        for key, value in overrides:
            if value is not None and (key in route or route is cfg["route"]):
                route[key] = value
        route.pop("group_wait", None)
        for child in route.get("routes", []):
            tune(child)

    tune(cfg["route"])
    cfg["route"]["group_wait"] = group_wait
    return cfg


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


# -- processes ------------------------------------------------------------------------------
@dataclass
class Service:
    """A server subprocess (own process group) with its URL and log file."""

    name: str
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait_ready(self, timeout: float = 30.0) -> Service:
        """Wait for ``/-/ready`` to answer 200; raise with the log's tail if it does not."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running():
                break
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(self.url + "/-/ready", timeout=2) as resp,
            ):
                if resp.status == 200:
                    return self
            time.sleep(0.1)
        tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
        self.stop()
        raise ObservabilityError(f"{self.name} at {self.url} did not become ready:\n{tail}")

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM the process group, SIGKILL after ``grace`` seconds; always reaps."""
        if self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue


def _die_with_parent() -> None:  # pragma: no cover (runs in the child)
    """Linux: SIGTERM this server when its starter dies, even by SIGKILL (no orphans)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _spawn(name: str, args: list[str], url: str, log: Path) -> Service:
    if shutil.which(args[0]) is None:
        raise ObservabilityError(f"{args[0]} is not on PATH: apt-get install {name}")
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            args,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C in the terminal reaches the caller, who stops us
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
    return Service(name, proc, url, log)


def start_prometheus(
    workdir: Path, config: dict[str, Any], *, port: int = 0, resend_delay: str = "1s"
) -> Service:
    """Start Prometheus with ``config`` (data in ``workdir/prometheus``); not yet ready."""
    port = port or free_port()
    path = write_yaml(workdir / "prometheus.yml", config)
    (workdir / "prometheus").mkdir(exist_ok=True)
    args = [
        PROMETHEUS_BIN,
        f"--config.file={path}",
        f"--storage.tsdb.path={workdir / 'prometheus'}",
        f"--web.listen-address=127.0.0.1:{port}",
        f"--rules.alert.resend-delay={resend_delay}",
    ]
    return _spawn("prometheus", args, f"http://127.0.0.1:{port}", workdir / "prometheus.log")


def start_alertmanager(workdir: Path, config: dict[str, Any], *, port: int = 0) -> Service:
    """Start Alertmanager with ``config`` (data in ``workdir/alertmanager``, no clustering)."""
    port = port or free_port()
    path = write_yaml(workdir / "alertmanager.yml", config)
    (workdir / "alertmanager").mkdir(exist_ok=True)
    args = [
        ALERTMANAGER_BIN,
        f"--config.file={path}",
        f"--storage.path={workdir / 'alertmanager'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--cluster.listen-address=",  # no gossip
    ]
    return _spawn("prometheus-alertmanager", args, f"http://127.0.0.1:{port}", workdir / "alertmanager.log")


# -- the webhook receiver -------------------------------------------------------------------
@dataclass(frozen=True)
class Notification:
    """One webhook post from Alertmanager: the path it was sent to and its JSON body."""

    path: str
    payload: dict[str, Any]
    received: float  # time.monotonic()


class WebhookReceiver:
    """Records Alertmanager webhook posts on a loopback port; ``on_post`` is called for each."""

    def __init__(self, on_post: Callable[[Notification], None] | None = None) -> None:
        self.notifications: list[Notification] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server API)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    payload = json.loads(body)
                except ValueError:
                    payload = {"unparsed": body.decode(errors="replace")}
                note = Notification(self.path, payload, time.monotonic())
                with receiver._lock:
                    receiver.notifications.append(note)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()
                if on_post is not None:
                    on_post(note)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="webhooks", daemon=True)

    def start(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def received(self) -> list[Notification]:
        with self._lock:
            return list(self.notifications)

    def stop(self) -> None:
        if self._thread.is_alive():
            self.httpd.shutdown()
        self.httpd.server_close()


def describe(receiver: str, alert: dict[str, Any]) -> str:
    """One line for one alert of a notification, for a console."""
    lab, ann = alert.get("labels", {}), alert.get("annotations", {})
    method = f" ({lab['method']})" if "method" in lab else ""
    return (
        f"ALERT {alert.get('status', '?')} -> {receiver}: {lab.get('alertname')} "
        f"[{lab.get('severity')}] {ann.get('summary', '')}{method}"
    )


def _new_alerts_printer(out: Callable[[str], None]) -> Callable[[Notification], None]:
    """Print each alert once per status change, not at every re-notification of its group."""
    seen: set[tuple[str, str]] = set()
    lock = threading.Lock()

    def show(note: Notification) -> None:
        for alert in note.payload.get("alerts", []):
            key = (alert.get("fingerprint", ""), alert.get("status", ""))
            with lock:
                if key in seen:
                    continue
                seen.add(key)
            out(describe(note.payload.get("receiver", "?"), alert))

    return show


# -- the whole stack ------------------------------------------------------------------------
@dataclass
class Stack:
    """Prometheus + Alertmanager + webhook receiver; :meth:`stop` ends them all."""

    workdir: Path
    receiver: WebhookReceiver
    services: list[Service] = field(default_factory=list)

    @property
    def prometheus(self) -> Service:
        return self.services[1]

    @property
    def alertmanager(self) -> Service:
        return self.services[0]

    def stop(self) -> None:
        for service in reversed(self.services):
            service.stop()
        self.receiver.stop()


def start_stack(
    workdir: Path,
    target: str,
    *,
    model: str | None = None,
    for_duration: str | None = None,
    prometheus_port: int = 0,
    alertmanager_port: int = 0,
    interval: str = "1s",
    group_wait: str = "1s",
    group_interval: str | None = None,
    repeat_interval: str | None = None,
    on_notification: Callable[[Notification], None] | None = None,
    ready_timeout: float = 30.0,
) -> Stack:
    """Start Alertmanager, then Prometheus scraping ``target``, and wait until both are ready.

    ``for_duration`` replaces every alert's ``for:`` (the real ones run to hours: a demo or a
    test shortens them; nothing else in the rules changes).
    """
    if not rules_available():
        raise ObservabilityError(
            f"no rule files under {DEPLOY}: reinstall from a wheel built with `python -m build`"
        )
    workdir.mkdir(parents=True, exist_ok=True)
    stack = Stack(workdir, WebhookReceiver(on_notification).start())
    try:
        am = start_alertmanager(
            workdir,
            alertmanager_config(
                stack.receiver.url,
                group_wait=group_wait,
                group_interval=group_interval,
                repeat_interval=repeat_interval,
            ),
            port=alertmanager_port,
        )
        stack.services.append(am)
        am.wait_ready(ready_timeout)
        rules = write_rule_files(workdir, for_duration)
        cfg = prometheus_config(
            target, rules, model=model, interval=interval, alertmanager=urlsplit(am.url).netloc
        )
        prom = start_prometheus(workdir, cfg, port=prometheus_port, resend_delay=interval)
        stack.services.append(prom)
        prom.wait_ready(ready_timeout)
    except BaseException:
        stack.stop()
        raise
    return stack


# -- the demo -------------------------------------------------------------------------------
#: The demo's ``for:`` for every alert, so a newcomer sees alerts fire within a minute.
DEMO_FOR = "10s"


def start_demo_stack(
    workdir: Path,
    exporter_port: int,
    *,
    model: str = "credit-v3",
    fixed_ports: bool = True,
    out: Callable[[str], None] = print,
    on_alert: Callable[[str], None] | None = None,
) -> Stack | None:
    """Prometheus (:9090) and Alertmanager (:9093) for ``stream-fair demo``, or ``None``.

    Ports fall back to free ones when taken (or always with ``fixed_ports=False``). Alert
    notifications go to ``on_alert`` (default ``out``), one line each (see :func:`describe`).
    Missing binaries or rules are reported, not fatal.
    """
    if not binaries_available():
        out(
            f"({PROMETHEUS_BIN} / {ALERTMANAGER_BIN} not on PATH: no Prometheus or Alertmanager; "
            "apt-get install prometheus prometheus-alertmanager to see alerts fire)"
        )
        return None
    if not rules_available():
        out(f"(no alert rules under {DEPLOY}: reinstall stream-fair from a wheel to see alerts)")
        return None
    try:
        stack = start_stack(
            workdir,
            f"127.0.0.1:{exporter_port}",
            model=model,
            for_duration=DEMO_FOR,
            prometheus_port=free_port(9090) if fixed_ports else 0,
            alertmanager_port=free_port(9093) if fixed_ports else 0,
            interval="2s",
            group_wait="2s",
            group_interval="10s",
            on_notification=_new_alerts_printer(on_alert or out),
        )
    except ObservabilityError as exc:
        out(f"(Prometheus / Alertmanager did not start: {exc})")
        return None
    out(
        f"prometheus {stack.prometheus.url}/alerts; alertmanager {stack.alertmanager.url} "
        f"(rules and routes from deploy/, every alert's for: shortened to {DEMO_FOR})"
    )
    return stack
