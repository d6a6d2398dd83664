"""Score histograms per (model, feature, group): against numpy on the same events, across
partitions, after a restart from the local store and after a restore from the changelog records."""

from __future__ import annotations

import random
import tempfile
from typing import Any

import numpy as np
import orjson
import pytest

from stream_fair.config import Config
from stream_fair.groups import feature_keys
from stream_fair.histograms import NBINS, ScoreHistogram, edges
from stream_fair.state.codec import meta_key
from stream_fair.state.restore import PartitionRestore
from stream_fair.state.rocks import RocksBackend
from stream_fair.tracker import Tracker
from tests.helpers import LocalTracker

TTL = 500.5
FEATURES = {"sex": ["F", "M"], "race": ["A", "B", "C"]}


def config() -> Config:
    return Config.model_validate(
        {
            "fairness": {"features": list(FEATURES), "intersections": [["race", "sex"]]},
            "join": {"ttl": TTL},
        }
    )


def make_stream(n: int, seed: int) -> tuple[list[tuple[int, str, bytes]], list[dict[str, Any]]]:
    """(partition, topic, raw) in event-time order, and the truth per prediction."""
    rng = random.Random(seed)
    events: list[tuple[float, int, str, bytes]] = []
    truth = []
    for i in range(n):
        attrs = {f: rng.choice(v) for f, v in FEATURES.items()}
        ts = float(1000 + i)
        r = rng.random()
        score: float | None = (
            rng.random() if r < 0.9 else (rng.choice([-0.4, 1.3, 7.0]) if r < 0.95 else None)
        )
        predicted = int(score is not None and score >= 0.5) if rng.random() < 0.9 else int(rng.random() < 0.5)
        label = int(rng.random() < (score if score is not None and 0 <= score <= 1 else 0.5))
        # a label within the ttl, or never
        delay = rng.uniform(1, 400) if rng.random() < 0.6 else None
        part = i % 3
        doc: dict[str, Any] = {
            "id": f"r{i}",
            "ts": ts,
            "model": "m",
            "prediction": predicted,
            "attributes": attrs,
        }
        if score is not None:
            doc["score"] = score
        events.append((ts, part, "predictions", orjson.dumps(doc)))
        if rng.random() < 0.05:  # a duplicate: counted once
            events.append((ts + 0.5, part, "predictions", orjson.dumps(doc)))
        if delay is not None:
            events.append(
                (
                    ts + delay,
                    part,
                    "outcomes",
                    orjson.dumps({"id": f"r{i}", "ts": ts + delay, "label": label}),
                )
            )
        truth.append(
            {
                "ts": ts,
                "part": part,
                "attrs": attrs,
                "score": score,
                "predicted": predicted,
                "label": label,
                "labelled_at": None if delay is None else ts + delay,
            }
        )
    events.sort(key=lambda e: e[0])
    return [(p, t, raw) for _, p, t, raw in events], truth


def feed(t: Tracker, events: list[tuple[int, str, bytes]], offsets: dict[tuple[int, str], int]) -> None:
    for p, topic, raw in events:
        o = offsets.get((p, topic), 0)
        offsets[(p, topic)] = o + 1
        (t.update_prediction if topic == "predictions" else t.update_outcome)(p, raw, o)


