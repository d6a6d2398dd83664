"""One report over several replicas: their report inputs merged by partition (pure, no I/O).

stream-fair runs as N replicas in one consumer group, each owning some input partitions; the
report of one replica covers its partitions only. :func:`merge` combines the
:class:`~stream_fair.stakeholder_report.ReportInputs` of several sources (``/report.json?raw=1``
of each replica, or several state directories) into one, exactly where the data allows:

* **All-data counts** are summed per partition (counts are additive). Each partition is taken from
  one source only: if two sources hold the same partition (during a rebalance, or a stale state
  directory), the one with the higher committed offsets wins (sum of the next offsets of both
  input topics; a tie goes to the later snapshot) and the other is listed as dropped, never
  counted twice.
* **Per-period counts** (buckets) are per replica, not per partition: each replica keeps the rows
  *it* folded, including those of partitions it owned earlier. They are summed over the sources;
  rows folded by a replica that is not among the sources are missing from periods (the report
  says so), and the duplicate rule cannot be applied to them.
* **Alarm log**: the model-wide leader's (a source with ``leader`` true); replica-local logs of
  several sources are not merged (they are per replica): not available then.
* **What-ifs and label-free estimates** are computed by each replica over its own partitions and
  are not additive: they are kept per source, each marked with the source and the partitions it
  covers, never presented as model-wide. Root cause and unconfigured intersections are computed
  again by :func:`~stream_fair.stakeholder_report.assemble` on the merged counts.

The raw payload of one source (:func:`inputs_to_json` / :func:`inputs_from_json`) carries the
config sections that decide the numbers, so a merged report needs no local config.

>>> from stream_fair.config import Config
>>> cfg = Config()
>>> def src(name, p, offsets, n):
...     return ReportInputs(config=cfg, cumulative={}, buckets={}, source=name, taken_at=0.0,
...         software_version="x", partitions=[{"partition": p, "next_offsets": offsets}],
...         partition_rows={p: {("m", ("F",)): [0, n, 0, 0, 0, 0, 0]}}, partitions_total=2)
>>> m = merge([src("a", 0, [10, 10], 10), src("b", 0, [12, 11], 12), src("c", 1, [5, 5], 5)])
>>> m.cumulative[("m", ("F",))][1], [p["source"] for p in m.partitions]
(17, ['b', 'c'])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from stream_fair.config import Config
from stream_fair.counts import WIDTH, Key, add_rows
from stream_fair.stakeholder_report import (
    FINGERPRINT_SECTIONS,
    ReportError,
    ReportInputs,
    config_fingerprint,
    iso,
)

RAW_SCHEMA = "stream-fair-report-inputs/1"
#: Analyses a replica computes over its own partitions only (kept per source when merged).
PER_SOURCE_SIGNALS = ("threshold_whatif", "label_free_estimates")

ERR_CONFIG = (
    "report error: {a} and {b} run different configurations (features, windows, thresholds or "
    "topics differ): a report can merge replicas of one deployment only"
)
ERR_NO_PARTITIONS = (
    "report error: {source} gives no per-partition counts (an older version?): upgrade it, or make "
    "its report alone"
)
ERR_RAW = "report error: {source} did not answer a stream-fair report payload ({problem})"


# -- the raw payload ------------------------------------------------------------------------------
def _rows_to_json(rows: Mapping[Key, Sequence[int]]) -> list[list[Any]]:
    return [[m, list(c), list(r)] for (m, c), r in sorted(rows.items())]


def _rows_from_json(rows: Any) -> dict[Key, list[int]]:
    return {(str(m), tuple(str(x) for x in c)): [int(v) for v in r] for m, c, r in rows}


def inputs_to_json(inputs: ReportInputs) -> dict[str, Any]:
    """One source's inputs as JSON: per-partition counts, buckets, offsets, signals, and the
    config sections that decide the numbers (no addresses or credentials)."""
    dump = inputs.config.model_dump(mode="json", by_alias=True)
    sections = {("schema" if k == "schema_" else k): dump["schema" if k == "schema_" else k]
                for k in FINGERPRINT_SECTIONS}  # fmt: skip
    return {
        "schema": RAW_SCHEMA,
        "source": inputs.source,
        "taken_at": inputs.taken_at,
        "software_version": inputs.software_version,
        "config": sections,
        "config_fingerprint": config_fingerprint(inputs.config)["value"],
        "partitions_total": inputs.partitions_total,
        "leader": inputs.leader,
        "partitions": [dict(p) for p in inputs.partitions],
        "partition_rows": {str(p): _rows_to_json(r) for p, r in sorted(inputs.partition_rows.items())},
        "buckets": {str(b): _rows_to_json(r) for b, r in sorted(inputs.buckets.items())},
        "last_bucket": inputs.last_bucket,
        "alarm_events": None if inputs.alarm_events is None else [dict(e) for e in inputs.alarm_events],
        "alarms_now": None if inputs.alarms_now is None else [dict(a) for a in inputs.alarms_now],
        "signals": dict(inputs.signals),
        "signal_notes": dict(inputs.signal_notes),
        "notes": list(inputs.notes),
    }


def inputs_from_json(doc: Any, where: str) -> ReportInputs:
    """The inputs of :func:`inputs_to_json`; ReportError (one line) when it is not one."""
    if not isinstance(doc, dict) or doc.get("schema") != RAW_SCHEMA:
        raise ReportError(ERR_RAW.format(source=where, problem="not the raw report inputs"))
    try:
        config = Config.model_validate(doc["config"])
        if config_fingerprint(config)["value"] != doc["config_fingerprint"]:
            raise ReportError(ERR_RAW.format(source=where, problem="its config did not round-trip"))
        partition_rows = {int(p): _rows_from_json(r) for p, r in doc["partition_rows"].items()}
        cumulative: dict[Key, list[int]] = {}
        for rows in partition_rows.values():
            _add(cumulative, rows)
        return ReportInputs(
            config=config,
            cumulative=cumulative,
            buckets={int(b): _rows_from_json(r) for b, r in doc["buckets"].items()},
            partitions=list(doc["partitions"]),
            source=str(doc["source"]),
            taken_at=float(doc["taken_at"]),
            software_version=str(doc["software_version"]),
            alarm_events=doc.get("alarm_events"),
            alarms_now=doc.get("alarms_now"),
            last_bucket=doc.get("last_bucket"),
            notes=list(doc.get("notes") or ()),
            signals=dict(doc.get("signals") or {}),
            signal_notes=dict(doc.get("signal_notes") or {}),
            partition_rows=partition_rows,
            partitions_total=doc.get("partitions_total"),
            leader=doc.get("leader"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ReportError(ERR_RAW.format(source=where, problem=f"{type(exc).__name__}: {exc}")) from None


# -- merging --------------------------------------------------------------------------------------
def _add(acc: dict[Key, list[int]], rows: Mapping[Key, Sequence[int]]) -> None:
    for key, row in rows.items():
        dest = acc.get(key)
        if dest is None:
            dest = acc[key] = [0] * WIDTH
        add_rows(dest, list(row)[:WIDTH])


def _progress(p: Mapping[str, Any]) -> int:
    """How far a partition's committed state has got: the sum of its next offsets."""
    return sum(int(o) for o in (p.get("next_offsets") or ()) if o is not None)


