"""The stakeholder report (``stream-fair report``) on a simulated stream, against an independent
recount of the same events (plain Python and fairlearn, no stream-fair counting code): per-group
counts, pending labels, rates, disparities of a period and of one step over time; groups below
min samples shown and marked; the content hash and its verification (JSON, HTML, CLI); the
Markdown and JSON content; the HTML rendered by headless Chromium; one-line CLI errors.

The stream is one the simulator does not make by default: label delays and label chances differ
by group (Asian men's outcomes take 10x longer, a fifth of Hispanic women's never come), and
the stream is cut while outcomes are still in flight, so pending labels differ by group.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from fairlearn.metrics import MetricFrame, selection_rate, true_positive_rate

from stream_fair import report_render as render
from stream_fair import svg
from stream_fair.config import Config
from stream_fair.dev import simulate
from stream_fair.report_sources import collect
from stream_fair.stakeholder_report import (
    DEFINITIONS,
    ERR_NOT_KEPT,
    Period,
    ReportError,
    ReportInputs,
    assemble,
    content_hash,
    iso,
    parse_period,
    verify,
)
from tests.helpers import LocalTracker, free_port, run_cli, write_config

FEATURES = ("sex", "race", "age")
RES = 600.0  # window_resolution
MIN_SAMPLES = 250
CUT_S = 6000.0  # event time of the stream's last record, from its start
START = 1_790_000_400.0  # a bucket edge
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _config() -> Config:
    return Config.model_validate(
        {
            "fairness": {
                "features": [
                    {"name": "sex", "reference": "Male"},
                    {"name": "race", "reference": "White"},
                    "age",
                ],
                "intersections": [["race", "sex"]],
                "min_samples": MIN_SAMPLES,
            },
            "windows": ["6h"],
            "window_resolution": "10m",
            "join": {"ttl": "3650d"},  # nothing expires: the recount's fates are exact
        }
    )


def _stream() -> list[tuple[str, dict[str, Any]]]:
    scenario = simulate.SCENARIOS["lending"](
        label_delay_mean_s=300.0,
        label_delay_mean_by_cell={"race=Asian&sex=Male": 3000.0},
        label_prob_by_cell={"race=Hispanic&sex=Female": 0.8},
    )
    events = simulate.generate(scenario, 20_000, seed=11, start_ts=START, rate_per_s=2.0)
    return [(k, p) for k, p in events if p["ts"] <= START + CUT_S]


@pytest.fixture(scope="module")
def fed(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Config, ReportInputs, list[tuple[str, dict[str, Any]]]]:
    """The report's inputs after a local tracker consumed the stream (checkpoints as it goes)."""
    cfg = _config()
    tracker = LocalTracker(cfg, str(tmp_path_factory.mktemp("state")))
    events = _stream()
    offsets = [0, 0]
    for i, (kind, payload) in enumerate(events):
        topic = 0 if kind == "prediction" else 1
        update = tracker.update_prediction if topic == 0 else tracker.update_outcome
        update(0, orjson.dumps(payload), offsets[topic])
        offsets[topic] += 1
        if i % 1500 == 0:
            tracker.snapshot()
    snap = tracker.snapshot()
    parts = collect(snap, tracker, tracker.model_counts)
    inputs = ReportInputs(
        config=cfg,
        cumulative=parts["cumulative"],
        buckets=parts["buckets"],
        partitions=parts["partitions"],
        source="test: local tracker",
        taken_at=parts["taken_at"],
        software_version="0.1.0",
        alarm_events=[],
        last_bucket=parts["last_bucket"],
    )
    assert parts["partitions"][0]["next_offsets"] == offsets
    return cfg, inputs, events


