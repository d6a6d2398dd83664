"""Configuration: one YAML file plus ``STREAM_FAIR_<SECTION>__<KEY>`` environment overrides.

Validated once at start-up. Unknown keys are errors. :func:`load` raises :class:`ConfigError`
whose message is one line naming the key and the fix; the CLI prints it and exits with status 2.

>>> cfg = Config.model_validate({"fairness": {"features": ["sex", {"name": "race", "reference": "White"}],
...                                           "intersections": [["race", "sex"]]}})
>>> [f.name for f in cfg.fairness.features], cfg.fairness.features[0].path
(['sex', 'race'], 'attributes.sex')
>>> cfg.join.ttl
604800.0
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from stream_fair.errors import ConfigError

ENV_PREFIX = "STREAM_FAIR_"
ENV_DELIMITER = "__"

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0, None: 1.0}

ERR_DURATION = "expected a duration such as 90s, 15m, 1h, 7d or a number of seconds"
ERR_TIMESTAMP = (
    "expected an ISO 8601 date or time such as 2020-01-01 or 2020-01-01T00:00:00Z, or Unix seconds"
)


def parse_duration(value: Any) -> float:
    """Seconds from ``"90s"``, ``"15m"``, ``"1h"``, ``"7d"``, ``"2w"`` or a plain number.

    >>> parse_duration("1h"), parse_duration(30), parse_duration("1.5d")
    (3600.0, 30.0, 129600.0)
    """
    if isinstance(value, bool):
        raise ValueError(ERR_DURATION)
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ValueError(ERR_DURATION)
        seconds = float(match.group(1)) * _UNIT[match.group(2)]
    if seconds <= 0:
        raise ValueError("a duration must be positive")
    return seconds


_BYTES = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]i?[bB]?|[bB])?\s*$")
_BYTE_UNIT = {"": 1, "b": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4}
ERR_BYTES = "expected a size such as 64MB, 1GiB or a number of bytes"


def parse_bytes(value: Any) -> int:
    """Bytes from ``"64MB"``, ``"64MiB"``, ``"1GB"`` or a plain number.

    >>> parse_bytes("64MiB"), parse_bytes("1GB"), parse_bytes(4096)
    (67108864, 1000000000, 4096)
    """
    if isinstance(value, bool):
        raise ValueError(ERR_BYTES)
    if isinstance(value, int | float):
        n = float(value)
    else:
        match = _BYTES.match(str(value))
        if not match:
            raise ValueError(ERR_BYTES)
        unit = (match.group(2) or "").lower()
        base = 1024 if "i" in unit else 1000
        letter = unit[:1] if unit not in ("b", "") else ""
        n = float(match.group(1)) * (base ** "kmgt".index(letter) * base if letter else 1)
    if n <= 0:
        raise ValueError("a size must be positive")
    return int(n)


def format_duration(seconds: float) -> str:
    """The shortest exact label for a window: ``3600 -> "1h"``.

    >>> format_duration(3600), format_duration(86400), format_duration(90)
    ('1h', '1d', '90s')
    """
    for unit in ("w", "d", "h", "m", "s"):
        size = _UNIT[unit]
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KafkaConfig(_Section):
    """Connection to the cluster. Passwords are ``SecretStr``: masked whenever printed."""

    transport: Literal["kafka-python", "confluent"] = "kafka-python"
    bootstrap_servers: str = "localhost:9092"
    group_id: str = "stream-fair"
    client_id: str = "stream-fair"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    sasl_username_file: Path | None = None
    sasl_password_file: Path | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_password: SecretStr | None = None
    ssl_password_file: Path | None = None
    ssl_check_hostname: bool = True
    session_timeout_ms: int = Field(10000, gt=0)
    heartbeat_interval_ms: int = Field(3000, gt=0)
    max_poll_interval_ms: int = Field(300000, gt=0)
    request_timeout_ms: int = Field(30000, gt=0)
    max_poll_records: int = Field(2000, gt=0)
    fetch_max_bytes: int = Field(52428800, gt=0)
    # how soon a deleted input topic or a changed partition count is seen (then the run loop stops)
    metadata_max_age_ms: int = Field(60000, gt=0)
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    unavailable_after: float = 30.0

    _unavailable = field_validator("unavailable_after", mode="before")(parse_duration)

    @model_validator(mode="before")
    @classmethod
    def _secrets_from_files(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = dict(data)
            for key in SECRET_FILE_KEYS:
                path = data.get(f"{key}_file")
                if path is not None:
                    if data.get(key) is not None:
                        raise ValueError(ERR_SECRET_TWICE.format(key=key))
                    data[key] = read_secret_file(f"kafka.{key}_file", path)
        return data

    @model_validator(mode="after")
    def _sasl_complete(self) -> KafkaConfig:
        if self.security_protocol.startswith("SASL") and self.sasl_mechanism is None:
            raise ValueError("security_protocol SASL_* needs kafka.sasl_mechanism (e.g. SCRAM-SHA-512)")
        if self.sasl_mechanism in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512") and (
            self.sasl_username is None or self.sasl_password is None
        ):
            raise ValueError(
                "SASL PLAIN/SCRAM needs kafka.sasl_username and kafka.sasl_password "
                "(set the password through STREAM_FAIR_KAFKA__SASL_PASSWORD)"
            )
        if self.heartbeat_interval_ms >= self.session_timeout_ms:
            raise ValueError("kafka.heartbeat_interval_ms must be below kafka.session_timeout_ms")
        return self


SECRET_FILE_KEYS = ("sasl_username", "sasl_password", "ssl_password")
ERR_SECRET_TWICE = "set kafka.{key} or kafka.{key}_file, not both"
ERR_SECRET_FILE = "{key}: cannot read {path!r} ({reason}): mount the secret there or fix the path"


def read_secret_file(key: str, path: Any) -> str:
    """A secret file's content, verbatim but for one trailing newline (as ``echo`` writes).

    Kubernetes mounts each key of a Secret as a file; its bytes are the secret, never YAML.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ValueError(ERR_SECRET_FILE.format(key=key, path=str(path), reason=reason)) from None
    return text[:-2] if text.endswith("\r\n") else text.removesuffix("\n")