def _span(parts: Sequence[int], total: int | None) -> str:
    listed = ", ".join(map(str, parts)) or "none"
    if total is None:
        return f"partitions {listed}"
    if len(parts) == total:
        return f"all {total} partitions ({listed})"
    return f"partitions {listed} of {total} only (not model-wide)"


def _per_source_signals(
    sources: Sequence[ReportInputs], owned: Mapping[str, list[int]], total: int | None
) -> tuple[dict[str, Any], dict[str, str]]:
    signals: dict[str, Any] = {}
    notes: dict[str, str] = {}
    for name in PER_SOURCE_SIGNALS:
        items: list[dict[str, Any]] = []
        for s in sources:
            data = s.signals.get(name)
            if not isinstance(data, Mapping):
                continue
            covers = f"from {s.source}: {_span(owned[s.source], total)}"
            if name == "threshold_whatif":
                for w in data.get("whatifs") or ():
                    items.append({**w, "source": s.source, "notes": [*(w.get("notes") or ()), covers + "."]})
            else:
                for fe in data.get("features") or ():
                    items.append({**fe, "source": covers})
        if not items:
            reasons = sorted({s.signal_notes.get(name, "") for s in sources} - {""})
            notes[name] = "; ".join(reasons) or "no source computed it"
        elif name == "threshold_whatif":
            signals[name] = {
                "over": "per replica: each what-if covers only the labelled pairs of the source named "
                "in its notes, not the whole model",
                "whatifs": items,
            }
        else:
            signals[name] = {
                "view": "pending predictions, cumulative, per replica: each table covers only the "
                "partitions of the source named, not the whole model",
                "features": items,
            }
    return signals, notes