# -- the independent recount ----------------------------------------------------------------------
def _pairs(events: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per prediction: its attributes, time, decision and label (None: no outcome yet)."""
    labels = {p["id"]: int(p["label"]) for k, p in events if k == "outcome"}
    return [
        {**p["attributes"], "ts": p["ts"], "y_pred": int(p["prediction"]), "y_true": labels.get(p["id"])}
        for k, p in events
        if k == "prediction"
    ]


def _group(row: dict[str, Any], feature: str) -> str:
    return "&".join(str(row[f]) for f in feature.split("&"))


def _recount(rows: list[dict[str, Any]], feature: str) -> dict[str, dict[str, int]]:
    out: dict[str, Counter[str]] = defaultdict(Counter)
    for r in rows:
        c = out[_group(r, feature)]
        c["predictions"] += 1
        c["positive_predictions"] += r["y_pred"]
        if r["y_true"] is None:
            c["pending"] += 1
        else:
            c["labelled"] += 1
            c[{(1, 1): "tp", (0, 1): "fp", (0, 0): "tn", (1, 0): "fn"}[r["y_true"], r["y_pred"]]] += 1
    return {g: dict(c) for g, c in out.items()}


def _in(rows: list[dict[str, Any]], start: float, end: float) -> list[dict[str, Any]]:
    """Predictions whose bucket lies in ``[start, end)`` (edges on bucket boundaries)."""
    return [r for r in rows if start <= math.floor(r["ts"] / RES) * RES < end]


def _check_counts(doc: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    for f in doc["features"]:
        expected = _recount(rows, f["feature"])
        got = {g["group"]: g for g in f["groups"]}
        assert set(got) == set(expected), f["feature"]
        for g, e in expected.items():
            r = got[g]
            for k in ("predictions", "positive_predictions", "labelled", "pending"):
                assert r[k] == e.get(k, 0), (f["feature"], g, k, r[k], e.get(k, 0))
            assert r["confusion"] == {k: e.get(k, 0) for k in ("tp", "fp", "tn", "fn")}
            assert r["expired"] == 0
            assert r["below_min_samples"] == (e.get("labelled", 0) < MIN_SAMPLES)


def _check_rates(doc: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """Every group's rates and the between-groups differences against fairlearn."""
    labelled = [r for r in rows if r["y_true"] is not None]
    for f in doc["features"]:
        groups = np.array([_group(r, f["feature"]) for r in labelled])
        y_true = np.array([r["y_true"] for r in labelled])
        y_pred = np.array([r["y_pred"] for r in labelled])
        frame = MetricFrame(
            metrics={"selection_rate": selection_rate, "true_positive_rate": true_positive_rate},
            y_true=y_true,
            y_pred=y_pred,
            sensitive_features=groups,
        )
        for g in f["groups"]:
            for rate in ("selection_rate", "true_positive_rate"):
                assert g["rates"][rate]["value"] == pytest.approx(frame.by_group[rate][g["group"]], abs=1e-6)
        eligible = [g["group"] for g in f["groups"] if not g["below_min_samples"]]
        keep = np.isin(groups, eligible)
        if len(eligible) < 2:
            continue
        sub = MetricFrame(
            metrics={"sr": selection_rate, "tpr": true_positive_rate},
            y_true=y_true[keep],
            y_pred=y_pred[keep],
            sensitive_features=groups[keep],
        )
        diff = sub.difference(method="between_groups")
        d = {(x["disparity"], x["method"]): x for x in f["disparities"]}
        assert d["demographic_parity_difference", "between_groups"]["value"] == pytest.approx(
            diff["sr"], abs=1e-6
        )
        assert d["equal_opportunity_difference", "between_groups"]["value"] == pytest.approx(
            diff["tpr"], abs=1e-6
        )


def test_all_data_matches_an_independent_recount(fed: Any) -> None:
    cfg, inputs, events = fed
    doc = assemble(inputs)
    rows = _pairs(events)
    _check_counts(doc, rows)
    _check_rates(doc, rows)
    totals = doc["summary"]["totals"]["credit-v3"]
    assert totals["predictions"] == len(rows)
    assert totals["pending"] == sum(r["y_true"] is None for r in rows) > 0
    # pending labels differ by group as the stream was made: Asian men wait longest
    rs = {g["group"]: g for f in doc["features"] if f["feature"] == "race&sex" for g in f["groups"]}
    share = {g: r["pending"] / r["predictions"] for g, r in rs.items()}
    assert max(share, key=share.__getitem__) in ("Asian&Male", "Hispanic&Female"), share
    # the biased intersection is flagged, the marginals are not
    flagged = {(x["feature"], x["disparity"]) for x in doc["summary"]["flagged"]}
    assert ("race&sex", "equal_opportunity_difference") in flagged
    assert not any(f in ("sex", "race") for f, _ in flagged)


def test_a_period_matches_the_recount_of_its_predictions(fed: Any) -> None:
    cfg, inputs, events = fed
    start, end = START + 1200.0, START + 3600.0
    doc = assemble(inputs, Period(start + 100.0, end - 50.0))  # widened to the bucket edges
    assert (doc["period"]["prediction_time_from"], doc["period"]["prediction_time_to"]) == (
        iso(start),
        iso(end),
    )
    assert doc["audit"]["period"]["from"] == doc["period"]["prediction_time_from"]
    rows = _in(_pairs(events), start, end)
    _check_counts(doc, rows)
    _check_rates(doc, rows)
    # a short period has small groups: shown, marked, kept out of the disparities
    small = [(x["feature"], x["group"]) for x in doc["unknown"]["groups_below_min_samples"]]
    assert ("race&sex", "Asian&Female") in small
    rs = next(f for f in doc["features"] if f["feature"] == "race&sex")
    af = next(g for g in rs["groups"] if g["group"] == "Asian&Female")
    assert af["below_min_samples"] and not af["eligible"] and af["rates"]


def test_the_last_window_is_a_period_the_report_can_cover(fed: Any) -> None:
    """``--last 6h`` with ``windows: [6h]`` (the documented ``--last 1d`` with the default 1d):
    ending now, inside the newest bucket, it starts inside the bucket just before the oldest one
    kept. It was refused ("counts are kept only from ..."); it now starts at the oldest bucket."""
    cfg, inputs, events = fed
    res, span = cfg.window_resolution, round(max(cfg.windows) / cfg.window_resolution)
    last = max(inputs.buckets)
    now = last * res + res / 3  # the clock inside the newest bucket
    doc = assemble(replace(inputs, last_bucket=last), Period(now - max(cfg.windows), now))
    oldest = last - span + 1
    assert doc["period"]["prediction_time_from"] == iso(oldest * res)
    assert "from the oldest bucket kept" in doc["period"]["basis"]
    rows = _in(_pairs(events), oldest * res, (last + 1) * res)
    _check_counts(doc, rows)
    # a start a whole bucket earlier is still refused
    with pytest.raises(ReportError):
        assemble(replace(inputs, last_bucket=last), Period(now - max(cfg.windows) - res, now))
    # a period wholly inside the bucket before the oldest kept is refused, not an empty report
    before = (oldest - 1) * res
    with pytest.raises(ReportError):
        assemble(replace(inputs, last_bucket=last), Period(before + 1.0, before + res / 2))


def test_each_step_over_time_matches_the_recount(fed: Any) -> None:
    cfg, inputs, events = fed
    doc = assemble(inputs)
    rows = _pairs(events)
    series = {(s["feature"], s["disparity"]): s for s in doc["over_time"]}
    eo = series["race&sex", "equal_opportunity_difference"]
    assert eo["step_seconds"] == RES and len(eo["points"]) == math.ceil(CUT_S / RES)
    for p in eo["points"][2:5]:
        step = [r for r in _in(rows, p["t"], p["t"] + RES) if r["y_true"] is not None]
        groups = np.array([_group(r, "race&sex") for r in step])
        counts = Counter(groups.tolist())
        keep = np.isin(groups, [g for g, n in counts.items() if n >= MIN_SAMPLES])
        y = np.array([r["y_true"] for r in step])[keep]
        yp = np.array([r["y_pred"] for r in step])[keep]
        if len(set(groups[keep].tolist())) < 2:
            assert p["value"] is None
            continue
        frame = MetricFrame(metrics=true_positive_rate, y_true=y, y_pred=yp, sensitive_features=groups[keep])
        assert p["value"] == pytest.approx(frame.difference(method="between_groups"), abs=1e-6)


def test_alarms_are_marked_while_raised(fed: Any) -> None:
    cfg, inputs, _ = fed
    first = min(inputs.buckets) * RES
    ev = {
        "model": "credit-v3",
        "feature": "race&sex",
        "disparity": "equal_opportunity_difference",
        "group": "Black&Female",
        "rate": "true_positive_rate",
    }
    events = [
        {**ev, "seq": 1, "kind": "alarm_raised", "ts": first + 2 * RES + 10},
        {**ev, "seq": 2, "kind": "alarm_cleared", "ts": first + 5 * RES + 10},
    ]

    doc = assemble(replace(inputs, alarm_events=events))
    eo = next(
        s
        for s in doc["over_time"]
        if s["feature"] == "race&sex" and s["disparity"] == "equal_opportunity_difference"
    )
    assert [p["alarm_raised"] for p in eo["points"][:8]] == [
        False,
        False,
        True,
        True,
        True,
        True,
        False,
        False,
    ]
    other = next(s for s in doc["over_time"] if s["feature"] == "sex")
    assert not any(p["alarm_raised"] for p in other["points"])
    assert doc["summary"]["alarms_raised_in_period"] == 1
    assert len(doc["alarms"]["events_in_period"]) == 2
    html = render.to_html(doc)
    assert html.count('class="alarm" ') == 0 or True  # dots are circles with class alarm
    assert len(re.findall(r'<circle class="alarm"', html)) >= 3


# -- root cause, unconfigured intersections -------------------------------------------------------
def test_every_flagged_difference_is_explained(fed: Any) -> None:
    _, inputs, _ = fed
    doc = assemble(inputs)
    wanted = {
        (f["feature"], f["disparity"])
        for f in doc["summary"]["flagged"]
        if f["method"] == "between_groups" and f["disparity"].endswith("_difference")
    }
    explained = doc["signals"]["root_cause"]["data"]["explained"]
    assert {(x["feature"], x["disparity"]) for x in explained} == wanted and wanted
    for x in explained:
        assert "error" not in x, x
        drivers = x["drivers"]
        age = [d for d in drivers["ranked"] if d["by"] == "age"]
        assert sum(d["contribution"] for d in age) == pytest.approx(drivers["gap"], abs=1e-4)
        assert x["group"] == "Black&Female"
    md = render.to_markdown(doc)
    assert "Black&Female's true_positive_rate against the rest of the feature" in md
    assert "| traffic mix |" in md


def test_an_unconfigured_intersection_is_found_and_counted(fed: Any) -> None:
    cfg, inputs, events = fed

    plain = Config.model_validate(
        {**cfg.model_dump(by_alias=True), "fairness": {**cfg.fairness.model_dump(), "intersections": []}}
    )
    doc = assemble(replace(inputs, config=plain))
    assert [f["feature"] for f in doc["features"]] == ["sex", "race", "age"]
    found = doc["signals"]["unconfigured_intersections"]["data"]["models"]["credit-v3"]["findings"]
    top = found[0]
    assert (top["intersection"], top["group"], top["rate"], top["direction"]) == (
        "sex&race",
        "Female&Black",
        "true_positive_rate",
        "below",
    )
    # its evidence, recounted: Black women with a positive outcome, and those approved
    rows = [r for r in _pairs(events) if r["y_true"] == 1]
    bf = [r for r in rows if (r["sex"], r["race"]) == ("Female", "Black")]
    assert (top["trials"], top["successes"]) == (len(bf), sum(r["y_pred"] for r in bf))
    assert top["rest_trials"] == len(rows) - len(bf)
    html = render.to_html(doc)
    assert "add [&#x27;sex&#x27;, &#x27;race&#x27;] to fairness.intersections" in html
    assert "holm-corrected" in render.to_markdown(doc)


# -- definitions, unknowns, signals ---------------------------------------------------------------
def test_every_metric_shown_is_defined_and_unknowns_are_stated(fed: Any) -> None:
    _, inputs, _ = fed
    doc = assemble(inputs)
    shown = {r for f in doc["features"] for g in f["groups"] for r in g["rates"]}
    shown |= {d["disparity"] for f in doc["features"] for d in f["disparities"]}
    shown |= {
        "label_coverage",
        "pending",
        "expired",
        "min_samples",
        "flagged",
        "alarm",
        "between_groups",
        "to_reference",
    }
    assert shown <= set(DEFINITIONS), shown - set(DEFINITIONS)
    assert doc["definitions"] == dict(DEFINITIONS)
    for name, sig in doc["signals"].items():  # never silently omitted
        assert sig["available"] is (name in ("root_cause", "unconfigured_intersections")), name
        assert sig["available"] or sig["reason"], name
    assert doc["unknown"]["pending_labels"]["credit-v3"] > 0
    assert doc["unknown"]["estimated_values"] == []


def test_markdown_and_json_content(fed: Any) -> None:
    _, inputs, _ = fed
    doc = assemble(inputs, Period(START + 1200.0, START + 3600.0))
    md = render.to_markdown(doc)
    assert md.startswith("# stream-fair fairness report: credit-v3")
    assert doc["audit"]["content_hash"]["value"] in md
    assert doc["audit"]["config_fingerprint"]["value"] in md
    rs = next(f for f in doc["features"] if f["feature"] == "race&sex")
    for g in rs["groups"]:
        line = next(
            ln for ln in md.splitlines() if ln.startswith(f"| {g['group']} |") and str(g["predictions"]) in ln
        )
        assert str(g["labelled"]) in line and str(g["pending"]) in line
        assert ("below min samples" in line) == g["below_min_samples"]
    for term in ("selection_rate", "true_positive_rate", "equal_opportunity_difference", "label_coverage"):
        assert f"- **{term}**: " in md
    for section in (
        "## What is not known yet",
        "## Audit trail",
        "## Threshold what-ifs",
        "## Root cause of the flagged disparities",
    ):
        assert section in md
    assert "Not available: " in md
    text = render.to_json(doc)
    back = json.loads(text)
    assert back == doc and verify(back)
    assert back["audit"]["partitions"][0]["next_offsets"][0] > 0


# -- the content hash -----------------------------------------------------------------------------
def test_the_content_hash_is_verifiable_and_catches_an_edit(fed: Any, tmp_path: Path) -> None:
    _, inputs, _ = fed
    doc = assemble(inputs)
    # the definition an auditor can apply without stream-fair
    body = json.loads(json.dumps(doc))
    recorded = body["audit"].pop("content_hash")
    import hashlib

    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    assert hashlib.sha256(canonical.encode()).hexdigest() == recorded["value"] == content_hash(doc)

    good = tmp_path / "report.json"
    good.write_text(render.to_json(doc), encoding="utf-8")
    ok = run_cli("report", "--verify", str(good))
    assert ok.returncode == 0 and ok.stdout.startswith("ok: "), ok.stderr
    bad = json.loads(good.read_text())
    bad["features"][0]["groups"][0]["labelled"] += 1
    (tmp_path / "bad.json").write_text(json.dumps(bad), encoding="utf-8")
    failed = run_cli("report", "--verify", str(tmp_path / "bad.json"))
    assert (
        failed.returncode == 1
        and failed.stderr.startswith("FAILED: ")
        and len(failed.stderr.splitlines()) == 1
    )

    html = render.to_html(doc)
    (tmp_path / "report.html").write_text(html, encoding="utf-8")
    assert run_cli("report", "--verify", str(tmp_path / "report.html")).returncode == 0
    # a number edited in the visible HTML (not in the embedded document) is caught by re-rendering
    total = str(doc["summary"]["totals"]["credit-v3"]["predictions"])
    edited = html.replace(f"<td>{total}</td>", f"<td>{int(total) - 1}</td>", 1)
    assert edited != html
    (tmp_path / "edited.html").write_text(edited, encoding="utf-8")
    assert run_cli("report", "--verify", str(tmp_path / "edited.html")).returncode == 1


# -- errors ---------------------------------------------------------------------------------------
def test_bad_periods_are_one_line_errors(fed: Any) -> None:
    _, inputs, _ = fed
    cases: tuple[dict[str, str], ...] = (
        {"since": "yesterday"},
        {"last": "forever"},
        {"since": "2026-01-02", "until": "2026-01-01"},
        {"last": "1h", "since": "1"},
    )
    for kwargs in cases:
        with pytest.raises(ReportError) as err:
            parse_period(kwargs.get("since"), kwargs.get("until"), kwargs.get("last"))
        assert len(str(err.value).splitlines()) == 1 and "--from" in str(err.value)
    with pytest.raises(ReportError) as err:
        assemble(inputs, Period(START - 86400.0, START))
    assert str(err.value).startswith(ERR_NOT_KEPT.split("{")[0]) and "\n" not in str(err.value)


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    port = free_port()
    cases = [
        ("report", "--url", f"http://127.0.0.1:{port}", "-o", str(tmp_path / "r.html")),
        ("report", "--url", f"http://127.0.0.1:{port}", "--last", "forever"),
        ("report", "--url", f"http://127.0.0.1:{port}", "--from", "noon"),
        ("report",),
        ("report", "--input", str(tmp_path / "saved.json"), "--last", "1h"),
        ("report", "--input", str(tmp_path / "missing.json")),
        (
            "report",
            "--config",
            str(
                write_config(
                    tmp_path / "c.yaml",
                    {"fairness": {"features": ["sex"]}, "state": {"path": str(tmp_path / "none")}},
                )
            ),
        ),
    ]
    for args in cases:
        proc = run_cli(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("stream-fair: report error: "), (args, proc.stderr)
    assert "cannot reach" in run_cli(*cases[0]).stderr
    assert not (tmp_path / "r.html").exists()


# -- the HTML in a browser ------------------------------------------------------------------------
def _rgb(colour: str) -> tuple[int, int, int]:
    return (int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16))


@pytest.fixture(scope="module")
def page(fed: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str, dict[str, Any]]]:
    _, inputs, _ = fed

    first = START + 1200.0  # a short period: some groups are below min samples
    ev = {
        "model": "credit-v3",
        "feature": "race&sex",
        "disparity": "equal_opportunity_difference",
        "group": "Black&Female",
        "rate": "true_positive_rate",
        "statistic": 12.0,
        "threshold": 9.2,
        "change_point_ts": first,
        "group_value": 0.5,
        "rest_value": 0.76,
        "evidence": {},
        "direction": "below",
    }
    events = [{**ev, "seq": 1, "kind": "alarm_raised", "ts": first + 2 * RES}]
    doc = assemble(replace(inputs, alarm_events=events), Period(first, START + 3600.0))
    assert doc["unknown"]["groups_below_min_samples"]
    out = tmp_path_factory.mktemp("html") / "report.html"
    text = render.to_html(doc)
    out.write_text(text, encoding="utf-8")
    yield out, text, doc


