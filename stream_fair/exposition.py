"""The ``/metrics`` text: prometheus_client's text format 0.0.4, byte for byte what
``prometheus_client.generate_latest`` writes for the same registry, at a fraction of its cost.

``generate_latest`` escapes and sorts every label of every sample at every scrape (about 12 us a
series); here each family's text is rendered once, and a scrape that gets the same family object
again (the collector reuses the families of an unchanged report,
:class:`~stream_fair.exporter.FairnessCollector`) reuses that text. A family rendered anew looks up
each series' ``name{labels} `` prefix from the previous rendering of that family, so only the
values are formatted: label sets are stable from one scrape to the next, values are not. Both
caches hold only what the last scrape used.

Written by hand because prometheus_client offers no hook to reuse rendered text; the tests compare
the output with ``generate_latest`` byte for byte, special characters included.

>>> from prometheus_client import CollectorRegistry, Gauge, generate_latest
>>> reg = CollectorRegistry()
>>> Gauge("x", 'a "gauge"', ["g"], registry=reg).labels(g='A"\\\\n').set(2)
>>> text = Exposition(reg).render()
>>> text == generate_latest(reg)
True
>>> print(text.decode(), end="")
# HELP x a "gauge"
# TYPE x gauge
x{g="A\\"\\\\n"} 2.0
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

try:  # prometheus_client >= 0.21 escapes names that are not valid legacy names
    from prometheus_client.openmetrics.exposition import UNDERSCORES, escape_label_name, escape_metric_name
except ImportError:  # pragma: no cover (older clients write names as they are)
    UNDERSCORES = ""

    def escape_metric_name(s: str, escaping: str = UNDERSCORES) -> str:
        return s

    def escape_label_name(s: str, escaping: str = UNDERSCORES) -> str:
        return s


# OpenMetrics-only samples that generate_latest moves into a gauge family of their own
_OM_SUFFIXES = ("_created", "_gsum", "_gcount")
_TYPES = {"info": "gauge", "stateset": "gauge", "gaugehistogram": "histogram", "unknown": "untyped"}


def _escape_help(s: str) -> str:
    return s.replace("\\", r"\\").replace("\n", r"\n")


def _escape_value(s: str) -> str:
    return s.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


class Prerendered(Metric):
    """Families already rendered as this module's text (the report worker's, rendered in its own
    process by an :class:`Exposition` there): written as they are."""

    def __init__(self, text: str) -> None:
        super().__init__("prerendered", "", "untyped")
        self.text = text


class Rows(Metric):
    """A gauge or counter family built as prometheus_client's ``GaugeMetricFamily`` and
    ``CounterMetricFamily`` are (``add_metric(label_values, value)``), that keeps each series as a
    ``(label values, value)`` row: no ``Sample`` or label dict per series. :class:`Exposition`
    renders the rows directly, reusing each series' prefix by its label values; any other reader
    (``generate_latest``, tests) gets the same ``samples`` as prometheus_client's families.
    """

    def __init__(self, name: str, documentation: str, typ: str, labels: Sequence[str]) -> None:
        if typ == "counter":
            name = name.removesuffix("_total")  # as CounterMetricFamily: the samples carry it
        super().__init__(name, documentation, typ)
        self.labelnames = tuple(labels)
        self.sample_name = name + "_total" if typ == "counter" else name
        self.rows: list[tuple[tuple[str, ...], float]] = []

    def add_metric(self, labels: Sequence[str], value: float) -> None:
        key = tuple(labels)
        if len(key) != len(self.labelnames):
            raise ValueError(f"{self.name}: {len(key)} label values for labels {self.labelnames}")
        self.rows.append((key, value))

    @property  # type: ignore[override]
    def samples(self) -> list[Sample]:
        names, sample = self.labelnames, self.sample_name
        return [Sample(sample, dict(zip(names, key, strict=True)), value) for key, value in self.rows]

    @samples.setter
    def samples(self, value: list[Sample]) -> None:
        if value:  # Metric.__init__ sets an empty list; series are added with add_metric
            raise TypeError("add series to a Rows family with add_metric")


def gauge(name: str, documentation: str, labels: Sequence[str]) -> Rows:
    return Rows(name, documentation, "gauge", labels)


def counter(name: str, documentation: str, labels: Sequence[str]) -> Rows:
    return Rows(name, documentation, "counter", labels)


class Exposition:
    """Renders a registry's families as ``generate_latest`` does, reusing the previous scrape's text."""

    def __init__(self, registry: Collector) -> None:
        self._registry = registry
        self._lock = threading.Lock()  # scrapes may run on several server threads
        self._texts: dict[int, tuple[Any, str]] = {}  # id(family) -> (family, its text), last scrape
        self._prefixes: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], str]] = {}
        self._row_prefixes: dict[str, dict[tuple[str, ...], str]] = {}  # Rows families' prefixes

    def render(self) -> bytes:
        with self._lock:
            texts: dict[int, tuple[Any, str]] = {}
            out = []
            for metric in self._registry.collect():
                if isinstance(metric, Prerendered):
                    out.append(metric.text)
                    continue
                hit = self._texts.get(id(metric))
                if hit is not None and hit[0] is metric:
                    text = hit[1]
                elif isinstance(metric, Rows):
                    text = self._rows(metric)
                else:
                    text = self._family(metric)
                texts[id(metric)] = (metric, text)
                out.append(text)
            self._texts = texts
            return "".join(out).encode("utf-8")

    @staticmethod
    def _header(metric: Any) -> tuple[str, str]:
        """(the family's ``# HELP``/``# TYPE`` lines, its escaped help text)"""
        name, mtype = metric.name, metric.type
        if mtype == "counter":
            name += "_total"
        elif mtype == "info":
            name += "_info"
        mtype = _TYPES.get(mtype, mtype)
        doc = _escape_help(metric.documentation)
        name = escape_metric_name(name, UNDERSCORES)
        return f"# HELP {name} {doc}\n# TYPE {name} {mtype}\n", doc

    def _rows(self, metric: Rows) -> str:
        """A :class:`Rows` family: its series' prefixes by label values, labels sorted by name as
        ``generate_latest`` sorts them."""
        header, _ = self._header(metric)
        out = [header]
        old = self._row_prefixes.get(metric.name, {})
        new: dict[tuple[str, ...], str] = {}
        sname = escape_metric_name(metric.sample_name, UNDERSCORES)
        names = metric.labelnames
        order = sorted(range(len(names)), key=names.__getitem__)
        escaped = [escape_label_name(names[i], UNDERSCORES) for i in order]
        for key, value in metric.rows:
            prefix = new.get(key) or old.get(key)
            if prefix is None:
                if key:
                    pairs = ",".join(
                        f'{n}="{_escape_value(key[i])}"' for n, i in zip(escaped, order, strict=True)
                    )
                    prefix = f"{sname}{{{pairs}}} "
                else:
                    prefix = sname + " "
            new[key] = prefix
            out.append(f"{prefix}{floatToGoString(value)}\n")
        self._row_prefixes[metric.name] = new
        return "".join(out)

    def _family(self, metric: Any) -> str:
        header, doc = self._header(metric)
        out = [header]
        old = self._prefixes.get(metric.name, {})
        new: dict[tuple[str, tuple[tuple[str, str], ...]], str] = {}
        extra: dict[str, list[str]] = {}
        specials = tuple(metric.name + sfx for sfx in _OM_SUFFIXES)
        for s in metric.samples:
            key = (s.name, tuple(s.labels.items()))
            prefix = new.get(key) or old.get(key)
            if prefix is None:
                sname = escape_metric_name(s.name, UNDERSCORES)
                if s.labels:
                    pairs = ",".join(
                        f'{escape_label_name(k, UNDERSCORES)}="{_escape_value(v)}"'
                        for k, v in sorted(s.labels.items())
                    )
                    prefix = f"{sname}{{{pairs}}} "
                else:
                    prefix = sname + " "
            new[key] = prefix
            ts = "" if s.timestamp is None else f" {int(float(s.timestamp) * 1000):d}"
            line = f"{prefix}{floatToGoString(s.value)}{ts}\n"
            if s.name in specials:
                extra.setdefault(s.name[len(metric.name) :], []).append(line)
            else:
                out.append(line)
        self._prefixes[metric.name] = new
        for sfx, lines in sorted(extra.items()):
            om = escape_metric_name(metric.name + sfx, UNDERSCORES)
            out.append(f"# HELP {om} {doc}\n# TYPE {om} gauge\n")
            out.extend(lines)
        return "".join(out)
