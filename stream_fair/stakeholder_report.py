"""The stakeholder report's content: one JSON-able document for a period, and its content hash.

Step 6 of the fairness workflow ("validate with stakeholders") needs a document a risk committee
can read and an auditor can check. This module *assembles* it from plain inputs (count rows, the
alarm log, partition offsets: :class:`ReportInputs`), with no I/O; :mod:`stream_fair.report_render`
turns it into HTML and Markdown, :mod:`stream_fair.report_sources` reads the inputs from a running
instance or a state directory. (:mod:`stream_fair.report` is something else: the per-feature
fairness evaluation behind ``/metrics`` and the status page, which this module reuses.)

**Period.** Count rows are bucketed by the *prediction's* event time (``window_resolution``
seconds; see :mod:`stream_fair.aggregate`). A period ``[from, to)`` is reported from the buckets
it covers, widened to bucket edges (the document states the effective period); buckets are kept
for the longest configured window, so older periods cannot be reported. Without a period the
report covers every count since the state began (the cumulative rows).

**Content hash.** ``audit.content_hash.value`` is the SHA-256 (hex) of the document's canonical
form with ``audit.content_hash`` itself removed: UTF-8 of ``json.dumps(doc, sort_keys=True,
separators=(",", ":"), ensure_ascii=False, allow_nan=False)``. Numbers are rounded to 6 decimals
and non-finite ones written as null when the document is built, so the form is stable.

>>> doc = {"schema": SCHEMA, "audit": {"x": 1}, "value": 0.5}
>>> doc = seal(doc)
>>> verify(doc)
True
>>> doc["value"] = 0.6
>>> verify(doc)
False
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from stream_fair.config import Config, format_duration, parse_duration
from stream_fair.counts import EXPIRED, FN, FP, PRED0, PRED1, TN, TP, WIDTH, Key, add_rows
from stream_fair.disparity import DISPARITIES, DISPARITY_RATES
from stream_fair.errors import StreamFairError
from stream_fair.fairness import RATES, Counts, FeatureReport, evaluate_feature, group_rates
from stream_fair.feedback.coverage import coverage
from stream_fair.groups import FeatureKey, feature_keys
from stream_fair.report import (
    fairness_settings,
    flagged_extremes,
    references,
    search_cells,
    search_enabled,
)

SCHEMA = "stream-fair-report/1"
HASH_ALGORITHM = "sha256"
HASH_COVERS = (
    "the UTF-8 bytes of json.dumps(document without audit.content_hash, sort_keys=True, "
    "separators=(',', ':'), ensure_ascii=False, allow_nan=False)"
)
#: The config sections that decide the numbers (where it runs does not: kafka, state, exporter, log_level).
FINGERPRINT_SECTIONS = (
    "topics", "schema_", "event_time", "fairness", "windows", "window_resolution", "join", "feedback",
)  # fmt: skip
#: Most points of a disparity-over-time chart (steps are whole multiples of the bucket width).
MAX_POINTS = 48
#: The rates the report's tables show (the JSON carries every rate of :data:`RATES`).
SHOWN_RATES = ("selection_rate", "true_positive_rate", "false_positive_rate", "accuracy")

ERR_PERIOD = (
    "report error: {problem}: give --from/--to as ISO-8601 UTC times (2026-11-30T06:00Z) or unix "
    "seconds, or --last DURATION (6h), or neither for all data"
)
ERR_NOT_KEPT = (
    "report error: the period starts at {start}, but per-period counts are kept only from {kept} "
    "(the longest configured window, windows: {windows}): choose a later --from, or omit the period "
    "for all data since the state began"
)
ERR_NO_BUCKETS = (
    "report error: this instance keeps no per-period counts (windows: []): omit --from/--to/--last "
    "to report all data, or configure windows"
)

#: Plain-language definitions of every metric the report can show (one place; the renderers and
#: the tests read them from here).
DEFINITIONS: Mapping[str, str] = {
    "predictions": "Decisions the model made for people of this group in the period.",
    "labelled pairs (n)": "Decisions whose real outcome is known (for example: the loan was "
    "repaid or not). Every error rate below is computed on these only.",
    "pending": "Decisions whose outcome has not arrived yet and may still arrive. Nothing about "
    "them is known yet.",
    "expired": "Decisions whose outcome never arrived within the configured waiting time "
    "(join.ttl). They are missing from every error rate.",
    "label_coverage": "Of the decisions whose outcome was settled (arrived or given up on), the "
    "share that got an outcome: labelled / (labelled + expired). A group with lower coverage is "
    "judged on a smaller, possibly different, slice of its decisions.",
    "selection_rate": "Share of decisions that were positive (for example: approved).",
    "base_rate": "Share of labelled people whose real outcome was positive.",
    "true_positive_rate": "Of the people whose real outcome was positive, the share the model "
    "decided positively (also called recall). A low value means deserving people were missed.",
    "false_positive_rate": "Of the people whose real outcome was negative, the share the model "
    "still decided positively.",
    "false_negative_rate": "Of the people whose real outcome was positive, the share the model "
    "decided negatively (1 - true positive rate).",
    "true_negative_rate": "Of the people whose real outcome was negative, the share the model "
    "decided negatively.",
    "positive_predictive_value": "Of the positive decisions, the share that turned out positive (precision).",
    "negative_predictive_value": "Of the negative decisions, the share that turned out negative.",
    "accuracy": "Share of labelled decisions that matched the real outcome.",
    "credible interval": "The range the true rate lies in with the stated probability (for "
    "example 95%), given the data seen so far; small groups have wide ranges.",
    "min_samples": "Groups with fewer labelled pairs than this are shown but take no part in the "
    "disparities or flags: their numbers are too uncertain.",
    "demographic_parity_difference": "The largest gap in selection rate between two groups "
    "(between_groups), or between a group and the reference group (to_reference). 0 means equal.",
    "demographic_parity_ratio": "The smallest group's selection rate divided by the largest's "
    "(1 means equal; below 0.8 fails the four-fifths rule).",
    "equal_opportunity_difference": "The largest gap in true positive rate between groups: "
    "deserving people of one group are missed more often than of another.",
    "equal_opportunity_ratio": "The smallest group's true positive rate divided by the largest's.",
    "equalized_odds_difference": "The larger of the true-positive-rate gap and the "
    "false-positive-rate gap between groups.",
    "equalized_odds_ratio": "The smaller of the true-positive-rate ratio and the "
    "false-positive-rate ratio between groups.",
    "predictive_parity_difference": "The largest gap in precision (positive predictive value) "
    "between groups: a positive decision is right more often for one group than another.",
    "accuracy_difference": "The largest gap in accuracy between groups.",
    "between_groups": "The disparity compares the best-off and the worst-off group.",
    "to_reference": "The disparity compares every group with the configured reference group.",
    "flagged": "The whole credible interval of the disparity lies beyond its threshold: the gap "
    "is real with the stated probability, not noise.",
    "alarm": "The calibrated alarm (the one that pages): raised when a group's rate has moved "
    "away from the rest of its feature with a stated false-alarm guarantee; cleared when it "
    "recovers. Red dots on the charts mark periods while it was raised.",
}


class ReportError(StreamFairError):
    """A report cannot be made as asked (bad period, data not kept, instance unreachable)."""


# -- the period -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Period:
    """``[start, end)`` in prediction event time (unix seconds); None: unbounded."""

    start: float | None = None
    end: float | None = None

    @property
    def everything(self) -> bool:
        return self.start is None and self.end is None


def parse_time(text: str) -> float:
    """Unix seconds from ISO-8601 (``Z`` or an offset; no zone means UTC) or a number.

    >>> parse_time("2026-11-30T06:00Z"), parse_time("1795000000")
    (1796018400.0, 1795000000.0)
    """
    s = text.strip()
    problem = ERR_PERIOD.format(problem=f"{text[:40]!r} is not a time between 1970 and 9999")
    if re.fullmatch(r"\d+(\.\d+)?", s):
        ts = float(s) if len(s) <= 40 else _LATEST + 1
    else:
        try:
            when = datetime.fromisoformat(s.replace("Z", "+00:00").replace("z", "+00:00"))
            if when.tzinfo is None:
                when = when.replace(tzinfo=timezone.utc)
            ts = when.timestamp()
        except (ValueError, OverflowError):  # not ISO 8601, or out of datetime's range with its zone
            raise ReportError(problem) from None
    if not 0.0 <= ts <= _LATEST:
        raise ReportError(problem)
    return ts


_LATEST = 253402300799.0  # 9999-12-31T23:59:59Z: the last time datetime (and an ISO string) can hold


def parse_period(
    since: str | None = None, until: str | None = None, last: str | None = None, now: float | None = None
) -> Period:
    """The period of ``--from``/``--to`` or ``--last`` (ending now); ReportError (one line) if bad.

    >>> parse_period(last="1h", now=7200.0)
    Period(start=3600.0, end=7200.0)
    """
    if last is not None:
        if since is not None or until is not None:
            raise ReportError(ERR_PERIOD.format(problem="--last cannot be combined with --from/--to"))
        try:
            span = parse_duration(last)
        except ValueError:
            raise ReportError(ERR_PERIOD.format(problem=f"--last {last!r} is not a duration")) from None
        stop = time.time() if now is None else now
        if not stop - span >= 0.0:  # also a span too large to be a number
            raise ReportError(ERR_PERIOD.format(problem=f"--last {last[:40]!r} reaches back before 1970"))
        return Period(stop - span, stop)
    start = None if since is None else parse_time(since)
    end = None if until is None else parse_time(until)
    if start is not None and end is not None and end <= start:
        raise ReportError(ERR_PERIOD.format(problem=f"--to {until} is not after --from {since}"))
    return Period(start, end)


def iso(ts: float | None) -> str | None:
    """``2026-11-30T06:00:00Z`` (None stays None)."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- the inputs -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReportInputs:
    """Everything the report is made from, as plain data (no store, no socket).

    ``cumulative`` and each bucket of ``buckets`` map ``(model, cell)`` to a count row in
    :data:`stream_fair.counts.ROW` order; ``buckets`` are keyed by period index
    (``floor(prediction ts / resolution)``). ``partitions`` describe the input partitions the data
    covers: ``{"partition", "next_offsets": [predictions, outcomes], "consumed": [...],
    "last_event_ts": [...]}``. ``alarm_events`` are :meth:`AlarmEvent.to_json` documents, None when
    the source cannot know them. ``signals`` holds optional documents of other analyses by name
    (None: not available here, with ``signal_notes[name]`` saying why). ``partition_rows`` are the
    cumulative rows per input partition (what :mod:`stream_fair.report_merge` merges by),
    ``partitions_total`` the input topics' partition count (None: unknown), ``leader`` whether the
    source is the model-wide leader, ``sources`` the audit entries of merged sources.
    """

    config: Config
    cumulative: Mapping[Key, Sequence[int]]
    buckets: Mapping[int, Mapping[Key, Sequence[int]]]
    partitions: Sequence[Mapping[str, Any]]
    source: str
    taken_at: float
    software_version: str
    alarm_events: Sequence[Mapping[str, Any]] | None = None
    alarms_now: Sequence[Mapping[str, Any]] | None = None
    last_bucket: int | None = None
    notes: Sequence[str] = ()
    signals: Mapping[str, Any] = field(default_factory=dict)
    signal_notes: Mapping[str, str] = field(default_factory=dict)
    partition_rows: Mapping[int, Mapping[Key, Sequence[int]]] = field(default_factory=dict)
    partitions_total: int | None = None
    leader: bool | None = None
    sources: Sequence[Mapping[str, Any]] = ()


