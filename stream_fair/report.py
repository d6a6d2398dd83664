"""From a raw :class:`~stream_fair.tracker.Snapshot` to per-feature fairness reports.

Counts are kept per (model, cell); here they are summed into each marginal feature and each
intersection, per window, and handed to :func:`stream_fair.fairness.evaluate_feature`. Pure: the
exporter and the status page both render a :class:`Report`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from stream_fair.config import Config, format_duration
from stream_fair.counts import Key, Quad, add_rows
from stream_fair.disparity import DISPARITY_RATES
from stream_fair.estimates import CalibrationCache, EstimateSettings, FeatureEstimates, estimate_feature
from stream_fair.fairness import Counts, FairnessSettings, FeatureReport, evaluate_feature
from stream_fair.groups import SEPARATOR, Cell, FeatureKey, carried_attributes, feature_keys
from stream_fair.histograms import ScoreHistogram
from stream_fair.search import SearchResult, search
from stream_fair.tracker import Snapshot

CUMULATIVE = "cumulative"


@dataclass(frozen=True)
class FeatureView:
    """One (model, feature or intersection, window) with its fairness report."""

    model: str
    feature: FeatureKey
    window: str
    report: FeatureReport


@dataclass(frozen=True)
class TrafficView:
    """All predictions of a (model, feature) by group, labelled or not (cumulative)."""

    model: str
    feature: FeatureKey
    predictions: dict[str, tuple[int, int]]  # group -> (predicted 0, predicted 1)
    expired: dict[str, int]
    joined: dict[str, int]


@dataclass(frozen=True)
class PartitionGroups:
    """One partition's count rows summed per (model, feature, group): the exported counters."""

    partition: int
    rows: dict[tuple[str, str, str], list[int]]


@dataclass(frozen=True)
class SearchView:
    """One model's search of unconfigured intersections (:mod:`stream_fair.search`) in a window."""

    model: str
    window: str
    result: SearchResult


@dataclass(frozen=True)
class EstimateView:
    """One (model, feature key): calibration by group and label-free estimates (cumulative)."""

    model: str
    feature: FeatureKey
    estimates: FeatureEstimates


@dataclass(frozen=True)
class Report:
    snapshot: Snapshot
    settings: FairnessSettings
    views: list[FeatureView] = field(default_factory=list)
    traffic: list[TrafficView] = field(default_factory=list)
    partitions: list[PartitionGroups] = field(default_factory=list)
    searches: list[SearchView] = field(default_factory=list)
    attributes: tuple[tuple[str, int], ...] = ()  # (name, cell position) of every carried attribute
    keys: list[FeatureKey] = field(default_factory=list)
    estimates: list[EstimateView] = field(default_factory=list)

    def feature_key(self, feature: str) -> FeatureKey:
        """The configured feature or intersection named ``feature`` (KeyError if none)."""
        for k in self.keys:
            if k.name == feature:
                return k
        raise KeyError(feature)

    def score_histograms(self, model: str, feature: str) -> dict[str, ScoreHistogram]:
        """group -> :class:`~stream_fair.histograms.ScoreHistogram` of one (model, feature), summed
        over this replica's partitions; ``{}`` when the model has no scored prediction.
        KeyError when ``feature`` is not a configured feature or intersection."""
        return self.snapshot.score_histograms(self.feature_key(feature)).get(model, {})

    def view(self, model: str, feature: str, window: str = CUMULATIVE) -> FeatureView:
        for v in self.views:
            if v.model == model and v.feature.name == feature and v.window == window:
                return v
        raise KeyError((model, feature, window))


@dataclass
class ReportCache:
    """What a report keeps for the next one of the same process (:meth:`Detector.current`): the
    calibrations, recomputed only for the groups whose labelled counts changed."""

    calibration: CalibrationCache = field(default_factory=CalibrationCache)