def test_html_is_self_contained_with_every_chart(page: Any) -> None:
    _, text, doc = page
    assert not re.search(r"https?://|@import|url\(", text.split('<script type="application/json"')[0], re.I)
    assert not re.search(r"<(link|img|iframe)\b", text, re.I)
    assert len(re.findall(r"<script", text)) == 1 and 'type="application/json"' in text  # data, not code
    n_features = len(doc["features"])
    assert len(re.findall(r'<svg class="forest"', text)) == n_features
    assert len(re.findall(r'<svg class="coverage"', text)) == n_features
    assert len(re.findall(r'<svg class="spark"', text)) == len(doc["over_time"]) > 0
    rs = re.split(r"(?=<h[23][ >])", text)
    for f in doc["features"]:
        head = f"<h3>{f['model']} · {f['feature']}".replace("&", "&amp;")
        section = next(s for s in rs if s.startswith(head))
        [forest] = re.findall(r'<svg class="forest".*?</svg>', section, re.S)
        assert (svg.FLAGGED in forest) == any(
            d["flagged"] and d["method"] == "between_groups" for d in f["disparities"]
        )
        small = sum(g["below_min_samples"] for g in f["groups"])
        assert section.count("<span class=small>below min samples</span>") == small, f["feature"]
        assert forest.count(f'stroke="{svg.MUTED}"') == small * 3 - sum(  # grey: every rate it has
            3
            - len(
                [
                    r
                    for r in ("selection_rate", "true_positive_rate", "false_positive_rate")
                    if r in g["rates"]
                ]
            )
            for g in f["groups"]
            if g["below_min_samples"]
        )
    assert render.verify_html(text)


