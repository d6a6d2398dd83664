"""Feedback indicators against batch references computed by hand on small streams."""

from __future__ import annotations

import math
import random

import numpy as np
import orjson

from stream_fair.feedback import FeedbackMonitor, FeedbackSettings
from stream_fair.feedback.delay import GAMMA, DelayHistogram
from stream_fair.feedback.loop import loop_indicator
from stream_fair.feedback.traffic import exposure_ratios, shares
from stream_fair.groups import feature_keys

KEYS = feature_keys(["sex", "race"], [["race", "sex"]])


def _stream(seed: int, n: int) -> list[tuple]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        cell = (rng.choice("FM"), rng.choice("abc"))
        pred = int(rng.random() < (0.6 if cell[0] == "M" else 0.3))
        fate = rng.random()
        out.append((cell, pred, float(i), rng.random() < 0.4, fate, rng.expovariate(1 / 50)))
    return out


def _run(events: list[tuple], settings: FeedbackSettings) -> FeedbackMonitor:
    m = FeedbackMonitor(KEYS, settings)
    for cell, pred, ts, label, fate, delay in events:
        m.on_prediction("m", cell, pred, ts)
        if fate < 0.7:
            m.on_joined("m", cell, pred, int(label), ts, ts + delay)
        elif fate < 0.9:
            m.on_expired("m", cell, ts)
    return m


def test_coverage_delay_and_counts_match_batch_after_every_step() -> None:
    events = _stream(0, 600)
    settings = FeedbackSettings(period=1e9, min_samples=1, flush_every=7)
    m = FeedbackMonitor(KEYS, settings)
    for k, (cell, pred, ts, label, fate, delay) in enumerate(events):
        m.on_prediction("m", cell, pred, ts)
        if fate < 0.7:
            m.on_joined("m", cell, pred, int(label), ts, ts + delay)
        elif fate < 0.9:
            m.on_expired("m", cell, ts)
        if k % 50 and k != len(events) - 1:
            continue
        snap = m.snapshot()
        seen = events[: k + 1]
        for f in KEYS:
            for grp in {f.group(e[0]) for e in seen}:
                rows = [e for e in seen if f.group(e[0]) == grp]
                joined = [e for e in rows if e[4] < 0.7]
                expired = [e for e in rows if 0.7 <= e[4] < 0.9]
                g = snap.groups[("m", f.name, grp)]
                assert g.predictions == len(rows)
                assert g.positive_predictions == sum(e[1] for e in rows)
                assert (g.joined, g.expired) == (len(joined), len(expired))
                if joined or expired:
                    assert g.label_coverage == len(joined) / (len(joined) + len(expired))
                if joined:
                    delays = sorted(e[5] for e in joined)
                    exact = delays[math.ceil(0.5 * len(delays)) - 1]
                    got = g.label_delay_seconds[0.5]
                    assert exact <= 1 or abs(got / max(exact, 1.0) - 1) <= GAMMA - 1


def test_coverage_gap_flags_selective_labels() -> None:
    rng = random.Random(1)
    m = FeedbackMonitor(KEYS, FeedbackSettings(period=1e9))
    for i in range(20_000):
        cell = (rng.choice("FM"), rng.choice("abc"))
        pred = int(rng.random() < 0.4)
        m.on_prediction("m", cell, pred, float(i))
        # race=c only gets outcomes when approved (selective labels), the others always
        if cell[1] != "c" or pred:
            m.on_joined("m", cell, pred, int(rng.random() < 0.3), float(i), i + 10.0)
        else:
            m.on_expired("m", cell, float(i))
    snap = m.snapshot()
    gap = snap.features[("m", "race")].label_coverage_gap
    assert gap is not None and gap.flagged and abs(gap.value - 0.6) < 0.03
    assert not snap.features[("m", "sex")].label_coverage_gap.flagged  # type: ignore[union-attr]


def test_traffic_share_exposure_and_reference_per_period() -> None:
    settings = FeedbackSettings(period=10.0, reference_periods=1, min_samples=1)
    m = FeedbackMonitor(KEYS, settings)
    # period 0: 8 F (2 positive), 2 M (2 positive); period 1: 5 F (1), 5 M (4); then one event
    for i, (sex, pred) in enumerate([("F", 1)] * 2 + [("F", 0)] * 6 + [("M", 1)] * 2):
        m.on_prediction("m", (sex, "a"), pred, float(i))
    for i, (sex, pred) in enumerate([("F", 1)] + [("F", 0)] * 4 + [("M", 1)] * 4 + [("M", 0)]):
        m.on_prediction("m", (sex, "a"), pred, 10.0 + i)
    m.on_prediction("m", ("F", "a"), 0, 25.0)
    snap = m.snapshot()
    f, mm = snap.groups[("m", "sex", "F")], snap.groups[("m", "sex", "M")]
    assert (f.traffic_share, mm.traffic_share) == (0.5, 0.5)
    assert (f.traffic_share_reference, mm.traffic_share_reference) == (0.8, 0.2)
    # exposure = share of positives / share of traffic = (1/5) / (5/10)
    assert math.isclose(f.exposure_ratio, (1 / 5) / 0.5)  # type: ignore[arg-type]
    assert math.isclose(mm.exposure_ratio, (4 / 5) / 0.5)  # type: ignore[arg-type]
    assert shares({"x": (3, 0), "y": (1, 0)}) == {"x": 0.75, "y": 0.25}
    assert exposure_ratios({"x": (3, 0), "y": (1, 0)}) == {}


