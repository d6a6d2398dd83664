"""``stream-fair whatif``: ask a running instance's ``/whatif`` and print the answer as a table.

>>> print(format_rule({"thresholds": [0.4, 0.46], "weights": [0.7, 0.3]}))
0.40 (70%) / 0.46 (30%)
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import Any

from stream_fair.errors import StreamFairError, WhatIfError
from stream_fair.web import client_context
from stream_fair.whatif import REPORTED_RATES

UNREACHABLE_ERROR = "cannot reach {url} ({reason}): is stream-fair running there? pass --url"
NOT_JSON_ERROR = "{url} answered {status} without a what-if document: is it a stream-fair {need}?"
PASSWORD_ENV = "STREAM_FAIR_PASSWORD"
_SHORT = {
    "selection_rate": "selection",
    "true_positive_rate": "TPR",
    "false_positive_rate": "FPR",
    "accuracy": "accuracy",
}


def fetch(
    url: str,
    params: Sequence[tuple[str, str]],
    *,
    user: str | None = None,
    password: str | None = None,
    cafile: str | None = None,
    server_name: str | None = None,
    timeout: float = 30.0,
) -> dict[str, Any]:
    """GET ``url/whatif?params``; the document, or WhatIfError with the server's message."""
    full = url.rstrip("/") + "/whatif?" + urllib.parse.urlencode(list(params))
    req = urllib.request.Request(full, headers={"Accept": "application/json"})
    if user is not None:
        token = base64.b64encode(f"{user}:{password or ''}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
    context = client_context(cafile, server_name)
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as resp:
            return _document(resp.status, resp.read(), url)
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            raise WhatIfError(f"{url} needs credentials: pass --user and set {PASSWORD_ENV}") from None
        doc = _document(exc.code, exc.read(), url)
        raise WhatIfError(doc.get("error", f"HTTP {exc.code}")) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise StreamFairError(UNREACHABLE_ERROR.format(url=url, reason=reason)) from None


def _document(status: int, body: bytes, url: str) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        raise StreamFairError(NOT_JSON_ERROR.format(url=url, status=status, need="with /whatif"))
    return doc


def format_rule(rule: dict[str, Any]) -> str:
    ts, ws = rule["thresholds"], rule["weights"]
    if len(ts) == 1 and "coin" not in rule:
        return f"{ts[0]:.2f}"
    text = " / ".join(f"{t:.2f} ({w:.0%})" for t, w in zip(ts, ws, strict=True))
    if "coin" in rule:
        text += f" + coin {rule['coin']['weight']:.0%} at {rule['coin']['selection_rate']:.2f}"
    return text


def _est(e: dict[str, float]) -> str:
    return f"{e['value']:.3f} [{e['lower']:.3f}, {e['upper']:.3f}]"


def _change(e: dict[str, float]) -> str:
    return f"{e['value']:+.3f} [{e['lower']:+.3f}, {e['upper']:+.3f}]"


def format_document(doc: dict[str, Any]) -> str:
    """The what-if as text: per group the threshold and rates now -> projected, then the disparities."""
    level = doc.get("credible_level", 0.95)
    head = f"model {doc['model']}  feature {doc['feature']}"
    if doc.get("criterion"):
        head += f"  criterion {doc['criterion']} ({doc['mode']}, tolerance {doc['tolerance']:g})"
        head += ": met" if doc.get("met") else ": NOT met"
    lines = [head, f"intervals: {level:.0%}; 'now -> projected'", ""]
    rows = [["group", "n", "threshold", *(_SHORT[r] for r in REPORTED_RATES), "accuracy change (pitfall 2)"]]
    for g, r in doc["groups"].items():
        rates = [
            f"{r['current_rates'][m]['value']:.3f} -> {_est(r['rates'][m])}" if m in r["rates"] else "-"
            for m in REPORTED_RATES
        ]
        threshold = f"{r['current_threshold']:.2f} -> {format_rule(r['rule'])}"
        rows.append([g, str(r["n"]), threshold, *rates, _change(r["accuracy_change"])])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.append("")
    for name, e in doc["disparities"].items():
        now = doc["current_disparities"].get(name)
        lines.append(f"{name}: {now['value']:.3f} -> {_est(e)}" if now else f"{name}: {_est(e)}")
    acc_now, acc = doc["current_overall"]["accuracy"], doc["overall"]["accuracy"]
    sel_now, sel = doc["current_overall"]["selection_rate"], doc["overall"]["selection_rate"]
    lines.append(
        f"overall accuracy: {acc_now['value']:.3f} -> {_est(acc)}, change {_change(doc['accuracy_change'])}"
    )
    change = _change(doc["selection_change"])
    lines.append(f"overall selection rate: {sel_now['value']:.3f} -> {_est(sel)}, change {change}")
    for g, why in doc.get("excluded", {}).items():
        lines.append(f"excluded {g}: {why}")
    lines += [f"note: {n}" for n in doc.get("notes", [])]
    return "\n".join(lines)