def test_screenshot_shows_the_charts(page: Any, tmp_path: Path) -> None:
    if CHROMIUM is None:
        pytest.fail(
            "chromium is not installed: apt-get install --no-install-recommends chromium (scripts/test does)"
        )
    import subprocess

    from tests.test_status_page import _colours, decode_png

    path, _, _ = page
    png = tmp_path / "report.png"
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={png}", "--window-size=1280,3600", "--hide-scrollbars", path.as_uri(),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert png.exists(), proc.stderr[-2000:]
    width, height, rows = decode_png(png.read_bytes())
    colours = _colours(rows)
    background, n = colours.most_common(1)[0]
    assert min(background) >= 0xF0 and n < 0.97 * width * height
    assert sum(c for rgb, c in colours.items() if max(rgb) < 0x60) > 5_000  # text
    assert colours.get((0xFD, 0xE2, 0xE1), 0) > 200, "no flagged badge"
    assert colours.get(_rgb(svg.BAND), 0) > 2_000, "no disparity-over-time bands"
    assert colours.get(_rgb(svg.INTERVAL), 0) > 1_000, "no lines or intervals"
    assert colours.get(_rgb(svg.REFERENCE), 0) > 50, "no thresholds or reference lines"
    assert colours.get(_rgb(svg.FLAGGED), 0) > 20, "no alarm marks"
    assert colours.get(_rgb(svg.LABELLED), 0) > 1_000, "no label-coverage bars"


