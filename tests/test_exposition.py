"""The /metrics text: byte for byte prometheus_client's generate_latest, never stale, and cheap to
repeat; the calibrations reused only for unchanged groups."""

from __future__ import annotations

import urllib.request

import numpy as np
import orjson
import pytest
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Enum,
    Gauge,
    Histogram,
    Info,
    Summary,
    generate_latest,
)

from stream_fair.app import _default_feedback
from stream_fair.config import Config
from stream_fair.estimates import CalibrationCache, EstimateSettings, calibrations
from stream_fair.exporter import ExporterServer, FairnessCollector, Health, PipelineStats, registry_for
from stream_fair.exposition import Exposition, Rows, counter, gauge
from stream_fair.label_windows import LabelledHistogram
from stream_fair.report import build_report
from tests.helpers import LocalTracker as Tracker
from tests.helpers import parse_metrics

CFG = Config.model_validate(
    {
        "fairness": {
            "features": [{"name": "sex", "reference": "M"}, "race"],
            "intersections": [["race", "sex"]],
            "min_samples": 5,
        },
        "windows": ["1h"],
    }
)
# group values a label must escape (quote, backslash) or keep as they are (comma, braces, non-ASCII)
RACES = ['A"quoted"', "B\\slash", "C,{x=1}", "Dé"]


def feed(t: Tracker, start: int, n: int) -> None:
    for i in range(start, start + n):
        attrs = {"sex": "FM"[i % 2], "race": RACES[i % len(RACES)]}
        p = {
            "id": f"r{i}",
            "ts": 1000 + i,
            "model": "m",
            "prediction": i % 3 % 2,
            "score": (i % 10) / 10 + 0.05,
            "attributes": attrs,
        }
        t.update_prediction(0, orjson.dumps(p), i)
        t.update_outcome(0, orjson.dumps({"id": f"r{i}", "ts": 1001 + i, "label": i % 5 % 2}), i)


def test_render_is_generate_latest_byte_for_byte_special_characters_included() -> None:
    t = Tracker(CFG, feedback=_default_feedback(CFG))
    feed(t, 0, 400)
    report = build_report(t.snapshot(), CFG)
    reg = registry_for(lambda: (report, PipelineStats(lag={("predictions", 0): 2}, last_checkpoint=5.0)))
    text = Exposition(reg).render()
    assert _without_process(text) == _without_process(generate_latest(reg))
    assert b'group="A\\"quoted\\""' in text and b'group="C,{x=1}"' in text and b'group="B\\\\slash"' in text

    # the standard metric types too: counters' *_created, histograms, summaries, info, enums
    std = CollectorRegistry()
    Counter("c", "a counter\nwith a newline and a \\", ["x"], registry=std).labels(x='q"').inc(3)
    Histogram("h", "a histogram", registry=std).observe(0.3)
    Summary("s", "a summary", ["k"], registry=std).labels(k="v").observe(2.5)
    Info("i", "an info", registry=std).info({"version": "1"})
    Enum("e", "an enum", states=["a", "b"], registry=std).state("b")
    Gauge("g", "big and odd values", ["v"], registry=std).labels(v="x\ny").set(1e300)
    Gauge("g2", "nan", registry=std).set(float("nan"))
    exposition = Exposition(std)
    assert exposition.render() == generate_latest(std)
    assert exposition.render() == generate_latest(std)  # the second time from the cached texts