def coverage_of(inputs: ReportInputs) -> dict[str, Any]:
    """Which input partitions the report's counts cover, and which of the topic are missing."""
    covered = sorted({int(p["partition"]) for p in inputs.partitions})
    total = inputs.partitions_total
    return {
        "partitions_total": total,
        "covered": covered,
        "missing": None if total is None else [p for p in range(total) if p not in covered],
        "model_wide": None if total is None else len(covered) == total,
    }


def coverage_note(cov: Mapping[str, Any]) -> str:
    """One plain sentence on what :func:`coverage_of` found."""
    covered = ", ".join(map(str, cov["covered"])) or "none"
    if cov["partitions_total"] is None:
        return (
            f"The counts cover input partitions {covered}; the topics' partition count is not known "
            "to this source, so whether partitions are missing cannot be said."
        )
    if cov["model_wide"]:
        return (
            f"The counts cover all {cov['partitions_total']} input partitions ({covered}): the whole model."
        )
    return (
        f"PARTIAL: the counts cover input partitions {covered} of {cov['partitions_total']}; partitions "
        f"{', '.join(map(str, cov['missing']))} are MISSING (owned by other replicas): these numbers are "
        "not model-wide. Make the report with one --url per replica to cover the whole model."
    )


#: The other analyses a report includes when the source has them (name -> title).
SIGNALS: Mapping[str, str] = {
    "root_cause": "Root cause of the flagged disparities",
    "unconfigured_intersections": "Intersections nobody configured",
    "label_free_estimates": "Label-free estimates (before outcomes arrive)",
    "threshold_whatif": "Threshold what-ifs",
}