_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")
# stream-fair's own topics are named after kafka.group_id (stream_fair.transport.changelog)
CHANGELOG_SUFFIX = "-stream-fair-changelog"
INCREMENTS_SUFFIX = "-stream-fair-increments"
LEADER_SUFFIX = "-stream-fair-leader"


def topic_problem(name: str) -> str | None:
    """Why ``name`` is no legal Kafka topic name (the broker's rule), or None.

    >>> print(topic_problem("bad topic!"))  # doctest: +NORMALIZE_WHITESPACE
    'bad topic!' is not a legal Kafka topic name: use 1-249 of a-z A-Z 0-9 . _ - (not '.' or '..'),
    e.g. 'bad-topic'
    >>> topic_problem("predictions.v2") is None
    True
    """
    if _TOPIC.fullmatch(name) and name not in (".", ".."):
        return None
    if len(name) > 249:
        return f"a topic name of {len(name)} characters ({name[:20]!r}...) is too long: Kafka allows 1-249"
    legal = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")[:249]
    example = f", e.g. {legal!r}" if legal.strip(".") else ""
    return (
        f"{name!r} is not a legal Kafka topic name: use 1-249 of a-z A-Z 0-9 . _ - (not '.' or '..')"
        + example
    )


def _legal_topic(name: str | None) -> str | None:
    problem = None if name is None else topic_problem(name)
    if problem is not None:
        raise ValueError(problem)
    return name


class TopicsConfig(_Section):
    predictions: str = "predictions"
    outcomes: str = "outcomes"
    dead_letters: str | None = "stream-fair-dead-letters"
    dead_letter_max_bytes: int = Field(1_000_000, ge=10_000)

    _names = field_validator("predictions", "outcomes", "dead_letters", mode="after")(_legal_topic)

    @model_validator(mode="after")
    def _distinct(self) -> TopicsConfig:
        if self.predictions == self.outcomes:
            raise ValueError(
                "topics.outcomes is the same topic as topics.predictions: stream-fair reads them from two "
                "co-partitioned topics (every record of one topic would be read as a prediction)"
            )
        if self.dead_letters in (self.predictions, self.outcomes):
            raise ValueError(
                f"topics.dead_letters is the input topic {self.dead_letters!r}: a rejected record would be "
                "read and rejected again without end; name another topic, or null to only count rejections"
            )
        return self


