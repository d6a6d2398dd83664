"""Group keys: sensitive-feature values, intersections and the cardinality guard.

Every joined pair is counted once, in its *cell*: the tuple of its values for all configured
sensitive features, in configured order. A marginal feature (``sex``) or an intersection
(``race&sex``) is a projection of the cell, so per-feature counts are sums over cells at snapshot
time. That keeps the per-event cost at one update however many features and intersections are
configured.

>>> keys = feature_keys(["sex", "race"], [["race", "sex"]])
>>> [k.name for k in keys]
['sex', 'race', 'race&sex']
>>> keys[2].group(("Female", "Black"))
'Black&Female'
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

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

    @property
    def is_intersection(self) -> bool:
        return len(self.indices) > 1

    def group(self, cell: Cell) -> str:
        if len(self.indices) == 1:
            return cell[self.indices[0]]
        return SEPARATOR.join(cell[i] for i in self.indices)


def feature_keys(features: Sequence[str], intersections: Sequence[Sequence[str]]) -> list[FeatureKey]:
    """Marginal keys in configured order, then one key per intersection."""
    position = {name: i for i, name in enumerate(features)}
    keys = [FeatureKey(name, (i,)) for i, name in enumerate(features)]
    for combo in intersections:
        keys.append(FeatureKey(SEPARATOR.join(combo), tuple(position[n] for n in combo)))
    return keys


@dataclass(slots=True)
class CardinalityGuard:
    """Admits at most ``limit`` distinct values per feature; later new values fold into ``__other__``.

    Admission is first come, first served and sticky, so a group never changes its label once
    exported. Folded events are counted per feature in ``overflow``.

    >>> guard = CardinalityGuard(limits=(2,))
    >>> [guard.cell(v) for v in (("a",), ("b",), ("c",), ("a",))]
    [('a',), ('b',), ('__other__',), ('a',)]
    >>> guard.overflow
    [1]
    """

    limits: tuple[int, ...]
    admitted: list[set[str]] = field(default_factory=list)
    overflow: list[int] = field(default_factory=list)
    _unfolded: dict[Cell, Cell] = field(default_factory=dict)  # cells known to pass unchanged

    def __post_init__(self) -> None:
        if not self.admitted:
            self.admitted = [set() for _ in self.limits]
        if not self.overflow:
            self.overflow = [0 for _ in self.limits]

    def cell(self, values: Cell) -> Cell:
        if values in self._unfolded:  # admission is sticky, so a passing cell always passes
            return values
        out = values
        for i, value in enumerate(values):
            seen = self.admitted[i]
            if value in seen or value == MISSING:
                continue
            if len(seen) < self.limits[i]:
                seen.add(value)
                continue
            self.overflow[i] += 1
            out = out[:i] + (OTHER,) + out[i + 1 :]
        if out is values and len(self._unfolded) < 100_000:
            self._unfolded[values] = values
        return out

    def to_state(self) -> dict[str, list]:
        return {"admitted": [sorted(s) for s in self.admitted], "overflow": list(self.overflow)}

    def load_state(self, state: dict[str, list]) -> None:
        for i, values in enumerate(state["admitted"][: len(self.limits)]):
            self.admitted[i] = set(values)
        for i, n in enumerate(state["overflow"][: len(self.limits)]):
            self.overflow[i] = int(n)