def oracle(
    truth: list[dict[str, Any]], feature: list[str], nows: dict[int, float]
) -> dict[str, dict[str, np.ndarray]]:
    """numpy histograms per group of what is known when each partition ``p`` has read its events
    up to event time ``nows[p]`` (expiry follows each partition's own event time)."""
    e = edges()
    out: dict[str, dict[str, np.ndarray]] = {}
    by: dict[str, list[dict[str, Any]]] = {}
    for row in truth:
        if row["ts"] > nows.get(row["part"], -1) or row["score"] is None:
            continue
        row = {**row, "now": nows[row["part"]]}
        by.setdefault("&".join(row["attrs"][f] for f in feature), []).append(row)
    for g, rows in by.items():
        s = np.clip(np.array([r["score"] for r in rows]), 0.0, 1.0)
        now = np.array([r["now"] for r in rows])
        labelled = np.array([r["labelled_at"] is not None and r["labelled_at"] <= r["now"] for r in rows])
        y = np.array([r["label"] for r in rows])
        pred = np.array([r["predicted"] for r in rows])
        expired = ~labelled & (np.array([r["ts"] for r in rows]) + TTL < now)
        pending = ~labelled & ~expired

        def h(mask: np.ndarray, s: np.ndarray = s) -> np.ndarray:
            return np.histogram(s[mask], bins=e)[0]

        out[g] = {
            "predictions": h(np.ones(len(rows), bool)),
            "positives": h(labelled & (y == 1)),
            "negatives": h(labelled & (y == 0)),
            "pending1": h(pending & (pred == 1)),
            "pending0": h(pending & (pred == 0)),
            "expired": h(expired),
            "out_of_range": np.array([sum(1 for r in rows if not 0 <= r["score"] <= 1)]),
        }
    return out


def check(hists: dict[str, ScoreHistogram], want: dict[str, dict[str, np.ndarray]]) -> None:
    assert set(hists) == set(want)
    for g, w in want.items():
        h = hists[g]
        np.testing.assert_array_equal(h.predictions, w["predictions"], err_msg=g)
        np.testing.assert_array_equal(h.positives, w["positives"], err_msg=g)
        np.testing.assert_array_equal(h.negatives, w["negatives"], err_msg=g)
        np.testing.assert_array_equal(h.pending(1), w["pending1"], err_msg=g)
        np.testing.assert_array_equal(h.pending(0), w["pending0"], err_msg=g)
        np.testing.assert_array_equal(h.pending(), w["pending1"] + w["pending0"], err_msg=g)
        np.testing.assert_array_equal(h.expired, w["expired"], err_msg=g)
        assert h.out_of_range == int(w["out_of_range"][0])


@pytest.mark.parametrize("seed", [1, 2])
def test_histograms_match_numpy_at_every_checkpoint(seed: int) -> None:
    cfg = config()
    keys = feature_keys(list(FEATURES), [["race", "sex"]])
    events, truth = make_stream(3000, seed)
    t = LocalTracker(cfg)
    offsets: dict[tuple[int, str], int] = {}
    step = 700
    for start in range(0, len(events), step):
        chunk = events[start : start + step]
        feed(t, chunk, offsets)
        snap = t.snapshot()
        nows: dict[int, float] = {}
        for p, _, raw in events[: start + len(chunk)]:
            nows[p] = max(nows.get(p, -1.0), orjson.loads(raw)["ts"])
        for key in keys:
            names = [k for k in FEATURES if k in key.name.split("&")]
            order = [key.name.split("&")[i] for i in range(len(key.indices))]
            check(snap.score_histograms(key)["m"], oracle(truth, order if len(order) > 1 else names, nows))
    assert snap.score_histograms(keys[0])["m"]["F"].edges.shape == (NBINS + 1,)


def test_histograms_survive_a_restart_and_a_changelog_restore() -> None:
    cfg = config()
    keys = feature_keys(list(FEATURES), [["race", "sex"]])
    events, _ = make_stream(2000, 7)
    path = tempfile.mkdtemp()
    t = LocalTracker(cfg, path)
    offsets: dict[tuple[int, str], int] = {}
    log: dict[int, list[tuple[bytes, bytes | None]]] = {}
    for start in range(0, len(events), 500):
        feed(t, events[start : start + 500], offsets)
        cp = t.checkpoint()
        for sc in cp.shards:  # the changelog order of the run loop: data, then the meta alone
            log.setdefault(sc.partition, []).extend(sc.changelog)
            log[sc.partition].append((meta_key(sc.partition), orjson.dumps(sc.meta)))
        t.commit(cp)
    before = {k.name: t.snapshot().score_histograms(k)["m"] for k in keys}
    assert sum(int(h.pending().sum()) for h in before["sex"].values()) > 0
    t.backend.close()

    again = LocalTracker(cfg, path)
    for p in range(3):
        again.shard(p)
    for k in keys:
        got = again.snapshot().score_histograms(k)["m"]
        assert set(got) == set(before[k.name])
        for g, h in got.items():
            np.testing.assert_array_equal(h.counts, before[k.name][g].counts)
    again.backend.close()

    fresh = RocksBackend(tempfile.mkdtemp())
    for p, records in log.items():
        r = PartitionRestore(fresh, p, epoch=0, full=True, ttl=TTL, outcome_ttl=TTL)
        for offset, (key, value) in enumerate(records):
            r.feed(offset, key, value, 0)
        r.finish()
    restored = Tracker(cfg, fresh)
    for p in range(3):
        restored.shard(p)
    snap = restored.snapshot()
    for k in keys:
        got = snap.score_histograms(k)["m"]
        for g, h in got.items():
            np.testing.assert_array_equal(h.counts, before[k.name][g].counts)
        assert set(got) == set(before[k.name])


