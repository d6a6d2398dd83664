"""The status page of a real detector: its content, its pictures (a forest plot per feature, a
sparkline per disparity), no external assets, and how it renders in headless Chromium (a
screenshot decoded and checked for content and for the pictures' colours, not just for existence).
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import threading
import time
import urllib.request
import uuid
import zlib
from collections import Counter
from collections.abc import Iterator
from html import unescape
from pathlib import Path

import pytest

from stream_fair import svg
from stream_fair.app import Detector
from stream_fair.config import Config
from stream_fair.dev import simulate
from stream_fair.dev.broker import create_topics, produce_events
from tests.conftest import TopicNames
from tests.helpers import detector_config, paced, wait_consumed

pytestmark = pytest.mark.integration

MODEL = "credit-v3"
RACE_SEX = [f"{r}&{s}" for r in ("White", "Black", "Hispanic", "Asian") for s in ("Female", "Male")]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
WIDTH, HEIGHT = 1280, 1600
BIASED_GROUP = "Black&Female"
FLAG_RGB = (0xFD, 0xE2, 0xE1)  # background of a flagged disparity's badge (status_page._CSS)


def _rgb(colour: str) -> tuple[int, int, int]:
    return (int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16))


@pytest.fixture(scope="module")
def page(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """``(url, html)`` of a detector that consumed a lending stream (bias in race&sex)."""
    tmp = tmp_path_factory.mktemp("status")
    tag = uuid.uuid4().hex[:12]
    topics = TopicNames(f"predictions-{tag}", f"outcomes-{tag}", f"dead-letters-{tag}")
    create_topics(kafka_bootstrap, list(topics), partitions=1)
    cfg = detector_config(
        kafka_bootstrap,
        topics,
        f"stream-fair-status-{tag}",
        tmp / "state",
        fairness={
            "features": [{"name": "sex", "reference": "Male"}, {"name": "race", "reference": "White"}, "age"],
            "min_samples": 100,
        },
        state={"checkpoint_interval": "200ms"},  # reports (and sparkline points) follow checkpoints
    )
    detector = Detector(Config.model_validate(cfg), exporter_port=0)
    detector.history.interval = 0.0  # a sparkline point at every new report (default: every 10 s)
    stop = threading.Event()
    thread = threading.Thread(target=detector.run, args=(stop,), name="detector", daemon=True)
    thread.start()
    try:
        scenario = simulate.SCENARIOS["lending"](label_delay_mean_s=5.0)
        events = list(
            simulate.messy(
                simulate.generate(scenario, 8_000, seed=5), seed=5, duplicate_rate=0.002, malformed_rate=0.002
            )
        )
        sent = Counter(kind for kind, _ in events)
        # paced over ~8 s, scraped meanwhile: the sparklines get several points (at 5000/s the
        # race&sex line, defined only once its groups have min_samples labels, got 2-3 points
        # on a quiet machine and 1 in a loaded CI run; at 2000/s 8)
        producer = threading.Thread(
            target=produce_events,
            args=(kafka_bootstrap, topics.predictions, topics.outcomes, paced(events, 2000)),
            daemon=True,
        )
        producer.start()
        wait_consumed(detector.port, (sent["prediction"], sent["outcome"]), timeout=60)
        producer.join(timeout=30)
        url = f"http://127.0.0.1:{detector.port}/"
        with urllib.request.urlopen(url, timeout=10) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/html")
            body = resp.read().decode("utf-8")
        yield url, body
    finally:
        stop.set()
        thread.join(timeout=30)


def _text(html: str) -> str:
    return unescape(re.sub(r"<[^>]+>", " ", html))


def _section(html: str, heading: str) -> str:
    """The HTML from the ``<h2>`` whose text starts with ``heading`` up to the next ``<h2>``."""
    parts = re.split(r"(?=<h2)", html)
    found = [p for p in parts if _text(p).strip().startswith(heading)]
    assert found, f"no section {heading!r}"
    return found[0]


def test_page_shows_every_group_and_the_flagged_intersection(page: tuple[str, str]) -> None:
    _, html = page
    table = _text(_section(html, f"{MODEL} · race&sex"))
    for group in RACE_SEX:
        assert group in table, group
    for header in ("n", "selection", "TPR", "FPR", "accuracy"):
        assert header in table
    flagged = _section(html, "Flagged disparities")
    rows = [_text(r) for r in re.findall(r"<tr>.*?</tr>", flagged)]
    eo = [
        r for r in rows if "race&sex" in r and "equal_opportunity_difference" in r and "between_groups" in r
    ]
    assert eo, rows
    assert not [r for r in rows if re.search(r"\bsex\b", r) and "race&sex" not in r], rows
    assert "Pipeline" in _text(html) and "predictions" in _text(_section(html, "Pipeline"))

    # The verdict on top, and in the race&sex table the cell that makes it: Black women's TPR.
    assert re.search(r"\d+ disparities flagged\s*</span>\s*in credit-v3 · race&amp;sex</p>", html)
    rs = _section(html, f"{MODEL} · race&sex")
    assert "flagged</span></h2>" in rs
    rows = {_text(r).split()[0]: r for r in re.findall(r"<tr><td class=l>.*?</tr>", rs)}
    tpr_column = [re.findall(r"<td[^>]*>", r)[3] for r in rows.values()]  # group, n, sel, TPR
    assert "class=ext" in re.findall(r"<td[^>]*>", rows[BIASED_GROUP])[3]
    assert tpr_column.count("<td class=ext>") == 2  # the lowest and the highest TPR
    for marginal in ("sex", "race"):  # the marginals hide the bias: nothing flagged or marked
        section = _section(html, f"{MODEL} · {marginal} ·")
        assert "flagged" not in _text(section) and "class=ext" not in section


def _svgs(html: str, kind: str) -> list[str]:
    return re.findall(rf'<svg class="{kind}".*?</svg>', html, re.S)


def test_a_forest_plot_per_feature(page: tuple[str, str]) -> None:
    _, html = page
    for feature, groups, reference in (
        ("sex", ["Female", "Male"], "Male"),
        ("race", ["White", "Black", "Hispanic", "Asian"], "White"),
        ("race&sex", RACE_SEX, "White&Male"),
    ):
        section = _section(html, f"{MODEL} · {feature} ·")
        [plot] = _svgs(section, "forest")
        labels = re.findall(r'class="lab">([^<]+)</text>', plot)
        assert sorted(unescape(g) for g in labels) == sorted(groups)
        # three panels (selection, TPR, FPR): an interval and a point per group in each
        assert len(re.findall(r'<line class="ci"', plot)) == 3 * len(groups)
        assert len(re.findall(r'<circle class="pt"', plot)) == 3 * len(groups)
        # the reference line in each panel sits at the reference group's rate
        refs = [float(x) for x in re.findall(r'<line class="ref" x1="([\d.]+)"', plot)]
        assert len(refs) == 3
        rows = dict(
            zip(
                (unescape(g) for g in labels),
                re.findall(r'<circle class="pt" cx="([\d.]+)"', plot)[::3],
                strict=False,
            )
        )
        assert abs(float(rows[reference]) - refs[0]) < 0.2, (rows[reference], refs)
        assert f"dashed line: reference group {reference}" in unescape(section)
    age = _svgs(_section(html, f"{MODEL} · age"), "forest")[0]  # no reference: the pooled rate
    assert "all eligible groups pooled" in age and len(re.findall(r'<line class="ref"', age)) == 3
    # the flagged intersection: Black women's TPR (lowest) and Black men's (highest) drawn in red
    [rs] = _svgs(_section(html, f"{MODEL} · race&sex ·"), "forest")
    red = re.findall(rf'<line class="ci"[^>]*stroke="{svg.FLAGGED}"', rs)
    assert len(red) >= 2, "the ends of the flagged disparity are not marked"
    assert svg.FLAGGED not in _svgs(_section(html, f"{MODEL} · sex ·"), "forest")[0]


def test_a_sparkline_per_disparity(page: tuple[str, str]) -> None:
    _, html = page
    section = _section(html, "Disparities over time")
    cards = re.findall(r"<div class=spark-card>(.*?)</div>", section, re.S)
    titles = [unescape(re.sub(r"<[^>]+>", " ", c.split("<svg")[0])) for c in cards]
    eo = [c for c, t in zip(cards, titles, strict=True) if "race&sex" in t and "equal opportunity" in t]
    assert len(eo) == 1, titles
    line = re.search(r'<polyline class="val" points="([^"]+)"', eo[0])
    assert line is not None and len(line.group(1).split()) >= 2  # a line over several reports
    assert '<line class="thr"' in eo[0] and '<polygon class="band"' in eo[0]
    for feature in ("sex", "race", "age", "race&sex"):
        assert any(f"credit-v3 · {feature} " in t for t in titles), feature


def test_page_links_metrics_and_loads_nothing_external(page: tuple[str, str]) -> None:
    _, html = page
    targets = re.findall(r"""(?:href|src|action)\s*=\s*["']?([^"'\s>]+)""", html, re.I)
    assert "/metrics" in targets
    assert all(t.startswith(("/", "#", "?")) and not t.startswith("//") for t in targets), targets
    assert not re.search(r"https?://|@import|url\(", html, re.I)
    assert not re.search(r"<(script|link|img|iframe)\b", html, re.I)  # one self-contained page


# -- the screenshot -------------------------------------------------------------------------
def decode_png(data: bytes) -> tuple[int, int, list[bytes]]:
    """``(width, height, rows)`` of an 8-bit, non-interlaced RGB or RGBA PNG (rows as RGB bytes).

    Enough of the PNG format to look at a screenshot without an imaging library.
    """
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, b"", b""
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        chunk = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = chunk
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", header)
    assert depth == 8 and color in (2, 6) and interlace == 0, (depth, color, interlace)
    bpp = 3 if color == 2 else 4
    raw, stride = zlib.decompress(idat), width * bpp
    rows, prev = [], bytearray(stride)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if kind == 1:
                line[i] = (line[i] + a) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + b) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 0xFF
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        prev = line
        rows.append(bytes(line) if bpp == 3 else bytes(v for j, v in enumerate(line) if j % 4 != 3))
    return width, height, rows


