"""Shared test helpers: scrape /metrics, recount expected results by hand, run the CLI, wait.

The recount here is deliberately plain and independent of stream-fair's own code (no decoder,
join buffer or counts): it walks the produced event list and applies the documented fates.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from prometheus_client.parser import text_string_to_metric_families

from stream_fair.aggregate import ModelCounts
from stream_fair.config import Config, format_duration
from stream_fair.state.rocks import RocksBackend
from stream_fair.tracker import Snapshot, Tracker

T = TypeVar("T")

# Consumer-group timings under which Tansu completes a join in seconds (docs: ENVIRONMENT.md).
FAST_KAFKA = {"session_timeout_ms": 6000, "heartbeat_interval_ms": 2000, "max_poll_interval_ms": 10000}
DEFAULT_TRANSPORT = "kafka-python"
_transport = [DEFAULT_TRANSPORT]  # set per test by the ``kafka_transport`` fixture (conftest.py)


def use_transport(name: str) -> None:
    _transport[0] = name


def transport() -> str:
    """The ``kafka.transport`` of the running test (both, in turn, for tests marked ``transports``)."""
    return _transport[0]


LENDING_FEATURES = ("sex", "race", "age")
LENDING_INTERSECTIONS = (("race", "sex"),)
ACTUAL_PREDICTED = ((1, 1), (0, 1), (0, 0), (1, 0))


# -- waiting ------------------------------------------------------------------------------------
def wait_for(condition: Callable[[], T], timeout: float, what: str, interval: float = 0.1) -> T:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = condition()
            if value:
                return value
        except (OSError, ValueError) as exc:  # endpoint not up yet
            last_error = exc
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"timed out after {timeout:.0f} s waiting for {what} (last error: {last_error!r})"
            )
        time.sleep(interval)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- scraping -----------------------------------------------------------------------------------
Labels = frozenset[tuple[str, str]]


@dataclass(frozen=True)
class Scrape:
    """One parsed /metrics response: sample name -> {labels: value}."""

    samples: dict[str, dict[Labels, float]]

    def get(self, name: str, **labels: str) -> float | None:
        """The sample with exactly these labels; for per-partition counters, their sum over the
        partitions when ``partition`` is not given (None when there is no such sample)."""
        exact = self.samples.get(name, {}).get(frozenset(labels.items()))
        if exact is not None or "partition" in labels:
            return exact
        if name.endswith("_timestamp_seconds"):  # the newest over the partitions
            found = [
                v
                for lbl, v in self.samples.get(name, {}).items()
                if {k: x for k, x in lbl if k != "partition"} == labels
            ]
            return max(found) if found else None
        summed = self.by(name, list(labels), **labels)
        return summed.get(tuple(labels.values())) if summed else None

    def by(self, name: str, keys: Sequence[str], **fixed: str) -> dict[tuple[str, ...], float]:
        """``{(label values in ``keys`` order): value}`` for the samples matching ``fixed``,
        summed over the labels not in ``keys`` (e.g. the ``partition`` of a counter)."""
        out: dict[tuple[str, ...], float] = {}
        for labels, value in self.samples.get(name, {}).items():
            d = dict(labels)
            if all(d.get(k) == v for k, v in fixed.items()) and all(k in d for k in keys):
                key = tuple(d[k] for k in keys)
                out[key] = out.get(key, 0.0) + value
        return out


def parse_metrics(text: str) -> Scrape:
    samples: dict[str, dict[Labels, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, {})[frozenset(s.labels.items())] = s.value
    return Scrape(samples)


def scrape(port: int, timeout: float = 5.0) -> Scrape:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as resp:
        return parse_metrics(resp.read().decode())


def ready(port: int) -> bool:
    """/readyz answers 200: partitions assigned and state loaded (503 raises HTTPError)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as resp:
        return bool(resp.status == 200)


def consumed(s: Scrape) -> tuple[int, int]:
    p = s.get("stream_fair_events_consumed_total", topic="predictions")
    o = s.get("stream_fair_events_consumed_total", topic="outcomes")
    return int(p or 0), int(o or 0)


def wait_consumed(port: int, counts: tuple[int, int], timeout: float) -> Scrape:
    """The first scrape whose (predictions, outcomes) consumed counters equal ``counts``."""

    def done() -> Scrape | None:
        s = scrape(port)
        seen = consumed(s)
        assert seen[0] <= counts[0] and seen[1] <= counts[1], f"consumed {seen} > {counts}"
        return s if seen == counts else None

    return wait_for(done, timeout, f"consumed counts {counts}")