def test_the_report_serves_histograms_by_model_and_feature_name() -> None:
    from stream_fair.report import build_report

    cfg = config()
    events, truth = make_stream(600, 3)
    t = LocalTracker(cfg)
    feed(t, events, {})
    report = build_report(t.snapshot(), cfg)
    by_group = report.score_histograms("m", "race&sex")
    scored = [r for r in truth if r["score"] is not None]
    assert sum(int(h.predictions.sum()) for h in by_group.values()) == len(scored)
    assert set(by_group) == {f"{r['attrs']['race']}&{r['attrs']['sex']}" for r in scored}
    assert report.score_histograms("other-model", "sex") == {}
    with pytest.raises(KeyError):
        report.score_histograms("m", "nope")


def test_out_of_range_scores_are_exported_per_partition() -> None:
    from stream_fair.exporter import PipelineStats, registry_for
    from stream_fair.report import build_report

    cfg = config()
    events, truth = make_stream(900, 4)
    t = LocalTracker(cfg)
    feed(t, events, {})
    reg = registry_for(lambda: (build_report(t.snapshot(), cfg), PipelineStats()))
    for p in range(3):
        want = sum(1 for r in truth if r["part"] == p and r["score"] is not None and not 0 <= r["score"] <= 1)
        assert want > 0
        got = reg.get_sample_value(
            "stream_fair_scores_out_of_range_total", {"model": "m", "partition": str(p)}
        )
        assert got == want


def test_a_score_on_an_edge_counts_in_the_bin_a_threshold_there_selects() -> None:
    """Bin b is [edges[b], edges[b+1]): ``score >= edge`` (how a threshold reads a score) and the
    bin agree for every 4-decimal score, although e.g. 0.58 * 50 is 28.999999999999996 in floats."""
    from stream_fair.histograms import BINS, PartitionHistograms, edges

    e = edges()
    scores = np.concatenate([np.round(np.linspace(0, 1, 10_001), 4), e])
    h = PartitionHistograms()
    for s in scores:
        h.add(0, 1, float(s))
    counts = np.asarray(h.rows[0][1 * BINS.count : 2 * BINS.count])
    for b in range(1, BINS.count):
        # everything at or above edge b is in bins b and up
        assert counts[b:].sum() == int((scores >= e[b]).sum()), b
    assert counts.sum() == len(scores)


def test_a_row_bins_every_score_as_score_bins_index() -> None:
    """PartitionHistograms.add inlines ScoreBins.index (the hot path): the same bin for scores on
    and next to every edge, below 0 and above 1."""
    from stream_fair.histograms import BINS, ROW_LENGTH, PartitionHistograms, edges

    e = edges()
    scores = [float(x) for x in np.concatenate([e, np.nextafter(e, -1), np.nextafter(e, 2)])]
    scores += [-3.5, -1e-300, 1.0000001, 7.0, 0.58, 0.29, 0.57]
    for s in scores:
        h = PartitionHistograms()
        h.add(0, 0, s)
        expected = [0] * ROW_LENGTH
        expected[BINS.index(s)] += 1
        if s < 0 or s > 1:
            expected[-1] += 1
        assert h.rows[0] == expected, s
