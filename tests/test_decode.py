"""Decoding through the field mapping, and every rejection reason."""

from __future__ import annotations

from datetime import datetime, timezone

import orjson
import pytest

from stream_fair import decode
from stream_fair.config import Config
from stream_fair.decode import Decoder
from stream_fair.events import Outcome, Prediction, Rejection


def decoder(**schema: object) -> Decoder:
    return Decoder(
        Config.model_validate(
            {
                "schema": schema,
                "fairness": {"features": ["sex", {"name": "band", "path": "applicant.age.band"}]},
            }
        )
    )


def p(**fields: object) -> bytes:
    base: dict[str, object] = {
        "id": "r1",
        "ts": 100,
        "model": "m",
        "prediction": 1,
        "attributes": {"sex": "F"},
        "applicant": {"age": {"band": "30s"}},
    }
    base.update(fields)
    return orjson.dumps({k: v for k, v in base.items() if v is not ...})


def test_default_schema_and_dotted_paths() -> None:
    ev = decoder().prediction(p(score=0.7))
    assert ev == Prediction("r1", 100.0, "m", 1, 0.7, ("F", "30s"))
    noon = datetime(2026, 11, 28, 12, tzinfo=timezone.utc).timestamp()
    assert decoder().outcome(b'{"id": 7, "ts": "2026-11-28T12:00:00Z", "label": true}') == Outcome(
        "7", noon, 1
    )
    # no zone means UTC, whatever the host's time zone
    assert decoder().outcome(b'{"id": 7, "ts": "2026-11-28T12:00:00", "label": 1}').ts == noon  # type: ignore[union-attr]


def test_slow_and_fast_paths_agree_on_valid_events() -> None:
    d = decoder()
    for raw in [p(), p(ts=1.5e9), p(prediction=0, score=None), p(id=12)]:
        assert d.prediction(raw) == d._prediction(raw, None)


def test_value_maps_score_threshold_and_units() -> None:
    d = decoder(prediction_values={"approved": 1, "denied": 0}, label_values={"repaid": 1})
    assert isinstance(d.prediction(p(prediction="approved")), Prediction)
    assert d.prediction(p(prediction="denied")).predicted == 0  # type: ignore[union-attr]
    assert d.outcome(b'{"id": "a", "ts": 1, "label": "repaid"}').label == 1  # type: ignore[union-attr]
    d = decoder(prediction={"prediction": None}, score_threshold=0.5, timestamp_unit="milliseconds")
    ev = d.prediction(p(prediction=..., score=0.5, ts=1500))
    assert isinstance(ev, Prediction) and ev.predicted == 1 and ev.ts == 1.5


def test_missing_attribute_is_a_group_not_a_rejection() -> None:
    ev = decoder().prediction(p(attributes={}))
    assert isinstance(ev, Prediction) and ev.cell == ("__missing__", "30s")


def test_kafka_timestamp_fallback_and_reject_mode() -> None:
    assert decoder().outcome(b'{"id": "a", "label": 0}', 5000).ts == 5.0  # type: ignore[union-attr]
    r = decoder(missing_timestamp="reject").outcome(b'{"id": "a", "label": 0}', 5000)
    assert isinstance(r, Rejection) and r.reason == decode.MISSING_TIMESTAMP


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\xff\xfe", decode.INVALID_JSON),
        (b"", decode.INVALID_JSON),
        (None, decode.INVALID_JSON),
        (b"[1]", decode.NOT_AN_OBJECT),
        (p(id=...), decode.MISSING_ID),
        (p(id=[1]), decode.INVALID_ID),
        (p(id="x" * 300), decode.INVALID_ID),
        (p(ts="yesterday"), decode.INVALID_TIMESTAMP),
        (p(ts=-5), decode.event_time.TIMESTAMP_BEFORE_EPOCH),
        (p(ts=1e13), decode.event_time.FUTURE_TIMESTAMP),
        (p(ts="9999-12-31T23:59:59Z"), decode.event_time.FUTURE_TIMESTAMP),
        (p(ts="nan"), decode.INVALID_TIMESTAMP),
        (p(model=3), decode.INVALID_MODEL),
        (p(model=[1]), decode.INVALID_MODEL),  # unhashable: was a TypeError out of the decoder
        (p(model={}), decode.INVALID_MODEL),
        (p(prediction=...), decode.MISSING_PREDICTION),
        (p(prediction="maybe"), decode.INVALID_PREDICTION),
        (p(prediction=2), decode.INVALID_PREDICTION),
        (p(score="high"), decode.INVALID_SCORE),
        (p(attributes={"sex": {"nested": 1}}), decode.INVALID_ATTRIBUTE),
        (p(attributes={"sex": ["F"]}), decode.INVALID_ATTRIBUTE),
        (p(attributes={"sex": "A&B"}), decode.INVALID_ATTRIBUTE),
        (p(attributes={"sex": "__other__"}), decode.INVALID_ATTRIBUTE),
        (p(attributes={"sex": "F\r\nx"}), decode.INVALID_ATTRIBUTE),
        (p(attributes={"sex": "F\x00"}), decode.INVALID_ATTRIBUTE),
        (p(attributes={"sex": "F\x85"}), decode.INVALID_ATTRIBUTE),
        (p(model="m\r"), decode.INVALID_MODEL),
        (p(model="m\x00"), decode.INVALID_MODEL),
        (p(model="__other__"), decode.INVALID_MODEL),
        (p(model=""), decode.INVALID_MODEL),
    ],
)
def test_prediction_rejections(raw: bytes | None, reason: str) -> None:
    r = decoder().prediction(raw)
    assert isinstance(r, Rejection), r
    assert r.reason == reason and r.reason in decode.REASONS and r.detail


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b'{"ts": 1, "label": 1}', decode.MISSING_ID),
        (b'{"id": "a", "ts": 1}', decode.MISSING_LABEL),
        (b'{"id": "a", "ts": 1, "label": 0.5}', decode.INVALID_LABEL),
        (b'{"id": "a", "ts": {}, "label": 1}', decode.INVALID_TIMESTAMP),
        (b'{"id": "a", "ts": 1e400, "label": 1}', decode.INVALID_JSON),
    ],
)
def test_outcome_rejections(raw: bytes, reason: str) -> None:
    r = decoder().outcome(raw)
    assert isinstance(r, Rejection) and r.reason == reason


