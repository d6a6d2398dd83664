"""``join.max_pending_bytes`` bounds the local store, and no partition starves under it.

A real detector on a real RocksDB store (small write buffers, so that a budget of a few MB is
well above what the memtables and level-0 files take), no broker: records go straight to the
tracker and each checkpoint applies the budget, as in ``run``. Before, (1) the shares followed
the partitions' current sizes, so a new or empty partition got a bound of 1 and expired almost
every prediction early; (2) only pending events were bounded: an early expiry turned a pending
record into a remembered one of about the same size, so the store grew past the budget without
limit; (3) a partition that moved away kept its keys on disk for good, charged to the budget.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from stream_fair import app as app_module
from stream_fair.app import BUDGET_PENDING_SHARE, Detector
from stream_fair.config import Config, notes
from stream_fair.kafka_io import DeadLetters
from stream_fair.state.codec import SPACE_COUNTS, SPACE_DEADLINE, SPACE_ID, SPACE_META, prefix
from tests.test_checkpoint_pace import NoGroup

T0 = 1_700_000_000.0


class Group(NoGroup):
    def commit(self, offsets: Any = None) -> None:  # the offsets mirror: nobody to tell
        pass


def detector(tmp_path: Path, budget: str, **state: Any) -> Detector:
    cfg = Config.model_validate(
        {
            "topics": {"predictions": "p", "outcomes": "o", "dead_letters": None},
            "fairness": {"features": ["sex"]},
            "join": {"max_pending_bytes": budget, "ttl": "30d"},
            "state": {"path": str(tmp_path / "state"), "changelog": False, "write_buffer_bytes": "128KiB"}
            | state,
        }
    )
    d = Detector(cfg, exporter_port=0)
    d.attach(Group(), DeadLetters(cfg))
    return d


class Feed:
    """Predictions ``r<i>`` of partition ``shard``, every other one joined by its outcome."""

    def __init__(self, d: Detector) -> None:
        self.d, self.i, self.offsets = d, 0, {}

    def __call__(self, shard: int, n: int, joined: bool = True) -> None:
        t = self.d.tracker
        assert t is not None
        for _ in range(n):
            i, self.i = self.i, self.i + 1
            o = self.offsets.setdefault(shard, [0, 0])
            value = {
                "id": f"r{i}",
                "ts": T0 + i * 0.01,
                "model": "m",
                "prediction": 1,
                "attributes": {"sex": "F"},
            }
            t.update_prediction(shard, orjson.dumps(value), o[0])
            o[0] += 1
            if joined and i % 2:
                t.update_outcome(
                    shard, orjson.dumps({"id": f"r{i - 1}", "ts": T0 + i * 0.01, "label": 1}), o[1]
                )
                o[1] += 1
        t.shard(shard).changed = True
        assert self.d.checkpoint()


def entries(d: Detector, shard: int) -> int:
    assert d.tracker is not None
    j = d.tracker.shards[shard].join
    return j.pending_predictions + j.pending_outcomes + j.remembered


def test_the_store_stays_near_the_budget(tmp_path: Path) -> None:
    budget = 5_000_000
    d = detector(tmp_path, "5MB")
    feed = Feed(d)
    disk = []
    for _ in range(25):  # 250k predictions, 125k joined: 250k entries unbounded, ~6 MB compacted
        feed(0, 10_000)
        disk.append(d.stats.state_disk_bytes)
    assert d.tracker is not None and d._entry_bytes is not None
    j = d.tracker.shards[0].join
    n = entries(d, 0)
    # pending and remembered together: within the share (plus one checkpoint's growth) ...
    assert j.capacity_evictions[0] > 0 and j.remembered <= j.max_remembered
    assert n <= j.max_pending / BUDGET_PENDING_SHARE + 10_000, (n, j.max_pending)
    # ... which is the budget at the measured bytes per entry, and did not collapse
    assert 0.5 * budget < n * d._entry_bytes < 1.2 * budget, (n, d._entry_bytes)
    assert n > 20_000, n
    # the store's bytes swing with compactions (memtables, files awaiting compaction) around it
    assert sum(disk[-10:]) / 10 < 1.5 * budget, disk
    d.backend.compact()  # the live entries alone
    assert d.backend.disk_bytes() < budget
    d.close()


def test_a_new_partition_gets_an_equal_share_and_is_not_starved(tmp_path: Path) -> None:
    d = detector(tmp_path, "5MB")
    feed = Feed(d)
    for _ in range(12):
        feed(0, 10_000)
    assert d.tracker is not None
    big = d.tracker.shards[0].join
    before = big.capacity_evictions[0]
    assert before > 0  # partition 0 is at its bound
    feed(1, 0)  # partition 1 arrives empty (a rebalance)
    new = d.tracker.shards[1].join
    assert new.max_pending == big.max_pending > 10_000, (new.max_pending, big.max_pending)
    feed(1, 2_000, joined=False)  # its predictions wait for their outcomes
    assert new.capacity_evictions == [0, 0] and new.pending_predictions == 2_000
    d.close()


def test_a_partition_that_moved_away_is_deleted_after_local_max_age(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app_module, "MOVED_CHECK_EVERY", 0.0)
    d = detector(tmp_path, "100MB", changelog=True, local_max_age="2s")  # no changelog attached
    feed = Feed(d)
    feed(0, 6_000)
    feed(1, 6_000)
    d._on_revoke({1})  # moved to another replica: its keys stay, for a quick return

    def keys(p: int) -> int:
        spaces = (SPACE_ID, SPACE_DEADLINE, SPACE_COUNTS, SPACE_META)
        return sum(len(d.backend.scan(prefix(s, p), prefix(s, p + 1))) for s in spaces)

    feed(0, 10)
    assert keys(1) > 6_000 and d._kept == {1: 6_000}
    assert d.tracker is not None
    # the kept copy's bytes are not charged to the budget: its entries count in the cost per
    # entry, and the whole allowed count goes to the owned partition
    assert d._entry_bytes is not None
    share = 100_000_000 / d._entry_bytes
    assert d.tracker.shards[0].join.max_pending == int(share * BUDGET_PENDING_SHARE)
    time.sleep(2.1)
    feed(0, 10)
    assert keys(1) == 0 and d._kept == {}
    assert keys(0) > 6_000  # the owned partition is untouched
    d.close()


def test_a_budget_below_the_memtables_is_called_out() -> None:
    cfg = Config.model_validate({"join": {"max_pending_bytes": "50MB"}})
    (note,) = notes(cfg)
    assert (
        note.startswith("join.max_pending_bytes (50000000 bytes) is below") and "write_buffer_bytes" in note
    )
    assert notes(Config.model_validate({"join": {"max_pending_bytes": "50GB"}})) == []
