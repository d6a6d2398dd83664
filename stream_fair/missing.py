"""Configured features that most events do not carry (their group is ``__missing__``).

A feature path that matches nothing in the events (a typo, another schema, the wrong scenario)
does not fail: every event counts in group ``__missing__`` and no disparity can be measured. This
module finds that from the per-cell prediction counts of a snapshot, for the status page, the
``stream_fair_feature_missing_ratio`` gauge and a log warning at start-up and periodically.

Share of a (model, feature): predictions whose value for the feature is ``__missing__``, over all
accepted predictions of the model. Pure: no Kafka, no Prometheus.

>>> preds = {("m", ("__missing__", "White")): (60, 30), ("m", ("Male", "White")): (5, 5)}
>>> [(m.feature, round(m.share, 2), m.mostly_missing) for m in missing_shares(preds, ["sex", "race"])]
[('sex', 0.9, True), ('race', 0.0, False)]
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from stream_fair.counts import Key
from stream_fair.groups import MISSING
from stream_fair.report import Report

log = logging.getLogger("stream_fair")

#: Above this share of predictions without a value, a feature is called out.
MOSTLY = 0.5
#: ... once a model has this many predictions (a handful of early events proves nothing).
MIN_PREDICTIONS = 100


@dataclass(frozen=True)
class MissingFeature:
    """How often one configured feature is missing from one model's predictions."""

    model: str
    feature: str
    missing: int
    predictions: int

    @property
    def share(self) -> float:
        return self.missing / self.predictions if self.predictions else 0.0

    @property
    def mostly_missing(self) -> bool:
        return self.predictions >= MIN_PREDICTIONS and self.share > MOSTLY

    def message(self, path: str | None = None) -> str:
        where = f" (path {path})" if path else ""
        return (
            f"feature {self.feature!r}{where} is missing from {self.share:.0%} of the "
            f"{self.predictions} predictions of model {self.model!r} (counted as group {MISSING}): "
            "check fairness.features against your events; `stream-fair check-config --probe` "
            "shows what they contain"
        )


def missing_shares(
    predictions: Mapping[Key, tuple[int, int]], features: Sequence[str]
) -> list[MissingFeature]:
    """Per (model, feature): predictions whose value is ``__missing__``; ``features`` in cell order.

    ``predictions`` is :attr:`stream_fair.tracker.Snapshot.predictions`, ``(model, cell) ->
    (predicted 0, predicted 1)``.
    """
    totals: dict[str, int] = {}
    missing: dict[tuple[str, int], int] = {}
    for (model, cell), (n0, n1) in predictions.items():
        n = n0 + n1
        totals[model] = totals.get(model, 0) + n
        for i, value in enumerate(cell):
            if value == MISSING:
                missing[model, i] = missing.get((model, i), 0) + n
    return [
        MissingFeature(model, name, missing.get((model, i), 0), total)
        for model, total in sorted(totals.items())
        for i, name in enumerate(features)
    ]


class MissingFeatureLog:
    """Logs a warning for each mostly-missing feature: at start-up, then every ``every`` seconds.

    It looks every second until some model has ``MIN_PREDICTIONS`` predictions (the start-up
    warning comes as soon as there is enough to judge), then every ``check_every`` seconds (each
    look reads a report), and warns again every ``every`` seconds while a feature stays missing.
    """

    def __init__(self, paths: Mapping[str, str], every: float = 300.0, check_every: float = 30.0) -> None:
        self.paths = dict(paths)  # feature name -> configured path, for the message
        self.every = every
        self.check_every = check_every
        self._next_check = 0.0
        self._last_warned: dict[tuple[str, str], float] = {}

    def maybe_warn(self, now: float, predictions: Callable[[], Mapping[Key, tuple[int, int]]]) -> None:
        """Check (at most every ``check_every`` s) and warn; ``predictions`` is read only then."""
        if now < self._next_check:
            return
        shares = missing_shares(predictions(), list(self.paths))
        # Until a model has enough predictions to judge, look again soon: the start-up warning.
        judged = any(m.predictions >= MIN_PREDICTIONS for m in shares)
        self._next_check = now + (self.check_every if judged else min(1.0, self.check_every))
        for m in shares:
            key = (m.model, m.feature)
            last = self._last_warned.get(key)
            if m.mostly_missing and (last is None or now - last >= self.every):
                self._last_warned[key] = now
                log.warning("%s", m.message(self.paths.get(m.feature)))


def report_missing(report: Report) -> list[MissingFeature]:
    """:func:`missing_shares` for the configured features of a report's snapshot."""
    keys = {v.feature.indices[0]: v.feature.name for v in report.traffic if not v.feature.is_intersection}
    names = [keys[i] for i in sorted(keys)]
    return missing_shares(report.snapshot.predictions, names) if names else []