class PredictionFields(_Section):
    """Dotted paths into a prediction event."""

    id: str = "id"
    timestamp: str = "ts"
    model: str = "model"
    prediction: str | None = "prediction"
    score: str | None = "score"


class OutcomeFields(_Section):
    """Dotted paths into an outcome event."""

    id: str = "id"
    timestamp: str = "ts"
    label: str = "label"


class SchemaConfig(_Section):
    """How to read events. The default matches the documented default event schema."""

    prediction: PredictionFields = PredictionFields()
    outcome: OutcomeFields = OutcomeFields()
    prediction_values: dict[str, Literal[0, 1]] = Field(default_factory=dict)
    label_values: dict[str, Literal[0, 1]] = Field(default_factory=dict)
    score_threshold: float | None = Field(None, ge=0.0, le=1.0)
    default_model: str = "default"
    timestamp_unit: Literal["seconds", "milliseconds"] = "seconds"
    missing_timestamp: Literal["use_kafka_timestamp", "reject"] = "use_kafka_timestamp"

    @model_validator(mode="after")
    def _decision_source(self) -> SchemaConfig:
        if self.prediction.prediction is None and (
            self.prediction.score is None or self.score_threshold is None
        ):
            raise ValueError(
                "schema.prediction.prediction is unset: set it, or set schema.prediction.score "
                "and schema.score_threshold so the decision is score >= threshold"
            )
        return self


class FeatureConfig(_Section):
    name: str = Field(min_length=1)
    path: str | None = None
    reference: str | None = None
    cardinality_limit: int | None = Field(None, gt=0)

    @field_validator("name")
    @classmethod
    def _no_separator(cls, v: str) -> str:
        if "&" in v:
            raise ValueError("a feature name cannot contain '&' (it joins intersection names)")
        if v.startswith("__"):
            raise ValueError(f"feature name {v!r}: names starting with '__' are reserved; rename it")
        return v

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, data: Any) -> Any:
        return {"name": data} if isinstance(data, str) else data

    @model_validator(mode="after")
    def _default_path(self) -> FeatureConfig:
        if self.path is None:
            object.__setattr__(self, "path", f"attributes.{self.name}")
        return self


SearchRate = Literal["selection_rate", "true_positive_rate", "false_positive_rate"]


class SearchConfig(_Section):
    """The search of intersections nobody configured (:mod:`stream_fair.search`)."""

    enabled: bool = True
    max_order: int = Field(2, ge=2, le=3)
    alpha: float = Field(0.05, gt=0.0, lt=1.0)
    rates: list[SearchRate] = Field(default_factory=lambda: list(get_args(SearchRate)), min_length=1)
    max_tests: int = Field(5000, gt=0)
    top: int = Field(10, gt=0)


class EstimatesConfig(_Section):
    enabled: bool = True
    max_calibration_error: float = Field(0.05, gt=0.0, lt=1.0)


