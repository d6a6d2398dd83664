"""Where a stakeholder report's inputs come from: a running detector, its HTTP endpoint, or a
state directory read offline. The I/O edge of :mod:`stream_fair.stakeholder_report`.

* :func:`inputs_from_detector`: inside a running detector (``/report.json``), under the lock that
  guards checkpoints, so the counts, buckets and offsets belong to one committed checkpoint.
* :func:`fetch_report`: ``GET /report.json`` of a running instance (same auth as ``/metrics``).
* :func:`inputs_from_state`: a state directory opened **read-only** (RocksDB's read-only mode
  takes no lock and writes nothing, so it works next to a running detector and cannot disturb
  it). It sees the state as of the moment it is opened: the last checkpoint written to disk; the
  per-period buckets are written right after each checkpoint, so they can lag it by one.
"""

from __future__ import annotations

import base64
import json
import struct
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from stream_fair import __version__
from stream_fair.config import Config
from stream_fair.counts import WIDTH, Key
from stream_fair.stakeholder_report import Period, ReportError, ReportInputs, assemble, parse_period
from stream_fair.web import client_context

ERR_UNREACHABLE = (
    "report error: cannot reach {url} ({reason}): check --url (the detector's exporter address, "
    "e.g. http://localhost:9800) and that it runs"
)
ERR_HTTP = "report error: {url} answered {code}: {body}"
ERR_STATE = "report error: cannot read the state directory {path} ({reason}): {fix}"
ERR_FINGERPRINT = (
    "report error: {path} was written for another configuration (features, intersections, windows, "
    "feedback units, group or topics differ): pass the --config the detector runs with"
)


def _alarm_signal_note(leader: bool | None) -> str:
    return (
        "this replica is not the leader of the model-wide alarm: make the report from the "
        "leader (stream_fair_leader == 1) for the alarm log"
        if leader is False
        else ""
    )


# -- a running detector ---------------------------------------------------------------------------
def collect(snapshot: Any, tracker: Any, windows: Any) -> dict[str, Any]:
    """Counts, buckets and offsets of one committed checkpoint (call under the checkpoint lock).

    ``snapshot`` is the published :class:`~stream_fair.tracker.Snapshot`, ``windows`` the
    :class:`~stream_fair.aggregate.ModelCounts` folded from the same checkpoints.
    """
    buckets = {b: {k: list(v) for k, v in rows.items()} for b, rows in windows.buckets.items()}
    partitions = []
    cumulative: dict[Key, list[int]] = {}
    per_partition: dict[int, dict[Key, list[int]]] = {}
    if snapshot is not None:
        for p, view in sorted(snapshot.partitions.items()):
            shard = tracker.shards.get(p) if tracker is not None else None
            partitions.append(
                {
                    "partition": p,
                    "next_offsets": list(shard.committed_offsets) if shard is not None else [None, None],
                    "consumed": list(view.consumed),
                    "last_event_ts": list(view.last_ts),
                }
            )
            per_partition[p] = {k: list(row[:WIDTH]) for k, row in view.cells.items()}
            for k, row in view.cells.items():
                acc = cumulative.setdefault(k, [0] * WIDTH)
                for i, v in enumerate(row[:WIDTH]):
                    acc[i] += v
    return {
        "cumulative": cumulative,
        "partition_rows": per_partition,
        "buckets": buckets,
        "last_bucket": windows.last_bucket,
        "partitions": partitions,
        "taken_at": snapshot.taken_at if snapshot is not None else time.time(),
    }


#: The criteria a what-if can meet, by the disparity that measures them.
_CRITERIA = {
    "equal_opportunity_difference": "equal_opportunity",
    "demographic_parity_difference": "demographic_parity",
    "equalized_odds_difference": "equalized_odds",
}


