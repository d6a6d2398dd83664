"""Value types that flow through the core: decoded events, a rejection, a joined pair."""

from __future__ import annotations

from dataclasses import dataclass

from stream_fair.groups import Cell


@dataclass(slots=True)
class Prediction:
    """A model decision. ``cell`` holds its sensitive-feature values in configured order."""

    id: str
    ts: float
    model: str
    predicted: int
    score: float | None
    cell: Cell


@dataclass(slots=True)
class Outcome:
    """The ground-truth label for the prediction with the same ``id``."""

    id: str
    ts: float
    label: int


@dataclass(slots=True, frozen=True)
class Rejection:
    """Why an event could not be used. ``reason`` is a stable label value; ``detail`` is for humans."""

    reason: str
    detail: str


@dataclass(slots=True, frozen=True)
class Joined:
    """A prediction with its outcome; ``delay`` is the label delay in event-time seconds."""

    prediction: Prediction
    outcome: Outcome

    @property
    def delay(self) -> float:
        return self.outcome.ts - self.prediction.ts
