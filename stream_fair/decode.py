"""Bytes to events through the configured field mapping, or a :class:`Rejection` with a reason.

Hand-written rather than a pydantic model per event: this runs once per Kafka record and pydantic
validation costs ~2.5 us against ~1 us for ``orjson.loads`` plus these lookups.

>>> from stream_fair.config import Config
>>> cfg = Config.model_validate({"fairness": {"features": ["sex"]}})
>>> d = Decoder(cfg)
>>> d.prediction(b'{"id": "r1", "ts": 10, "model": "m", "prediction": 1, "attributes": {"sex": "F"}}')
Prediction(id='r1', ts=10.0, model='m', predicted=1, score=None, cell=('F',))
>>> d.outcome(b'{"id": "r1", "ts": "1970-01-01T00:01:00Z", "label": "yes"}')
Rejection(reason='invalid_label', detail="label 'yes' is not 0/1 (add it to schema.label_values)")
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timezone
from operator import itemgetter
from typing import Any, NamedTuple

import orjson

from stream_fair import event_time
from stream_fair.config import Config
from stream_fair.event_time import EventTimeGuard
from stream_fair.events import Outcome, Prediction, Rejection
from stream_fair.groups import MISSING

INVALID_JSON = "invalid_json"
NOT_AN_OBJECT = "not_an_object"
MISSING_ID = "missing_id"
INVALID_ID = "invalid_id"
MISSING_TIMESTAMP = "missing_timestamp"
INVALID_TIMESTAMP = "invalid_timestamp"
INVALID_MODEL = "invalid_model"
MISSING_PREDICTION = "missing_prediction"
INVALID_PREDICTION = "invalid_prediction"
INVALID_SCORE = "invalid_score"
MISSING_LABEL = "missing_label"
INVALID_LABEL = "invalid_label"
INVALID_ATTRIBUTE = "invalid_attribute"
UNFORESEEN = "unforeseen"
"""A record that failed in a way no rule above names: rejected (never a crash of the consumer) and
logged at ERROR with the exception, as a bug to report."""
REASONS = (
    INVALID_JSON, NOT_AN_OBJECT, MISSING_ID, INVALID_ID, MISSING_TIMESTAMP, INVALID_TIMESTAMP,
    INVALID_MODEL, MISSING_PREDICTION, INVALID_PREDICTION, INVALID_SCORE, MISSING_LABEL,
    INVALID_LABEL, INVALID_ATTRIBUTE, UNFORESEEN, *event_time.REASONS,
)  # fmt: skip
_UNFORESEEN_LOGGED = 20  # ERROR lines per process for unforeseen records (each is also counted)

log = logging.getLogger(__name__)

_ABSENT = object()
_INF = float("inf")
# Scores outside [0, 1] are kept (counted in the edge bins and as out of range: logits show there),
# but not beyond this: a score of 1e308 is no model's output, and its bin arithmetic overflows.
MAX_SCORE = 1e9
_MAX_ID = 256
_MAX_VALUE = 128
# Control characters (Unicode category Cc: C0, DEL, C1) never reach a label value: a raw CR or NUL
# breaks the exposition format and log lines. Rejected rather than escaped, so a group is always
# exactly the value the producer sent.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_RESERVED = ("__other__", "__missing__")
_BINARY: dict[Any, int] = {0: 0, 1: 1, "0": 0, "1": 1}  # False == 0 and True == 1 as keys


_UTC = timezone.utc


def parse_iso(value: str) -> float:
    """Unix seconds of an ISO-8601 timestamp; one without a zone is UTC, never the host's time.

    Raises ValueError when ``value`` is not ISO 8601. The decoder's only ISO parser (fast and
    full path alike), so a record's time does not depend on which path read it.

    >>> parse_iso("2026-09-21T14:13:20.474Z"), parse_iso("2026-09-21T16:13:20.474+02:00")
    (1790000000.474, 1790000000.474)
    >>> parse_iso("2026-09-21T14:13:20.474")
    1790000000.474
    """
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=_UTC)
    return parsed.timestamp()


class _Reject(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        self.rejection = Rejection(reason, detail)

    @classmethod
    def of(cls, rejection: Rejection) -> _Reject:
        return cls(rejection.reason, rejection.detail)


def getter(path: str) -> Callable[[dict[str, Any]], Any]:
    """A fast lookup for a dotted path; returns a sentinel when any step is missing.

    >>> getter("a.b")({"a": {"b": 3}}), getter("a.b")({"a": 1}) is _ABSENT
    (3, True)
    """
    parts = tuple(path.split("."))
    if len(parts) == 1:
        key = parts[0]
        return lambda doc: doc.get(key, _ABSENT)

    def get(doc: dict[str, Any]) -> Any:
        node: Any = doc
        for part in parts:
            if not isinstance(node, dict):
                return _ABSENT
            node = node.get(part, _ABSENT)
            if node is _ABSENT:
                return _ABSENT
        return node

    return get


def _required(paths: list[str]) -> Callable[[dict[str, Any]], tuple[Any, ...]]:
    """Reads several fields at once for the fast path; raises KeyError when one is absent.

    >>> _required(["a", "b.c"])({"a": 1, "b": {"c": 2}})
    (1, 2)
    """
    if all("." not in p for p in paths):
        return itemgetter(*paths)  # type: ignore[return-value]
    getters = [getter(p) for p in paths]

    def read(doc: dict[str, Any]) -> tuple[Any, ...]:
        out = tuple(g(doc) for g in getters)
        if _ABSENT in out:
            raise KeyError("absent")
        return out

    return read


def _feature_reader(paths: list[str]) -> Callable[[dict[str, Any]], list[Any]]:
    """Reads all sensitive-feature values at once; paths sharing a parent read it once.

    >>> read = _feature_reader(["attributes.sex", "attributes.race", "age"])
    >>> [v for v in read({"attributes": {"sex": "F"}, "age": 30}) if v is not _ABSENT]
    ['F', 30]
    """
    parents: dict[str, list[tuple[int, str]]] = {}
    for i, path in enumerate(paths):
        parent, _, leaf = path.rpartition(".")
        parents.setdefault(parent, []).append((i, leaf))
    groups = [(getter(parent) if parent else None, leaves) for parent, leaves in parents.items()]
    n = len(paths)
    if len(groups) == 1 and groups[0][0] is not None and [i for i, _ in groups[0][1]] == list(range(n)):
        get_parent, names = groups[0][0], [leaf for _, leaf in groups[0][1]]

        def read_one(doc: dict[str, Any]) -> list[Any]:  # the common case: all under one object
            node = get_parent(doc)
            if node.__class__ is dict:
                return [node.get(leaf, _ABSENT) for leaf in names]
            return [_ABSENT] * n

        return read_one

    def read(doc: dict[str, Any]) -> list[Any]:
        out: list[Any] = [_ABSENT] * n
        for get, leaves in groups:
            node = doc if get is None else get(doc)
            if isinstance(node, dict):
                for i, leaf in leaves:
                    out[i] = node.get(leaf, _ABSENT)
        return out

    return read


class _Raw(NamedTuple):
    """One record's value and Kafka timestamp (ms), shaped like a Kafka record."""

    value: bytes | None
    timestamp: int | None