class FairnessConfig(_Section):
    features: list[FeatureConfig] = Field(default_factory=list)
    intersections: list[list[str]] = Field(default_factory=list)
    audit_only: list[FeatureConfig] = Field(default_factory=list)
    search: SearchConfig = Field(default_factory=SearchConfig)
    estimates: EstimatesConfig = Field(default_factory=EstimatesConfig)
    min_samples: int = Field(100, ge=1)
    credible_level: float = Field(0.95, gt=0.5, lt=1.0)
    prior: Literal["jeffreys", "uniform"] = "jeffreys"
    pooling: Literal["none", "empirical_bayes"] = "none"
    thresholds: dict[str, float] = Field(default_factory=dict)
    cardinality_limit: int = Field(50, gt=0)
    intersection_cardinality_limit: int = Field(100, gt=0)
    model_limit: int = Field(10, gt=0)

    @field_validator("thresholds", mode="after")
    @classmethod
    def _thresholds_known(cls, v: dict[str, float]) -> dict[str, float]:
        from stream_fair.fairness import FairnessSettings

        FairnessSettings(thresholds=v)  # raises ValueError naming the disparity and the range
        return v

    @model_validator(mode="after")
    def _intersections_known(self) -> FairnessConfig:
        names = [f.name for f in self.features]
        if len(set(names)) != len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(
                f"fairness.features lists {', '.join(map(repr, twice))} twice: list each feature once"
            )
        audit = [f.name for f in self.audit_only]
        if len(set(audit)) != len(audit) or set(audit) & set(names):
            raise ValueError(
                "fairness.audit_only lists an attribute twice or one of fairness.features: "
                "list each attribute once, in features (monitored) or in audit_only (searched only)"
            )
        seen: set[frozenset[str]] = set()
        for combo in self.intersections:
            if len(combo) < 2:
                raise ValueError("each fairness.intersections entry needs at least two features")
            if len(set(combo)) != len(combo) or frozenset(combo) in seen:
                raise ValueError(
                    f"fairness.intersections lists {'&'.join(combo)} twice or names a feature twice "
                    "(the order does not matter): keep one of each"
                )
            seen.add(frozenset(combo))
            unknown = [c for c in combo if c not in names]
            if unknown and unknown[0] in audit:
                raise ValueError(
                    f"fairness.intersections names {unknown[0]!r}, which is audit_only: move it to "
                    "fairness.features to monitor the intersection"
                )
            if unknown:
                raise ValueError(
                    f"fairness.intersections names {unknown[0]!r}, which is not in "
                    "fairness.features: add it there first"
                )
        return self

    @property
    def carried(self) -> list[FeatureConfig]:
        """Every attribute carried in a cell, in cell order: the features, then the audit_only ones."""
        return [*self.features, *self.audit_only]


class JoinConfig(_Section):
    ttl: float = 7 * 86400.0
    outcome_ttl: float | None = None
    dedupe_retention: float | None = None
    # per partition; 30 days at 100 predictions/s is 259.2 million (on disk, ~100 bytes each)
    max_pending: int = Field(300_000_000, gt=0)
    max_remembered: int | None = Field(None, gt=0)
    # a byte budget for the whole local store instead (e.g. "50GB"): the counts follow from it
    max_pending_bytes: int | None = Field(None, gt=0)

    _sizes = field_validator("max_pending_bytes", mode="before")(
        lambda v: None if v is None else parse_bytes(v)
    )

    _durations = field_validator("ttl", "outcome_ttl", "dedupe_retention", mode="before")(
        lambda v: None if v is None else parse_duration(v)
    )


class StateConfig(_Section):
    path: Path = Path("stream-fair-state")
    checkpoint_interval: float = 1.0
    checkpoint_events: int = Field(50_000, gt=0)
    checkpoint_when_caught_up: bool = True
    changelog: bool = True
    changelog_topic: str | None = None
    changelog_replication: int = Field(1, ge=1)
    cache_bytes: int = Field(64 << 20, gt=0)
    write_buffer_bytes: int = Field(16 << 20, gt=0)
    local_max_age: float = 12 * 3600.0

    _durations = field_validator("checkpoint_interval", "local_max_age", mode="before")(parse_duration)
    _sizes = field_validator("cache_bytes", "write_buffer_bytes", mode="before")(lambda v: parse_bytes(v))
    _topic = field_validator("changelog_topic", mode="after")(_legal_topic)


class ExporterConfig(_Section):
    host: str = "0.0.0.0"
    port: int = Field(9800, ge=0, le=65535)
    read_timeout: float = 10.0
    workers: int = Field(4, ge=1, le=64)
    max_connections: int = Field(512, ge=1)
    web_config_file: Path | None = None
    # build each snapshot's /metrics text in a child process, off the consumer's interpreter
    report_process: bool = True

    _durations = field_validator("read_timeout", mode="before")(parse_duration)


