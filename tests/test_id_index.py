"""The id table's expiry and forget indexes across checkpoints: exact, and not rescanned at each one.

A checkpoint used to restart both index scans, so the first check after it sought through the
index head again (per partition and index, every checkpoint: ~10 % of the loop under a steady
stream). Now the head is known from below after a commit and the scan waits until something may be
due. These tests check that it still hands out exactly what a plain model says, in order, and that
a steady stream of checkpoints with nothing due scans no more.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from stream_fair.state.codec import KIND_J, PendingOutcome, PendingPrediction, Remembered
from stream_fair.state.ids import IdTable
from stream_fair.state.rocks import RocksBackend


class CountingBackend:
    """The real store, counting range scans."""

    def __init__(self, path: Path) -> None:
        self.inner = RocksBackend(path)
        self.scans = 0

    def scan(self, *args: Any, **kwargs: Any) -> Any:
        self.scans += 1
        return self.inner.scan(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _commit(table: IdTable, backend: CountingBackend) -> None:
    store, _ = table.changes()
    backend.write(store)
    table.committed()


def test_no_scan_at_a_checkpoint_while_nothing_is_due(tmp_path: Path) -> None:
    backend = CountingBackend(tmp_path)
    table = IdTable(backend, partition=0, ttl=100.0, outcome_ttl=100.0, chunk=4)
    table.put("a", PendingPrediction(ts=1.0, cell=0, predicted=1, score=None))
    _commit(table, backend)
    assert not table.due_before(50.0)  # the first check reads the head (unknown until then)
    first = backend.scans
    assert first >= 1
    for i in range(50):  # a steady stream: every "checkpoint" adds pending ids, none is due
        table.put(f"p{i}", PendingPrediction(ts=2.0 + i, cell=0, predicted=0, score=None))
        _commit(table, backend)
        assert not table.due_before(60.0 + i / 2)
    assert backend.scans == first, "a commit with nothing due must not rescan the index"
    # once something may be due, the scan runs and hands it out in deadline order
    assert table.due_before(101.5)
    assert [i for i, _ in table.pop_due(103.5)] == ["a", "p0", "p1"]
    assert backend.scans > first


def test_a_commit_keeps_the_overlays_earlier_deadline(tmp_path: Path) -> None:
    """An id added in the last checkpoint with a deadline before everything scanned is due first."""
    backend = CountingBackend(tmp_path)
    table = IdTable(backend, partition=0, ttl=100.0, outcome_ttl=10.0, chunk=4)
    table.put("late", PendingPrediction(ts=5.0, cell=0, predicted=1, score=None))  # due at 105
    _commit(table, backend)
    assert not table.due_before(20.0)
    table.put("early", PendingOutcome(ts=6.0, label=1))  # due at 16: before the scanned head
    _commit(table, backend)
    assert table.due_before(20.0)
    assert [i for i, _ in table.pop_due(20.0)] == ["early"]


@pytest.mark.parametrize("seed", range(6))
def test_expiry_and_forgetting_match_a_model_across_checkpoints(tmp_path: Path, seed: int) -> None:
    """Random puts, deletes, checkpoints and watermarks: what is handed out, and in which order,
    equals a plain dict of deadlines (small chunks, so scans restart mid-index)."""
    rng = random.Random(seed)
    backend = CountingBackend(tmp_path)
    ttl, outcome_ttl = 30.0, 12.0
    table = IdTable(backend, partition=3, ttl=ttl, outcome_ttl=outcome_ttl, chunk=3)
    due: dict[str, float] = {}  # pending id -> deadline
    forget: dict[str, float] = {}  # remembered id -> forget_at
    watermark = 0.0
    n = 0
    for _ in range(600):
        op = rng.random()
        if op < 0.45:  # a new pending prediction or outcome around the watermark
            n += 1
            eid = f"id-{n}"
            ts = watermark + rng.uniform(-5.0, 20.0)
            rec: Any = (
                PendingPrediction(ts=ts, cell=0, predicted=1, score=None)
                if rng.random() < 0.6
                else PendingOutcome(ts=ts, label=0)
            )
            deadline = ts + (ttl if isinstance(rec, PendingPrediction) else outcome_ttl)
            if deadline < watermark:
                continue  # the join never stores what is already due
            table.put(eid, rec)
            due[eid] = deadline
        elif op < 0.6 and due:  # a join: the pending id is remembered
            eid = rng.choice(sorted(due))
            assert table.get(eid) is not None
            del due[eid]
            at = watermark + rng.uniform(1.0, 40.0)
            table.put(eid, Remembered(KIND_J, at))
            forget[eid] = at
        elif op < 0.75:
            _commit(table, backend)
        else:  # the watermark moves: what is due expires, what is forgotten goes
            watermark += rng.uniform(0.0, 6.0)
            _expire(due, table.due_before, table.pop_due, table.delete, watermark)
            _expire(forget, table.forget_before, table.pop_forget, table.delete, watermark)
    _commit(table, backend)
    rest = table.pop_due()
    assert sorted(i for i, _ in rest) == sorted(due)


def _expire(model: dict[str, float], before: Any, pop: Any, delete: Any, watermark: float) -> None:
    """What one index hands out below ``watermark`` is what the model says, in its order."""
    expected = [i for _, i in sorted((at, i) for i, at in model.items() if at < watermark)]
    got = pop(watermark) if before(watermark) else []
    assert [i for i, _ in got] == expected
    for i in expected:
        del model[i]
        delete(i)
