"""Group keys: sensitive-feature values, intersections and the cardinality guard.

Every joined pair is counted once, in its *cell*: the tuple of its values for all configured
sensitive features, in configured order, then for the ``audit_only`` attributes (carried for the
search of unconfigured intersections, not monitored), followed by one fold flag per intersection
(``""``, or ``__other__`` when the guard folded that intersection's group). A marginal feature (``sex``) or an
intersection (``race&sex``) is a projection of the cell, so per-feature counts are sums over cells
at snapshot time. That keeps the per-event cost at one update however many features and
intersections are configured.

>>> keys = feature_keys(["sex", "race"], [["race", "sex"]])
>>> [k.name for k in keys]
['sex', 'race', 'race&sex']
>>> keys[2].group(("Female", "Black"))
'Black&Female'
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

OTHER = "__other__"
"""Values beyond a feature's cardinality limit fold into this group."""

MISSING = "__missing__"
"""An event without a value for a feature is counted in this group."""

SEPARATOR = "&"

Cell = tuple[str, ...]


@dataclass(frozen=True, slots=True)
class FeatureKey:
    """A marginal feature or an intersection, as positions in the cell tuple.

    >>> FeatureKey("race&sex", (1, 0)).group(("Male", "White"))
    'White&Male'
    """

    name: str
    indices: tuple[int, ...]
    fold: int | None = None  # position of the intersection's fold flag in the cell

    @property
    def is_intersection(self) -> bool:
        return len(self.indices) > 1

    def group(self, cell: Cell) -> str:
        if len(self.indices) == 1:
            return cell[self.indices[0]]
        fold = self.fold
        if fold is not None and fold < len(cell) and cell[fold] == OTHER:
            return OTHER
        return SEPARATOR.join(cell[i] for i in self.indices)


def feature_keys(
    features: Sequence[str], intersections: Sequence[Sequence[str]], audit_only: Sequence[str] = ()
) -> list[FeatureKey]:
    """Marginal keys in configured order, then one key per intersection.

    ``audit_only`` attributes are carried in the cell after the features (searched by
    :mod:`stream_fair.search`, never monitored): they get no key, but move the fold flags.

    >>> feature_keys(["sex"], [], ["region"])[0], feature_keys(["a", "b"], [["a", "b"]], ["r"])[2].fold
    (FeatureKey(name='sex', indices=(0,), fold=None), 3)
    """
    position = {name: i for i, name in enumerate(features)}
    keys = [FeatureKey(name, (i,)) for i, name in enumerate(features)]
    width = len(features) + len(audit_only)
    for j, combo in enumerate(intersections):
        keys.append(FeatureKey(SEPARATOR.join(combo), tuple(position[n] for n in combo), width + j))
    return keys


def carried_attributes(features: Sequence[str], audit_only: Sequence[str] = ()) -> list[tuple[str, int]]:
    """``(name, position in the cell)`` of every attribute a cell carries.

    >>> carried_attributes(["sex", "race"], ["region"])
    [('sex', 0), ('race', 1), ('region', 2)]
    """
    return [(name, i) for i, name in enumerate([*features, *audit_only])]


MODEL_OVERFLOW = "__model__"
"""The ``feature`` label under which folded models are counted in the overflow metric."""


@dataclass(slots=True)
class CardinalityGuard:
    """Bounds every label that comes from the data: feature values, intersection groups, models.

    At most ``limits[i]`` distinct values per feature, ``intersection_limit`` distinct groups per
    intersection (``intersections`` lists their feature positions) and ``model_limit`` models
    (None: unbounded); later new ones fold into ``__other__``. Admission is first come, first
    served and sticky, so a group never changes its label once exported. Folded predictions are
    counted in ``overflow`` (features, then intersections) and ``model_overflow``.

    >>> guard = CardinalityGuard(limits=(2,))
    >>> [guard.cell(v) for v in (("a",), ("b",), ("c",), ("a",))]
    [('a',), ('b',), ('__other__',), ('a',)]
    >>> guard.overflow
    [1]
    >>> g = CardinalityGuard(limits=(9, 9), intersections=((0, 1),), intersection_limit=1)
    >>> g.cell(("a", "x")), g.cell(("b", "y")), g.overflow
    (('a', 'x', ''), ('b', 'y', '__other__'), [0, 0, 1])
    """

    limits: tuple[int, ...]
    intersections: tuple[tuple[int, ...], ...] = ()
    intersection_limit: int = 100
    model_limit: int | None = None
    admitted: list[set[str]] = field(default_factory=list)
    cells: list[set[tuple[str, ...]]] = field(default_factory=list)  # admitted intersection groups
    models: set[str] = field(default_factory=set)
    overflow: list[int] = field(default_factory=list)
    model_overflow: int = 0
    _unfolded: dict[Cell, Cell] = field(default_factory=dict)  # cells known to pass unchanged

    def __post_init__(self) -> None:
        if not self.admitted:
            self.admitted = [set() for _ in self.limits]
        if not self.cells:
            self.cells = [set() for _ in self.intersections]
        if not self.overflow:
            self.overflow = [0 for _ in (*self.limits, *self.intersections)]

    def fold(self, p: Any) -> None:
        """Fold a prediction's cell and model in place (the tracker's one call)."""
        p.cell = self.cell(p.cell)
        model = p.model
        if self.model_limit is not None and model not in self.models:
            if len(self.models) < self.model_limit:
                self.models.add(model)
            else:
                self.model_overflow += 1
                p.model = OTHER

    def cell(self, values: Cell) -> Cell:
        known = self._unfolded.get(values)
        if known is not None:  # admission is sticky, so a passing cell always passes
            return known
        out = values
        folded = False
        for i, value in enumerate(values):
            seen = self.admitted[i]
            if value in seen or value == MISSING:
                continue
            if len(seen) < self.limits[i]:
                seen.add(value)
                continue
            self.overflow[i] += 1
            folded = True
            out = out[:i] + (OTHER,) + out[i + 1 :]
        flags = []
        n = len(self.limits)
        for j, indices in enumerate(self.intersections):
            group = tuple(out[i] for i in indices)
            admitted = self.cells[j]
            if group in admitted:
                flags.append("")
            elif len(admitted) < self.intersection_limit:
                admitted.add(group)
                flags.append("")
            else:
                self.overflow[n + j] += 1
                folded = True
                flags.append(OTHER)
        out = (*out, *flags) if flags else out
        if not folded and len(self._unfolded) < 100_000:
            self._unfolded[values] = out
        return out

    def to_state(self) -> dict[str, Any]:
        return {
            "admitted": [sorted(s) for s in self.admitted],
            "overflow": list(self.overflow),
            "cells": [sorted(list(c) for c in cells) for cells in self.cells],
            "models": sorted(self.models),
            "model_overflow": self.model_overflow,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        for i, values in enumerate(state["admitted"][: len(self.limits)]):
            self.admitted[i] = set(values)
        for i, n in enumerate(state["overflow"][: len(self.overflow)]):
            self.overflow[i] = int(n)
        for j, cells in enumerate(state.get("cells", [])[: len(self.cells)]):
            self.cells[j] = {tuple(c) for c in cells}
        self.models = set(state.get("models", []))
        self.model_overflow = int(state.get("model_overflow", 0))
        self._unfolded.clear()