# -- numbers --------------------------------------------------------------------------------------
def num(x: Any) -> float | None:
    """A float rounded to 6 decimals; None for NaN, infinities and None."""
    if x is None:
        return None
    v = float(x)
    return round(v, 6) if math.isfinite(v) else None


def clean(obj: Any) -> Any:
    """JSON-ready: floats rounded by :func:`num` (non-finite ones None), tuples as lists."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, int | str):
        return obj
    if isinstance(obj, float):
        return num(obj)
    if isinstance(obj, Mapping):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [clean(v) for v in obj]
    if hasattr(obj, "item"):  # numpy scalars
        return clean(obj.item())
    return str(obj)


def canonical(doc: Mapping[str, Any]) -> bytes:
    """The bytes the content hash is taken over (see the module docstring)."""
    body = json.loads(json.dumps(doc))  # a deep copy
    body.get("audit", {}).pop("content_hash", None)
    return json.dumps(
        body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


def content_hash(doc: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical(doc)).hexdigest()


def seal(doc: dict[str, Any]) -> dict[str, Any]:
    """Set ``audit.content_hash`` and return the document."""
    doc.setdefault("audit", {})["content_hash"] = {
        "algorithm": HASH_ALGORITHM,
        "covers": HASH_COVERS,
        "value": content_hash(doc),
    }
    return doc


def verify(doc: Mapping[str, Any]) -> bool:
    """Whether the document's recorded content hash matches its content."""
    recorded = doc.get("audit", {}).get("content_hash", {})
    return bool(recorded.get("algorithm") == HASH_ALGORITHM and recorded.get("value") == content_hash(doc))