def _load(raw: bytes | None) -> dict[str, Any]:
    if raw is None:
        raise _Reject(INVALID_JSON, "empty message (tombstone)")
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _Reject(INVALID_JSON, f"not UTF-8 JSON: {exc}") from None
    return _object(doc)


def _object(doc: Any) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise _Reject(NOT_AN_OBJECT, f"expected a JSON object, got {type(doc).__name__}")
    return doc


def _id(value: Any) -> str:
    if value is _ABSENT or value is None:
        raise _Reject(MISSING_ID, "no id field")
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise _Reject(INVALID_ID, f"id must be a string or integer, got {type(value).__name__}")
    text = str(value)
    if not text or len(text) > _MAX_ID:
        raise _Reject(INVALID_ID, f"id must have 1..{_MAX_ID} characters")
    return text


def _binary(value: Any, mapping: Mapping[str, int], what: str, key: str, missing: str, invalid: str) -> int:
    if value is _ABSENT or value is None:
        raise _Reject(missing, f"no {what} field")
    if isinstance(value, str) and value in mapping:
        return mapping[value]
    try:
        return _BINARY[value]
    except (KeyError, TypeError):
        shown = repr(value)[:40]
        raise _Reject(invalid, f"{what} {shown} is not 0/1 (add it to schema.{key})") from None


