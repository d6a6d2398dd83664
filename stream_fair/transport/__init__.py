"""Kafka I/O behind a small protocol, with two clients to choose from (``kafka.transport``).

* ``kafka-python`` (default): pure Python; reads 2.5-3x faster with the ``crc32c`` package, a
  dependency.
* ``confluent``: confluent-kafka (librdkafka), ``pip install 'stream-fair[confluent]'``.

The run loop and the CLI use only the names below; :mod:`.base` states the semantics both clients
keep, and the integration tests run on each.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from stream_fair.errors import ConfigError
from stream_fair.transport.base import (
    BrokerDown,
    ChangelogReader,
    ChangelogWriter,
    ClientError,
    GroupConsumer,
    Message,
    Reader,
    Record,
    TopicPartition,
    Transport,
)
from stream_fair.transport.bootstrap import sample_records, wait_for_broker
from stream_fair.transport.changelog import (
    CHANGELOG_CONFIGS,
    INCREMENTS_CONFIGS,
    changelog_topic,
    ensure_changelog,
    ensure_internal_topics,
    increments_topic,
    leader_topic,
)
from stream_fair.transport.dead_letters import TRUNCATED, DeadLetters, Letter, build_letter
from stream_fair.transport.inputs import InputReader
from stream_fair.transport.shards import (
    ERR_REPARTITIONED,
    ShardListener,
    check_copartitioned,
    commit_offsets,
    lag,
    resume_at,
)

if TYPE_CHECKING:
    from stream_fair.config import Config, KafkaConfig

TRANSPORTS = ("kafka-python", "confluent")
ERR_CONFLUENT_MISSING = (
    "config error: kafka.transport: confluent needs the confluent-kafka package: "
    "pip install 'stream-fair[confluent]', or set kafka.transport: kafka-python"
)

BROKER_DOWN: tuple[type[Exception], ...] = (BrokerDown,)
"""What the group consumer's ``poll`` raises while every broker refuses connections (an outage, a
restart): the run loop keeps trying, as it does during a hang, instead of dying."""

_loaded: dict[str, Transport] = {}


def require(k: KafkaConfig) -> None:
    """Raise the one-line :class:`ConfigError` when ``kafka.transport`` names a missing client."""
    if k.transport == "confluent":
        try:
            import confluent_kafka  # noqa: F401
        except ImportError:
            raise ConfigError(ERR_CONFLUENT_MISSING) from None


def get(k: KafkaConfig) -> Transport:
    """The transport ``kafka.transport`` names (its client library is imported on first use)."""
    name = k.transport
    transport = _loaded.get(name)
    if transport is None:
        require(k)
        if name == "confluent":
            from stream_fair.transport.confluent import ConfluentTransport

            transport = ConfluentTransport()
        else:
            from stream_fair.transport.kafka_python import KafkaPythonTransport

            transport = KafkaPythonTransport()
        _loaded[name] = transport
    return transport


def make_consumer(config: Config) -> GroupConsumer:
    """The group consumer of the run loop (joins the group at ``subscribe``)."""
    return get(config.kafka).consumer(config)


def changelog_writer(config: Config, topic: str | None = None, ordered: bool = False) -> ChangelogWriter:
    """A writer to the changelog (or another internal topic); ``ordered``: one request in flight
    at a time, so a retried batch never lands after a later one (the increments topic)."""
    return get(config.kafka).changelog_writer(config, topic or changelog_topic(config), ordered)


def changelog_reader(config: Config, topic: str | None = None) -> ChangelogReader:
    return get(config.kafka).changelog_reader(config, topic or changelog_topic(config))


def reader(config: Config, reset: str = "earliest", max_records: int = 500) -> Reader:
    """A consumer without a group (manual assignment), e.g. the leader's increments reader."""
    return get(config.kafka).reader(config, reset, max_records)


__all__ = [
    "BROKER_DOWN",
    "CHANGELOG_CONFIGS",
    "ERR_CONFLUENT_MISSING",
    "ERR_REPARTITIONED",
    "INCREMENTS_CONFIGS",
    "BrokerDown",
    "InputReader",
    "Reader",
    "ensure_internal_topics",
    "increments_topic",
    "leader_topic",
    "reader",
    "TRANSPORTS",
    "TRUNCATED",
    "ChangelogReader",
    "ChangelogWriter",
    "ClientError",
    "DeadLetters",
    "GroupConsumer",
    "Letter",
    "Message",
    "Record",
    "ShardListener",
    "TopicPartition",
    "Transport",
    "build_letter",
    "changelog_reader",
    "changelog_topic",
    "changelog_writer",
    "check_copartitioned",
    "commit_offsets",
    "ensure_changelog",
    "get",
    "lag",
    "make_consumer",
    "require",
    "resume_at",
    "sample_records",
    "wait_for_broker",
]
