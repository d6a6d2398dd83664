"""A replica elected leader whose lead is out of reach (the leader topic unreadable: a missing
ACL, a deleted topic) retries with a doubling pause, counts one ``errors_total{kind="leader"}``
after a minute, and tries a new assignment at once. Before the pause it opened a reader and
logged an ERROR at every poll of the run loop."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from stream_fair import leader as leader_module
from stream_fair.app import LEAD_FAILING_AFTER, LEAD_RETRY_MAX, Detector
from stream_fair.config import Config


def detector(tmp_path: Path) -> Detector:
    cfg = Config.model_validate(
        {
            "topics": {"predictions": "p", "outcomes": "o", "dead_letters": None},
            "fairness": {"features": ["sex"]},
            "state": {"path": str(tmp_path / "state"), "changelog": False},
        }
    )
    d = Detector(cfg, exporter_port=0)
    d.open_state()
    return d


@pytest.fixture
def failing_starts(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every ``Leader.start`` fails as an unreachable leader topic does; the calls are recorded."""
    calls: list[int] = []

    def start(self: Any) -> None:
        calls.append(len(calls))
        raise ConnectionError("the leader topic is unreachable")

    monkeypatch.setattr(leader_module.Leader, "start", start)
    return calls


def run_loop(d: Detector, start: float, seconds: float, poll: float = 0.05) -> None:
    """The run loop's calls to ``lead_step``: one per poll."""
    steps = int(seconds / poll)
    for i in range(steps):
        d.lead_step(start + i * poll)


def test_failed_starts_back_off_and_count_one_error_after_a_minute(
    tmp_path: Path, failing_starts: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    d = detector(tmp_path)
    d._lead_wanted = True
    t0 = 10_000.0
    with caplog.at_level(logging.ERROR, logger="stream_fair"):
        run_loop(d, t0, LEAD_FAILING_AFTER - 1)
    # 1,180 polls in 59 s: at every poll before; now a doubling pause (0.5, 1, 2, 4 ... 30 s)
    assert 4 <= len(failing_starts) <= 8, len(failing_starts)
    errors = [r for r in caplog.records if "cannot take the lead" in r.getMessage()]
    assert len(errors) == len(failing_starts)
    assert "retried in" in errors[0].getMessage()
    assert d.stats.errors.get("leader", 0) == 0  # a start during a rebalance may fail: not yet

    before = len(failing_starts)
    run_loop(d, t0 + LEAD_FAILING_AFTER - 1, 4 * LEAD_RETRY_MAX)
    assert d.stats.errors["leader"] == 1  # out of reach for a minute: once per streak
    # the pause is capped: a lead that comes back is taken within LEAD_RETRY_MAX
    assert 3 <= len(failing_starts) - before <= 6, len(failing_starts) - before


def test_a_new_assignment_is_tried_at_once(tmp_path: Path, failing_starts: list[int]) -> None:
    d = detector(tmp_path)
    d._lead_wanted = True
    t0 = 10_000.0
    run_loop(d, t0, 20.0)  # deep into the pauses
    n = len(failing_starts)
    d._on_leader(True)  # the group assigned the leader partition anew (another rebalance)
    d.lead_step(t0 + 20.0)
    assert len(failing_starts) == n + 1