def flagged_extremes(fr: FeatureReport) -> set[tuple[str, str]]:
    """``(group, rate)`` at the minimum or maximum of each flagged between-groups disparity.

    The groups a flagged disparity is made of: the status page and the stakeholder report mark them.
    """
    marked: set[tuple[str, str]] = set()
    for (d, method), flagged in fr.flagged.items():
        if not flagged or method != "between_groups":
            continue
        for rate in DISPARITY_RATES[d]:
            values = {
                g: gr.rates[rate].value for g, gr in fr.groups.items() if gr.eligible and rate in gr.rates
            }
            if len(values) >= 2:
                marked |= {
                    (min(values, key=values.__getitem__), rate),
                    (max(values, key=values.__getitem__), rate),
                }
    return marked


def fairness_settings(config: Config) -> FairnessSettings:
    fc = config.fairness
    defaults = FairnessSettings()
    thresholds = {**dict(defaults.thresholds), **fc.thresholds}
    return FairnessSettings(
        credible_level=fc.credible_level,
        min_samples=fc.min_samples,
        prior=fc.prior,
        pooling=fc.pooling,
        thresholds=thresholds,
    )


def references(config: Config, keys: Sequence[FeatureKey]) -> dict[str, str | None]:
    """Reference group per key; an intersection's is the join of its parts' references, if all set."""
    by_index = [f.reference for f in config.fairness.features]
    out: dict[str, str | None] = {}
    for key in keys:
        parts = [by_index[i] for i in key.indices]
        out[key.name] = None if any(p is None for p in parts) else SEPARATOR.join(parts)  # type: ignore[arg-type]
    return out


def group_quads(cells: Mapping[Key, Quad], key: FeatureKey) -> dict[str, dict[str, Quad]]:
    """model -> group -> summed (tp, fp, tn, fn) for one feature key."""
    out: dict[str, dict[str, Quad]] = {}
    for (model, cell), q in cells.items():
        groups = out.setdefault(model, {})
        g = key.group(cell)
        prev = groups.get(g)
        groups[g] = q if prev is None else (prev[0] + q[0], prev[1] + q[1], prev[2] + q[2], prev[3] + q[3])
    return out


def config_keys(config: Config) -> list[FeatureKey]:
    """The monitored feature keys of a config (features, then intersections)."""
    fc = config.fairness
    return feature_keys([f.name for f in fc.features], fc.intersections, [f.name for f in fc.audit_only])


def build_report(snapshot: Snapshot, config: Config, cache: ReportCache | None = None) -> Report:
    """Evaluate every model × feature key × window of a snapshot (``cache``: reuse what the
    previous report of the same process computed from unchanged inputs)."""
    settings = fairness_settings(config)
    keys = config_keys(config)
    refs = references(config, keys)
    fc = config.fairness
    carried = carried_attributes([f.name for f in fc.features], [f.name for f in fc.audit_only])
    report = Report(snapshot=snapshot, settings=settings, keys=list(keys), attributes=tuple(carried))
    windows = {CUMULATIVE: snapshot.cumulative, **snapshot.windows}
    for key in keys:
        for window, cells in windows.items():
            for model, groups in sorted(group_quads(cells, key).items()):
                counts = {g: Counts(*q) for g, q in groups.items()}
                fr = evaluate_feature(key.name, counts, settings, refs[key.name])
                report.views.append(FeatureView(model, key, window, fr))
        report.traffic.extend(_traffic(snapshot, key))
    report.partitions.extend(partition_groups(snapshot, keys))
    report.searches.extend(search_views(snapshot, config))
    if config.fairness.estimates.enabled:
        calibration = cache.calibration if cache is not None else None
        report.estimates.extend(estimate_views(snapshot, config, keys, refs, calibration))
    return report