def _whatifs(detector: Any, report: Any) -> tuple[Any, str]:
    """Per (model, feature) with a flagged between-groups disparity of a criterion, the thresholds
    that would meet it (``/whatif``, over every labelled pair held: not limited to the period)."""
    if not hasattr(detector, "whatif_document"):
        return None, "not available on this instance (this version has no /whatif)"
    asked = []
    for v in report.views:
        if v.window != "cumulative":
            continue
        for d, criterion in _CRITERIA.items():
            if v.report.flagged.get((d, "between_groups")):
                asked.append((v.model, v.feature.name, criterion))
                break
    if not asked:
        return None, "no disparity of a what-if criterion is flagged: no threshold change to consider"
    out = []
    for model, feature, criterion in asked[:6]:
        query = {"model": [model], "feature": [feature], "criterion": [criterion]}
        try:
            code, doc = detector.whatif_document(query)
        except Exception as exc:  # a what-if never breaks the report
            code, doc = 500, {"error": f"{type(exc).__name__}: {exc}"}
        out.append({"model": model, "feature": feature, "criterion": criterion, "status": code, **doc})
    return {"over": "every labelled pair the instance holds (not only the period)", "whatifs": out}, ""


def _estimates(report: Any) -> tuple[Any, str]:
    """The label-free estimates (:mod:`stream_fair.estimates`) of the pending predictions."""
    views = getattr(report, "estimates", None)
    if views is None:
        return None, "not available on this instance (this version has no label-free estimates)"
    if not views:
        return None, "no scored predictions, or fairness.estimates.enabled is off"
    out = []
    for ev in views:
        fe = ev.estimates
        groups = {}
        for g, ge in fe.groups.get("pending", {}).items():
            cal = fe.calibration.get(g)
            groups[g] = {
                "pending": fe.pending.get(g, 0),
                "trusted": ge.trusted,
                "calibration_error": None if cal is None or cal.ece is None else cal.ece.value,
                "reason": "" if cal is None else cal.reason,
                "rates": {
                    r: {"value": e.value, "lower": e.lower, "upper": e.upper} for r, e in ge.rates.items()
                },
            }
        flagged = sorted(
            d for (d, m), f in fe.flagged.get("pending", {}).items() if f and m == "between_groups"
        )
        out.append({"model": ev.model, "feature": ev.feature.name, "groups": groups, "flagged": flagged})
    return {"view": "pending predictions (outcomes not arrived yet), cumulative", "features": out}, ""


def inputs_from_detector(detector: Any, source: str) -> ReportInputs:
    """The inputs of a running :class:`~stream_fair.app.Detector` (one committed checkpoint)."""
    with detector.lock:
        parts = collect(detector._snapshot, detector.tracker, detector.windows)
    partitions = parts["partitions"]
    report, _ = detector.current()
    signals, signal_notes = {}, {}
    for name, (data, note) in (
        ("threshold_whatif", _whatifs(detector, report)),
        ("label_free_estimates", _estimates(report)),
    ):
        if data is None:
            signal_notes[name] = note
        else:
            signals[name] = data
    alarms = detector.alarms_document()
    leader = alarms.get("leader")
    notes = []
    events: list[dict[str, Any]] | None = list(alarms.get("events") or [])
    if leader is False:
        events = None
        notes.append(_alarm_signal_note(leader))
    return ReportInputs(
        config=detector.config,
        cumulative=parts["cumulative"],
        buckets=parts["buckets"],
        partitions=partitions,
        source=source,
        taken_at=parts["taken_at"],
        software_version=__version__,
        alarm_events=events,
        alarms_now=None if events is None else alarms.get("alarms"),
        last_bucket=parts["last_bucket"],
        notes=notes,
        signal_notes=signal_notes,
        signals=signals,
        partition_rows=parts["partition_rows"],
        partitions_total=getattr(detector, "_partitions", 0) or None,
        leader=leader,
    )


