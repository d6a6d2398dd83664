"""A small raw-event simulator for the explain and search tests, independent of stream_fair.dev.

Each event draws its attributes independently (per-attribute value probabilities, which a
scenario may shift), then a label from the cell's base rate and a decision from the cell's TPR or
FPR. Cells are matched by partial assignments (``{"sex": "F", "age": "young"}``), so a bias can be
injected into any intersection. The raw arrays are returned, so tests recount with numpy/fairlearn.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

Override = tuple[Mapping[str, str], Mapping[str, float]]  # (partial cell, {"base"/"tpr"/"fpr": v})


@dataclass
class Population:
    attributes: dict[str, tuple[Sequence[str], Sequence[float]]]
    base: float = 0.4
    tpr: float = 0.7
    fpr: float = 0.2
    overrides: list[Override] = field(default_factory=list)

    def params(self, cell: Mapping[str, str]) -> dict[str, float]:
        p = {"base": self.base, "tpr": self.tpr, "fpr": self.fpr}
        for match, values in self.overrides:
            if all(cell[k] == v for k, v in match.items()):
                p.update(values)
        return p


@dataclass
class Events:
    names: list[str]
    values: dict[str, np.ndarray]  # attribute -> value per event
    label: np.ndarray
    predicted: np.ndarray

    def cells(self, order: Sequence[str] | None = None) -> dict[tuple[str, ...], tuple[int, int, int, int]]:
        """(tp, fp, tn, fn) per full cell (attribute values in ``order``)."""
        order = list(order or self.names)
        keys = np.array(["\x1f".join(t) for t in zip(*(self.values[n] for n in order), strict=True)])
        out: dict[tuple[str, ...], tuple[int, int, int, int]] = {}
        for k in np.unique(keys):
            sel = keys == k
            y, p = self.label[sel], self.predicted[sel]
            out[tuple(str(k).split("\x1f"))] = (
                int(np.sum((y == 1) & (p == 1))),
                int(np.sum((y == 0) & (p == 1))),
                int(np.sum((y == 0) & (p == 0))),
                int(np.sum((y == 1) & (p == 0))),
            )
        return out


def generate(pop: Population, n: int, rng: np.random.Generator) -> Events:
    names = list(pop.attributes)
    values = {}
    for name, (vals, probs) in pop.attributes.items():
        values[name] = np.asarray(vals)[rng.choice(len(vals), size=n, p=np.asarray(probs) / np.sum(probs))]
    base = np.full(n, pop.base)
    tpr = np.full(n, pop.tpr)
    fpr = np.full(n, pop.fpr)
    for match, over in pop.overrides:
        sel = np.ones(n, dtype=bool)
        for k, v in match.items():
            sel &= values[k] == v
        base = np.where(sel & ("base" in over), over.get("base", 0.0), base)
        tpr = np.where(sel & ("tpr" in over), over.get("tpr", 0.0), tpr)
        fpr = np.where(sel & ("fpr" in over), over.get("fpr", 0.0), fpr)
    label = (rng.random(n) < base).astype(int)
    predicted = np.where(label == 1, rng.random(n) < tpr, rng.random(n) < fpr).astype(int)
    return Events(names, values, label, predicted)