def estimate_views(
    snapshot: Snapshot,
    config: Config,
    keys: Sequence[FeatureKey],
    refs: Mapping[str, str | None],
    cache: CalibrationCache | None = None,
) -> list[EstimateView]:
    """Calibration and label-free estimates of every (model, feature key) with scored predictions."""
    settings = fairness_settings(config)
    est = EstimateSettings(config.fairness.estimates.max_calibration_error, config.fairness.min_samples)
    out = []
    histograms = snapshot.all_score_histograms(keys)
    by_window = snapshot.window_score_histograms(keys)
    # shortest window first: the trust of a group follows its most recent calibration
    labels = [w for w in (format_duration(x) for x in sorted(config.windows)) if w in by_window]
    cumulative = snapshot.cumulative
    for key in keys:
        realized = group_quads(cumulative, key)
        for model, hists in sorted(histograms[key.name].items()):
            counts = {g: Counts(*q) for g, q in realized.get(model, {}).items()}
            windows = {w: by_window[w][key.name].get(model, {}) for w in labels}
            fe = estimate_feature(
                key.name, hists, counts, settings, est, refs.get(key.name), model, windows, cache
            )
            out.append(EstimateView(model, key, fe))
    return out


def search_views(snapshot: Snapshot, config: Config) -> list[SearchView]:
    """The search of unconfigured intersections, per model, over the longest configured window
    (a recent bias is not diluted by all history; cumulative when no window is configured)."""
    if not search_enabled(config):
        return []
    window = format_duration(max(config.windows)) if config.windows else CUMULATIVE
    cells = snapshot.windows.get(window) if window != CUMULATIVE else snapshot.cumulative
    if cells is None:
        window, cells = CUMULATIVE, snapshot.cumulative
    return [SearchView(model, window, result) for model, result in search_cells(cells, config).items()]


def search_enabled(config: Config) -> bool:
    """``fairness.search.enabled`` and at least two carried attributes (or an audit-only one)."""
    fc = config.fairness
    audit = [f.name for f in fc.audit_only]
    return fc.search.enabled and (
        len(carried_attributes([f.name for f in fc.features], audit)) >= 2 or bool(audit)
    )


def search_cells(cells: Mapping[Key, Quad], config: Config) -> dict[str, SearchResult]:
    """Per model, the search of unconfigured intersections over these cells' confusion counts."""
    fc = config.fairness
    ss = fc.search
    audit = [f.name for f in fc.audit_only]
    attributes = carried_attributes([f.name for f in fc.features], audit)
    by_model: dict[str, dict[Cell, Quad]] = {}
    for (model, cell), q in cells.items():
        by_model.setdefault(model, {})[cell] = q
    return {
        model: search(
            mc,
            attributes,
            fc.intersections,
            audit_only=audit,
            max_order=ss.max_order,
            rates=ss.rates,
            min_samples=fc.min_samples,
            alpha=ss.alpha,
            max_tests=ss.max_tests,
            top=ss.top,
        )
        for model, mc in sorted(by_model.items())
    }


def partition_groups(snapshot: Snapshot, keys: Sequence[FeatureKey]) -> list[PartitionGroups]:
    """Per owned partition, its rows projected onto every feature key (model, feature, group)."""
    out = []
    for p, view in sorted(snapshot.partitions.items()):
        rows: dict[tuple[str, str, str], list[int]] = {}
        for (model, cell), row in view.cells.items():
            for key in keys:
                k = (model, key.name, key.group(cell))
                acc = rows.get(k)
                if acc is None:
                    rows[k] = list(row)
                else:
                    add_rows(acc, row)
        out.append(PartitionGroups(p, rows))
    return out


def _traffic(snapshot: Snapshot, key: FeatureKey) -> list[TrafficView]:
    preds: dict[str, dict[str, tuple[int, int]]] = {}
    for (model, cell), (n0, n1) in snapshot.predictions.items():
        groups = preds.setdefault(model, {})
        g = key.group(cell)
        a, b = groups.get(g, (0, 0))
        groups[g] = (a + n0, b + n1)
    expired: dict[str, dict[str, int]] = {}
    for (model, cell), n in snapshot.expired.items():
        groups_e = expired.setdefault(model, {})
        g = key.group(cell)
        groups_e[g] = groups_e.get(g, 0) + n
    joined = {
        m: {g: sum(q) for g, q in gs.items()} for m, gs in group_quads(snapshot.cumulative, key).items()
    }
    return [
        TrafficView(model, key, groups, expired.get(model, {}), joined.get(model, {}))
        for model, groups in sorted(preds.items())
    ]
