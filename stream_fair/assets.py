"""Where the Prometheus rules, Alertmanager routes and Grafana dashboards are, installed or not.

Their source of truth is the repository's top-level ``deploy/`` and ``grafana/``; a built wheel
carries copies under ``stream_fair/_assets/`` with the same relative paths (``setup.py`` puts them
there). :func:`asset` answers the installed copy first, else the file of a source checkout, so
the demo and the tests read the same files either way.

>>> asset("deploy/prometheus/alert_rules.yml").name
'alert_rules.yml'
>>> asset("deploy/prometheus/alert_rules.yml").is_file()
True
"""

from __future__ import annotations

from pathlib import Path

from stream_fair.errors import StreamFairError

#: Copies inside an installed package (absent in a source checkout).
INSTALLED = Path(__file__).resolve().parent / "_assets"
#: The repository root of a source checkout (or an editable install).
CHECKOUT = Path(__file__).resolve().parents[1]


class AssetError(StreamFairError):
    """A packaged rule, route or dashboard file is missing."""


def asset_root() -> Path:
    """The directory holding ``deploy/`` and ``grafana/``: the installed copies, else the checkout."""
    return INSTALLED if INSTALLED.is_dir() else CHECKOUT


def asset(relative: str) -> Path:
    """The path of ``relative`` (e.g. ``"deploy/prometheus/alert_rules.yml"``); it may not exist."""
    return asset_root() / relative


def require(relative: str) -> Path:
    """Like :func:`asset`, but raise :class:`AssetError` with the fix when the file is missing."""
    path = asset(relative)
    if not path.is_file():
        raise AssetError(
            f"{relative} is not in this installation ({asset_root()}): reinstall stream-fair from a "
            "wheel built with `python -m build`, or run from a source checkout"
        )
    return path