def screenshot(url: str, out: Path, profile: Path) -> Path:
    cmd = [
        CHROMIUM or "chromium",
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        f"--screenshot={out}",
        f"--window-size={WIDTH},{HEIGHT}",
        "--hide-scrollbars",
        url,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.exists(), f"no screenshot (exit {proc.returncode}):\n{proc.stderr[-2000:]}"
    return out


def _colours(rows: list[bytes]) -> Counter[tuple[int, ...]]:
    return Counter(tuple(r[i : i + 3]) for r in rows for i in range(0, len(r), 3))


def test_screenshot_shows_a_readable_page(page: tuple[str, str], tmp_path: Path) -> None:
    if CHROMIUM is None:
        pytest.fail(
            "chromium is not installed: apt-get install --no-install-recommends chromium (scripts/test does)"
        )
    url, _ = page
    started = time.monotonic()
    png = screenshot(url, tmp_path / "status.png", tmp_path / "profile")
    data = png.read_bytes()
    assert len(data) > 20_000, len(data)  # a blank 1280x1600 page compresses to a few KB
    width, height, rows = decode_png(data)
    assert (width, height) == (WIDTH, HEIGHT)
    colours = _colours(rows)
    background, n_background = colours.most_common(1)[0]
    assert min(background) >= 0xF0, background  # a light page
    assert n_background < 0.97 * width * height  # ... with something on it
    assert len(colours) > 50  # anti-aliased text, table rules, badges
    dark = sum(n for c, n in colours.items() if max(c) < 0x60)
    assert dark > 5_000, dark  # text (the body colour is #1d2330)
    assert colours.get(FLAG_RGB, 0) > 200, "the flagged disparity's red badge is not visible"
    # the pictures render: interval bars and points, reference lines, sparkline bands, red marks
    assert colours.get(_rgb(svg.INTERVAL), 0) > 1_000, "no forest-plot intervals or sparklines drawn"
    assert colours.get(_rgb(svg.REFERENCE), 0) > 50, "no reference or threshold lines drawn"
    assert colours.get(_rgb(svg.BAND), 0) > 2_000, "no sparkline interval bands drawn"
    blank_rows = sum(len(set(r)) == 1 for r in rows[: height // 2])
    assert blank_rows < height // 2 * 0.8  # content fills the top half, not a one-line page
    assert time.monotonic() - started < 60
