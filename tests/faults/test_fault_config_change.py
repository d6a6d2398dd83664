"""State written under one configuration is never read under another (real processes, real broker).

The counts' cells, windows and the alarm's slot, cohort and period indexes are in the units of the
configuration that wrote them (``stream_fair.config.fingerprint``). Before the changelog's commit
markers carried that fingerprint, a replica started with another ``feedback.alarm_slot`` on an empty
disk (a new pod) restored the old state and carried on: its alarm put every new row into the slot
after the restored one, whose end lay at a multiple of the old event time, so the alarm never
raised nor cleared again, and nothing said so.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from stream_fair.config import feedback_settings, fingerprint, load
from stream_fair.dev import simulate
from stream_fair.dev.broker import produce_events
from stream_fair.errors import StateError
from stream_fair.groups import feature_keys
from stream_fair.leader import Leader
from tests.faults.proc import Run, consumed_all, run_to_exit, setup
from tests.helpers import recount, write_config

pytestmark = pytest.mark.integration


def _events(n: int, seed: int) -> list[tuple[str, Any]]:
    return list(simulate.generate(simulate.SCENARIOS["lending"](), n, seed=seed, start_ts=time.time() - 7200))


def _variant(config: Path, name: str, state: Path, **sections: Any) -> Path:
    """A copy of ``config`` with another state directory and ``sections`` merged in."""
    cfg = yaml.safe_load(config.read_text(encoding="utf-8"))
    cfg["state"]["path"] = str(state)
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    return write_config(config.with_name(name), cfg)


def _state_error(done: subprocess.CompletedProcess[str]) -> str:
    """The one ``state error`` line of a process that stopped with status 2 (and no traceback)."""
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if "state error" in line]
    assert len(lines) == 1, done.stderr
    return lines[0]


def test_a_replica_with_other_alarm_units_refuses_the_changelog_and_the_local_store(
    kafka_bootstrap: str, topic_names: Any, group_id: str, tmp_path: Path
) -> None:
    config = setup(kafka_bootstrap, topic_names, group_id, tmp_path, partitions=2)
    events = _events(600, seed=7)
    exp = recount(events)
    produce_events(kafka_bootstrap, topic_names.predictions, topic_names.outcomes, events)
    run = Run(config).start()
    try:
        consumed_all(run, exp.consumed["predictions"], exp.consumed["outcomes"])  # checkpointed
        assert run.stop() == 0, run.log
    finally:
        run.kill()

    # a new pod (empty disk) with another alarm slot: the changelog's markers are refused
    changed = _variant(config, "changed.yaml", tmp_path / "new-pod", feedback={"alarm_slot": "5m"})
    assert fingerprint(load(changed, environ={}))["feedback"]["alarm_slot"] == 300.0
    line = _state_error(run_to_exit(changed))
    # whichever it restores first: a partition from the changelog, or the model-wide fold
    assert (
        f"the changelog {group_id}-stream-fair-changelog holds partition " in line
        or f"the leader topic {group_id}-stream-fair-leader holds the model-wide fold" in line
    ), line
    assert "written with another configuration (feedback differ)" in line, line
    assert "new kafka.group_id" in line, line

    # the model-wide fold alone (a replica that would lead without owning an input partition)
    cfg = load(changed, environ={})
    fs = feedback_settings(cfg.feedback)
    fc = cfg.fairness
    features = feature_keys([f.name for f in fc.features], fc.intersections, [f.name for f in fc.audit_only])
    leader = Leader(cfg, features, fs.verdict_settings(), 2, fs)
    with pytest.raises(StateError) as err:
        leader.start()
    leader.stop()
    assert str(err.value).startswith(
        f"state error: the leader topic {group_id}-stream-fair-leader holds the model-wide fold written "
        "with another configuration (feedback differ): "
    ), err.value

    # the same change on the old pod's disk: the local store is refused before any restore
    same_disk = _variant(
        config, "same-disk.yaml", load(config, environ={}).state.path, feedback={"alarm_slot": "5m"}
    )
    line = _state_error(run_to_exit(same_disk))
    assert "was written for another configuration" in line, line

    # the control: the unchanged configuration on an empty disk restores the same counts
    control = _variant(config, "control.yaml", tmp_path / "control-pod")
    run = Run(control).start()
    try:
        s = consumed_all(run, exp.consumed["predictions"], exp.consumed["outcomes"])
        read = sum(s.by("stream_fair_records_read_total", ["topic"]).values())
        assert read == 0, f"the control replica read {read} input records instead of restoring"
        assert run.stop() == 0, run.log
    finally:
        run.kill()
