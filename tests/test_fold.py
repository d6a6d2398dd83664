"""The model-wide fold: each increment applied once, every partition awaited, idle ones released."""

from __future__ import annotations

import json

from stream_fair.dev.arrays import draw, increments
from stream_fair.dev.simulate import SCENARIOS, generate
from stream_fair.feedback import FeedbackMonitor, FeedbackSettings
from stream_fair.groups import feature_keys
from stream_fair.verdict import IncrementBuilder, VerdictEngine, VerdictSettings
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


def fold_loop_stream(
    fs: FeedbackSettings, *, n: int, seed: int, every: int, in_turn: bool, caught_up: bool,
    monitor: FeedbackMonitor | None = None,
) -> ModelWide:  # fmt: skip
    """The feedback_loop scenario's predictions dealt round-robin to three partitions' builders
    (100 s cohorts, 20 s slots) and folded: every ``every`` predictions the next partition publishes
    (``in_turn``), or all three do. ``monitor``, when given, sees every prediction."""
    settings = VerdictSettings(period=100.0, slot=20.0)
    fold = ModelWide(KEYS, settings, fs)
    fold.expect(3)
    builders = [IncrementBuilder(settings.period, settings.slot, settings.bins) for _ in range(3)]
    seq, wm = [0, 0, 0], [0.0, 0.0, 0.0]
    count = 0
    for kind, ev in generate(SCENARIOS["feedback_loop"](), n, seed=seed):
        if kind != "prediction":
            continue
        p = count % 3
        count += 1
        cell = (str(ev["attributes"]["group"]),)
        ts = float(ev["ts"])
        if monitor is not None:
            monitor.on_prediction("m", cell, int(ev["prediction"]), ts)
        builders[p].add_prediction("m", cell, int(ev["prediction"]), ts)
        wm[p] = ts
        if count % every:
            continue
        for q in [(count // every) % 3] if in_turn else range(3):
            seq[q] += 1
            rows = [c.to_json() for c in builders[q].build("", None).counts]
            fold.update({"partition": q, "seq": seq[q], "epoch": 1, "watermark": wm[q],
                         "caught_up": caught_up, "rows": rows})  # fmt: skip
    return fold


def assert_the_monitors_loop_test(fold: ModelWide, monitor: FeedbackMonitor) -> None:
    """The fold's periods through the leader's path (a capture carrying them, computed where the
    snapshot is read) give the loop test of the monitor that saw every prediction."""
    capture = monitor.capture()
    capture.loop_history = fold.loop_history()
    got = capture.compute().features[("m", "group")].feedback_loop
    want = monitor.snapshot().features[("m", "group")].feedback_loop
    assert got is not None and want is not None
    assert got.amplifying and want.amplifying and got.group == want.group == "D"
    assert got.pairs == want.pairs and got.statistic == want.statistic
    assert abs(got.value - want.value) < 1e-12


def test_the_loop_test_runs_on_the_whole_stream_like_the_monitor() -> None:
    """The feedback_loop scenario split over three partitions' builders, folded: the same loop
    estimate as one monitor that saw every prediction (period 100 s, a multiple of the slot)."""
    fs = FeedbackSettings(period=100.0)
    monitor = FeedbackMonitor(KEYS, fs)
    fold = fold_loop_stream(fs, n=120_000, seed=1, every=500, in_turn=False, caught_up=False, monitor=monitor)
    assert_the_monitors_loop_test(fold, monitor)


def test_caught_up_partitions_checkpointing_at_different_times_fold_like_one_monitor() -> None:
    """Every partition caught up (a live stream), each publishing at its own moments: a slot or
    loop period closes only once every partition's message has passed it, so no row counts late
    and the fold's loop test equals the monitor's that saw every prediction."""
    fs = FeedbackSettings(period=100.0)
    monitor = FeedbackMonitor(KEYS, fs)
    # each partition publishes every 900 predictions, 300 after the one before
    fold = fold_loop_stream(fs, n=120_000, seed=1, every=300, in_turn=True, caught_up=True, monitor=monitor)
    assert_the_monitors_loop_test(fold, monitor)


def test_the_loop_periods_do_not_depend_on_when_partitions_publish() -> None:
    """A period that is not a multiple of the slot (50 s, 20 s slots) takes its last slot whole:
    three caught-up partitions publishing in turn close the same periods with the same counts as
    the same rows published in a few large batches (a backlog). Before, a period closed at its own
    end, and the rest of its last slot counted in the next period when it came later."""
    fs = FeedbackSettings(period=50.0)
    live = fold_loop_stream(fs, n=60_000, seed=2, every=100, in_turn=True, caught_up=True)
    backlog = fold_loop_stream(fs, n=60_000, seed=2, every=7_000, in_turn=True, caught_up=False)
    # the backlog's engine waits for its slowest partition: it has closed fewer periods so far
    a, b = live.loop_history()[("m", "group")], backlog.loop_history()[("m", "group")]
    assert len(b) >= 8 and a[: len(b)] == b


def test_caught_up_partitions_publishing_in_turn_raise_what_the_whole_stream_raises() -> None:
    """The verdict engine side of the same rule: three caught-up partitions, one publishing per
    slot in turn (each holds up to three slots' rows), raise exactly the whole stream's events."""
    scenario = SCENARIOS["bias_onset"](tpr_drop=0.3, label_delay_mean_s=30.0, onset_fraction=0.3)
    stream = draw(scenario, 30_000, seed=3, rate_per_s=200.0)
    whole = VerdictEngine(KEYS, SETTINGS)
    fold = ModelWide(KEYS, SETTINGS)
    fold.expect(3)
    held: list[list] = [[], [], []]
    seq = [0, 0, 0]
    for i, inc in enumerate(increments(stream, SETTINGS)):
        whole.update(inc)
        for j, c in enumerate(inc.counts):
            held[j % 3].append(c.to_json())
        for q in [i % 3] if inc.watermark is not None else range(3):
            seq[q] += 1
            fold.update({"partition": q, "seq": seq[q], "epoch": 1, "watermark": inc.watermark,
                         "caught_up": True, "rows": held[q]})  # fmt: skip
            held[q] = []
    whole.flush()
    fold.engine.flush()
    got = [(e.kind, e.feature, e.disparity, e.group, e.ts) for e in fold.engine.events]
    want = [(e.kind, e.feature, e.disparity, e.group, e.ts) for e in whole.events]
    assert got == want and any(k == "alarm_raised" and g == "E" for k, _, _, g, _ in got)


def _msg(p: int, seq: int, epoch: int, wm: float | None, up: bool, **extra: object) -> dict:
    row = ["m", ["A"], 0, 0, [5, 5], [0, 0, 0, 0], [], [], 5.0]
    return {
        "partition": p,
        "seq": seq,
        "epoch": epoch,
        "watermark": wm,
        "caught_up": up,
        "rows": [row],
        **extra,
    }


def test_a_zombie_owner_is_fenced_and_a_new_owner_is_held_until_caught_up() -> None:
    fold = ModelWide(KEYS, SETTINGS)
    fold.expect(2)
    fold.update(_msg(0, 1, 1, 100.0, False))
    fold.update(_msg(1, 1, 1, 50.0, True))  # idle and caught up: follows partition 0
    assert fold.engine.watermark == 100.0
    # partition 1 moves: its new owner (epoch 2) is restoring, its first message not caught up
    assert fold.update(_msg(1, 2, 2, 60.0, False))
    assert fold.engine.watermark == 60.0  # the lift is taken back: slots wait for partition 1
    # the old owner (epoch 1) publishes late: fenced, nothing counted
    assert not fold.update(_msg(1, 3, 1, 500.0, True)) and fold.fenced == 1
    assert fold.engine.watermark == 60.0


def test_a_silent_caught_up_partition_is_held_again() -> None:
    fold = ModelWide(KEYS, SETTINGS)
    fold.expect(2)
    fold.update(_msg(1, 1, 1, 10.0, True), now=0.0)
    fold.update(_msg(0, 1, 1, 100.0, False), now=1.0)
    assert fold.engine.watermark == 10.0  # lifted to the newest at its own message: 10
    fold.update(_msg(1, 2, 1, 10.0, True), now=10.0)  # its heartbeat: lifted to partition 0's 100
    assert fold.engine.watermark == 100.0
    fold.release(now=200.0)  # partition 1 not heard for 200 s: its owner may be gone
    assert fold.engine.watermark == 10.0


def test_a_new_incarnation_restarts_the_sequence() -> None:
    fold = ModelWide(KEYS, SETTINGS)
    assert fold.update(_msg(0, 7, 3, 10.0, False, incarnation="a"))
    assert not fold.update(_msg(0, 2, 3, 20.0, False, incarnation="a"))  # a duplicate
    assert fold.update(_msg(0, 1, 1, 20.0, False, incarnation="b"))  # the state started over
    assert fold.applied[0] == 1


def test_increments_bin_scores_as_score_bins_index_on_every_edge() -> None:
    """The verdict's score bins are the histograms' (ScoreBins.index, exact at the edges): a score
    on an edge or next to one, or out of range, lands in the same bin in both."""
    import numpy as np

    from stream_fair.verdict import IncrementBuilder, ScoreBins

    for bins in (ScoreBins(0.0, 1.0, 50), ScoreBins(0.0, 1.0, 20), ScoreBins(-1.0, 3.0, 7)):
        e = bins.edges()
        scores = [float(x) for x in np.concatenate([e, np.nextafter(e, -np.inf), np.nextafter(e, np.inf)])]
        scores += [0.58, 0.29, 0.57, -7.0, 9.0]
        for score in scores:
            builder = IncrementBuilder(period=3600.0, slot=300.0, bins=bins)
            builder.add_labelled("m", ("a",), 1, 1, 10.0, 20.0, score)
            builder.add_labelled("m", ("a",), 0, 0, 10.0, 20.0, score)
            (row,) = builder.build("p0", None).counts
            want = [0] * bins.count
            want[bins.index(score)] = 1
            assert list(row.positive_scores) == want and list(row.negative_scores) == want, (bins, score)
