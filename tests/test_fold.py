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


def test_the_loop_test_runs_on_the_whole_stream_like_the_monitor() -> None:
    """The feedback_loop scenario split over three partitions' builders, folded: the same loop
    estimate as one monitor that saw every prediction (period 100 s, a multiple of the slot)."""
    from stream_fair.dev.simulate import generate
    from stream_fair.feedback import FeedbackMonitor, FeedbackSettings
    from stream_fair.verdict import IncrementBuilder
    from stream_fair.verdict.fold import LoopSettings

    settings = VerdictSettings(period=100.0, slot=20.0)
    fs = FeedbackSettings(period=100.0)
    monitor = FeedbackMonitor(KEYS, fs)
    loop = LoopSettings(100.0, fs.loop_window, fs.min_samples, fs.loop_min_periods, fs.loop_alpha)
    fold = ModelWide(KEYS, settings, loop)
    fold.expect(3)
    builders = [IncrementBuilder(settings.period, settings.slot, settings.bins) for _ in range(3)]
    seq = [0, 0, 0]
    wm = [0.0, 0.0, 0.0]
    for i, (kind, ev) in enumerate(generate(SCENARIOS["feedback_loop"](), 120_000, seed=1)):
        if kind != "prediction":
            continue
        p = i % 3
        cell = (str(ev["attributes"]["group"]),)
        monitor.on_prediction("m", cell, int(ev["prediction"]), float(ev["ts"]))
        builders[p].add_prediction("m", cell, int(ev["prediction"]), float(ev["ts"]))
        wm[p] = float(ev["ts"])
        if i % 500 == 0:
            for q in range(3):
                seq[q] += 1
                rows = [c.to_json() for c in builders[q].build("", None).counts]
                fold.update({"partition": q, "seq": seq[q], "epoch": 1, "watermark": wm[q], "rows": rows})
    got = fold.loop_estimates()[("m", "group")]
    want = monitor.snapshot().features[("m", "group")].feedback_loop
    assert got is not None and want is not None
    assert got.amplifying and want.amplifying and got.group == want.group == "D"
    assert got.pairs == want.pairs and got.statistic == want.statistic
    assert abs(got.value - want.value) < 1e-12