def parse_timestamp(value: Any) -> float:
    """Unix seconds from an ISO 8601 date/time (UTC unless zoned) or a number.

    >>> parse_timestamp("2020-01-01"), parse_timestamp(0)
    (1577836800.0, 0.0)
    """
    if isinstance(value, bool):
        raise ValueError(ERR_TIMESTAMP)
    if isinstance(value, int | float):
        return float(value)
    text = value.isoformat() if isinstance(value, datetime | date) else str(value).strip()
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(ERR_TIMESTAMP) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.timestamp()


class EventTimeConfig(_Section):
    """Which event times are believed (docs/configuration.md, ``event_time``)."""

    allowed_skew: float = 900.0
    min_timestamp: float = 0.0
    max_jump: float | None = None
    confirmations: int = Field(5, ge=1)

    _durations = field_validator("allowed_skew", "max_jump", mode="before")(
        lambda v: None if v is None else parse_duration(v)
    )
    _timestamp = field_validator("min_timestamp", mode="before")(parse_timestamp)

    @model_validator(mode="after")
    def _jump_above_skew(self) -> EventTimeConfig:
        if self.max_jump is not None and self.max_jump < self.allowed_skew:
            raise ValueError(
                "event_time.max_jump must be at least event_time.allowed_skew: raise it or unset it"
            )
        return self


class Config(_Section):
    kafka: KafkaConfig = KafkaConfig()
    topics: TopicsConfig = TopicsConfig()
    schema_: SchemaConfig = Field(SchemaConfig(), alias="schema")
    event_time: EventTimeConfig = EventTimeConfig()
    fairness: FairnessConfig = FairnessConfig()
    windows: list[float] = Field(default_factory=lambda: [3600.0, 86400.0])
    window_resolution: float = 300.0
    join: JoinConfig = JoinConfig()
    state: StateConfig = StateConfig()
    exporter: ExporterConfig = ExporterConfig()
    feedback: dict[str, Any] = Field(default_factory=dict)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    _windows = field_validator("windows", mode="before")(
        lambda v: [parse_duration(x) for x in v] if isinstance(v, list) else v
    )
    _resolution = field_validator("window_resolution", mode="before")(parse_duration)

    @field_validator("feedback", mode="after")
    @classmethod
    def _feedback_settings(cls, v: dict[str, Any]) -> dict[str, Any]:
        feedback_settings(v)  # raises ValueError naming the key
        return v

    @model_validator(mode="after")
    def _internal_topics_named(self) -> Config:
        """With the changelog on, ``kafka.group_id`` names topics: it must make legal names."""
        if not self.state.changelog:
            return self
        suffixes = [LEADER_SUFFIX, INCREMENTS_SUFFIX]
        if self.state.changelog_topic is None:
            suffixes.append(CHANGELOG_SUFFIX)
        for topic in (self.kafka.group_id + suffix for suffix in suffixes):
            if topic_problem(topic) is not None:
                longest = 249 - len(INCREMENTS_SUFFIX)
                raise ValueError(
                    f"kafka.group_id {self.kafka.group_id!r} names the topic {topic!r}, which is not a legal "
                    f"Kafka topic name: use a group id of 1-{longest} of a-z A-Z 0-9 . _ -"
                )
        return self

    @model_validator(mode="after")
    def _windows_fit(self) -> Config:
        for w in self.windows:
            if w % self.window_resolution:
                raise ValueError(
                    f"windows entry {format_duration(w)} is not a multiple of window_resolution "
                    f"{format_duration(self.window_resolution)}: choose a finer window_resolution"
                )
            if w < 2 * self.window_resolution:
                # a window holds its newest, partly filled step and the whole ones before it
                raise ValueError(
                    f"windows entry {format_duration(w)} is a single window_resolution step: it would hold "
                    "between none and all of one step (empty after every step boundary); set "
                    f"window_resolution to {format_duration(w / 2)} or less"
                )
        return self