class _Values(dict):  # type: ignore[type-arg]
    """Checked attribute values by raw value: strings as keys, integers and booleans kept apart.

    ``True == 1 == 1.0`` as dict keys, so a cache keyed by the raw value alone would count a later
    ``true`` in group ``1`` (or ``1`` in group ``true``) and accept a float ``1.0``. Only strings
    are stored as keys; an integer or a boolean misses and is answered by :meth:`__missing__` from
    a cache keyed by its exact type (still no exception, so it stays on the decoder's fast path);
    anything else misses with KeyError (the full path rejects it).

    >>> v = _Values(); v["F"] = "F"
    >>> v[1], v[True], v["F"]
    ('1', 'true', 'F')
    >>> v[1.0]
    Traceback (most recent call last):
    KeyError: 1.0
    """

    def __init__(self) -> None:
        super().__init__()
        self.typed: dict[tuple[type, int], str] = {}

    def __missing__(self, raw: Any) -> str:
        cls = raw.__class__
        if cls is not int and cls is not bool:
            raise KeyError(raw)
        value = self.typed.get((cls, raw))
        if value is None:
            value = Decoder._check(raw)  # true, false, 42
            if len(self.typed) < 10_000:
                self.typed[(cls, raw)] = value
        return value


class Decoder:
    """Decodes prediction and outcome records for one configuration."""

    def __init__(self, config: Config) -> None:
        schema = config.schema_
        p, o = schema.prediction, schema.outcome
        self._p_id, self._p_ts, self._p_model = getter(p.id), getter(p.timestamp), getter(p.model)
        self._p_pred = getter(p.prediction) if p.prediction else None
        self._p_score = getter(p.score) if p.score else None
        self._o_id, self._o_ts, self._o_label = getter(o.id), getter(o.timestamp), getter(o.label)
        self._p_fast = None if p.prediction is None else _required([p.id, p.timestamp, p.model, p.prediction])
        self._o_fast = _required([o.id, o.timestamp, o.label])
        self._features = _feature_reader([f.path or f.name for f in config.fairness.carried])
        self._values = _Values()  # validated attribute values (few distinct ones)
        self._models: set[str] = set()  # validated model names
        self.unforeseen = 0  # records rejected as UNFORESEEN (their ERROR lines are limited)
        self._pred_values = dict(schema.prediction_values)
        self._label_values = dict(schema.label_values)
        self._threshold = schema.score_threshold
        self._default_model = schema.default_model
        self._ts_scale = 0.001 if schema.timestamp_unit == "milliseconds" else 1.0
        self._kafka_ts_fallback = schema.missing_timestamp == "use_kafka_timestamp"
        et = config.event_time
        self.event_time = EventTimeGuard(
            et.allowed_skew, et.min_timestamp, et.max_jump, et.confirmations, self._ts_scale
        )
        self._min_ts, self._latest = et.min_timestamp, self.event_time.latest

    def _ts(self, value: Any, kafka_ts_ms: int | None) -> float:
        raw: float | None = None
        if value is _ABSENT or value is None:
            if self._kafka_ts_fallback and kafka_ts_ms is not None and kafka_ts_ms >= 0:
                ts = kafka_ts_ms / 1000.0
            else:
                raise _Reject(MISSING_TIMESTAMP, "no timestamp field")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            raw = float(value)
            ts = raw * self._ts_scale
        elif isinstance(value, str):
            try:
                ts = parse_iso(value)
            except ValueError:
                try:
                    raw = float(value)
                    ts = raw * self._ts_scale
                except ValueError:
                    raise _Reject(
                        INVALID_TIMESTAMP,
                        f"timestamp {value[:40]!r} is neither ISO 8601 nor a number",
                    ) from None
        else:
            raise _Reject(INVALID_TIMESTAMP, f"timestamp of type {type(value).__name__}")
        if not math.isfinite(ts):
            raise _Reject(INVALID_TIMESTAMP, f"timestamp {value!r:.40} is not a finite number")
        implausible = self.event_time.check(ts, raw)
        if implausible is not None:
            raise _Reject.of(implausible)
        return ts

    def prediction(self, raw: bytes | None, kafka_ts_ms: int | None = None) -> Prediction | Rejection:
        """Decode one prediction record (see :meth:`predictions`)."""
        return self.predictions((_Raw(raw, kafka_ts_ms),))[0]

    def predictions(self, records: Iterable[Any]) -> list[Prediction | Rejection]:
        """Decode one poll's prediction records (objects with ``value`` and ``timestamp``, the
        Kafka timestamp in ms), parsing each once.

        The fast path accepts only the plain, common shapes (string id, numeric or ISO-8601 time,
        0/1 integer decision, known attribute values) with exact type checks; anything else, valid
        or not, takes the full path with the parsed document, which alone decides rejections.
        """
        out: list[Prediction | Rejection] = []
        append = out.append
        loads, fast, get_score = orjson.loads, self._p_fast, self._p_score
        features, values, models = self._features, self._values, self._models
        scale, min_ts, latest = self._ts_scale, self._min_ts, self._latest()  # the clock once per poll
        for r in records:
            raw = r.value
            try:
                doc = loads(raw)
            except Exception:  # not JSON, or a tombstone: the full path names the reason
                append(self._prediction(raw, r.timestamp))
                continue
            try:
                if doc.__class__ is dict and fast is not None:
                    eid, ts, model, pred = fast(doc)  # KeyError when absent: full path
                    cls = ts.__class__
                    if cls is float or cls is int:
                        ts = float(ts * scale)
                    elif cls is str:
                        ts = parse_iso(ts)  # ValueError (a numeric string, say): full path
                    score = get_score(doc) if get_score else None
                    if (
                        ts.__class__ is float and min_ts <= ts <= latest
                        and eid.__class__ is str and 0 < len(eid) <= _MAX_ID
                        and model in models
                        and pred.__class__ is int and (pred == 0 or pred == 1)
                        and (
                            score is None or score is _ABSENT
                            or (score.__class__ is float and -MAX_SCORE <= score <= MAX_SCORE)
                        )
                    ):  # fmt: skip
                        cell = tuple([values[v] for v in features(doc)])
                        real_score: float | None = None if score is _ABSENT else score  # type: ignore[assignment]
                        append(Prediction(eid, ts, model, pred, real_score, cell))
                        continue
            except Exception:  # noqa: S110 - anything unusual goes to the full path below
                pass
            append(self._prediction(raw, r.timestamp, doc))
        return out

    def _prediction(
        self, raw: bytes | None, kafka_ts_ms: int | None, doc: Any = _ABSENT
    ) -> Prediction | Rejection:
        try:
            doc = _load(raw) if doc is _ABSENT else _object(doc)
            event_id = _id(self._p_id(doc))
            ts = self._ts(self._p_ts(doc), kafka_ts_ms)
            model = self._p_model(doc)
            if model is _ABSENT or model is None:
                model = self._default_model
            elif model.__class__ is not str or model not in self._models:  # a list is unhashable
                self._model(model)
            score = None
            if self._p_score is not None:
                raw_score = self._p_score(doc)
                if raw_score is not _ABSENT and raw_score is not None:
                    if isinstance(raw_score, bool) or not isinstance(raw_score, int | float):
                        raise _Reject(INVALID_SCORE, f"score {raw_score!r:.40} is not a number")
                    if not -MAX_SCORE <= raw_score <= MAX_SCORE:  # NaN and the infinities too
                        raise _Reject(
                            INVALID_SCORE,
                            f"score {raw_score!r:.40} is not a finite number within ±{MAX_SCORE:g}",
                        )
                    score = float(raw_score)
            raw_pred = self._p_pred(doc) if self._p_pred is not None else _ABSENT
            if (
                (raw_pred is _ABSENT or raw_pred is None)
                and score is not None
                and (self._threshold is not None)
            ):
                predicted = int(score >= self._threshold)
            else:
                predicted = _binary(
                    raw_pred, self._pred_values, "prediction", "prediction_values",
                    MISSING_PREDICTION, INVALID_PREDICTION,
                )  # fmt: skip
            values = self._values
            try:
                cell = tuple([values[raw] for raw in self._features(doc)])
            except (KeyError, TypeError):  # a value not seen before, or an unhashable one
                cell = tuple([self._value(raw) for raw in self._features(doc)])
            return Prediction(event_id, ts, model, predicted, score, cell)
        except _Reject as r:
            return r.rejection
        except Exception as exc:  # noqa: BLE001 - a bad record must never stop the consumer
            return self._unforeseen("prediction", exc)

    def _model(self, model: Any) -> None:
        if not isinstance(model, str) or not model or len(model) > _MAX_VALUE:
            raise _Reject(INVALID_MODEL, f"model must be a string of 1..{_MAX_VALUE} characters")
        bad = _CONTROL.search(model)
        if bad:
            raise _Reject(
                INVALID_MODEL, f"model {model!r:.40} contains control character U+{ord(bad[0]):04X}"
            )
        if model in _RESERVED:
            raise _Reject(INVALID_MODEL, f"model {model!r} is a reserved name")
        if len(self._models) < 10_000:
            self._models.add(model)

    def _value(self, raw: Any) -> str:
        try:
            hash(raw)
        except TypeError:
            return self._check(raw)  # a list or object: rejected below
        value = self._check(raw)
        # only strings are cached: the cache is read by the raw value, and True == 1 == 1.0 as keys
        # (a cached 1 would turn a later true into group '1', and accept a float 1.0)
        if raw.__class__ is str and len(self._values) < 10_000:
            self._values[raw] = value
        return value

    @staticmethod
    def _check(value: Any) -> str:
        if value is _ABSENT or value is None or value == "":
            return MISSING
        if isinstance(value, str):
            if len(value) > _MAX_VALUE:
                raise _Reject(INVALID_ATTRIBUTE, f"attribute value longer than {_MAX_VALUE} chars")
            if "&" in value or value in _RESERVED:
                raise _Reject(
                    INVALID_ATTRIBUTE,
                    f"attribute value {value!r:.40} uses a reserved character or name",
                )
            bad = _CONTROL.search(value)
            if bad:
                raise _Reject(
                    INVALID_ATTRIBUTE,
                    f"attribute value {value!r:.40} contains control character U+{ord(bad[0]):04X}",
                )
            return value
        if isinstance(value, bool | int):
            return str(value).lower() if isinstance(value, bool) else str(value)
        raise _Reject(INVALID_ATTRIBUTE, f"attribute of type {type(value).__name__} (expected a string)")

    def outcome(self, raw: bytes | None, kafka_ts_ms: int | None = None) -> Outcome | Rejection:
        """Decode one outcome record (see :meth:`outcomes`)."""
        return self.outcomes((_Raw(raw, kafka_ts_ms),))[0]

    def outcomes(self, records: Iterable[Any]) -> list[Outcome | Rejection]:
        """Decode one poll's outcome records, parsing each once (fast path as for predictions)."""
        out: list[Outcome | Rejection] = []
        append = out.append
        loads, fast = orjson.loads, self._o_fast
        scale, min_ts, latest = self._ts_scale, self._min_ts, self._latest()
        for r in records:
            raw = r.value
            try:
                doc = loads(raw)
            except Exception:
                append(self._outcome(raw, r.timestamp))
                continue
            try:
                if doc.__class__ is dict:
                    eid, ts, label = fast(doc)  # KeyError when absent: full path
                    cls = ts.__class__
                    if cls is float or cls is int:
                        ts = float(ts * scale)
                    elif cls is str:
                        ts = parse_iso(ts)
                    if (
                        ts.__class__ is float and min_ts <= ts <= latest
                        and eid.__class__ is str and 0 < len(eid) <= _MAX_ID
                        and label.__class__ is int and (label == 0 or label == 1)
                    ):  # fmt: skip
                        append(Outcome(eid, ts, label))
                        continue
            except Exception:  # noqa: S110 - anything unusual goes to the full path below
                pass
            append(self._outcome(raw, r.timestamp, doc))
        return out

    def _outcome(self, raw: bytes | None, kafka_ts_ms: int | None, doc: Any = _ABSENT) -> Outcome | Rejection:
        try:
            doc = _load(raw) if doc is _ABSENT else _object(doc)
            event_id = _id(self._o_id(doc))
            ts = self._ts(self._o_ts(doc), kafka_ts_ms)
            label = _binary(
                self._o_label(doc), self._label_values, "label", "label_values",
                MISSING_LABEL, INVALID_LABEL,
            )  # fmt: skip
            return Outcome(event_id, ts, label)
        except _Reject as r:
            return r.rejection
        except Exception as exc:  # noqa: BLE001 - a bad record must never stop the consumer
            return self._unforeseen("outcome", exc)

    def _unforeseen(self, kind: str, exc: Exception) -> Rejection:
        """The rejection of a record that failed outside every rule (:data:`UNFORESEEN`)."""
        detail = f"{kind} not decodable ({exc.__class__.__name__}: {exc!s:.80}); please report it"
        self.unforeseen += 1
        if self.unforeseen <= _UNFORESEEN_LOGGED:
            log.error("a %s record was rejected as %s: %s", kind, UNFORESEEN, detail, exc_info=exc)
        return Rejection(UNFORESEEN, detail)
