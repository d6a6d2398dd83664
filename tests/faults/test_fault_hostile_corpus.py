"""A hostile-input corpus: every bad record is rejected with its reason, accounted for in the fates
and present in the dead-letter topic, and /metrics stays valid for promtool (issue 9, item 8).

Each entry is (kind, key, value, expected reason). Good records are mixed in, so the identity
``consumed = fates + pending`` is checked on a stream that also joins.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from kafka import KafkaProducer

from stream_fair.dev import simulate
from stream_fair.dev.broker import consume_topic, produce_events
from tests.faults.proc import Run, consumed_all, headers, setup
from tests.helpers import assert_accounting, recount, wait_for

pytestmark = pytest.mark.integration

NOW = time.time()
OK = {"id": "ok", "ts": NOW - 600, "model": "credit-v3", "prediction": 1, "attributes": {"sex": "Female"}}


def p(**fields: Any) -> bytes:
    return orjson.dumps({**OK, **fields})


def nested(depth: int) -> dict[str, Any]:
    node: dict[str, Any] = {"leaf": 1}
    for _ in range(depth):
        node = {"n": node}
    return node


BIG = b'{"id": "big", "junk": "' + b"x" * 2_000_000 + b'"'  # 2 MB, unterminated
CORPUS: list[tuple[str, bytes | None, bytes | None, str]] = [
    ("prediction", b"k1", b"\xff\xfe\xfd", "invalid_json"),  # invalid UTF-8
    ("prediction", b"k2", b'{"id": "a\xff", "ts": 1}', "invalid_json"),  # invalid UTF-8 inside a string
    ("prediction", b"k3", b"", "invalid_json"),  # empty
    ("prediction", b"k4", None, "invalid_json"),  # tombstone
    ("prediction", None, b"   \n\t ", "invalid_json"),  # whitespace only
    ("prediction", None, b"[1, 2, 3]", "not_an_object"),
    ("prediction", None, b'"just a string"', "not_an_object"),
    ("prediction", None, b"null", "not_an_object"),
    ("prediction", None, b"[" * 5000 + b"]" * 5000, "invalid_json"),  # nesting beyond the parser's depth
    ("prediction", b"k5", p(attributes={"sex": nested(200)}), "invalid_attribute"),  # deep object as a value
    ("prediction", b"k6", b'{"id": 1' + b"0" * 400 + b', "ts": 1}', "invalid_json"),  # huge integer
    ("prediction", b"k7", p(ts=1e308), "future_timestamp"),  # huge float
    ("prediction", b"k8", b'{"id": "n", "ts": NaN, "prediction": 1}', "invalid_json"),
    ("prediction", b"k9", b'{"id": "i", "ts": Infinity, "prediction": 1}', "invalid_json"),
    ("prediction", b"k10", b'{"id": "d", "ts": 1e999, "prediction": 1}', "invalid_json"),
    # duplicate keys: the last one wins, and it is bad
    ("prediction", b"k11", p()[:-1] + b', "prediction": 1, "prediction": "maybe"}', "invalid_prediction"),
    ("prediction", b"k12", b"\xef\xbb\xbf" + p(id="bom"), "invalid_json"),  # UTF-8 byte order mark
    ("prediction", b"k13", b'{"id": "\\ud800", "ts": 1}', "invalid_json"),  # lone surrogate
    ("prediction", b"k14", p(id="cr", attributes={"sex": "Fe\r\nmale"}), "invalid_attribute"),
    ("prediction", b"k15", p(id="nul", model="credit\x00v3"), "invalid_model"),
    ("prediction", b"k16", p(id="esc", attributes={"sex": "\x1b[31mred"}), "invalid_attribute"),
    ("prediction", b"k17", p(id="c1", attributes={"sex": "F\u0085"}), "invalid_attribute"),
    ("prediction", b"k18", p(id=["a"]), "invalid_id"),
    ("prediction", b"k19", p(id=True), "invalid_id"),
    ("prediction", b"k20", p(id=1.5), "invalid_id"),
    ("prediction", b"k21", p(id=""), "invalid_id"),
    ("prediction", b"k22", p(id="x" * 300), "invalid_id"),
    ("prediction", b"k23", p(id=None), "missing_id"),
    ("prediction", b"k24", p(id="tso", ts={"s": 1}), "invalid_timestamp"),
    ("prediction", b"k25", p(id="tsb", ts=True), "invalid_timestamp"),
    ("prediction", b"k26", p(id="tss", ts="yesterday"), "invalid_timestamp"),
    ("prediction", b"k27", p(id="y9999", ts="9999-12-31T23:59:59Z"), "future_timestamp"),
    ("prediction", b"k28", p(id="ms", ts=int(NOW * 1000)), "future_timestamp"),  # milliseconds as seconds
    ("prediction", b"k29", p(id="neg", ts=-1), "timestamp_before_epoch"),
    ("prediction", b"k30", p(id="pm", prediction="maybe"), "invalid_prediction"),
    ("prediction", b"k31", p(id="p2", prediction=2), "invalid_prediction"),
    ("prediction", b"k32", p(id="pl", prediction=[1]), "invalid_prediction"),
    ("prediction", b"k33", p(id="sc", score="high"), "invalid_score"),
    ("prediction", b"k34", p(id="mi", model=123), "invalid_model"),
    ("prediction", b"k35", p(id="mo", model="__other__"), "invalid_model"),
    ("prediction", b"k36", p(id="al", attributes={"sex": ["F"]}), "invalid_attribute"),
    ("prediction", b"k37", p(id="aa", attributes={"sex": "A&B"}), "invalid_attribute"),
    ("prediction", b"k38", p(id="ar", attributes={"sex": "__missing__"}), "invalid_attribute"),
    ("prediction", b"k39", p(id="ax", attributes={"sex": "x" * 200}), "invalid_attribute"),
    ("prediction", b"k40", BIG, "invalid_json"),  # oversized
    # a model that is not a string: unhashable, it crashed the consumer at the set lookup, on every
    # restart and on every replica the partition moved to
    ("prediction", b"k41", p(id="ml", model=[1]), "invalid_model"),
    ("prediction", b"k42", p(id="md", model={"name": "m"}), "invalid_model"),
    ("outcome", b"o1", b'{"id": "o", "ts": 1795000000, "label": 0.5}', "invalid_label"),
    ("outcome", b"o2", b'{"id": "o", "ts": 1795000000, "label": "yes"}', "invalid_label"),
    ("outcome", b"o3", b'{"id": "o", "ts": 1795000000}', "missing_label"),
    ("outcome", b"o4", b"\x00\x01\x02", "invalid_json"),
    ("outcome", b"o6", None, "invalid_json"),  # tombstone
    ("outcome", b"o5", b'{"id": "o", "ts": 99999999999999, "label": 1}', "future_timestamp"),
]


def test_every_hostile_record_is_rejected_accounted_for_and_dead_lettered(
    kafka_bootstrap: str, topic_names: Any, group_id: str, tmp_path: Path
) -> None:
    assert len({reason for *_, reason in CORPUS}) >= 10 and len(CORPUS) >= 30
    config = setup(
        kafka_bootstrap, topic_names, group_id, tmp_path, fairness={"features": ["sex", "race", "age"]}
    )
    good = list(simulate.generate(simulate.SCENARIOS["lending"](), 200, seed=9, start_ts=NOW - 7200))
    exp = recount(good)
    half = len(good) // 2
    produce_events(kafka_bootstrap, topic_names.predictions, topic_names.outcomes, good[:half])
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, max_request_size=8_000_000, acks="all")
    try:
        for kind, key, value, _ in CORPUS:
            topic = topic_names.predictions if kind == "prediction" else topic_names.outcomes
            producer.send(topic, key=key, value=value).get(timeout=30)
    finally:
        producer.close()
    produce_events(kafka_bootstrap, topic_names.predictions, topic_names.outcomes, good[half:])
    want = Counter(("predictions" if k == "prediction" else "outcomes", r) for k, _, _, r in CORPUS)

    run = Run(config).start()
    try:
        s = consumed_all(
            run,
            exp.consumed["predictions"] + sum(n for (t, _), n in want.items() if t == "predictions"),
            exp.consumed["outcomes"] + sum(n for (t, _), n in want.items() if t == "outcomes"),
        )
        assert_accounting(s)
        assert s.by("stream_fair_rejected_events_total", ["topic", "reason"]) == {
            k: float(n) for k, n in want.items()
        }
        for topic in ("predictions", "outcomes"):
            assert (
                s.get("stream_fair_event_fates_total", topic=topic, fate="joined")
                == exp.fates[topic]["joined"]
            )
        per_topic = Counter(t for t, _ in want.elements())
        s = wait_for(
            lambda: (
                (x := run.scrape()).by("stream_fair_dead_letters_total", ["topic"])
                == {(t,): float(n) for t, n in per_topic.items()}
                and x
            ),
            60,
            "every rejected record dead-lettered",
        )
        text = run.text("/metrics")
        promtool = shutil.which("promtool")
        assert promtool, "promtool is required (Debian package prometheus)"
        check = subprocess.run(
            [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
        )
        assert check.returncode == 0, check.stdout + check.stderr
        assert "\r" not in text and "\x00" not in text and "\x1b" not in text
        assert run.stop() == 0, run.log
        assert "Traceback" not in run.log, run.log
    finally:
        run.kill()

    letters = consume_topic(kafka_bootstrap, topic_names.dead_letters)
    seen = Counter(
        (headers(r)["stream_fair.reason"].decode(), r.key, r.value if TRUNCATED not in headers(r) else "cut")
        for r in letters
    )
    expected = Counter(
        (reason, key, value if value is not BIG else "cut") for _, key, value, reason in CORPUS
    )
    assert seen == expected
    (cut,) = [r for r in letters if TRUNCATED in headers(r)]
    assert BIG.startswith(cut.value) and len(cut.value) < 1_000_000


TRUNCATED = "stream_fair.truncated"
