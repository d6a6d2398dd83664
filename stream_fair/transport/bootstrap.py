"""Before the run loop: reach the cluster, read a sample (the CLI's ``run`` and ``check-config --probe``)."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

from stream_fair.config import Config, KafkaConfig
from stream_fair.errors import BrokerError
from stream_fair.transport.base import Record


def _host_port(server: str) -> tuple[str, int]:
    host, _, port = server.strip().rpartition(":")
    if not host or not port.isdigit():
        raise BrokerError(
            f"kafka error: kafka.bootstrap_servers entry {server.strip()!r} is not host:port, e.g. kafka:9092"
        )
    return host.strip("[]"), int(port)


def wait_for_broker(
    k: KafkaConfig, progress: Callable[[str], None], *, attempt_timeout_s: float = 3.0
) -> None:
    """Return once a bootstrap server answers Kafka requests; report each failed attempt.

    Retries for ``kafka.request_timeout_ms`` in all, calling ``progress`` with one line per
    attempt (why it failed, time left), then raises :class:`BrokerError` with one line. A host
    name that does not resolve fails at once: retrying cannot fix a typo. The Kafka requests go
    through the configured transport, with its TLS and SASL settings.
    """
    from stream_fair.transport import get

    transport = get(k)  # a missing client library is a config error, before any waiting
    servers = [_host_port(s) for s in k.bootstrap_servers.split(",") if s.strip()]
    unresolved = []
    for host, port in servers:
        try:
            socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError):
            unresolved.append(host)
    if len(unresolved) == len(servers):
        raise BrokerError(
            f"kafka error: cannot resolve host {unresolved[0]!r} of kafka.bootstrap_servers="
            f"{k.bootstrap_servers!r}: check the address (DNS name, or host:port)"
        )
    budget = k.request_timeout_ms / 1000
    start = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        left = budget - (time.monotonic() - start)
        timeout_s = max(0.5, min(attempt_timeout_s, left))
        why = _try_tcp(servers, timeout_s)
        if why is None:  # TCP works: now the Kafka protocol (TLS, SASL and advertised listeners fail here)
            why = transport.probe(k, timeout_s)
            if why is None:
                return
        elapsed = time.monotonic() - start
        if elapsed >= budget:
            raise BrokerError(
                f"kafka error: cannot connect to kafka.bootstrap_servers={k.bootstrap_servers!r} "
                f"({why}) after {elapsed:.0f} s: check the address, security_protocol and credentials"
            )
        progress(
            f"waiting for Kafka at {k.bootstrap_servers}: {why} "
            f"(attempt {attempt}, {elapsed:.0f} s of {budget:.0f} s)"
        )
        time.sleep(min(float(attempt), 5.0, max(0.0, budget - elapsed)))  # back off: fewer lines


def _try_tcp(servers: list[tuple[str, int]], timeout_s: float) -> str | None:
    """None when one of the servers accepts a TCP connection, else why none did (short)."""
    reasons = []
    for host, port in servers:
        where = f"{host}:{port}: " if len(servers) > 1 else ""
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                return None
        except (socket.gaierror, UnicodeError):
            reasons.append(f"{where}unknown host")
        except TimeoutError:
            reasons.append(f"{where}no answer in {timeout_s:.0f} s")
        except OSError as exc:
            reasons.append(f"{where}{exc.strerror or exc}".lower())
    return "; ".join(reasons)


def sample_records(config: Config, topic: str, limit: int, timeout_s: float = 10.0) -> list[Record]:
    """Up to ``limit`` of the newest records of ``topic``, spread over its partitions.

    Reads without a consumer group (manual assignment, nothing committed), so it never moves the
    detector's offsets. Raises :class:`BrokerError` when the topic does not exist.
    """
    from stream_fair.transport import get

    records = get(config.kafka).sample(config, topic, limit, timeout_s)
    if records is None:
        raise BrokerError(f"kafka error: topic {topic!r} does not exist: create it or fix topics.*")
    return records