def notes(config: Config) -> list[str]:
    """What a valid configuration leaves off, one line each: said at startup (``run``'s log,
    ``check-config``'s stderr) so a missing series is never a surprise.

    >>> print(*notes(Config.model_validate({"schema": {"prediction": {"score": None}}})))
    ... # doctest: +NORMALIZE_WHITESPACE
    schema.prediction.score is null: the label-free estimates, the calibration checks and the
    threshold what-ifs are off (they need each prediction's score); set it to the score's field
    to have them
    >>> notes(Config())
    []
    """
    out = []
    if config.schema_.prediction.score is None:
        off = "the label-free estimates, the" if config.fairness.estimates.enabled else "the"
        out.append(
            f"schema.prediction.score is null: {off} calibration checks and the threshold what-ifs "
            "are off (they need each prediction's score); set it to the score's field to have them"
        )
    budget, buffers = config.join.max_pending_bytes, 10 * config.state.write_buffer_bytes
    if budget is not None and budget < buffers:
        out.append(
            f"join.max_pending_bytes ({budget} bytes) is below the room RocksDB takes for its "
            f"memtables and level-0 files, about 10 x state.write_buffer_bytes ({buffers} bytes): "
            "most pending predictions will expire early; raise it or lower state.write_buffer_bytes"
        )
    return out


def feedback_settings(options: Mapping[str, Any]) -> Any:
    """The feedback monitor's settings from the ``feedback:`` section (keys as in docs/feedback.md)."""
    import dataclasses

    from stream_fair.feedback import FeedbackSettings

    known = {f.name: f for f in dataclasses.fields(FeedbackSettings)}
    values: dict[str, Any] = {}
    for key, value in options.items():
        if key not in known:
            raise ValueError(f"unknown key {key!r}: choose one of {', '.join(sorted(known))}")
        if key in ("period", "cohort_period", "alarm_slot", "alarm_horizon"):
            try:
                value = parse_duration(value)
            except ValueError as exc:
                raise ValueError(f"{key}: {exc}") from None
        elif key == "detector_params" and isinstance(value, dict):
            value = tuple(sorted(value.items()))
        elif isinstance(value, list):
            value = tuple(value)
        values[key] = _typed(key, value, known[key].default)
    try:
        settings = FeedbackSettings(**values)
    except (TypeError, ValueError) as exc:
        raise ValueError(str(exc)) from None
    ratio = settings.period / settings.alarm_slot
    if abs(ratio - round(ratio)) > 1e-9 * max(1.0, ratio) or round(ratio) < 1:
        # the model-wide loop test counts predictions by alarm slot: a period that is not a whole
        # number of slots alternates between periods holding whole slots and periods holding none
        raise ValueError(
            f"period {format_duration(settings.period)} is not a multiple of alarm_slot "
            f"{format_duration(settings.alarm_slot)}: set feedback.period to a multiple of it or "
            f"feedback.alarm_slot to a divisor of the period (e.g. alarm_slot: "
            f"{format_duration(_divisor_slot(settings.period, settings.alarm_slot))}; on existing "
            "state a change of either is a start-over: docs/state.md, 'Configuration changes')"
        )
    return settings


def _typed(key: str, value: Any, default: Any) -> Any:
    """``value`` checked against the type of the key's default (YAML gives ``"100"`` for a quoted
    number and ``"false"`` for a quoted boolean: both would be wrong later, silently or not).

    >>> _typed("min_samples", 100, 100), _typed("loop_alpha", 1, 0.01)
    (100, 1.0)
    >>> _typed("use_scores", "false", True)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: use_scores: expected true or false, got 'false' (YAML read a string: ...)
    """
    hint = (
        " (YAML read a string: write a plain number or true/false, e.g. 0.001 rather than 1e-3)"
        if isinstance(value, str)
        else ""
    )
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{key}: expected true or false, got {value!r}{hint}")
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key}: expected a whole number, e.g. {default}, got {value!r}{hint}")
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{key}: expected a number, e.g. {default:g}, got {value!r}{hint}")
        return float(value)
    elif isinstance(default, tuple) and key != "detector_params":
        if not isinstance(value, tuple) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in value
        ):
            raise ValueError(f"{key}: expected a list of numbers, e.g. {list(default)}, got {value!r}")
        return tuple(float(v) for v in value)
    elif isinstance(default, str) and not isinstance(value, str):
        raise ValueError(f"{key}: expected one of the names in docs/feedback.md, got {value!r}")
    return value