def test_rows_families_render_and_read_as_prometheus_clients_own_families() -> None:
    """The exporter's families keep (label values, value) rows; rendered, and read through
    ``samples``, they are prometheus_client's GaugeMetricFamily/CounterMetricFamily, render after
    render (prefixes reused, series gone and back, values changed)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    labels = ["zone", "group", "a_first"]  # not in name order: the text sorts them
    rounds = [
        [(["z1", 'A"q"', "x"], 3), (["z1", "B\\s", "y\nz"], 0.25), (["é", "C,{x=1}", ""], float("nan"))],
        [(["z1", 'A"q"', "x"], 4), (["z2", "new", "n"], float("inf"))],  # one gone, one new
        [(["z1", "B\\s", "y\nz"], 1e300), (["z1", 'A"q"', "x"], -2.5), (["z1", 'A"q"', "x"], 7)],
    ]

    def plain(rows: list[tuple[list[str], float]]) -> CollectorRegistry:
        g = GaugeMetricFamily("t_gauge", 'a "gauge"\nwith help to escape \\', labels=labels)
        c = CounterMetricFamily("t_count_total", "a counter", labels=labels)
        e = GaugeMetricFamily("t_empty", "no labels", labels=[])
        for values, v in rows:
            g.add_metric(values, v)
            c.add_metric(values, abs(v) if v == v else v)
        e.add_metric([], len(rows))

        class _C:
            def collect(self) -> list[object]:
                return [g, c, e]

        reg = CollectorRegistry(auto_describe=False)
        reg.register(_C())  # type: ignore[arg-type]
        return reg

    current: list[Rows] = []

    class _Mine:
        def collect(self) -> list[Rows]:
            return current

    exposition = Exposition(_Mine())  # type: ignore[arg-type]
    for rows in rounds:
        g = gauge("t_gauge", 'a "gauge"\nwith help to escape \\', labels=labels)
        c = counter("t_count_total", "a counter", labels=labels)
        e = gauge("t_empty", "no labels", labels=[])
        for values, v in rows:
            g.add_metric(values, v)
            c.add_metric(values, abs(v) if v == v else v)
        e.add_metric([], len(rows))
        current[:] = [g, c, e]
        reference = plain(rows)
        assert exposition.render() == generate_latest(reference)
        assert generate_latest(_registry(current)) == generate_latest(reference)  # through .samples
        mine = [s for f in current for s in f.samples]
        theirs = [s for f in reference.collect() for s in f.samples]
        assert [(s.name, s.labels, s.value) for s in mine] == [(s.name, s.labels, s.value) for s in theirs]

    with pytest.raises(ValueError, match="2 label values"):
        gauge("t_bad", "x", labels=labels).add_metric(["a", "b"], 1.0)


def _registry(families: list[Rows]) -> CollectorRegistry:
    class _C:
        def collect(self) -> list[Rows]:
            return families

    reg = CollectorRegistry(auto_describe=False)
    reg.register(_C())  # type: ignore[arg-type]
    return reg


def test_a_new_report_is_rendered_anew_and_the_same_report_reuses_its_families() -> None:
    t = Tracker(CFG)
    feed(t, 0, 200)
    reports = [build_report(t.snapshot(), CFG)]
    collector = FairnessCollector(lambda: (reports[-1], PipelineStats()))
    reg = CollectorRegistry(auto_describe=False)
    reg.register(collector)  # type: ignore[arg-type]
    exposition = Exposition(reg)

    first = parse_metrics(exposition.render().decode())
    families = [f for f in collector.collect() if f.name.startswith("stream_fair_group")]
    again = [f for f in collector.collect() if f.name.startswith("stream_fair_group")]
    assert families and all(a is b for a, b in zip(families, again, strict=True))
    labels = {"model": "m", "feature": "sex", "group": "F", "window": "cumulative"}
    assert first.get("stream_fair_group_samples", **labels) == 100

    feed(t, 200, 200)  # a new checkpoint: new counts, same label sets
    reports.append(build_report(t.snapshot(), CFG))
    text = exposition.render()
    assert text == generate_latest(reg)
    assert parse_metrics(text.decode()).get("stream_fair_group_samples", **labels) == 200


def test_http_metrics_serves_the_exposition() -> None:
    t = Tracker(CFG)
    feed(t, 0, 100)
    report = build_report(t.snapshot(), CFG)
    reg = registry_for(lambda: (report, PipelineStats()))
    server = ExporterServer("127.0.0.1", 0, reg, Health()).start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=10) as r:
            body = r.read()
        assert _without_process(body) == _without_process(generate_latest(reg))
        s = parse_metrics(body.decode())
        assert (
            s.get("stream_fair_group_samples", model="m", feature="race", group="Dé", window="cumulative")
            == 25
        )
    finally:
        server.stop()


def _without_process(text: bytes) -> bytes:
    """``text`` without the process_* lines (their values move between two renderings)."""
    return b"\n".join(line for line in text.split(b"\n") if b"process_" not in line)


def test_calibration_cache_recomputes_only_changed_groups_and_changes_nothing() -> None:
    rng = np.random.default_rng(4)

    def hist(p: float, n: int) -> LabelledHistogram:
        scores = rng.integers(0, 50, n)
        labels = rng.random(n) < p
        return LabelledHistogram(
            np.bincount(scores[labels], minlength=50), np.bincount(scores[~labels], minlength=50)
        )

    settings = EstimateSettings(min_labelled=50)
    hists = {g: hist(p, 400) for g, p in zip("ABCD", (0.3, 0.5, 0.6, 0.9), strict=True)}
    seed = ("m", "f", "")
    plain = calibrations(hists, settings, key=seed)
    cache = CalibrationCache()
    assert calibrations(hists, settings, key=seed, cache=cache) == plain
    assert (cache.hits, cache.misses) == (0, 4)
    # a group's interval depends on its own counts only: alone, it is the same
    assert calibrations({"B": hists["B"]}, settings, key=seed) == {"B": plain["B"]}

    changed = dict(hists, C=hist(0.6, 450))
    again = calibrations(changed, settings, key=seed, cache=cache)
    assert (cache.hits, cache.misses) == (3, 5)
    assert again == calibrations(changed, settings, key=seed)  # the same as without a cache
    assert again["C"] != plain["C"] and again["C"].samples == 450
    # other settings or level: recomputed, never served from the cache
    calibrations(changed, EstimateSettings(min_labelled=10), key=seed, cache=cache)
    assert cache.misses == 9
