"""Drift detectors on fairness signals, fed batch means so the hot path stays cheap.

A signal (a group's selection rate, true or false positive rate, or a feature's disparity) is a
ratio of counts. :class:`BatchedDetector` is given the signal's cumulative numerator and
denominator whenever the monitor flushes; each time at least ``batch`` new trials have
accumulated it feeds the batch rate :math:`\\Delta num / \\Delta den` to a river detector
(``drift.ADWIN`` by default, ``drift.PageHinkley`` selectable). A detection increments
``detections`` and records ``last_ts``, the event time (watermark) of the flush that saw it.

Reset behaviour (river's): ADWIN drops the part of its window before the change and keeps
watching, so one lasting change is counted once and a later change again; PageHinkley resets its
cumulative sum after every detection. Neither is reset by stream-fair. ADWIN's bound assumes values
in [0, 1] and pays for the range, so it needs a few dozen batches after a change (about 50 for a
jump of 0.3) whatever the batch size; PageHinkley reacts faster to a known-size shift but needs its
``threshold`` tuned to the signal's noise. ADWIN's ``delta`` bounds
the false-detection probability of one check, not of a whole stream: detections are a prompt to
look at the rates, the disparity verdict (:mod:`stream_fair.sequential`) is the calibrated alarm.

>>> d = BatchedDetector("adwin", batch=50)
>>> import random; rng = random.Random(1); hits = 0
>>> for i in range(1, 201):
...     hits += sum(rng.random() < (0.8 if i <= 100 else 0.5) for _ in range(50))
...     _ = d.feed(hits, 50 * i, ts=float(i))
>>> d.detections >= 1, 100 < d.last_ts <= 160  # ADWIN needs a few dozen batches
(True, True)
"""

from __future__ import annotations

import base64
from typing import Any, Literal

from river import drift, stats

DetectorName = Literal["adwin", "page_hinkley"]


def make_detector(name: DetectorName, **params: float) -> drift.ADWIN | drift.PageHinkley:
    """A fresh river detector by name."""
    if name == "adwin":
        # every update is already a batch of trials: check for a cut after each one
        return drift.ADWIN(**{"clock": 1, **params})  # type: ignore[arg-type]
    if name == "page_hinkley":
        return drift.PageHinkley(**params)  # type: ignore[arg-type]
    raise ValueError(f"unknown detector {name!r}: use 'adwin' or 'page_hinkley'")


class BatchedDetector:
    """A river detector fed batch rates of a cumulative ratio."""

    __slots__ = ("detector", "batch", "num", "den", "detections", "last_ts")

    def __init__(self, name: DetectorName, batch: int, **params: float) -> None:
        self.detector = make_detector(name, **params)
        self.batch = batch
        self.num = 0.0
        self.den = 0.0
        self.detections = 0
        self.last_ts: float | None = None

    def __repr__(self) -> str:
        return f"BatchedDetector({type(self.detector).__name__}, detections={self.detections})"

    def feed(self, num: float, den: float, ts: float) -> bool:
        """Offer the cumulative ``num / den``; True when this call detected a change."""
        dd = den - self.den
        if dd < self.batch:
            return False
        self.detector.update((num - self.num) / dd)
        self.num, self.den = num, den
        return self._check(ts)

    def feed_value(self, value: float, ts: float) -> bool:
        """Feed one value directly (a disparity computed by the caller over a batch)."""
        self.detector.update(value)
        return self._check(ts)

    def _check(self, ts: float) -> bool:
        if self.detector.drift_detected:
            self.detections += 1
            self.last_ts = ts
            return True
        return False

    def to_state(self) -> dict:
        return {
            "d": detector_state(self.detector),
            "b": self.batch,
            "num": self.num,
            "den": self.den,
            "n": self.detections,
            "ts": self.last_ts,
        }

    @classmethod
    def from_state(cls, state: dict) -> BatchedDetector:
        obj = cls.__new__(cls)
        obj.detector = detector_from_state(state["d"])
        obj.batch = int(state["b"])
        obj.num, obj.den = _number(state["num"]), _number(state["den"])  # ints stay ints: restored exactly
        obj.detections = int(state["n"])
        obj.last_ts = state["ts"]
        return obj


def _number(x: Any) -> float:
    return x if isinstance(x, int) and not isinstance(x, bool) else float(x)


_ADWIN_PARAMS = ("delta", "clock", "max_buckets", "min_window_length", "grace_period")
_PH_PARAMS = ("min_instances", "delta", "threshold", "alpha", "mode")
_PH_STATE = ("_sum_increase", "_sum_decrease", "_min_increase", "_max_decrease")


def detector_state(det: drift.ADWIN | drift.PageHinkley) -> dict[str, Any]:
    """Explicit, JSON-able state of a river detector (never a pickle: loading runs no code).

    ADWIN's window lives in river's Rust core, which serialises it to plain bytes (bincode of its
    buckets); those bytes travel base64-encoded and are read back by the same Rust code.

    >>> a = make_detector("adwin")
    >>> for x in (0.1, 0.9) * 20:
    ...     a.update(x)
    >>> b = detector_from_state(detector_state(a))
    >>> (b.width, b.estimation) == (a.width, a.estimation)
    True
    """
    if isinstance(det, drift.ADWIN):
        window = det._helper.__getstate__()
        return {
            "kind": "adwin",
            "params": {k: getattr(det, k) for k in _ADWIN_PARAMS},
            "window": base64.b64encode(window).decode(),
        }
    mean = det._x_mean
    return {
        "kind": "page_hinkley",
        "params": {k: getattr(det, k) for k in _PH_PARAMS},
        "state": {k: float(getattr(det, k)) for k in _PH_STATE},
        "mean": [mean.n, mean.get()],
    }


def detector_from_state(state: dict[str, Any]) -> drift.ADWIN | drift.PageHinkley:
    """The detector :func:`detector_state` described."""
    if state["kind"] == "adwin":
        det = drift.ADWIN(**state["params"])
        det._helper.__setstate__(base64.b64decode(state["window"]))
        return det
    ph = drift.PageHinkley(**state["params"])
    for k, v in state["state"].items():
        setattr(ph, k, float(v))
    n, mean = state["mean"]
    m = stats.Mean()
    if n:
        m.update(float(mean), w=float(n))
    ph._x_mean = m
    return ph
