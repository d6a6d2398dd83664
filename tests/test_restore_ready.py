"""``/readyz`` follows every assignment's restore, not only the first one (docs/state.md, "Restore
on assignment"): a rebalance that hands this replica more partitions makes it not ready until their
state is loaded. Before, readiness, once set, stayed set through every later restore."""

from __future__ import annotations

from pathlib import Path

from stream_fair.app import Detector
from stream_fair.config import Config
from stream_fair.kafka_io import DeadLetters
from tests.test_checkpoint_pace import NoGroup


def detector(tmp_path: Path) -> Detector:
    cfg = Config.model_validate(
        {
            "topics": {"predictions": "p", "outcomes": "o", "dead_letters": None},
            "fairness": {"features": ["sex"]},
            "state": {"path": str(tmp_path / "state"), "changelog": False},
        }
    )
    d = Detector(cfg, exporter_port=0)
    d.attach(NoGroup(), DeadLetters(cfg))  # no broker: the restores are the local store's
    return d


def test_readiness_clears_while_a_later_assignment_restores(tmp_path: Path) -> None:
    d = detector(tmp_path)
    assert not d.health.ready
    d._on_assign({0})
    assert not d.health.ready  # restoring partition 0
    d.restore_step()
    assert d.health.ready and set(d.tracker.shards) == {0}  # type: ignore[union-attr]
    d._on_assign({0, 1, 2})  # a rebalance hands over partitions 1 and 2
    assert not d.health.ready, "ready while partitions 1 and 2 restore"
    d.restore_step()
    assert d.health.ready and set(d.tracker.shards) == {0, 1, 2}  # type: ignore[union-attr]
    d._on_assign({0, 1, 2})  # assigned again, nothing new to restore: stays ready
    assert d.health.ready