def test_control_characters_never_reach_a_label_even_after_warm_up() -> None:
    d = decoder()
    assert isinstance(d.prediction(p()), Prediction)  # "m" and "F" are now known to the fast path
    for raw in (p(model="m\r"), p(attributes={"sex": "F\x00"}), p(model="m\x1b[31m")):
        r = d.prediction(raw)
        assert isinstance(r, Rejection) and "control character" in r.detail, r


def test_a_record_failing_outside_every_rule_is_rejected_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    """The safety net: whatever a record does to the decoder, the consumer gets a rejection (counted,
    dead-lettered) and an ERROR line with the exception, never an exception out of the decoder."""
    d = decoder()

    def broken(doc: object) -> object:
        raise RuntimeError("a decoding rule nobody wrote")

    d._p_fast = d._o_fast = None  # the full path, where the fields are read one by one
    d._p_ts = d._o_ts = broken
    with caplog.at_level("ERROR", logger="stream_fair.decode"):
        results = [d.prediction(p()) for _ in range(decode._UNFORESEEN_LOGGED + 5)]
        results.append(d.outcome(b'{"id": "a", "ts": 1, "label": 1}'))
    assert all(isinstance(r, Rejection) and r.reason == decode.UNFORESEEN for r in results), results
    assert decode.UNFORESEEN in decode.REASONS
    assert "RuntimeError: a decoding rule nobody wrote" in results[0].detail  # type: ignore[union-attr]
    assert d.unforeseen == len(results)
    assert len(caplog.records) == decode._UNFORESEEN_LOGGED  # counted every time, logged the first ones


@pytest.mark.parametrize("score", [1e308, -1e308, 3.7e306, decode.MAX_SCORE * 10])
def test_a_score_no_model_emits_is_rejected_on_both_paths(score: float) -> None:
    """A finite score of 1e308 passed the finiteness check and then overflowed the score bins'
    arithmetic (``int(inf)``): an OverflowError out of the tracker stopped the consumer."""
    d = decoder()
    for r in (d.prediction(p(score=score)), d._prediction(p(score=score), None)):
        assert isinstance(r, Rejection) and r.reason == decode.INVALID_SCORE, r
    # logits and other out-of-range scores are kept (counted as out of range downstream)
    for kept in (decode.MAX_SCORE, -decode.MAX_SCORE, 42.0, -3.5):
        assert d.prediction(p(score=kept)).score == kept  # type: ignore[union-attr]


def test_a_score_of_1e308_neither_crashes_the_tracker_nor_goes_unaccounted() -> None:
    from tests.helpers import LocalTracker

    t = LocalTracker(Config.model_validate({"fairness": {"features": ["sex"]}}))
    rejected = t.update_prediction(0, p(id="big", score=1e308), 0)
    assert rejected is not None and rejected.reason == decode.INVALID_SCORE
    assert t.update_prediction(0, p(id="ok", score=0.3), 1) is None
    assert t.update_outcome(0, b'{"id": "ok", "ts": 101, "label": 1}', 0) is None
    fates = t.snapshot().fates
    assert fates["predictions"]["rejected"] == 1 and fates["outcomes"]["joined"] == 1


@pytest.mark.parametrize(
    "order", [(True, 1), (1, True), (False, 0), (0, False), (1.0, 1), (1, 1.0), (1, True, 1.0)]
)
def test_an_attribute_value_is_the_same_group_whatever_came_first(order: tuple[object, ...]) -> None:
    """The decoder's cache of checked values was keyed by the raw value, and ``True == 1 == 1.0``
    as keys: after a 1, a true was counted in group '1' and a float 1.0 accepted; after a true, a 1
    was counted in group 'true'. So a group depended on arrival order and changed at a restart."""
    d = decoder()
    for v in order:
        for r in (d.prediction(p(attributes={"sex": v})), d._prediction(p(attributes={"sex": v}), None)):
            if v.__class__ is float:
                assert isinstance(r, Rejection) and r.reason == decode.INVALID_ATTRIBUTE, (order, v, r)
            else:
                want = str(v).lower()  # true, false, 1, 0 (a dict keyed by them would merge them too)
                assert isinstance(r, Prediction) and r.cell[0] == want, (order, v, r)  # type: ignore[index]