def report_endpoint(detector: Any, query: Mapping[str, list[str]], source: str) -> tuple[int, dict[str, Any]]:
    """``/report.json?from=..&to=..`` or ``?last=6h``: (status, document or {"error": one line}).

    ``?raw=1``: this replica's report inputs instead (per-partition counts, buckets, offsets; see
    :func:`stream_fair.report_merge.inputs_to_json`), what ``stream-fair report`` merges when given
    several ``--url``.
    """

    def one(name: str) -> str | None:
        values = query.get(name)
        return values[-1] if values else None

    if one("raw") not in (None, "0", "false"):
        from stream_fair.report_merge import inputs_to_json

        return 200, inputs_to_json(inputs_from_detector(detector, source))
    try:
        period = parse_period(one("from"), one("to"), one("last"))
        return 200, assemble(inputs_from_detector(detector, source), period)
    except ReportError as exc:
        return 400, {"error": str(exc)}


# -- over HTTP ------------------------------------------------------------------------------------
def fetch_report(
    url: str,
    period: Period,
    *,
    user: str | None = None,
    password: str | None = None,
    timeout: float = 30.0,
    cafile: str | None = None,
    server_name: str | None = None,
    raw: bool = False,
) -> dict[str, Any]:
    """GET ``/report.json`` of a running instance (``raw``: its report inputs, ``?raw=1``);
    ReportError (one line) when it cannot."""
    base = url.rstrip("/")
    if not base.startswith(("http://", "https://")):
        base = "http://" + base
    params = {"raw": "1"} if raw else {}
    if period.start is not None:
        params["from"] = repr(period.start)
    if period.end is not None:
        params["to"] = repr(period.end)
    full = f"{base}/report.json" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    req = urllib.request.Request(full, headers={"Accept": "application/json"})
    if user is not None:
        token = base64.b64encode(f"{user}:{password or ''}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
    ctx = client_context(cafile, server_name)
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=ctx) as resp:
            body = resp.read()
    except urllib.error.HTTPError as exc:
        text = exc.read().decode("utf-8", "replace")
        try:
            text = json.loads(text)["error"]
            raise ReportError(text) from None
        except (ValueError, KeyError, TypeError):
            pass
        hint = {
            401: "unauthorized: pass --user and --password-file",
            404: "no /report.json there: is it a stream-fair exporter of this version?",
        }.get(exc.code, text.strip().splitlines()[0] if text.strip() else exc.reason)
        raise ReportError(ERR_HTTP.format(url=full, code=exc.code, body=hint)) from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ReportError(ERR_UNREACHABLE.format(url=base, reason=reason)) from None
    try:
        doc = json.loads(body)
    except ValueError:
        raise ReportError(ERR_HTTP.format(url=full, code=200, body="not JSON")) from None
    if not isinstance(doc, dict) or "schema" not in doc:
        raise ReportError(ERR_HTTP.format(url=full, code=200, body="not a stream-fair report"))
    if raw and "partition_rows" not in doc:
        raise ReportError(
            ERR_HTTP.format(url=full, code=200, body="no raw report inputs: is it an older stream-fair?")
        )
    return doc