def test_selection_rate_trend_matches_ewm_reference() -> None:
    settings = FeedbackSettings(period=10.0, fast_alpha=0.5, slow_alpha=0.1, min_samples=1)
    m = FeedbackMonitor(KEYS, settings)
    rates = [0.2, 0.2, 0.4, 0.6]
    for p, r in enumerate(rates):
        for i in range(10):
            m.on_prediction("m", ("F", "a"), int(i < r * 10), p * 10.0 + i)
    m.on_prediction("m", ("F", "a"), 0, 100.0)
    fast = slow = rates[0]
    for r in rates[1:]:
        fast, slow = 0.5 * r + 0.5 * fast, 0.1 * r + 0.9 * slow
    got = m.snapshot().groups[("m", "sex", "F")].selection_rate_trend
    assert got is not None and math.isclose(got, fast - slow, abs_tol=1e-12)


def test_loop_indicator_matches_numpy_correlation() -> None:
    rng = np.random.default_rng(2)
    periods = []
    for _ in range(10):
        n = rng.integers(200, 400, size=4)
        periods.append({g: (int(k), int(rng.integers(0, k))) for g, k in zip("ABCD", n, strict=True)})
    est = loop_indicator(periods, min_predictions=1, min_periods=5, alpha=0.01)
    xs, ys = [], []
    for a, b in zip(periods, periods[1:], strict=False):
        ta, tb = sum(v[0] for v in a.values()), sum(v[0] for v in b.values())
        x = np.array([a[g][1] / a[g][0] for g in "ABCD"])
        y = np.log(np.array([(b[g][0] / tb) / (a[g][0] / ta) for g in "ABCD"]))
        xs += list(x - x.mean())
        ys += list(y - y.mean())
    ref = float(np.sum(np.array(xs) * ys) / np.sqrt(np.sum(np.square(xs)) * np.sum(np.square(ys))))
    assert est is not None and est.pairs == 36 and math.isclose(est.value, ref, abs_tol=1e-12)


def test_state_round_trips_through_orjson() -> None:
    events = _stream(5, 3000)
    settings = FeedbackSettings(period=300.0, min_samples=10, drift_batch=20)
    a = _run(events[:2000], settings)
    state = orjson.loads(orjson.dumps(a.to_state()))
    b = FeedbackMonitor.from_state(state, KEYS, settings)
    for m in (a, b):
        for cell, pred, ts, label, fate, delay in events[2000:]:
            m.on_prediction("m", cell, pred, ts)
            if fate < 0.7:
                m.on_joined("m", cell, pred, int(label), ts, ts + delay)
    assert a.snapshot() == b.snapshot()


def test_state_holds_no_pickle_and_a_pickled_trend_is_refused() -> None:
    """A state must never run code when loaded: every value is plain data, trends included."""
    import base64
    import pickle

    import pytest

    from stream_fair.feedback.trends import Trend

    a = _run(_stream(5, 2000), FeedbackSettings(period=300.0, min_samples=10, drift_batch=20))
    state = a.to_state()
    assert state["sr_trend"] and state["disp_trend"]

    def leaves(x: object) -> list[object]:
        if isinstance(x, dict):
            return [v for y in x.values() for v in leaves(y)]
        if isinstance(x, (list, tuple)):
            return [v for y in x for v in leaves(y)]
        return [x]

    for v in leaves(state):
        assert v is None or isinstance(v, (bool, int, float, str)), type(v)
        if isinstance(v, str) and len(v) > 8:
            try:
                raw = base64.b64decode(v, validate=True)
            except ValueError:
                continue
            assert not raw.startswith(b"\x80"), f"a pickle in the feedback state: {v[:20]}..."
    old = base64.b64encode(pickle.dumps((1, 2, 3))).decode()
    with pytest.raises(ValueError, match="explicit form"):
        Trend.from_state(old)


def test_no_module_unpickles() -> None:
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1] / "stream_fair"
    for path in root.rglob("*.py"):
        assert "import pickle" not in path.read_text(), f"{path}: states are explicit data, never pickles"


def test_delay_histogram_relative_error() -> None:
    rng = np.random.default_rng(4)
    d = rng.lognormal(6, 2, 5000)
    h = DelayHistogram()
    h.add(d)
    for q in (0.5, 0.9, 0.99):
        exact = np.sort(d)[math.ceil(q * d.size) - 1]
        assert abs(h.quantiles((q,))[0] / exact - 1) <= GAMMA - 1


def test_core_imports_neither_kafka_nor_prometheus() -> None:
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1] / "stream_fair"
    for path in [*root.joinpath("feedback").glob("*.py"), root / "sequential.py"]:
        text = path.read_text()
        assert "import kafka" not in text and "prometheus_client" not in text, path
        assert "confluent_kafka" not in text, path
