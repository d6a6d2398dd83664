"""Event-time guard: plausible range, unit mistakes named, the watermark moved robustly."""

from __future__ import annotations

import orjson
import pytest

from stream_fair import event_time
from stream_fair.config import Config, ConfigError, load
from stream_fair.decode import Decoder
from stream_fair.event_time import EventTimeGuard
from stream_fair.events import Rejection
from tests.helpers import LocalTracker as Tracker

NOW = 1_795_000_000.0  # 2026-11-18


def guard(**kw: object) -> EventTimeGuard:
    return EventTimeGuard(**{"allowed_skew": 900.0, "clock": lambda: NOW, **kw})  # type: ignore[arg-type]


def test_range_and_unit_mistakes_named() -> None:
    g = guard()
    assert g.check(NOW + 899) is None and g.check(0.0) is None
    future = g.check(NOW * 1000, NOW * 1000)
    assert future is not None and future.reason == event_time.FUTURE_TIMESTAMP
    assert "looks like milliseconds" in future.detail and "schema.timestamp_unit is seconds" in future.detail
    micro = g.check(NOW * 1e6, NOW * 1e6)
    assert micro is not None and "looks like microseconds" in micro.detail
    far = g.check(253402300799.0)  # 9999-12-31, an ISO string: no unit to blame
    assert far is not None and far.reason == event_time.FUTURE_TIMESTAMP and "looks like" not in far.detail
    # seconds sent where milliseconds are configured land in January 1970
    ms = guard(min_timestamp=1577836800.0, unit_scale=1e-3)
    early = ms.check(NOW * 1e-3, NOW)
    assert early is not None and early.reason == event_time.TIMESTAMP_BEFORE_EPOCH
    assert "looks like seconds" in early.detail and "schema.timestamp_unit is milliseconds" in early.detail


def test_decoder_rejects_implausible_times_on_both_paths() -> None:
    d = Decoder(Config.model_validate({"event_time": {"min_timestamp": "2020-01-01"}}))
    base = {"id": "a", "model": "m", "prediction": 1}
    for ts, reason in [
        (4e12, event_time.FUTURE_TIMESTAMP),  # fast path shape: plain number
        ("9999-01-01T00:00:00Z", event_time.FUTURE_TIMESTAMP),
        (1_000_000, event_time.TIMESTAMP_BEFORE_EPOCH),
        ("1999-12-31", event_time.TIMESTAMP_BEFORE_EPOCH),
    ]:
        r = d.prediction(orjson.dumps({**base, "ts": ts}))
        assert isinstance(r, Rejection) and r.reason == reason, (ts, r)
        o = d.outcome(orjson.dumps({"id": "a", "ts": ts, "label": 1}))
        assert isinstance(o, Rejection) and o.reason == reason
    # a Kafka record timestamp used as the event time is held to the same range
    r = d.outcome(b'{"id": "a", "label": 1}', kafka_ts_ms=5_000)
    assert isinstance(r, Rejection) and r.reason == event_time.TIMESTAMP_BEFORE_EPOCH


def test_one_record_moves_event_time_by_the_skew_at_most() -> None:
    g = guard(confirmations=3)
    assert g.admit("k", None, None, 1000.0) == 1000.0  # the first record sets the clock
    assert g.admit("k", 1000.0, 1000.0, 1500.0) == 1500.0  # within the skew: followed exactly
    assert g.admit("k", 1500.0, 1500.0, 1e9) == 2400.0  # far ahead: one skew
    assert g.admit("k", 1500.0, 2400.0, 1600.0) == 1600.0  # back to normal resets the run
    assert g.admit("k", 1500.0, 2400.0, 9e8) == 3300.0
    assert g.admit("k", 1500.0, 3300.0, 8e8) == 4200.0
    assert g.admit("k", 1500.0, 4200.0, 8.5e8) == 8e8  # third in a row: confirmed, the earliest wins
    assert g.admit("other", None, 10.0, 11.0) == 11.0  # clocks are independent


def test_max_jump_rejects_until_confirmed() -> None:
    g = guard(max_jump=3600.0, confirmations=2)
    first = g.admit("k", 1000.0, 1000.0, 1000.0 + 7200)
    assert isinstance(first, Rejection) and first.reason == event_time.TIMESTAMP_JUMP
    assert "event_time.max_jump" in first.detail
    assert g.admit("k", 1000.0, 1000.0, 1000.0 + 7300) == 8200.0  # a second one confirms the gap
    # ahead of the clock by more than the skew but within max_jump: clamped, not rejected
    assert g.admit("k", 1000.0, 1000.0, 1000.0 + 1800) == 1900.0


def test_config_keys_and_errors() -> None:
    cfg = load(
        environ={
            "STREAM_FAIR_EVENT_TIME__MIN_TIMESTAMP": "2020-01-01",
            "STREAM_FAIR_EVENT_TIME__MAX_JUMP": "1d",
        }
    )
    assert cfg.event_time.min_timestamp == 1577836800.0 and cfg.event_time.max_jump == 86400.0
    assert cfg.event_time.allowed_skew == 900.0
    with pytest.raises(ConfigError, match="event_time.max_jump must be at least event_time.allowed_skew"):
        load(environ={"STREAM_FAIR_EVENT_TIME__MAX_JUMP": "1m"})
    with pytest.raises(ConfigError, match="event_time.min_timestamp: expected an ISO 8601"):
        load(environ={"STREAM_FAIR_EVENT_TIME__MIN_TIMESTAMP": "last tuesday"})


def _pairs(t: Tracker, n: int, start: float, prefix: str, offset: int = 0, inject: bytes = b"") -> int:
    for i in range(n):
        if inject and i == n // 2:  # mid-stream, while predictions wait for their outcomes
            t.update_prediction(0, inject, offset + n)
        ts = start + 60 * i
        p = {
            "id": f"{prefix}{i}",
            "ts": ts,
            "model": "m",
            "prediction": i % 2,
            "attributes": {"sex": "FM"[i % 2]},
        }
        t.update_prediction(0, orjson.dumps(p), offset + i)
        # the outcome of each prediction arrives two hours of event time later
        if i >= 120:
            j = i - 120
            t.update_outcome(
                0, orjson.dumps({"id": f"{prefix}{j}", "ts": start + 60 * j + 7200, "label": 1}), offset + j
            )
    for j in range(max(0, n - 120), n):
        t.update_outcome(
            0, orjson.dumps({"id": f"{prefix}{j}", "ts": start + 60 * j + 7200, "label": 1}), offset + j
        )
    return n


def test_a_far_jump_inside_the_wall_clock_does_not_expire_a_backlog() -> None:
    """Replaying a backlog 60 days old, one record stamped 'now' would have moved the watermark
    by 60 days and expired every pending prediction (their outcomes then late)."""
    cfg = Config.model_validate({"fairness": {"features": ["sex"]}, "join": {"ttl": "1d"}})
    t = Tracker(cfg)
    start = NOW - 60 * 86400
    now = orjson.dumps({"id": "now", "ts": NOW - 60, "model": "m", "prediction": 1})
    _pairs(t, 200, start, "a", inject=now)
    _pairs(t, 1000, start + 200 * 60, "b", offset=20_000)  # the rest of the backlog
    snap = t.snapshot()
    assert snap.fates["predictions"]["joined"] == 1200 and snap.fates["outcomes"]["joined"] == 1200
    assert snap.fates["predictions"]["expired"] == 0 and snap.fates["outcomes"]["late"] == 0
    assert snap.watermark is not None and snap.watermark < start + 1300 * 60 + 7200 + 900