def merge(sources: Sequence[ReportInputs]) -> ReportInputs:
    """The inputs of one report over ``sources`` (see the module docstring for the rules)."""
    if not sources:
        raise ReportError("report error: nothing to merge: pass at least one --url or --state-dir")
    if len(sources) == 1:
        return sources[0]
    names = [s.source for s in sources]
    for name in names:
        if names.count(name) > 1:
            raise ReportError(f"report error: {name} is given twice: pass each replica once")
    first = sources[0]
    fp = config_fingerprint(first.config)["value"]
    for s in sources[1:]:
        if config_fingerprint(s.config)["value"] != fp:
            raise ReportError(ERR_CONFIG.format(a=first.source, b=s.source))
    for s in sources:
        if {int(p["partition"]) for p in s.partitions} - set(s.partition_rows):
            raise ReportError(ERR_NO_PARTITIONS.format(source=s.source))

    # each partition from the source that got furthest with it
    candidates: dict[int, list[tuple[ReportInputs, Mapping[str, Any]]]] = {}
    for s in sources:
        for p in s.partitions:
            candidates.setdefault(int(p["partition"]), []).append((s, p))
    partitions: list[dict[str, Any]] = []
    cumulative: dict[Key, list[int]] = {}
    used: dict[str, list[int]] = {s.source: [] for s in sources}
    dropped: dict[str, list[dict[str, Any]]] = {s.source: [] for s in sources}
    notes: list[str] = []
    for pid in sorted(candidates):
        ranked = sorted(candidates[pid], key=lambda sp: (_progress(sp[1]), sp[0].taken_at), reverse=True)
        (win, wp), rest = ranked[0], ranked[1:]
        _add(cumulative, win.partition_rows[pid])
        partitions.append({**wp, "source": win.source})
        used[win.source].append(pid)
        for s, p in rest:
            dropped[s.source].append({**p, "kept_from": win.source})
            notes.append(
                f"Partition {pid} was reported by {win.source} "
                f"(next offsets {list(wp.get('next_offsets') or [])}) "
                f"and {s.source} (next offsets {list(p.get('next_offsets') or [])}), as during a rebalance: "
                f"counted once, from {win.source} (higher committed offsets)."
            )
    buckets: dict[int, dict[Key, list[int]]] = {}
    for s in sources:
        for b, rows in s.buckets.items():
            _add(buckets.setdefault(b, {}), rows)
    lasts = [s.last_bucket for s in sources if s.last_bucket is not None]
    totals = {s.partitions_total for s in sources if s.partitions_total is not None}
    total = max(totals) if totals else None
    if len(totals) > 1:
        notes.append(
            f"The sources disagree on the topic's partition count ({sorted(totals)}): the largest is used."
        )
    notes.append(
        "Per-period counts (the period's numbers, the over-time series, the root cause) are summed "
        "over each source's own event-time buckets: a replica keeps the rows it folded itself, so rows "
        "folded by a replica that is not among the sources are missing from periods (not from the "
        "all-data counts, which come from each partition's full state)."
        + (
            " The duplicate-partition rule applies to the all-data counts only."
            if any(dropped.values())
            else ""
        )
    )
    leaders = [s for s in sources if s.leader]
    if leaders:
        alarm_from: ReportInputs | None = leaders[0]
        notes.append(f"The alarm log is the model-wide leader's ({leaders[0].source}).")
    else:
        alarm_from = None
        notes.append(
            "No source is the model-wide leader: the alarm log is not available in a merged report "
            "(replica-local alarm logs are not merged); add the leader's --url (stream_fair_leader == 1)."
        )
    signals, signal_notes = _per_source_signals(sources, used, total)
    return ReportInputs(
        config=first.config,
        cumulative=cumulative,
        buckets=buckets,
        partitions=partitions,
        source=f"{len(sources)} sources merged by partition: " + "; ".join(s.source for s in sources),
        taken_at=max(s.taken_at for s in sources),
        software_version=first.software_version,
        alarm_events=None if alarm_from is None else alarm_from.alarm_events,
        alarms_now=None if alarm_from is None else alarm_from.alarms_now,
        last_bucket=max(lasts) if lasts else None,
        notes=notes,
        signals=signals,
        signal_notes=signal_notes,
        partition_rows={},
        partitions_total=total,
        leader=bool(leaders),
        sources=[
            {
                "source": s.source,
                "data_taken_at": iso(s.taken_at),
                "leader": s.leader,
                "partitions_used": [
                    {k: p[k] for k in ("partition", "next_offsets", "consumed") if k in p}
                    for p in s.partitions
                    if int(p["partition"]) in used[s.source]
                ],
                "partitions_dropped": dropped[s.source],
            }
            for s in sources
        ],
    )


__all__ = ["PER_SOURCE_SIGNALS", "RAW_SCHEMA", "inputs_from_json", "inputs_to_json", "merge"]
