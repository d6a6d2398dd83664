"""``/whatif``: parse a query, look up the labelled histograms, answer with an HTTP status and JSON.

Pure (no Kafka, no Prometheus): the app passes the histogram lookup and the fairness settings; the
exporter only moves bytes. Parameters (see docs/whatif.md):

* ``model``, ``feature`` (required);
* ``criterion``: ``demographic_parity`` | ``equal_opportunity`` | ``equalized_odds`` (the search);
* ``threshold=GROUP:T`` (repeatable): the plain what-if, those groups at those thresholds;
* ``mode``: ``deterministic`` (default) | ``randomized``; ``tolerance``: a difference in [0, 1];
* ``current=T`` or ``current=GROUP:T`` (repeatable): the thresholds in use now (default
  ``schema.score_threshold``).

Errors are ``{"error": message}`` with 400 (bad parameter), 404 (unknown model or feature) or 422
(too few labelled pairs).

>>> status, doc = answer({"model": ["m"]}, lambda m, f: None, FairnessSettings(), 0.5)
>>> status, doc["error"]
(400, 'missing parameter feature: pass model=...&feature=...&criterion=...')
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from stream_fair.errors import TooFewSamplesError, WhatIfError
from stream_fair.fairness import FairnessSettings
from stream_fair.whatif import (
    CRITERIA,
    MODES,
    UNKNOWN_GROUP_ERROR,
    UNKNOWN_MODE_ERROR,
    LabelledHistogram,
    optimize,
    what_if,
)

#: (model, feature) -> (edges, {group: (label-1 counts, label-0 counts[, decided-1 counts])}) per
#: score bin, or None if unknown.
Histograms = Callable[[str, str], "tuple[Sequence[float], Mapping[str, tuple[Any, ...]]] | None"]

MISSING_ERROR = "missing parameter {name}: pass model=...&feature=...&criterion=..."
NEITHER_ERROR = (
    "pass criterion=" + "|".join(CRITERIA) + " (thresholds that meet it) or threshold=GROUP:T (a what-if)"
)
NUMBER_ERROR = "{name}={value!r} is not a number in [0, 1]"
PAIR_ERROR = "{name}={value!r}: write GROUP:T, e.g. {name}=female:0.45"
NO_CURRENT_ERROR = (
    "no current threshold: schema.score_threshold is unset, so pass current=T (or current=GROUP:T "
    "per group), the threshold the model uses now"
)
UNKNOWN_ERROR = "no labelled score histograms for model {model!r} feature {feature!r}; known: {known}"


def _number(name: str, value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise WhatIfError(NUMBER_ERROR.format(name=name, value=value)) from None
    if not 0.0 <= x <= 1.0:
        raise WhatIfError(NUMBER_ERROR.format(name=name, value=value))
    return x


def _pairs(name: str, values: Sequence[str]) -> dict[str, float]:
    out = {}
    for v in values:
        group, sep, t = v.rpartition(":")
        if not sep or not group:
            raise WhatIfError(PAIR_ERROR.format(name=name, value=v))
        out[group] = _number(name, t)
    return out


def answer(
    query: Mapping[str, Sequence[str]],
    histograms: Histograms,
    settings: FairnessSettings,
    score_threshold: float | None,
    known: Callable[[], list[tuple[str, str]]] | None = None,
) -> tuple[int, dict[str, Any]]:
    """The status and JSON document of one ``/whatif`` query (``query`` as from ``parse_qs``)."""

    def one(name: str) -> str | None:
        values = query.get(name) or []
        return values[-1] if values else None

    try:
        model, feature = one("model"), one("feature")
        for name, value in (("model", model), ("feature", feature)):
            if not value:
                return 400, {"error": MISSING_ERROR.format(name=name)}
        assert model is not None and feature is not None
        criterion, mode = one("criterion"), one("mode") or "deterministic"
        if mode not in MODES:
            raise WhatIfError(UNKNOWN_MODE_ERROR.format(value=mode, choices=", ".join(MODES)))
        if mode != "deterministic" and query.get("threshold"):
            raise WhatIfError(f"mode={mode} applies to a criterion search, not to threshold=GROUP:T")
        thresholds = _pairs("threshold", query.get("threshold") or [])
        if criterion is None and not thresholds:
            return 400, {"error": NEITHER_ERROR}
        tol = one("tolerance")
        tolerance = _number("tolerance", tol) if tol is not None else None
        raw = query.get("current") or []
        current: float | dict[str, float]
        if any(":" in v for v in raw):
            current = _pairs("current", raw)
            if score_threshold is not None:
                current = {"": score_threshold, **current}  # default for groups not named
        elif raw:
            current = _number("current", raw[-1])
        elif score_threshold is not None:
            current = score_threshold
        else:
            return 400, {"error": NO_CURRENT_ERROR}
        found = histograms(model, feature)
        if found is None:
            listed = known() if known is not None else []
            return 404, {"error": UNKNOWN_ERROR.format(model=model, feature=feature, known=listed)}
        edges, per_group = found
        e = np.asarray(edges, dtype=np.float64)
        hists = {g: LabelledHistogram(e, *counts) for g, counts in per_group.items()}
        if isinstance(current, dict):
            missing = current.pop("", None)
            for g in current:
                if g not in hists:
                    raise WhatIfError(UNKNOWN_GROUP_ERROR.format(value=g, choices=sorted(hists)))
            current = {g: current.get(g, missing if missing is not None else np.nan) for g in hists}
            if any(np.isnan(v) for v in current.values()):
                return 400, {"error": NO_CURRENT_ERROR}
        if thresholds:
            result = what_if(
                feature, hists, thresholds, current, settings, criterion=criterion, tolerance=tolerance
            )
        else:
            assert criterion is not None
            result = optimize(
                hists, criterion, current, settings, feature=feature, mode=mode, tolerance=tolerance
            )
    except WhatIfError as exc:
        return (422 if isinstance(exc, TooFewSamplesError) else 400), {"error": str(exc)}
    doc = {"model": model, **result.to_json(), "credible_level": settings.credible_level}
    return 200, doc