def accounting_holds(s: Scrape) -> dict[str, tuple[float, float, float]]:
    """Per topic: (consumed, sum of fates, pending)."""
    out = {}
    for topic in ("predictions", "outcomes"):
        fates = sum(s.by("stream_fair_event_fates_total", ["fate"], topic=topic).values())
        out[topic] = (
            s.get("stream_fair_events_consumed_total", topic=topic) or 0.0,
            fates,
            s.get("stream_fair_pending_events", topic=topic) or 0.0,
        )
    return out


def assert_accounting(s: Scrape) -> None:
    for topic, (n, fates, pending) in accounting_holds(s).items():
        assert n == fates + pending, f"{topic}: consumed {n} != fates {fates} + pending {pending}"


# -- the core on a local store ----------------------------------------------------------------------
class LocalTracker(Tracker):
    """The tracker on a temporary local store; ``snapshot()`` checkpoints and publishes first,
    as the run loop does (counters are exported as of the last checkpoint)."""

    def __init__(self, cfg: Config, path: str | None = None, feedback: Any = None) -> None:
        self.path = path or tempfile.mkdtemp()
        super().__init__(cfg, RocksBackend(self.path), feedback)
        self.model_counts = ModelCounts(cfg.window_resolution, tuple(cfg.windows))
        self.labels = tuple(format_duration(w) for w in cfg.windows)

    def snapshot(self, windows: object = None) -> Snapshot:
        cp = self.checkpoint()
        self.commit(cp)
        for sc in cp.shards:
            if sc.increment is not None:
                self.model_counts.fold_increment(sc.increment)
        return super().snapshot(self.model_counts.window_quads(self.labels))


# -- independent recount ------------------------------------------------------------------------
def rejection_reason(kind: str, payload: dict[str, Any] | bytes) -> str | None:
    """Why the documented default schema refuses an event (decode order: json, id, ts, value)."""
    if isinstance(payload, bytes):
        try:
            payload = json.loads(payload)
        except ValueError:
            return "invalid_json"
    if not isinstance(payload, dict):
        return "not_an_object"
    if payload.get("id") is None:
        return "missing_id"
    if not isinstance(payload.get("ts"), int | float):
        return "invalid_timestamp"
    if kind == "prediction":
        return None if payload.get("prediction") in (0, 1) else "invalid_prediction"
    return None if payload.get("label") in (0, 1) else "invalid_label"


@dataclass
class Expected:
    """What the detector must report after consuming every event (no expiry)."""

    consumed: Counter[str] = field(default_factory=Counter)
    fates: dict[str, Counter[str]] = field(
        default_factory=lambda: {"predictions": Counter(), "outcomes": Counter()}
    )
    pending: Counter[str] = field(default_factory=Counter)
    rejected: dict[str, Counter[str]] = field(
        default_factory=lambda: {"predictions": Counter(), "outcomes": Counter()}
    )
    # (model, feature, group, actual, predicted) -> n
    confusion: Counter[tuple[str, str, str, str, str]] = field(default_factory=Counter)
    # (model, feature, group, predicted) -> n
    predictions: Counter[tuple[str, str, str, str]] = field(default_factory=Counter)
    joined: list[dict[str, Any]] = field(default_factory=list)  # one row per joined pair
    malformed: list[tuple[str, bytes, str]] = field(default_factory=list)  # (topic, bytes, reason)


def group_of(attributes: dict[str, Any], feature: Sequence[str]) -> str:
    return "&".join(str(attributes.get(f, "__missing__")) for f in feature)