def fingerprint(config: Config) -> dict[str, Any]:
    """What the stored state depends on (as JSON values): changing any of it needs a new state
    directory, and with the changelog a new ``kafka.group_id`` (docs/state.md). The local store
    keeps it (a store written for another fingerprint is refused) and so does every partition's
    commit marker in the changelog (a restore from another configuration's changelog is refused).

    >>> fingerprint(Config.model_validate({"feedback": {"alarm_slot": "5m"}}))["feedback"]["alarm_slot"]
    300.0
    """
    fc = config.fairness
    return {
        "features": [f.name for f in fc.features],
        "intersections": [list(c) for c in fc.intersections],
        # only when set: stores written before audit_only existed stay valid
        **({"audit_only": [f.name for f in fc.audit_only]} if fc.audit_only else {}),
        "windows": list(config.windows),
        "window_resolution": config.window_resolution,
        "group_id": config.kafka.group_id,
        "topics": [config.topics.predictions, config.topics.outcomes],
        # the units the alarm and the loop test count in (slot, cohort and period indexes)
        "feedback": _feedback_units(feedback_settings(config.feedback)),
    }


#: Fingerprint keys recorded only since a later version: a stored fingerprint without one predates
#: it, so the key cannot be compared (:func:`fingerprint_difference`; the caller warns).
LATER_KEYS = ("feedback",)


def _feedback_units(settings: Any) -> dict[str, Any]:
    """The feedback settings whose units the stored slot, cohort and period indexes are in."""
    return {
        "period": float(settings.period),
        "alarm_slot": float(settings.alarm_slot),
        "cohort_period": float(settings.cohort_period),
        "score_bins": [*map(float, settings.score_range), int(settings.score_bins)],
    }