# -- /report.json behind TLS and basic auth -------------------------------------------------------
from tests.test_web import cert as cert  # noqa: E402  (the fixture: a self-signed certificate)


def test_report_json_has_the_same_tls_and_auth_as_metrics(fed: Any, cert: Path, tmp_path: Path) -> None:
    import time

    import bcrypt
    import yaml

    from stream_fair.exporter import ExporterServer, Health, PipelineStats, registry_for
    from stream_fair.report import build_report
    from stream_fair.tracker import Snapshot
    from stream_fair.web import load_web_config

    cfg, inputs, _ = fed
    hashed = bcrypt.hashpw(b"pw for reports", bcrypt.gensalt(rounds=4)).decode()
    web = tmp_path / "web.yml"
    web.write_text(
        yaml.safe_dump(
            {
                "tls_server_config": {"cert_file": str(cert / "tls.crt"), "key_file": str(cert / "tls.key")},
                "basic_auth_users": {"auditor": hashed},
            }
        )
    )
    health = Health()
    health.heard(time.monotonic())
    reg = registry_for(lambda: (build_report(Snapshot(time.time(), {}), cfg), PipelineStats()))
    server = ExporterServer(
        "127.0.0.1", 0, reg, health, report=lambda q: (200, assemble(inputs)), web=load_web_config(web)
    ).start()
    url = f"https://127.0.0.1:{server.port}"
    (tmp_path / "pw").write_text("pw for reports\n")
    (tmp_path / "bad").write_text("guess\n")
    try:
        ok = run_cli(
            "report", "--url", url, "--user", "auditor", "--password-file", str(tmp_path / "pw"),
            "--cacert", str(cert / "tls.crt"), "-o", str(tmp_path / "r.json"),
        )  # fmt: skip
        assert ok.returncode == 0, ok.stderr
        assert verify(json.loads((tmp_path / "r.json").read_text()))
        for args in ((), ("--user", "auditor", "--password-file", str(tmp_path / "bad"))):
            denied = run_cli("report", "--url", url, *args, "--cacert", str(cert / "tls.crt"))
            assert denied.returncode == 2 and denied.stderr.count("\n") == 1, denied.stderr
            assert "answered 401: unauthorized: pass --user and --password-file" in denied.stderr
    finally:
        server.stop()
