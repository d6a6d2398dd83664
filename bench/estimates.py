"""Label-free estimates: how many days earlier the estimated gap flags, and false alarms on fair streams.

Run (about 10 minutes on 2 shared cores)::

    python bench/estimates.py --out docs/estimates.md

Every run feeds a simulated stream through the real core (:class:`~stream_fair.tracker.Tracker` on
a local RocksDB store, JSON records as the consumer reads them) and builds the report every 12
hours of event time, as the exporter would at a scrape. Streams are drawn here (not by
``stream_fair.dev.simulate``), with calibrated scores: per prediction a score ``s ~ Beta(a, b)``
of its group, label ``~ Bernoulli(s)``, decision ``s >= 0.5``; two groups A and B, 1,000
predictions per group and day, 70 days; each label arrives after ``delay`` days (uniform in
[delay - 2, delay + 2]).

* **shift**: 20-day label delays; from day 30 group B's scores move from Beta(2, 2) to
  Beta(1.5, 2.5) (still calibrated: a covariate shift), so B's TPR drops from 0.69 to 0.50 and the
  equal-opportunity difference goes from 0 to 0.19 (threshold 0.1). Reported: the day the estimated
  gap first flags (``stream_fair_estimated_disparity_flagged{view="pending"}``) and the day the
  realized one flags on the pairs *joined* in the last 7 days (what ``increase(...[7d])`` of
  ``stream_fair_confusion_total`` gives, as the recording rules' join-time windows; the event-time
  windows of the detector hold no labelled pair at all when labels take 20 days), both
  ``equal_opportunity_difference``, ``between_groups``, same credible level and threshold;
  N = realized day - estimated day. The cumulative realized flag is shown too.
* **fair**: the same without a shift; a false alarm is any report in which any estimated disparity
  of the pending view is flagged. Variants the product's simulator does not make:
  ``label_dependent_delays`` (positives' labels after 10 days, negatives' after 25),
  ``group_delays_mix_shift`` (B's labels after 30 days, A's after 10, and B's share of traffic
  rising from 20% to 60% over the run).

Seeds are fresh (never used while building the estimator): 70,000+ for shift, 80,000+ for fair.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stream_fair.config import Config  # noqa: E402
from stream_fair.fairness import Counts, evaluate_feature  # noqa: E402
from stream_fair.report import build_report  # noqa: E402
from stream_fair.state.rocks import RocksBackend  # noqa: E402
from stream_fair.tracker import Tracker  # noqa: E402

DAY = 86400.0
EO = ("equal_opportunity_difference", "between_groups")
BASE = (2.0, 2.0)
SHIFTED = (1.5, 2.5)


@dataclass(frozen=True)
class Scenario:
    name: str
    days: int = 70
    per_day: int = 1000  # per group (before the mix shift)
    shift_day: float | None = None
    delay_pos: dict[str, float] | None = None  # group -> delay of positives' labels (days)
    delay_neg: dict[str, float] | None = None
    share_b: tuple[float, float] = (0.5, 0.5)  # B's traffic share at the start and at the end

    def delay(self, g: np.ndarray, y: np.ndarray) -> np.ndarray:
        pos = self.delay_pos or {"A": 20.0, "B": 20.0}
        neg = self.delay_neg or pos
        return np.where(
            y == 1, np.where(g == "A", pos["A"], pos["B"]), np.where(g == "A", neg["A"], neg["B"])
        )


SHIFT = Scenario("shift", shift_day=30.0)
FAIR = [
    Scenario("fair_20d_delays"),
    Scenario("label_dependent_delays", delay_pos={"A": 10.0, "B": 10.0}, delay_neg={"A": 25.0, "B": 25.0}),
    Scenario("group_delays_mix_shift", delay_pos={"A": 10.0, "B": 30.0}, share_b=(0.2, 0.6)),
]


def draw(sc: Scenario, seed: int) -> list[tuple[float, int, bytes]]:
    """(event time, topic: 0 predictions / 1 outcomes, record) in event-time order."""
    rng = np.random.default_rng(seed)
    n = 2 * sc.per_day * sc.days
    ts = np.sort(rng.uniform(0, sc.days * DAY, n))
    share = sc.share_b[0] + (sc.share_b[1] - sc.share_b[0]) * ts / (sc.days * DAY)
    g = np.where(rng.random(n) < share, "B", "A")
    shifted = (g == "B") & (sc.shift_day is not None) & (ts >= (sc.shift_day or 0) * DAY)
    a = np.where(shifted, SHIFTED[0], BASE[0])
    b = np.where(shifted, SHIFTED[1], BASE[1])
    s = rng.beta(a, b)
    y = (rng.random(n) < s).astype(int)
    out_ts = ts + (sc.delay(g, y) + rng.uniform(-2, 2, n)) * DAY
    events: list[tuple[float, int, bytes]] = []
    ts, s, g, y, out_ts = ts.tolist(), s.tolist(), g.tolist(), y.tolist(), out_ts.tolist()
    for i in range(n):
        doc = {
            "id": f"r{i}",
            "ts": ts[i],
            "model": "m",
            "score": round(s[i], 6),
            "attributes": {"g": g[i]},
        }
        events.append((ts[i], 0, orjson.dumps(doc)))
        events.append((out_ts[i], 1, orjson.dumps({"id": f"r{i}", "ts": out_ts[i], "label": y[i]})))
    events.sort(key=lambda e: e[0])
    return events


def config() -> Config:
    return Config.model_validate(
        {
            "fairness": {"features": ["g"], "min_samples": 100},
            "schema": {"prediction": {"prediction": None}, "score_threshold": 0.5},
            "join": {"ttl": "60d"},
            "event_time": {"allowed_skew": "30d"},
        }
    )


def run(sc: Scenario, seed: int) -> dict[str, object]:
    cfg = config()
    t = Tracker(cfg, RocksBackend(tempfile.mkdtemp()))
    est_day = real_day = cum_day = None
    history: list[tuple[float, dict[str, Counts]]] = []
    false_alarms = 0
    reports = 0
    evaluated = 0
    next_report = DAY / 2
    off = [0, 0]
    for ts, topic, raw in draw(sc, seed):
        while ts >= next_report:
            t.commit(t.checkpoint())
            rep = build_report(t.snapshot(), cfg)
            reports += 1
            day = next_report / DAY
            fe = rep.estimates[0].estimates if rep.estimates else None
            flagged_est = fe is not None and bool(fe.flagged["pending"].get(EO, False))
            if fe is not None and any(fe.flagged["pending"].values()):
                false_alarms += 1
            if fe is not None and fe.disparities["pending"]:
                evaluated += 1  # at least two trusted groups: the estimated gap exists
            # realized: the pairs joined in the last 7 days (what increase(...[7d]) of the
            # confusion counters gives: the recording rules' join-time windows)
            cum = {g: gr.counts for g, gr in rep.view("m", "g").report.groups.items()} if rep.views else {}
            history.append((day, cum))
            old = next((c for d, c in reversed(history) if d <= day - 7), {})
            week = {
                g: Counts(c.tp - o.tp, c.fp - o.fp, c.tn - o.tn, c.fn - o.fn)
                for g, c in cum.items()
                for o in [old.get(g, Counts(0, 0, 0, 0))]
            }
            fr = evaluate_feature("g", week, rep.settings) if week else None
            flagged_real = fr is not None and bool(fr.flagged.get(EO, False))
            flagged_cum = bool(rep.views) and bool(rep.view("m", "g").report.flagged.get(EO, False))
            if flagged_cum and cum_day is None:
                cum_day = day
            if flagged_est and est_day is None:
                est_day = day
            if flagged_real and real_day is None:
                real_day = day
            next_report += DAY / 2
        (t.update_outcome if topic else t.update_prediction)(0, raw, off[topic])
        off[topic] += 1
    t.backend.close()
    return {
        "estimated_day": est_day,
        "realized_day": real_day,
        "cumulative_day": cum_day,
        "false_alarms": false_alarms,
        "reports": reports,
        "evaluated": evaluated,
    }


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shift-runs", type=int, default=5)
    ap.add_argument("--fair-runs", type=int, default=20)
    ap.add_argument("--variant-runs", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None, help="append the result table to this markdown file")
    args = ap.parse_args(argv)
    t0 = time.time()
    lines = []
    shifts = []
    for k in range(args.shift_runs):
        r = run(SHIFT, 70_000 + k)
        shifts.append(r)
        print("shift", 70_000 + k, r, flush=True)
    ns = [
        r["realized_day"] - r["estimated_day"]  # type: ignore[operator]
        for r in shifts
        if r["estimated_day"] is not None and r["realized_day"] is not None
    ]
    lines.append(
        "| scenario | runs | estimated gap flags (day) | realized gap, 7d by join time, flags (day) "
        "| realized cumulative flags (day) | N = days earlier |"
    )
    lines.append("| --- | --- | --- | --- | --- | --- |")

    def fmt(key: str) -> str:
        return ", ".join("never" if r[key] is None else f"{r[key]:.1f}" for r in shifts)

    cells = [fmt("estimated_day"), fmt("realized_day"), fmt("cumulative_day")]
    spread = (
        f"median {np.median(ns):.1f} (min {min(ns):.1f}, max {max(ns):.1f})" if ns else "no run flagged both"
    )
    lines.append(f"| shift at day 30, 20-day label delays | {len(shifts)} | {' | '.join(cells)} | {spread} |")
    lines.append("")
    lines.append(
        "| fair stream | runs | reports per run | reports with an estimated gap (>= 2 trusted groups) "
        "| runs with a false alarm | reports flagged |"
    )
    lines.append("| --- | --- | --- | --- | --- | --- |")
    for j, sc in enumerate(FAIR):
        runs = args.fair_runs if j == 0 else args.variant_runs
        res = []
        for k in range(runs):
            r = run(sc, 80_000 + 1000 * j + k)
            res.append(r)
            print(sc.name, 80_000 + 1000 * j + k, r, flush=True)
        bad = sum(1 for r in res if r["false_alarms"])
        lines.append(
            f"| {sc.name} | {runs} | {res[0]['reports']} | {sum(r['evaluated'] for r in res)} of "  # type: ignore[misc]
            f"{sum(r['reports'] for r in res)} | {bad} | {sum(r['false_alarms'] for r in res)} |"  # type: ignore[misc]
        )
    lines.append("")
    lines.append(f"Run time {time.time() - t0:.0f} s.")
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        with args.out.open("a") as fh:
            fh.write("\n" + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