def fingerprint_difference(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """The keys in which a stored fingerprint differs from the current one (a key absent from
    both is equal; one of :data:`LATER_KEYS` absent from ``stored`` is unknown, not different).

    >>> fingerprint_difference({"windows": [3600.0], "group_id": "g"}, {"windows": [60.0], "group_id": "g"})
    ['windows']
    >>> fingerprint_difference({"group_id": "g"}, {"group_id": "g", "feedback": {"period": 60.0}})
    []
    """
    return [
        k
        for k in dict.fromkeys([*stored, *current])
        if stored.get(k) != current.get(k) and not (k in LATER_KEYS and k not in stored)
    ]


def fingerprint_unknown(stored: Mapping[str, Any]) -> list[str]:
    """The keys of :data:`LATER_KEYS` a stored fingerprint predates (for the caller's warning)."""
    return [k for k in LATER_KEYS if k not in stored]


def _divisor_slot(period: float, slot: float) -> float:
    """The largest whole-second divisor of ``period`` not above ``slot`` (a suggestion in an error).

    >>> _divisor_slot(300.0, 600.0), _divisor_slot(3600.0, 420.0)
    (300.0, 400.0)
    """
    whole = max(1, int(period))
    small = [k for k in range(1, math.isqrt(whole) + 1) if whole % k == 0]
    return min(period, float(max(d for d in small + [whole // k for k in small] if d <= max(1, slot))))


def _verbatim(path: list[str]) -> bool | None:
    """Whether the field at ``path`` takes an environment value verbatim (a string-typed field).

    True for secrets (always verbatim), None for other plain string fields (verbatim except
    ``null``/``~``), False for everything else (parsed as YAML: numbers, lists, durations).
    """
    model: Any = Config
    field = None
    for part in path:
        fields = getattr(model, "model_fields", None)
        if fields is None:
            return False
        field = next((f for name, f in fields.items() if part in (name, f.alias)), None)
        if field is None:
            return False
        model = field.annotation
    if field is None:
        return False
    args = set(get_args(field.annotation)) or {field.annotation}
    args.discard(type(None))
    if args == {SecretStr}:
        return True
    return None if args <= {str, Path} else False


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """``STREAM_FAIR_KAFKA__SASL_PASSWORD=x`` -> ``{"kafka": {"sasl_password": "x"}}``.

    Values of string fields are taken verbatim (a password ``p@ss #1`` or a group id
    ``2024-01-01`` stays exactly as given; ``null`` unsets an optional one, except for secrets);
    other values are parsed as YAML scalars/flow collections, so ``[1h, 1d]`` and ``true`` work.
    """
    tree: dict[str, Any] = {}
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX) or key.startswith(ENV_PREFIX + "TEST_"):
            continue
        path = key[len(ENV_PREFIX) :].lower().split(ENV_DELIMITER)
        if path == ["config"]:
            continue
        verbatim = _verbatim(path)
        value: Any
        if verbatim is True:
            value = raw
        elif verbatim is None:
            value = None if raw in ("null", "~") else raw
        else:
            try:
                value = yaml.safe_load(raw)
            except yaml.YAMLError:
                value = raw
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: conflicts with another STREAM_FAIR_ variable")
        node[path[-1]] = value
    return tree


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in override.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _env_keys(tree: Mapping[str, Any], prefix: str = "") -> set[str]:
    """The dotted keys an environment override tree sets (``kafka.sasl_password``, ...)."""
    out = set()
    for k, v in tree.items():
        dotted = f"{prefix}{k}"
        out |= _env_keys(v, dotted + ".") if isinstance(v, dict) else {dotted}
    return out


def _one_line(err: ValidationError, from_env: set[str] | None = None) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    loc = loc.replace("schema_", "schema")
    # a key set by a STREAM_FAIR_ variable is named as the variable too: it is in no file
    by_env = next((k for k in from_env or () if loc == k or loc.startswith(k + ".")), None)
    if by_env is not None:
        return _one_line(err).replace(
            "config error: ", f"config error: {env_name(by_env)} (environment): ", 1
        )
    kind, msg = first["type"], first["msg"]
    if kind == "extra_forbidden":
        return (
            f"config error: unknown key {loc!r}: remove it or check its spelling (see docs/configuration.md)"
        )
    if kind == "missing":
        return f"config error: {loc} is required: set it in the YAML file or {env_name(loc)}"
    if kind in ("model_type", "dict_type"):  # a section given as a scalar, a list or nothing
        got = "nothing" if first.get("input") is None else type(first["input"]).__name__
        return (
            f"config error: {loc or 'the top level'} must be a mapping of keys, got {got}: indent its "
            "keys under it, or remove the section for its defaults (see docs/configuration.md)"
        )
    msg = msg.removeprefix("Value error, ")
    where = f"{loc}: " if loc else ""
    return f"config error: {where}{msg} (see docs/configuration.md)"


def env_name(dotted: str) -> str:
    """The environment variable that overrides a dotted key.

    >>> env_name("kafka.sasl_password")
    'STREAM_FAIR_KAFKA__SASL_PASSWORD'
    """
    return ENV_PREFIX + dotted.upper().replace(".", ENV_DELIMITER)


def load(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read the YAML file (optional), apply environment overrides, validate.

    Raises
    ------
    ConfigError
        One line naming the key and the fix.
    """
    environ = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if p.is_dir():
            raise ConfigError(f"config error: --config {p} is a directory: pass the path to a YAML file")
        if not p.is_file():
            raise ConfigError(f"config error: --config {p}: no such file: pass the path to a YAML file")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"config error: {p}{where}: not valid YAML: fix the syntax") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"config error: {p}: byte {exc.start} is not UTF-8: save the file as UTF-8"
            ) from None
        except OSError as exc:
            raise ConfigError(
                f"config error: {p}: cannot read it ({exc.strerror}): check its permissions"
            ) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config error: {p}: the top level must be a mapping of sections")
        data = loaded or {}
    overrides = _env_overrides(environ)
    data = _merge(data, overrides)
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_one_line(err, _env_keys(overrides))) from None


def redacted(config: Config) -> dict[str, Any]:
    """The effective config as a dict, secrets masked (safe to log)."""
    return config.model_dump(mode="json", by_alias=True)
