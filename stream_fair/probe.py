"""``check-config --probe``: how a few real records decode under the config, before anything runs.

Pure: it gets the raw record values (the CLI reads them with :func:`stream_fair.transport.
sample_records`) and decodes them with the same :class:`~stream_fair.decode.Decoder` the detector
uses, so what it shows is what ``run`` would count. For each topic it reports the fields found in
the records, whether each configured path is there, the groups seen per feature, the models and the
rejections; :attr:`TopicProbe.problems` names what would make the detector measure nothing.

>>> from stream_fair.config import Config
>>> cfg = Config.model_validate({"fairness": {"features": ["sex"]}})
>>> raw = [b'{"id": "a", "ts": 1, "model": "m", "prediction": 1, "attributes": {"group": "A"}}']
>>> p = probe_topic("predictions", "preds", raw, cfg)
>>> p.groups["sex"]
Counter({'__missing__': 1})
>>> problem = p.problems[0]
>>> "attributes.sex is in 0 of 1 records" in problem, problem.endswith("records have attributes.group")
(True, True)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import orjson

from stream_fair.config import Config
from stream_fair.decode import _ABSENT, Decoder, getter  # the decoder's own 'no such field'
from stream_fair.events import Rejection
from stream_fair.groups import MISSING

_MAX_DEPTH = 3


@dataclass
class TopicProbe:
    """What ``records`` values of one topic look like to the decoder."""

    role: str  # "predictions" or "outcomes"
    topic: str
    records: int = 0
    fields: Counter[str] = field(default_factory=Counter)  # dotted leaf paths found -> records
    configured: dict[str, tuple[str, int]] = field(default_factory=dict)  # key -> (path, records with it)
    groups: dict[str, Counter[str]] = field(default_factory=dict)  # feature -> group -> n
    models: Counter[str] = field(default_factory=Counter)
    rejections: Counter[str] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)  # reason -> one detail
    problems: list[str] = field(default_factory=list)


def _leaves(doc: object, prefix: str = "", depth: int = 0) -> Iterable[str]:
    if isinstance(doc, dict) and depth < _MAX_DEPTH:
        for k, v in doc.items():
            yield from _leaves(v, f"{prefix}{k}.", depth + 1)
    elif prefix:
        yield prefix[:-1]


def _configured_paths(role: str, config: Config) -> dict[str, str]:
    s = config.schema_
    if role == "outcomes":
        o = s.outcome
        return {"id": o.id, "timestamp": o.timestamp, "label": o.label}
    p = s.prediction
    paths = {"id": p.id, "timestamp": p.timestamp, "model": p.model}
    if p.prediction is not None:
        paths["prediction"] = p.prediction
    if p.score is not None:
        paths["score"] = p.score
    for f in config.fairness.carried:
        paths[f"feature {f.name}"] = str(f.path)
    return paths


def probe_topic(role: str, topic: str, values: Iterable[bytes | None], config: Config) -> TopicProbe:
    """Decode ``values`` (record values of ``topic``) as the detector would and summarise them."""
    probe = TopicProbe(role, topic)
    decoder = Decoder(config)
    paths = _configured_paths(role, config)
    present: Counter[str] = Counter()
    getters = {key: getter(path) for key, path in paths.items()}
    features = [f.name for f in config.fairness.carried]
    probe.groups = {name: Counter() for name in features} if role == "predictions" else {}
    for raw in values:
        probe.records += 1
        try:
            doc = orjson.loads(raw) if raw is not None else None
        except orjson.JSONDecodeError:
            doc = None
        if isinstance(doc, dict):
            probe.fields.update(set(_leaves(doc)))
            for key, get in getters.items():
                if get(doc) is not _ABSENT:
                    present[key] += 1
        event = decoder.prediction(raw) if role == "predictions" else decoder.outcome(raw)
        if isinstance(event, Rejection):
            probe.rejections[event.reason] += 1
            probe.examples.setdefault(event.reason, event.detail)
            continue
        if role == "predictions":
            probe.models[event.model] += 1  # type: ignore[union-attr]
            for name, value in zip(features, event.cell, strict=True):  # type: ignore[union-attr]
                probe.groups[name][value] += 1
    probe.configured = {key: (paths[key], present[key]) for key in paths}
    probe.problems = _problems(probe)
    return probe


def _problems(probe: TopicProbe) -> list[str]:
    out = []
    if probe.records == 0:
        return [f"no records read from {probe.topic!r}: is anything producing to it?"]
    decoded = probe.records - sum(probe.rejections.values())
    if decoded == 0:
        reason, n = probe.rejections.most_common(1)[0]
        out.append(f"every record is rejected (most often {reason}: {probe.examples[reason]})")
    for key, (path, n) in probe.configured.items():
        if not key.startswith("feature ") or 2 * n > probe.records:
            continue
        name = key.removeprefix("feature ")
        known = {p for p, _ in probe.configured.values()}
        candidates = [f for f in probe.fields if f not in known]
        hint = f"; the records have {', '.join(sorted(candidates)[:6])}" if candidates else ""
        out.append(
            f"feature {name!r}: path {path} is in {n} of {probe.records} records "
            f"(all counted as group {MISSING}){hint}"
            if n == 0
            else f"feature {name!r}: path {path} is in only {n} of {probe.records} records "
            f"(the rest count as group {MISSING})"
        )
    return out


def render(probes: list[TopicProbe]) -> str:
    """The probe as text for a terminal, ending with a verdict line."""
    lines = []
    for p in probes:
        lines.append(f"{p.role}: topic {p.topic!r}, {p.records} records read")
        if p.fields:
            found = ", ".join(f"{f} ({n})" for f, n in sorted(p.fields.items()))
            lines.append(f"  fields found: {found}")
        for key, (path, n) in p.configured.items():
            mark = "ok" if n == p.records and p.records else "MISSING" if n == 0 else "partly"
            lines.append(f"  {key:<20} {path:<28} in {n}/{p.records} records  {mark}")
        for name, groups in p.groups.items():
            seen = ", ".join(f"{g} ({n})" for g, n in groups.most_common()) or "none"
            lines.append(f"  groups of {name}: {seen}")
        if p.models:
            lines.append(f"  models: {', '.join(f'{m} ({n})' for m, n in p.models.most_common())}")
        if p.rejections:
            for reason, n in p.rejections.most_common():
                lines.append(f"  rejected {n}: {reason} (e.g. {p.examples[reason]})")
        else:
            lines.append("  rejected: none")
    problems = [f"{p.role}: {text}" for p in probes for text in p.problems]
    if problems:
        lines.append(f"{len(problems)} problem{'s' if len(problems) > 1 else ''}:")
        lines.extend(f"  - {text}" for text in problems)
    else:
        lines.append("ok: every configured field decodes; `stream-fair run` will count these records")
    return "\n".join(lines)
