"""The changelog topic: its name, its configs, and creating or checking it at start-up."""

from __future__ import annotations

from stream_fair.config import CHANGELOG_SUFFIX, INCREMENTS_SUFFIX, LEADER_SUFFIX, Config
from stream_fair.errors import BrokerError
from stream_fair.transport.base import ClientError, GroupConsumer

CHANGELOG_CONFIGS = {
    "cleanup.policy": "compact",
    # an ignored (uncommitted) tail is rewritten by the next owner's claim within seconds;
    # compaction must not hide the committed value before that (docs/state.md)
    "min.compaction.lag.ms": str(3_600_000),
    "delete.retention.ms": str(7 * 86_400_000),
    "max.message.bytes": str(8 << 20),
}


def changelog_topic(config: Config) -> str:
    return config.state.changelog_topic or config.kafka.group_id + CHANGELOG_SUFFIX


def ensure_changelog(consumer: GroupConsumer, config: Config, partitions: int) -> None:
    """Create the changelog topic (compacted, co-partitioned with the inputs) or check it."""
    from stream_fair.transport import get

    name = changelog_topic(config)
    try:
        existing = consumer.partitions_for_topic(name)
    except ClientError:
        existing = None
    if existing:
        if len(existing) != partitions:
            raise BrokerError(
                f"kafka error: the changelog topic {name!r} has {len(existing)} partitions but the input "
                f"topics have {partitions}: recreate it with {partitions} partitions (its state is lost: "
                "predictions still pending are then recounted from the input topics) or set "
                "state.changelog_topic to a new name"
            )
        return
    why = get(config.kafka).create_topic(
        config.kafka, name, partitions, config.state.changelog_replication, CHANGELOG_CONFIGS
    )
    if why is not None:
        raise BrokerError(
            f"kafka error: cannot create the changelog topic {name!r} ({why}): create it "
            f"yourself (compacted, {partitions} partitions) or grant the CreateTopics permission"
        )


def increments_topic(config: Config) -> str:
    """Partition owners publish each committed checkpoint's increment here; the leader folds them."""
    return config.kafka.group_id + INCREMENTS_SUFFIX


def leader_topic(config: Config) -> str:
    """One partition: its owner (by the group's own assignment) is the leader, and the topic is the
    changelog of the leader's model-wide state."""
    return config.kafka.group_id + LEADER_SUFFIX


INCREMENTS_CONFIGS = {
    "cleanup.policy": "delete",
    "retention.ms": str(7 * 86_400_000),
    "max.message.bytes": str(8 << 20),
}


def ensure_internal_topics(consumer: GroupConsumer, config: Config) -> None:
    """Create the increments topic and the leader topic (one partition each) when missing."""
    from stream_fair.transport import get

    wanted = {increments_topic(config): INCREMENTS_CONFIGS, leader_topic(config): CHANGELOG_CONFIGS}
    missing = {}
    for name, configs in wanted.items():
        try:
            parts = consumer.partitions_for_topic(name)
        except ClientError:
            parts = None
        if parts and len(parts) != 1:
            raise BrokerError(
                f"kafka error: the internal topic {name!r} has {len(parts)} partitions, it needs 1: "
                "recreate it with one partition"
            )
        if not parts:
            missing[name] = configs
    for name, configs in missing.items():
        why = get(config.kafka).create_topic(
            config.kafka, name, 1, config.state.changelog_replication, configs
        )
        if why is not None:
            raise BrokerError(
                f"kafka error: cannot create the internal topics {sorted(missing)} ({why}): "
                "create them yourself (one partition each) or grant the CreateTopics permission"
            )