# -- a state directory, offline -----------------------------------------------------------------
def inputs_from_state(config: Config, path: str | Path | None = None) -> ReportInputs:
    """Read a state directory read-only (next to a running detector or after it stopped)."""
    from rocksdict import AccessType, Options, Rdict

    from stream_fair.config import fingerprint, fingerprint_difference
    from stream_fair.state.codec import (
        FORMAT_KEY,
        SPACE_COUNTS,
        SPACE_META,
        WINDOWS_PREFIX,
        decode_json,
        feedback_key,
        split_key,
    )

    p = Path(path if path is not None else config.state.path)
    if not (p / "CURRENT").exists():
        raise ReportError(
            ERR_STATE.format(
                path=p,
                reason="no RocksDB database there",
                fix="pass --state-dir (state.path of the detector)",
            )
        )
    db = None
    last_exc: Exception | None = None
    for _ in range(3):  # a live detector may delete a log file while it is being opened
        try:
            db = Rdict(str(p), Options(raw_mode=True), access_type=AccessType.read_only())
            break
        except Exception as exc:  # rocksdict raises plain Exceptions
            last_exc = exc
            time.sleep(0.2)
    if db is None:
        raise ReportError(
            ERR_STATE.format(
                path=p, reason=str(last_exc).splitlines()[0], fix="check the path and its permissions"
            )
        )
    try:
        raw = db.get(FORMAT_KEY)
        stored = decode_json(raw) if raw is not None else {}
        if fingerprint_difference(stored.get("fingerprint") or {}, fingerprint(config)):
            raise ReportError(ERR_FINGERPRINT.format(path=p))
        cumulative: dict[Key, list[int]] = {}
        per_partition: dict[int, dict[Key, list[int]]] = {}
        metas: dict[int, dict[str, Any]] = {}
        it = db.iter()
        it.seek(bytes([SPACE_COUNTS]))
        while it.valid():
            key = it.key()
            space, partition, _ = split_key(key)
            if space > SPACE_META:
                break
            if space == SPACE_COUNTS:
                model, cell, row = decode_json(it.value())
                key_ = (str(model), tuple(cell))
                acc = cumulative.setdefault(key_, [0] * WIDTH)
                own = per_partition.setdefault(partition, {}).setdefault(key_, [0] * WIDTH)
                for i, v in enumerate(list(row)[:WIDTH]):
                    acc[i] += int(v)
                    own[i] += int(v)
            elif space == SPACE_META:
                metas[partition] = decode_json(it.value())
            it.next()
        buckets: dict[int, dict[Key, list[int]]] = {}
        it = db.iter()
        it.seek(WINDOWS_PREFIX + b"b")
        while it.valid() and it.key() < WINDOWS_PREFIX + b"c":
            b = struct.unpack(">q", it.key()[len(WINDOWS_PREFIX) + 1 :])[0]
            buckets[b] = {(str(m), tuple(c)): [int(x) for x in row] for m, c, row in decode_json(it.value())}
            it.next()
        wmeta = db.get(WINDOWS_PREFIX + b"m")
        last_bucket = decode_json(wmeta)["last_bucket"] if wmeta is not None else None
        fb_raw = db.get(feedback_key(("verdict",)))  # the monitor's entry holding its alarm log
    finally:
        db.close()
    events = None
    notes = [
        "Read offline from the state directory (read-only): the counts are those of the last "
        "checkpoint on disk, for the partitions stored there "
        f"({', '.join(map(str, sorted(metas))) or 'none'})."
    ]
    if fb_raw is not None:
        fb = decode_json(fb_raw)
        events = list(fb["state"].get("events") or [])
    if events is None:
        notes.append(
            "The alarm log is not in this state directory (with a changelog the model-wide alarm "
            "lives in the leader's topic): make the report from the running instance with --url."
        )
    partitions = [
        {
            "partition": i,
            "next_offsets": list(m.get("offsets") or [None, None]),
            "consumed": list(m.get("consumed") or [None, None]),
            "last_event_ts": list(m.get("last_ts") or [None, None]),
        }
        for i, m in sorted(metas.items())
    ]
    return ReportInputs(
        config=config,
        cumulative=cumulative,
        buckets=buckets,
        partitions=partitions,
        source=f"state directory {p} (read-only)",
        taken_at=max((t for m in metas.values() for t in (m.get("wall"),) if t), default=time.time()),
        software_version=__version__,
        alarm_events=events,
        last_bucket=last_bucket,
        notes=notes,
        partition_rows={i: per_partition.get(i, {}) for i in metas},
        signal_notes={
            name: "not available offline: computed by a running instance only"
            for name in (
                "root_cause",
                "unconfigured_intersections",
                "threshold_whatif",
                "label_free_estimates",
            )
        },
    )
