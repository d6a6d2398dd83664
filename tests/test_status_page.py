"""The status page of a real detector: its content, no external assets, and how it renders in
headless Chromium (a screenshot decoded and checked for content, not just for existence).
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

from stream_fair.app import Detector
from stream_fair.config import Config
from stream_fair.dev import simulate
from stream_fair.dev.broker import create_topics, produce_events
from tests.conftest import TopicNames
from tests.helpers import detector_config, wait_consumed

pytestmark = pytest.mark.integration

MODEL = "credit-v3"
RACE_SEX = [f"{r}&{s}" for r in ("White", "Black", "Hispanic", "Asian") for s in ("Female", "Male")]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
WIDTH, HEIGHT = 1280, 1600
BIASED_GROUP = "Black&Female"
FLAG_RGB = (0xFD, 0xE2, 0xE1)  # background of a flagged disparity's badge (status_page._CSS)


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
        tmp / "state.db",
        fairness={
            "features": [{"name": "sex", "reference": "Male"}, {"name": "race", "reference": "White"}, "age"],
            "min_samples": 100,
        },
    )
    detector = Detector(Config.model_validate(cfg), exporter_port=0)
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
        produce_events(kafka_bootstrap, topics.predictions, topics.outcomes, events)
        wait_consumed(detector.port, (sent["prediction"], sent["outcome"]), timeout=60)
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
    blank_rows = sum(len(set(r)) == 1 for r in rows[: height // 2])
    assert blank_rows < height // 2 * 0.8  # content fills the top half, not a one-line page
    assert time.monotonic() - started < 60
