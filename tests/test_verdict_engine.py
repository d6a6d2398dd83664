"""The verdict engine on simulated streams: detection, silence, hysteresis, determinism, splits, state."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from stream_fair.dev.arrays import Stream, draw, increments
from stream_fair.dev.simulate import SCENARIOS, generate
from stream_fair.feedback import FeedbackMonitor, FeedbackSettings
from stream_fair.feedback.alert import AlertCondition
from stream_fair.feedback.change import ChangeSettings
from stream_fair.groups import feature_keys
from stream_fair.sequential import SequentialSettings
from stream_fair.verdict import CellCounts, Increment, ScoreBins, VerdictEngine, VerdictSettings
from stream_fair.verdict.increments import BINS_ERROR, VERSION_ERROR
from stream_fair.verdict.strata import group_weights

EO = "equal_opportunity_difference"
DP = "demographic_parity_difference"
KEYS = feature_keys(["group", "sex"], [])


def run(stream: Stream, settings: VerdictSettings | None = None) -> VerdictEngine:
    s = settings or VerdictSettings()
    engine = VerdictEngine(KEYS, s)
    for inc in increments(stream, s):
        engine.update(inc)
    engine.flush()
    return engine


def raises(engine: VerdictEngine) -> list[tuple[str, str, str, str]]:
    return [(e.feature, e.disparity, e.group, e.direction) for e in engine.events if e.kind == "alarm_raised"]


def post_onset_labels(stream: Stream, onset: int, ts: float) -> int:
    """E's predictions made from the onset whose label had arrived by ``ts``."""
    is_e = stream.group("group") == "E"
    after = np.arange(stream.ts.size) >= onset
    return int((is_e & after & stream.labelled & (stream.outcome_ts <= ts)).sum())


def test_arrays_are_the_events_generate_yields() -> None:
    scenario = SCENARIOS["label_delays"]()
    stream = draw(scenario, 9_000, seed=4, rate_per_s=50.0)  # crosses a chunk boundary
    preds = [p for k, p in generate(scenario, 9_000, seed=4) if k == "prediction"]
    outcomes = {p["id"]: p for k, p in generate(scenario, 9_000, seed=4) if k == "outcome"}
    # generate rounds event times to the millisecond for its payloads
    assert np.allclose([p["ts"] for p in preds], stream.ts, rtol=0, atol=5.01e-4)
    assert [p["prediction"] for p in preds] == stream.pred.astype(int).tolist()
    assert [p["score"] for p in preds] == stream.score.tolist()
    assert [tuple(p["attributes"].values()) for p in preds] == [stream.cells[c] for c in stream.cell]
    labelled = [p["id"] in outcomes for p in preds]
    assert labelled == stream.labelled.tolist()
    got = [outcomes[p["id"]]["ts"] for p, lab in zip(preds, labelled, strict=True) if lab]
    assert np.allclose(got, stream.outcome_ts[stream.labelled], rtol=0, atol=5.01e-4)


