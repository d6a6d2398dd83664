"""Build hook: ship the top-level ``deploy/`` and ``grafana/`` files inside the wheel.

The Prometheus rules, Alertmanager routes and Grafana dashboards live at the top of the repository
(their source of truth, used by the Kubernetes and compose manifests). A wheel must carry them too,
so that ``stream-fair demo`` finds its rules in an installed package: ``build_py`` copies them to
``stream_fair/_assets/<same relative path>``, where :mod:`stream_fair.assets` looks first. An
editable install reads them from the checkout instead, so nothing is copied into the source tree.
Everything else is declared in ``pyproject.toml``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
#: Repository-relative globs of the files shipped as package data (MANIFEST.in puts them in the sdist).
ASSET_GLOBS = (
    "deploy/prometheus/*.yml",
    "deploy/alertmanager/*.yml",
    "grafana/dashboards/*.json",
    "grafana/provisioning/*/*.yml",
)


class BuildPyWithAssets(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib) / "stream_fair" / "_assets"
        copied = 0
        for pattern in ASSET_GLOBS:
            for source in sorted(ROOT.glob(pattern)):
                dest = target / source.relative_to(ROOT)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, dest)
                copied += 1
        if not copied:
            raise RuntimeError(f"no deploy/ or grafana/ files under {ROOT}: build from a checkout or sdist")


setup(cmdclass={"build_py": BuildPyWithAssets})