def recount(
    events: Iterable[tuple[str, dict[str, Any] | bytes]],
    features: Sequence[str] = LENDING_FEATURES,
    intersections: Sequence[Sequence[str]] = LENDING_INTERSECTIONS,
) -> Expected:
    """Expected fates and counts when nothing expires (TTL longer than the stream).

    Per id: the first accepted prediction joins if any accepted outcome exists for the id, else it
    is pending; every further copy is a duplicate. The same holds for outcomes.
    """
    import orjson  # the bytes produce_events sends for a dict payload

    keys = [(f,) for f in features] + [tuple(c) for c in intersections]
    exp = Expected()
    first_pred: dict[str, dict[str, Any]] = {}
    first_out: dict[str, dict[str, Any]] = {}
    copies: dict[str, Counter[str]] = {"predictions": Counter(), "outcomes": Counter()}
    for kind, payload in events:
        topic = "predictions" if kind == "prediction" else "outcomes"
        exp.consumed[topic] += 1
        reason = rejection_reason(kind, payload)
        if reason is not None:
            exp.fates[topic]["rejected"] += 1
            exp.rejected[topic][reason] += 1
            raw = payload if isinstance(payload, bytes) else orjson.dumps(payload)
            exp.malformed.append((topic, raw, reason))
            continue
        assert isinstance(payload, dict)
        ident = str(payload["id"])
        copies[topic][ident] += 1
        (first_pred if topic == "predictions" else first_out).setdefault(ident, payload)
    for topic, firsts, partners in (
        ("predictions", first_pred, first_out),
        ("outcomes", first_out, first_pred),
    ):
        for ident in firsts:
            if ident in partners:
                exp.fates[topic]["joined"] += 1
            else:
                exp.pending[topic] += 1
            exp.fates[topic]["duplicate"] += copies[topic][ident] - 1
    for ident, p in first_pred.items():
        model, attrs, predicted = p["model"], p["attributes"], int(p["prediction"])
        for key in keys:
            exp.predictions[model, "&".join(key), group_of(attrs, key), str(predicted)] += 1
        o = first_out.get(ident)
        if o is None:
            continue
        label = int(o["label"])
        exp.joined.append({"model": model, **attrs, "y_true": label, "y_pred": predicted})
        for key in keys:
            cell = (model, "&".join(key), group_of(attrs, key))
            exp.confusion[(*cell, str(label), str(predicted))] += 1
    return exp


def full_confusion(exp: Expected) -> dict[tuple[str, str, str, str, str], int]:
    """Every (model, feature, group) seen, with all four (actual, predicted) cells, zeros too."""
    cells = {k[:3] for k in exp.confusion}
    return {
        (*c, str(a), str(p)): exp.confusion.get((*c, str(a), str(p)), 0)
        for c in cells
        for a, p in ACTUAL_PREDICTED
    }


def full_predictions(exp: Expected) -> dict[tuple[str, str, str, str], int]:
    cells = {k[:3] for k in exp.predictions}
    return {(*c, p): exp.predictions.get((*c, p), 0) for c in cells for p in ("0", "1")}


# -- configs and the CLI ------------------------------------------------------------------------
def detector_config(
    bootstrap: str,
    topics: Any,
    group_id: str,
    state_path: Path,
    **sections: dict[str, Any],
) -> dict[str, Any]:
    """A config dict for the lending stream on the given topics; ``sections`` override keys."""
    cfg: dict[str, Any] = {
        "kafka": {
            "bootstrap_servers": bootstrap,
            "group_id": group_id,
            "transport": transport(),
            **FAST_KAFKA,
        },
        "topics": {
            "predictions": topics.predictions,
            "outcomes": topics.outcomes,
            "dead_letters": topics.dead_letters,
        },
        "fairness": {
            "features": list(LENDING_FEATURES),
            "intersections": [list(c) for c in LENDING_INTERSECTIONS],
            "min_samples": 30,
        },
        "join": {"ttl": "3650d"},
        "state": {"path": str(state_path)},
        "exporter": {"host": "127.0.0.1", "port": 0},
        "log_level": "WARNING",
    }
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values} if isinstance(values, dict) else values
    return cfg


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def cli_env(**extra: str) -> dict[str, str]:
    """The current environment minus STREAM_FAIR_* overrides (they would leak into configs)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAM_FAIR_")}
    env.update(extra)
    return env


def run_cli(
    *args: str, timeout: float = 60.0, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stream_fair", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or cli_env(),
    )


def start_cli(*args: str, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "stream_fair", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env or cli_env(),
        )


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """Kill a process we started (SIGKILL) and reap it; no-op when it already exited."""
    if proc.poll() is None:
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def paced(
    events: Iterable[T], per_second: float, chunk: int = 200, gate: threading.Event | None = None
) -> Iterable[T]:
    """Yield events at about ``per_second``, so consumption can be observed mid-stream.

    While ``gate`` is cleared the stream pauses (at most 120 s), e.g. while a consumer restarts.
    """
    start, base = time.monotonic(), 0
    for i, e in enumerate(events, 1):
        yield e
        if i % chunk:
            continue
        if gate is not None and not gate.is_set():
            gate.wait(120)
            start, base = time.monotonic(), i
        ahead = (i - base) / per_second - (time.monotonic() - start)
        if ahead > 0:
            time.sleep(ahead)