def config_fingerprint(config: Config) -> dict[str, Any]:
    """SHA-256 of the canonical JSON of the config sections that decide the numbers."""
    dump = config.model_dump(mode="json")
    part = {k: dump[k] for k in FINGERPRINT_SECTIONS}
    text = json.dumps(part, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return {
        "algorithm": HASH_ALGORITHM,
        "sections": list(FINGERPRINT_SECTIONS),
        "value": hashlib.sha256(text.encode()).hexdigest(),
    }


# -- assembly -------------------------------------------------------------------------------------
def _sum_rows(parts: Sequence[Mapping[Key, Sequence[int]]]) -> dict[Key, list[int]]:
    out: dict[Key, list[int]] = {}
    for rows in parts:
        for key, row in rows.items():
            acc = out.get(key)
            if acc is None:
                acc = out[key] = [0] * WIDTH
            add_rows(acc, list(row)[:WIDTH])
    return out


def _by_group(rows: Mapping[Key, Sequence[int]], key: FeatureKey) -> dict[str, dict[str, list[int]]]:
    """model -> group -> summed row, for one feature key."""
    out: dict[str, dict[str, list[int]]] = {}
    for (model, cell), row in rows.items():
        g = key.group(cell)
        acc = out.setdefault(model, {}).setdefault(g, [0] * WIDTH)
        add_rows(acc, list(row)[:WIDTH])
    return out


def _counts(row: Sequence[int]) -> Counts:
    return Counts(tp=row[TP], fp=row[FP], tn=row[TN], fn=row[FN])


def _select(inputs: ReportInputs, period: Period) -> tuple[dict[Key, list[int]], dict[str, Any], list[int]]:
    """The rows of the period, its effective description, and the bucket indexes it spans."""
    res = inputs.config.window_resolution
    kept = sorted(inputs.buckets)
    if period.everything:
        first = kept[0] * res if kept else None
        desc = {
            "from": None,
            "to": None,
            "basis": "every prediction since the state began (cumulative counts)",
            "prediction_time_from": None,
            "prediction_time_to": None,
        }
        if first is not None:
            desc["over_time_from"] = iso(first)
        return _sum_rows([inputs.cumulative]), desc, kept
    if not inputs.config.windows:
        raise ReportError(ERR_NO_BUCKETS)
    span = max(1, round(max(inputs.config.windows) / res))
    last = inputs.last_bucket if inputs.last_bucket is not None else (kept[-1] if kept else None)
    oldest = None if last is None else last - span + 1
    first_b = math.floor(period.start / res) if period.start is not None else oldest
    end_b = math.ceil(period.end / res) if period.end is not None else (None if last is None else last + 1)
    # "the last 1d" with a 1d window starts inside the bucket just before the oldest one kept (the
    # windows hold the current, partly filled bucket): begin at the oldest, less than a bucket later
    clipped = (
        oldest is not None
        and first_b == oldest - 1
        and (period.end is None or period.end > oldest * res)  # a period inside that bucket: refused
    )
    if clipped:
        first_b = oldest
    if period.start is not None and oldest is not None and first_b is not None and first_b < oldest:
        raise ReportError(
            ERR_NOT_KEPT.format(
                start=iso(period.start),
                kept=iso(oldest * res),
                windows=", ".join(format_duration(w) for w in inputs.config.windows),
            )
        )
    chosen = [b for b in kept if (first_b is None or b >= first_b) and (end_b is None or b < end_b)]
    lo = first_b if first_b is not None else (chosen[0] if chosen else None)
    hi = end_b if end_b is not None else (chosen[-1] + 1 if chosen else None)
    desc = {
        "from": iso(period.start),
        "to": iso(period.end),
        "basis": "predictions whose event time lies in the period, widened to "
        f"{format_duration(res)} buckets"
        + (
            f" (from the oldest bucket kept, less than {format_duration(res)} after the period's start)"
            if clipped
            else ""
        ),
        "prediction_time_from": iso(None if lo is None else lo * res),
        "prediction_time_to": iso(None if hi is None else hi * res),
    }
    return _sum_rows([inputs.buckets[b] for b in chosen]), desc, chosen


def _estimate(est: Any) -> dict[str, float | None]:
    return {"value": num(est.value), "lower": num(est.lower), "upper": num(est.upper)}


def _feature_section(
    model: str, key: FeatureKey, groups: Mapping[str, list[int]], fr: FeatureReport, settings: Any
) -> dict[str, Any]:
    marked = flagged_extremes(fr)
    rows = []
    for g, gr in sorted(fr.groups.items(), key=lambda kv: (-kv[1].counts.n, kv[0])):
        row = groups[g]
        predictions = row[PRED0] + row[PRED1]
        joined, expired = gr.counts.n, row[EXPIRED]
        rows.append(
            {
                "group": g,
                "predictions": predictions,
                "positive_predictions": row[PRED1],
                "labelled": joined,
                "expired": expired,
                "pending": max(0, predictions - joined - expired),
                "label_coverage": num(coverage(joined, expired)),
                "confusion": {"tp": row[TP], "fp": row[FP], "tn": row[TN], "fn": row[FN]},
                "eligible": gr.eligible,
                "below_min_samples": joined < settings.min_samples,
                "rates": {r: _estimate(gr.rates[r]) for r in RATES if r in gr.rates},
                "flagged_extreme": sorted(r for gg, r in marked if gg == g),
            }
        )
    # groups with predictions but no labelled pair yet: shown too (evaluate_feature has no row)
    for g in sorted(set(groups) - set(fr.groups)):
        row = groups[g]
        predictions = row[PRED0] + row[PRED1]
        rows.append(
            {
                "group": g,
                "predictions": predictions,
                "positive_predictions": row[PRED1],
                "labelled": 0,
                "expired": row[EXPIRED],
                "pending": max(0, predictions - row[EXPIRED]),
                "label_coverage": num(coverage(0, row[EXPIRED])),
                "confusion": {"tp": 0, "fp": 0, "tn": 0, "fn": 0},
                "eligible": False,
                "below_min_samples": True,
                "rates": {},
                "flagged_extreme": [],
            }
        )
    disparities = []
    for d in DISPARITIES:
        for method in ("between_groups", "to_reference"):
            if method == "to_reference" and fr.reference is None:
                continue
            est = fr.disparities.get((d, method))
            disparities.append(
                {
                    "disparity": d,
                    "method": method,
                    "value": None if est is None else num(est.value),
                    "lower": None if est is None else num(est.lower),
                    "upper": None if est is None else num(est.upper),
                    "threshold": num(settings.thresholds[d]),
                    "flagged": bool(fr.flagged.get((d, method), False)),
                    "computable": est is not None,
                }
            )
    eligible = [gr.counts for gr in fr.groups.values() if gr.eligible]
    pooled = group_rates(sum(eligible, Counts(0, 0, 0, 0)), settings) if eligible else {}
    return {
        "model": model,
        "feature": key.name,
        "intersection": key.is_intersection,
        "reference": fr.reference,
        "pooled_eligible_rates": {r: _estimate(pooled[r]) for r in RATES if r in pooled},
        "groups": rows,
        "disparities": disparities,
    }


def _alarm_state(
    events: Sequence[Mapping[str, Any]], model: str, feature: str, disparity: str
) -> list[tuple[float, bool]]:
    """(ts, raised after it) for one alarm, oldest first."""
    out = []
    for e in sorted(events, key=lambda e: (e["ts"], e.get("seq", 0))):
        if e["model"] == model and e["feature"] == feature and e["disparity"] == disparity:
            out.append((float(e["ts"]), e["kind"] == "alarm_raised"))
    return out


def _raised_during(changes: Sequence[tuple[float, bool]], start: float, end: float) -> bool:
    """Whether the alarm was raised at any moment of ``[start, end)``."""
    state = False
    for ts, raised in changes:
        if ts >= start:
            break
        state = raised
    return state or any(raised for ts, raised in changes if start <= ts < end)


def _over_time(
    inputs: ReportInputs, chosen: Sequence[int], keys: Sequence[FeatureKey], refs: Mapping[str, str | None]
) -> list[dict[str, Any]]:
    """Between-groups difference disparities per step of the period (each step on its own counts)."""
    if not chosen:
        return []
    settings = fairness_settings(inputs.config)
    res = inputs.config.window_resolution
    first, last = chosen[0], chosen[-1]
    width = max(1, math.ceil((last - first + 1) / MAX_POINTS))
    steps: dict[int, list[int]] = {}
    for b in chosen:
        steps.setdefault((b - first) // width, []).append(b)
    events = list(inputs.alarm_events or ())
    series: dict[tuple[str, str, str], dict[str, Any]] = {}
    for i in sorted(steps):
        rows = _sum_rows([inputs.buckets[b] for b in steps[i]])
        start, end = (first + i * width) * res, (first + (i + 1) * width) * res
        for key in keys:
            for model, groups in sorted(_by_group(rows, key).items()):
                counts = {g: _counts(r) for g, r in groups.items() if any(r[TP : FN + 1])}
                fr = evaluate_feature(key.name, counts, settings, refs[key.name])
                for d in DISPARITIES:
                    if not d.endswith("_difference"):
                        continue
                    s = series.setdefault(
                        (model, key.name, d),
                        {
                            "model": model,
                            "feature": key.name,
                            "disparity": d,
                            "method": "between_groups",
                            "threshold": num(settings.thresholds[d]),
                            "step_seconds": width * res,
                            "points": [],
                        },
                    )
                    est = fr.disparities.get((d, "between_groups"))
                    changes = _alarm_state(events, model, key.name, d)
                    s["points"].append(
                        {
                            "from": iso(start),
                            "to": iso(end),
                            "t": start,
                            "value": None if est is None else num(est.value),
                            "lower": None if est is None else num(est.lower),
                            "upper": None if est is None else num(est.upper),
                            "flagged": bool(fr.flagged.get((d, "between_groups"), False)),
                            "alarm_raised": _raised_during(changes, start, end) if events else False,
                        }
                    )
    order = {k.name: i for i, k in enumerate(keys)}
    return [series[k] for k in sorted(series, key=lambda k: (k[0], order[k[1]], DISPARITIES.index(k[2])))]


#: Most flagged disparities a report explains (each explanation bootstraps its intervals).
MAX_EXPLAINED = 6


def _root_causes(
    inputs: ReportInputs,
    chosen: Sequence[int],
    keys: Sequence[FeatureKey],
    flagged: Sequence[Mapping[str, Any]],
    events: Sequence[Mapping[str, Any]] | None,
) -> tuple[Any, str]:
    """:func:`stream_fair.explain.explain` of each flagged between-groups difference in the period,
    split at the change point of an alarm raised for it in the period, else at the midpoint."""
    from stream_fair.explain import explain
    from stream_fair.groups import carried_attributes

    wanted = [
        f for f in flagged if f["method"] == "between_groups" and f["disparity"].endswith("_difference")
    ]
    if not wanted:
        return None, "no disparity is flagged in this period: nothing to explain"
    if not chosen:
        return None, "no per-period counts in this period: the decomposition needs them"
    fc = inputs.config.fairness
    by_name = {k.name: k for k in keys}
    buckets = {b: inputs.buckets[b] for b in chosen}
    attributes = carried_attributes([x.name for x in fc.features], [x.name for x in fc.audit_only])
    out = []
    for f in wanted[:MAX_EXPLAINED]:
        which = (f["model"], f["feature"], f["disparity"])
        raised = [
            e
            for e in events or ()
            if e["kind"] == "alarm_raised"
            and (e["model"], e["feature"], e["disparity"]) == which
            and e.get("change_point_ts") is not None
        ]
        last = raised[-1] if raised else None
        try:
            doc = explain(
                buckets,
                model=f["model"],
                key=by_name[f["feature"]],
                disparity=f["disparity"],
                attributes=attributes,
                intersections=[k for k in keys if k.is_intersection],
                resolution=inputs.config.window_resolution,
                split_ts=None if last is None else float(last["change_point_ts"]),
                split_source="alarm" if last is not None else "request",
                group=None if last is None else last["group"],
                rate=None if last is None else last["rate"],
                named=frozenset(),  # the last alarm's group and rate, not a person's
                min_samples=fc.min_samples,
                level=fc.credible_level,
            )
        except Exception as exc:  # one explanation that fails never fails the report
            doc = {
                "model": which[0],
                "feature": which[1],
                "disparity": which[2],
                "error": f"{type(exc).__name__}: {exc}",
            }
        out.append(doc)
    return {"explained": out, "left_out": max(0, len(wanted) - MAX_EXPLAINED)}, ""


def _unconfigured(inputs: ReportInputs, rows: Mapping[Key, Sequence[int]]) -> tuple[Any, str]:
    """The search of unconfigured intersections (:mod:`stream_fair.search`) over the period's pairs."""
    if not search_enabled(inputs.config):
        return None, "the search is off (fairness.search.enabled) or fewer than two attributes are carried"
    quads = {k: (r[TP], r[FP], r[TN], r[FN]) for k, r in rows.items() if any(r[TP : FN + 1])}
    results = search_cells(quads, inputs.config)
    return {
        "over": "the labelled pairs of the report's period",
        "models": {m: r.to_json() for m, r in results.items()},
    }, ""


def assemble(inputs: ReportInputs, period: Period = Period()) -> dict[str, Any]:
    """The report document for ``period`` (sealed with its content hash)."""
    config = inputs.config
    settings = fairness_settings(config)
    keys = feature_keys([f.name for f in config.fairness.features], config.fairness.intersections)
    refs = references(config, keys)
    rows, period_doc, chosen = _select(inputs, period)
    features = []
    for key in keys:
        for model, groups in sorted(_by_group(rows, key).items()):
            counts = {g: _counts(r) for g, r in groups.items() if any(r[TP : FN + 1])}
            fr = evaluate_feature(key.name, counts, settings, refs[key.name])
            features.append(_feature_section(model, key, groups, fr, settings))

    models = sorted({m for m, _ in rows})
    totals = {}
    for m in models:
        acc = [0] * WIDTH
        for (mm, _), row in rows.items():
            if mm == m:
                add_rows(acc, row)
        predictions = acc[PRED0] + acc[PRED1]
        joined = acc[TP] + acc[FP] + acc[TN] + acc[FN]
        totals[m] = {
            "predictions": predictions,
            "labelled": joined,
            "expired": acc[EXPIRED],
            "pending": max(0, predictions - joined - acc[EXPIRED]),
            "label_coverage": num(coverage(joined, acc[EXPIRED])),
        }

    events = inputs.alarm_events
    in_period = None
    if events is not None:
        lo = period.start if period.start is not None else -math.inf
        hi = period.end if period.end is not None else math.inf
        in_period = [dict(e) for e in events if lo <= float(e["ts"]) < hi]
    flagged = [
        {
            "model": f["model"],
            "feature": f["feature"],
            **{k: d[k] for k in ("disparity", "method", "value", "lower", "upper", "threshold")},
        }
        for f in features
        for d in f["disparities"]
        if d["flagged"]
    ]
    below = [
        {"model": f["model"], "feature": f["feature"], "group": g["group"], "labelled": g["labelled"]}
        for f in features
        for g in f["groups"]
        if g["below_min_samples"]
    ]
    not_computable = [
        {"model": f["model"], "feature": f["feature"], "disparity": d["disparity"], "method": d["method"]}
        for f in features
        for d in f["disparities"]
        if not d["computable"]
    ]
    notes_for: dict[str, str] = {}
    computed = {
        "root_cause": _root_causes(inputs, chosen, keys, flagged, events),
        "unconfigured_intersections": _unconfigured(inputs, rows),
    }
    signals = {}
    for name, title in SIGNALS.items():
        data = inputs.signals.get(name)
        if data is None and name in computed:
            data, note = computed[name]
            if data is None:
                notes_for[name] = note
        signals[name] = (
            {"title": title, "available": True, "data": clean(data)}
            if data is not None
            else {
                "title": title,
                "available": False,
                "reason": notes_for.get(name)
                or inputs.signal_notes.get(
                    name, "not available on this instance (this version or this source does not compute it)"
                ),
            }
        )
    cov = coverage_of(inputs)
    notes = [coverage_note(cov), *inputs.notes]
    unknown = {
        "pending_labels": {m: t["pending"] for m, t in totals.items()},
        "groups_below_min_samples": below,
        "disparities_not_computable": not_computable,
        "estimated_values": [
            {"signal": n, "note": "values under this signal are estimates made without outcomes"}
            for n in ("label_free_estimates",)
            if signals[n]["available"]
        ],
        "alarm_log_available": events is not None,
        "notes": notes,
    }
    if not rows and not period.everything:
        kept = sorted(inputs.buckets)
        newest = iso((kept[-1] + 1) * config.window_resolution) if kept else None
        notes.insert(
            0,
            "No predictions in this period"
            + (f": the kept per-period counts end at {newest} (prediction time)." if newest else "."),
        )
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "title": "stream-fair fairness report",
        "generated_at": iso(inputs.taken_at),
        "models": models,
        "period": period_doc,
        "settings": {
            "credible_level": num(settings.credible_level),
            "min_samples": settings.min_samples,
            "prior": settings.prior,
            "pooling": settings.pooling,
            "thresholds": {d: num(settings.thresholds[d]) for d in DISPARITIES},
            "disparity_rates": {d: list(DISPARITY_RATES[d]) for d in DISPARITIES},
            "features": [f.name for f in config.fairness.features],
            "intersections": [list(c) for c in config.fairness.intersections],
        },
        "summary": {
            "coverage": coverage_note(cov),
            "totals": totals,
            "flagged": flagged,
            "alarms_raised_in_period": None
            if in_period is None
            else sum(e["kind"] == "alarm_raised" for e in in_period),
        },
        "features": features,
        "over_time": _over_time(inputs, chosen, keys, refs),
        "alarms": {
            "available": events is not None,
            "events_in_period": in_period,
            "now": None if inputs.alarms_now is None else [dict(a) for a in inputs.alarms_now],
        },
        "signals": signals,
        "unknown": unknown,
        "definitions": dict(DEFINITIONS),
        "audit": {
            "software": {"name": "stream-fair", "version": inputs.software_version},
            "config_fingerprint": config_fingerprint(config),
            "source": inputs.source,
            "data_taken_at": iso(inputs.taken_at),
            "period": {"from": period_doc["prediction_time_from"], "to": period_doc["prediction_time_to"]},
            "partitions": [dict(p) for p in sorted(inputs.partitions, key=lambda p: p["partition"])],
            "coverage": cov,
            "sources": [dict(x) for x in inputs.sources]
            or [
                {
                    "source": inputs.source,
                    "data_taken_at": iso(inputs.taken_at),
                    "leader": inputs.leader,
                    "partitions_used": [
                        {k: p[k] for k in ("partition", "next_offsets", "consumed") if k in p}
                        for p in sorted(inputs.partitions, key=lambda p: p["partition"])
                    ],
                    "partitions_dropped": [],
                }
            ],
            "window_resolution_seconds": config.window_resolution,
        },
    }
    return seal(json.loads(json.dumps(doc, allow_nan=False)))


__all__ = [
    "DEFINITIONS", "SCHEMA", "SIGNALS", "Period", "ReportError", "ReportInputs", "assemble", "coverage_note",
    "coverage_of",
    "canonical", "config_fingerprint", "content_hash", "iso", "parse_period", "parse_time", "seal", "verify",
]  # fmt: skip
