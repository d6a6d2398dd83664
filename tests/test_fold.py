"""The model-wide fold: each increment applied once, every partition awaited, idle ones released."""

from __future__ import annotations

import json

from stream_fair.dev.arrays import draw, increments
from stream_fair.dev.simulate import SCENARIOS
from stream_fair.groups import feature_keys
from stream_fair.verdict import VerdictEngine, VerdictSettings
from stream_fair.verdict.fold import ModelWide

KEYS = feature_keys(["group"], [])
SETTINGS = VerdictSettings(period=60.0, slot=10.0)


def stream_messages(partitions: int) -> tuple[list[dict], VerdictEngine]:
    """The same stream as one engine source, and split round-robin into partition messages."""
    scenario = SCENARIOS["bias_onset"](tpr_drop=0.3, label_delay_mean_s=30.0, onset_fraction=0.3)
    stream = draw(scenario, 30_000, seed=3, rate_per_s=200.0)
    whole = VerdictEngine(KEYS, SETTINGS)
    messages: list[dict] = []
    seq = [0] * partitions
    for i, inc in enumerate(increments(stream, SETTINGS)):
        whole.update(inc)
        parts: list[list] = [[] for _ in range(partitions)]
        for j, c in enumerate(inc.counts):
            parts[j % partitions].append(c.to_json())
        for p in range(partitions):
            seq[p] += 1
            messages.append({"partition": p, "seq": seq[p], "epoch": 1, "watermark": inc.watermark,
                             "caught_up": False, "rows": parts[p]})  # fmt: skip
        if i % 7 == 3:  # a re-published outbox
            messages.append(dict(messages[-2]))
    whole.flush()
    return messages, whole


def test_partitions_folded_once_raise_what_the_whole_stream_raises() -> None:
    messages, whole = stream_messages(3)
    fold = ModelWide(KEYS, SETTINGS)
    fold.expect(3)
    half = len(messages) // 2
    for m in messages[:half]:
        fold.update(m)
    # a leader failover: the state travels as JSON, the rest is folded by the next leader
    fold = ModelWide.from_state(json.loads(json.dumps(fold.to_state())), KEYS, SETTINGS)
    for m in messages[half - 20 :]:  # some applied already: skipped by (partition, seq)
        fold.update(m)
    fold.engine.flush()
    assert fold.duplicates >= 20
    got = [(e.kind, e.feature, e.disparity, e.group, e.ts) for e in fold.engine.events]
    want = [(e.kind, e.feature, e.disparity, e.group, e.ts) for e in whole.events]
    assert got == want and any(k == "alarm_raised" and g == "E" for k, _, _, g, _ in got)


def test_silent_partitions_hold_the_verdict_back_until_caught_up() -> None:
    fold = ModelWide(KEYS, SETTINGS)
    fold.expect(2)
    row = ["m", ["A"], 0, 0, [5, 5], [0, 0, 0, 0], [], [], 5.0]
    fold.update({"partition": 0, "seq": 1, "epoch": 1, "watermark": 100.0, "caught_up": False, "rows": [row]})
    assert fold.engine.watermark is not None and fold.engine.watermark < 0  # waits for partition 1
    # partition 1 has no records at all and is read to its end: it follows the newest watermark
    fold.update({"partition": 1, "seq": 1, "epoch": 1, "watermark": None, "caught_up": True, "rows": []})
    assert fold.engine.watermark == 100.0
