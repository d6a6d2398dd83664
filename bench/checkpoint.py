"""Checkpoint benchmark: what a checkpoint costs at 15k and 45k series, and the feedback monitor's
share of it (its state written, its snapshot math under the consumer lock).

The detector is built as in ``bench/scrape.py`` (the real ``Detector.process`` and checkpoints to
RocksDB, 60k predictions and their outcomes by default), then each round feeds one second of a
5k events/s stream and checkpoints, timed (CPU and wall):

- ``checkpoint``: the whole ``Detector.checkpoint()`` (no changelog);
- ``feedback state``: what the checkpoint spends on the monitor's state (encoding the whole
  ``to_state()`` document before, the changed entries now) and the bytes and keys it writes;
- ``lock``: how long the consumer lock was held by the checkpoint's commit and publish.

    python bench/checkpoint.py                # 15k and 45k series, 5 rounds
    PYTHONPATH=/path/to/other/checkout python bench/checkpoint.py   # the same on other code

Timings on shared machines are noisy: compare runs made one after the other, CPU times first.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from scrape import SIZES, Feeder, LockTimer  # noqa: E402

from stream_fair.state.codec import encode_json  # noqa: E402


def feedback_cost(d: Any) -> tuple[float, int, int]:
    """CPU seconds, bytes and keys of the monitor's state as the checkpoint writes it (a dry run:
    nothing is marked committed)."""
    fb = d.feedback
    t0 = time.process_time()
    if hasattr(fb, "changes"):
        entries = fb.changes()
        encoded = [encode_json(v) for v in entries.values() if v is not None]
        fb._dirty |= fb._writing  # noqa: SLF001 - undo: the real checkpoint writes them again
        fb._writing = set()  # noqa: SLF001
    else:
        encoded = [encode_json(fb.to_state())]
    return time.process_time() - t0, sum(map(len, encoded)), len(encoded)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=sorted(SIZES))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--predictions", type=int, default=60_000)
    ap.add_argument(
        "--events",
        type=int,
        nargs="+",
        default=[10_000, 1_000],
        help="records per checkpoint (10,000: 1 s of 5k predictions/s; 1,000: the 0.1 s early checkpoints)",
    )
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            models, regions = SIZES[size]
            feeder = Feeder(Path(tmp) / size, models, regions)
            feeder.feed(2 * args.predictions)
            d = feeder.detector
            detectors = len(getattr(d.feedback, "_detectors", {})) + len(
                getattr(d.feedback, "_disp_detectors", {})
            )
            lock = LockTimer(d.lock)
            d.lock = lock  # type: ignore[assignment]
            checkpoint = d.checkpoint
            for per in args.events:
                cp_cpu, cp_wall, fb_cpu, fb_bytes, fb_keys, holds = [], [], [], [], [], []
                for _ in range(args.rounds):
                    d.checkpoint = lambda *a, **k: True  # type: ignore[method-assign]
                    feeder.feed(per)  # predictions and outcomes, not checkpointed yet
                    d.checkpoint = checkpoint  # type: ignore[method-assign]
                    c, b, k = feedback_cost(d)
                    fb_cpu.append(c)
                    fb_bytes.append(b)
                    fb_keys.append(k)
                    lock.holds.clear()
                    t0, c0 = time.perf_counter(), time.process_time()
                    d.checkpoint()
                    cp_wall.append(time.perf_counter() - t0)
                    cp_cpu.append(time.process_time() - c0)
                    holds.append(max(lock.holds, default=0.0))
                med = statistics.median
                print(
                    f"{size}, {per:,} records per checkpoint: {detectors} drift detectors; "
                    f"checkpoint {med(cp_cpu) * 1e3:.0f} ms CPU "
                    f"({med(cp_wall) * 1e3:.0f} ms wall); monitor's state {med(fb_cpu) * 1e3:.1f} ms CPU, "
                    f"{med(fb_bytes) / 1e3:.0f} kB in {med(fb_keys):.0f} keys; consumer lock held "
                    f"{med(holds) * 1e3:.1f} ms per checkpoint (median of {args.rounds})",
                    flush=True,
                )
            d.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