def test_raises_equal_opportunity_for_the_dropped_group_with_its_change_point() -> None:
    n = 200_000
    stream = draw(SCENARIOS["bias_onset_delayed"](), n, seed=7)
    engine = run(stream)
    onset_ts = float(stream.ts[n // 2])
    first = engine.events[0]
    assert raises(engine)[:2] == [
        ("group", EO, "E", "below"),
        ("group", "equalized_odds_difference", "E", "below"),
    ]
    assert first.rate == "true_positive_rate" and first.statistic >= first.threshold
    assert first.change_point_ts is not None and abs(first.change_point_ts - onset_ts) < 3 * 3600
    assert first.group_value is not None and first.rest_value is not None
    assert first.group_value < first.rest_value - 0.05
    assert (
        first.evidence["group_trials"] > 100
        and first.evidence["rest_trials"] > first.evidence["group_trials"]
    )
    # raised at the event time of its evidence, after the onset, within the goal's reach
    assert onset_ts < first.ts <= float(np.nanmax(stream.outcome_ts[stream.outcome_ts <= stream.ts[-1]]))
    assert post_onset_labels(stream, n // 2, first.ts) < 3_000
    assert all(f == "group" and g == "E" for f, _, g, _ in raises(engine))  # nothing else
    status = engine.alarms()[("m", "group", EO)]
    assert status.flagged and status.raised_by == (("E", "true_positive_rate"),) and status.raised_total == 1


def test_scores_make_detection_faster() -> None:
    """The score chain carries more per labelled positive than the decision alone."""
    n = 200_000
    with_scores, decisions = [], []
    for seed in (1, 2, 3):
        stream = draw(SCENARIOS["bias_onset_delayed"](), n, seed=seed)
        for out, s in ((with_scores, VerdictSettings()), (decisions, VerdictSettings(use_scores=False))):
            ev = next(e for e in run(stream, s).events if e.disparity == EO and e.group == "E")
            out.append(post_onset_labels(stream, n // 2, ev.ts))
    assert np.mean(with_scores) < 0.85 * np.mean(decisions)


def _legacy_raises(stream: Stream) -> set[str]:
    """What the old per-replica default (cumulative labelled pairs, arrival order) raises on ``group``."""
    alert = AlertCondition(SequentialSettings(alpha=0.025), ChangeSettings(alpha=0.025))
    lab = np.flatnonzero(stream.labelled & (stream.outcome_ts <= stream.ts[-1]))
    lab = lab[np.argsort(stream.outcome_ts[lab], kind="stable")]
    groups = stream.group("group")[lab]
    quad = np.array([[2, 3], [1, 0]])[stream.pred[lab].astype(int), stream.label[lab].astype(int)]
    cum = {g: np.zeros(4, dtype=np.int64) for g in "ABCDE"}
    out: set[str] = set()
    for lo in range(0, lab.size, 1000):
        for g, q in zip(groups[lo : lo + 1000], quad[lo : lo + 1000], strict=True):
            cum[g][q] += 1
        out |= {d for d, a in alert.check({g: c.tolist() for g, c in cum.items()}, 0.0).items() if a.flagged}
    return out


@pytest.mark.parametrize(
    ("name", "overrides", "legacy"),
    [
        # positives labelled later, by a group-dependent factor: DP from labelled pairs is censored
        ("label_delays", {}, DP),
        # every group's TPR drops; E's labels come after 6 h, the others' after 5 days
        (
            "model_change",
            {"label_delay_mean_s": 5 * 86400.0, "label_delay_mean_by_cell": {"group=E": 6 * 3600.0}},
            EO,
        ),
    ],
)
def test_silent_where_the_old_default_fires(name: str, overrides: dict[str, Any], legacy: str) -> None:
    n = 300_000
    old_fired = 0
    for seed in (11, 12):
        stream = draw(SCENARIOS[name](**overrides), n, seed=seed)
        assert raises(run(stream)) == []
        old_fired += legacy in _legacy_raises(stream)
    assert old_fired >= 1  # the streams are hard: the old per-replica alarm raises a false alarm


def test_false_raises_stay_within_the_bound() -> None:
    """At a loose level (expected false raises per run <= 0.5), over many fair runs."""
    s = VerdictSettings(alpha=0.5, horizon=12 * 3600.0)  # the horizon is the run: 12 cohorts
    fair = SCENARIOS["fair"](features={"group": {"A": 0.7, "B": 0.2, "C": 0.1}})
    keys = feature_keys(["group"], [])
    runs = []
    for i in range(40):
        engine = VerdictEngine(keys, s)
        for inc in increments(draw(fair, 21_600, seed=100 + i, rate_per_s=0.5), s):
            engine.update(inc)
        runs.append(raises(engine))
        assert engine._h == pytest.approx(math.log(12 / 0.5))
    assert sum(len(r) for r in runs) / len(runs) <= 0.5


def _two_phase(seed: int) -> tuple[Stream, float]:
    """E's TPR 0.8 -> 0.5 for the first 3 days, then fixed (a fair model) for 5 days."""
    biased = draw(SCENARIOS["bias_onset_delayed"](tpr_drop=0.3, onset_index=0), 260_000, seed=seed)
    fixed = draw(SCENARIOS["bias_onset_delayed"](tpr_drop=0.0), 430_000, seed=seed + 1)
    shift = biased.ts[-1] + 1.0 - fixed.ts[0]
    fixed = replace(fixed, ts=fixed.ts + shift, outcome_ts=fixed.outcome_ts + shift)
    fields = ("ts", "cell", "label", "pred", "score", "labelled", "outcome_ts")
    joined = Stream(
        *(np.concatenate([getattr(biased, f), getattr(fixed, f)]) for f in fields),
        cells=biased.cells,
        names=biased.names,
    )
    return joined, float(biased.ts[-1])


def test_one_incident_per_change_then_cleared_once_fixed() -> None:
    stream, fixed_at = _two_phase(seed=21)
    engine = run(stream)
    eo = [e for e in engine.events if e.disparity == EO]
    assert [(e.kind, e.group) for e in eo] == [("alarm_raised", "E"), ("alarm_cleared", "E")]
    raised, cleared = eo
    assert raised.ts < fixed_at < cleared.ts
    assert cleared.change_point_ts is not None and cleared.change_point_ts >= fixed_at - 3600
    assert cleared.statistic >= cleared.threshold and cleared.direction == "below"
    det = engine.detectors()[("m", "group", "E", "true_positive_rate")]
    assert (det.raised_total, det.cleared_total, det.flagged) == (1, 1, False)


def test_a_persistent_gap_is_one_incident_without_flapping() -> None:
    n = 500_000  # 5.8 days, the gap from day 1.2 on
    stream = draw(SCENARIOS["bias_onset_delayed"](onset_index=100_000), n, seed=5)
    engine = run(stream)
    eo = [e for e in engine.events if e.disparity == EO]
    assert [e.kind for e in eo] == ["alarm_raised"]
    status = engine.alarms()[("m", "group", EO)]
    assert status.flagged and status.raised_total == 1
    d = engine.detectors()[("m", "group", "E", "true_positive_rate")]
    assert d.clear_statistic is not None and d.clear_statistic < d.clear_threshold


def test_same_increments_same_results_and_state_round_trip() -> None:
    n = 150_000
    stream = draw(SCENARIOS["bias_onset_delayed"](onset_index=50_000), n, seed=3)
    s = VerdictSettings()
    incs = list(increments(stream, s))
    whole = VerdictEngine(KEYS, s)
    for inc in incs:
        whole.update(inc)
    again = VerdictEngine(KEYS, s)
    resumed = VerdictEngine(KEYS, s)
    for i, inc in enumerate(incs):
        again.update(Increment.from_json(json.loads(json.dumps(inc.to_json()))))
        if i == len(incs) // 2:  # a new leader restores the checkpoint and replays the rest
            resumed = VerdictEngine.from_state(json.loads(json.dumps(resumed.to_state())), KEYS, s)
        resumed.update(inc)
    assert whole.events and whole.events == again.events == resumed.events
    assert json.dumps(whole.to_state()) == json.dumps(resumed.to_state()) == json.dumps(again.to_state())
    assert whole.detectors() == resumed.detectors() and whole.alarms() == resumed.alarms()


def _split(incs: list[Increment], sources: int, seed: int, late: float = 0.0) -> list[Increment]:
    """The same rows from ``sources`` sources, in pieces, interleaved; ``late`` of them delayed."""
    rnd = random.Random(seed)
    out: list[Increment] = []
    held: list[CellCounts] = []
    for inc in incs:
        pieces: list[list[Increment]] = [[] for _ in range(sources)]
        rows = list(inc.counts)
        rnd.shuffle(rows)
        for k in range(sources):
            mine = [r for i, r in enumerate(rows) if i % sources == k]
            if late:
                held += [r for r in mine if rnd.random() < late]
                mine = [r for r in mine if r not in held]
            cut = rnd.randint(0, len(mine))
            pieces[k] = [
                Increment(f"p{k}", None, tuple(mine[:cut])),
                Increment(f"p{k}", inc.watermark, tuple(mine[cut:])),
            ]
        while any(pieces):
            k = rnd.choice([i for i, p in enumerate(pieces) if p])
            out.append(pieces[k].pop(0))
        if held and rnd.random() < 0.3:  # rows that missed their slot arrive behind the watermark
            out.append(Increment("p0", inc.watermark, tuple(held)))
            held = []
    return out


def test_alarms_do_not_depend_on_how_the_stream_is_split() -> None:
    n = 200_000
    stream = draw(SCENARIOS["bias_onset_delayed"](), n, seed=9)
    s = VerdictSettings()
    incs = list(increments(stream, s))
    one = VerdictEngine(KEYS, s)
    for inc in incs:
        one.update(inc)
    three = VerdictEngine(KEYS, s)
    for inc in _split(incs, 3, seed=1):
        three.update(inc)
    assert one.events and three.events == one.events
    # some rows behind the watermark: the same alarms, within one slot
    lagging = VerdictEngine(KEYS, s)
    for inc in _split(incs, 3, seed=2, late=0.02):
        lagging.update(inc)
    lagging.flush()
    assert raises(lagging) == raises(one)
    for a, b in zip(lagging.events, one.events, strict=True):
        assert abs(a.ts - b.ts) <= s.slot + 1e-6


def _thirds(row: CellCounts, rnd: random.Random) -> list[CellCounts]:
    """``row``'s counts cut in three rows (as three checkpoints of its partition would publish)."""
    vec = np.array(row.predictions + row.labelled + row.positive_scores + row.negative_scores)
    a = np.array([rnd.randint(0, v) for v in vec])
    b = np.array([rnd.randint(0, v) for v in vec - a])
    out = []
    for part in (a, b, vec - a - b):
        v = [int(x) for x in part]
        pos = len(row.positive_scores)
        out.append(
            replace(
                row,
                predictions=(v[0], v[1]),
                labelled=(v[2], v[3], v[4], v[5]),
                positive_scores=tuple(v[6 : 6 + pos]),
                negative_scores=tuple(v[6 + pos :]),
            )
        )
    return out


def test_an_open_slot_keeps_one_row_per_cell_and_cohort_and_decides_the_same() -> None:
    """Rows wait in their slot until every source has passed it; they are summed as they come,
    so the queue (and the leader's checkpoint, which writes it) is bounded by the cells, not by
    how many increments arrive before the slot closes."""
    stream = draw(SCENARIOS["bias_onset_delayed"](), 120_000, seed=5)
    s = VerdictSettings()
    incs = list(increments(stream, s))
    rnd = random.Random(4)
    rows = [part for inc in incs for r in inc.counts for part in _thirds(r, rnd)]
    rnd.shuffle(rows)
    held = VerdictEngine(KEYS, s)
    for i in range(0, len(rows), 50):  # no source passes a slot: every row waits
        held.update(Increment(f"p{i % 3}", None, tuple(rows[i : i + 50])))
    state = held.to_state()
    queued = [r for _, by_slot in state["pending"] for r in by_slot]
    assert 3 * len(queued) == len(rows) == 3 * sum(len(inc.counts) for inc in incs)
    # what a version that queued every row saved is summed when restored
    by_slot: dict[int, list[Any]] = {}
    for r in rows:
        by_slot.setdefault(r.slot, []).append(r.to_json())
    unsummed = VerdictEngine.from_state({**state, "pending": list(by_slot.items())}, KEYS, s)
    assert json.dumps(unsummed.to_state()) == json.dumps(state)
    # and the summed rows decide exactly what the whole rows did one slot at a time
    one = VerdictEngine(KEYS, s)
    for inc in incs:
        one.update(inc)
    one.flush()
    restored = VerdictEngine.from_state(json.loads(json.dumps(state)), KEYS, s)
    for engine in (held, restored):
        engine.flush()
        assert engine.events and engine.events == one.events
        assert engine.detectors() == one.detectors() and engine.alarms() == one.alarms()


def test_a_backlog_in_one_increment_gives_the_same_events_at_their_evidence_time() -> None:
    n = 200_000
    stream = draw(SCENARIOS["bias_onset_delayed"](), n, seed=9)
    s = VerdictSettings()
    incs = list(increments(stream, s))
    live = VerdictEngine(KEYS, s)
    for inc in incs:
        live.update(inc)
    backlog = VerdictEngine(KEYS, s)
    rows = tuple(r for inc in incs for r in inc.counts)
    backlog.update(Increment("p0", incs[-1].watermark, rows))  # read in one go, watermark at the end
    assert backlog.events == live.events
    first = backlog.events[0]
    assert first.ts < float(incs[-1].watermark or 0.0) - 12 * 3600  # at its evidence, hours earlier


def test_memory_is_bounded() -> None:
    s = VerdictSettings()
    sizes = []
    for n in (100_000, 270_000):
        engine = run(draw(SCENARIOS["group_delays"](), n, seed=2), s)
        for model in engine._models.values():
            assert all(len(d.open) <= s.open_cohorts + 1 for d in model.detectors.values())
            assert len(model.budget) <= 2 * (s.open_cohorts + 1)
        assert not engine._pending
        sizes.append(len(json.dumps(engine.to_state())))
    assert sizes[1] < 1.5 * sizes[0]  # 2.7 times the stream, about the same state


def test_demographic_parity_needs_no_labels_and_two_groups_are_one_hypothesis() -> None:
    s = VerdictSettings(bins=ScoreBins(count=0))
    engine = VerdictEngine(feature_keys(["sex"], []), s)
    rows = []
    for hour in range(24):  # predictions only; F's selection rate falls at hour 8
        rows += [
            CellCounts(
                "m", ("F",), hour, hour * 6, (700, 300) if hour < 8 else (800, 200), max_ts=3600.0 * hour
            ),
            CellCounts("m", ("M",), hour, hour * 6, (700, 300), max_ts=3600.0 * hour),
        ]
    engine.update(Increment("p0", 86400.0, tuple(rows)))
    assert [(e.disparity, e.group, e.direction) for e in engine.events] == [(DP, "F", "below")]
    assert set(engine.detectors()) == {("m", "sex", "F", "selection_rate")}  # no labels, one side


def test_small_groups_get_more_of_alpha() -> None:
    before = np.zeros((3, 6))
    before[:, 0] = [800, 150, 50]
    w = group_weights(["A", "B", "C"], before, "traffic", 0.01)
    assert w.sum() == pytest.approx(1.0) and w[2] > w[1] > w[0]
    assert w[2] / w[0] == pytest.approx(16.0)
    assert group_weights(["A", "B", "C"], before, "uniform", 0.01).tolist() == pytest.approx([1 / 3] * 3)
    assert group_weights(["F", "M"], before[:2], "traffic", 0.01).tolist() == [1.0, 0.0]


def test_increments_are_versioned_json_and_errors_name_the_fix() -> None:
    inc = Increment(
        "p3", 1200.0, (CellCounts("m", ("F", "x"), 0, 1, (1, 2), (0, 1, 0, 0), (), (0, 1), 601.5),)
    )
    assert Increment.from_json(json.loads(json.dumps(inc.to_json()))) == inc
    with pytest.raises(ValueError, match="version"):
        Increment.from_json({**inc.to_json(), "version": 99})
    assert "version 99" in VERSION_ERROR.format(got=99, want=1)
    engine = VerdictEngine(KEYS, VerdictSettings(bins=ScoreBins(count=4)))
    with pytest.raises(ValueError, match="configure the same bins"):
        engine.update(inc)
    assert "has 2 bins" in BINS_ERROR.format(got=2, want=4)
    two = VerdictEngine(KEYS, VerdictSettings(bins=ScoreBins(count=2)))
    two.update(replace(inc, watermark=None))  # its row waits in an open slot
    with pytest.raises(ValueError, match="configure the same bins"):  # not summed cut short
        VerdictEngine.from_state(two.to_state(), KEYS, engine.settings)
    with pytest.raises(ValueError, match="same feature keys"):
        VerdictEngine.from_state(engine.to_state(), feature_keys(["sex"], []), engine.settings)


def test_verdict_imports_neither_kafka_nor_prometheus() -> None:
    code = (
        "import sys, stream_fair.verdict\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('kafka', 'prometheus_client')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_monitor_pages_with_the_engine_and_keeps_it_in_its_state() -> None:
    scenario = SCENARIOS["bias_onset_delayed"](onset_index=40_000, label_delay_mean_s=900.0)
    keys = feature_keys(["group", "sex"], [])
    settings = FeedbackSettings(period=3600.0)
    monitor = FeedbackMonitor(keys, settings)
    monitors = [monitor]
    pending: dict[str, tuple[tuple[str, ...], int, float, float]] = {}
    for i, (kind, ev) in enumerate(generate(scenario, 120_000, seed=4, rate_per_s=1.0)):
        for m in monitors:
            if kind == "prediction":
                cell = (ev["attributes"]["group"], ev["attributes"]["sex"])
                pending[ev["id"]] = (cell, ev["prediction"], ev["ts"], ev["score"])
                m.on_prediction("m", cell, ev["prediction"], ev["ts"])
            else:
                cell, p, ts, score = pending[ev["id"]]
                m.on_joined("m", cell, p, ev["label"], ts, ev["ts"], score)
        if i == 100_000:  # a restart: the restored monitor carries on beside the original
            state = json.loads(json.dumps(monitor.to_state()))
            monitors.append(FeedbackMonitor.from_state(state, keys, settings))
    snap = monitor.snapshot()
    alarm = snap.features[("m", "group")].alarms[EO]
    assert alarm.flagged and alarm.group == "E" and alarm.rate == "true_positive_rate"
    assert alarm.raised_total == 1 and alarm.reason == "E true_positive_rate"
    assert snap.groups[("m", "group", "E")].change_alarms["true_positive_rate"].flagged
    assert not snap.features[("m", "sex")].alarms[EO].flagged
    assert [e.kind for e in snap.alarm_events][:1] == ["alarm_raised"]
    again = monitors[1].snapshot()
    assert again.alarm_events == snap.alarm_events
    assert again.features[("m", "group")].alarms == snap.features[("m", "group")].alarms


def _late_rows(cohort: int, hour: int, c_tpr: float, n: tuple[int, int, int]) -> list[CellCounts]:
    """One cohort's labelled pairs of groups A, B (TPR 0.8) and C, arriving at ``hour``."""
    out = []
    for g, pos in zip("ABC", n, strict=True):
        tp = round(pos * (0.8 if g != "C" else c_tpr))
        out.append(
            CellCounts(
                "m", (g,), cohort, hour * 6, (900, 300), (tp, 100, 900, pos - tp), max_ts=hour * 3600.0 + 1
            )
        )
    return out


def _tpr_events(late: bool, schedule: Any, hours: int) -> list[tuple[str, float]]:
    s = VerdictSettings(bins=ScoreBins(count=0), use_scores=False, rates=("true_positive_rate",))
    e = VerdictEngine(feature_keys(["group"], []), s)
    for hour in range(hours):
        e.update(Increment("p0", (hour + 1) * 3600.0, tuple(schedule(hour, late))))
    return [(x.kind, x.ts / 3600.0) for x in e.events if x.disparity == "equal_opportunity_difference"]


def test_late_labels_from_before_a_change_do_not_clear_its_alarm() -> None:
    """Review finding: labels of cohorts already folded into the detectors' prefix reached every
    track, also the clear track, which must only see cohorts after the raise. C's TPR drops to 0.5
    at cohort 10 and stays there; a late backfill of cohorts 0-9 (no gap then) cleared the alarm."""

    def schedule(hour: int, late: bool) -> list[CellCounts]:
        big = (1000, 1000, 500)
        rows = _late_rows(hour, hour, 0.8 if hour < 10 else 0.5, big if 10 <= hour < 15 else (100, 100, 50))
        if late and hour >= 46:  # the rest of cohorts 0..9's labels, two days late
            for c in range(2 * (hour - 46), 2 * (hour - 46) + 2):
                rows += _late_rows(c, hour, 0.8, (4000, 4000, 2000))
        return rows

    prompt = _tpr_events(False, schedule, 52)
    assert prompt and all(kind == "alarm_raised" for kind, _ in prompt)
    assert _tpr_events(True, schedule, 52) == prompt


def test_late_labels_of_a_cleared_incident_do_not_raise_it_again() -> None:
    """After a clear, the raise tracks start at cohorts after it (a recurrence is new evidence):
    a late backfill of the incident's own cohorts raised it a second time."""

    def schedule(hour: int, late: bool) -> list[CellCounts]:
        rows = (
            _late_rows(hour, hour, 0.5, (300, 300, 150))
            if 10 <= hour < 13
            else _late_rows(hour, hour, 0.8, (1000, 1000, 500))
        )
        if late and hour >= 54:
            rows += _late_rows(10 + (hour - 54) % 3, hour, 0.5, (3000, 3000, 1500))
        return rows

    prompt = _tpr_events(False, schedule, 60)
    assert [kind for kind, _ in prompt][-1] == "alarm_cleared"
    assert _tpr_events(True, schedule, 60) == prompt
