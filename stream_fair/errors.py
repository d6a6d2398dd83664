"""One root exception with one subclass per area, so callers can catch exactly what they handle."""

from __future__ import annotations


class StreamFairError(Exception):
    """Root of every error stream-fair raises on purpose."""


class ConfigError(StreamFairError):
    """Invalid configuration. The message is one line naming the key and the fix."""


class StateError(StreamFairError):
    """The state store cannot be read or written."""


class BrokerError(StreamFairError):
    """Kafka is unreachable or a topic is missing or incompatible."""


class WhatIfError(StreamFairError):
    """A threshold what-if cannot be answered (unknown criterion or group, too few labelled pairs)."""


class TooFewSamplesError(WhatIfError):
    """A what-if needs more labelled pairs than a group has (HTTP 422, not a bad request)."""
