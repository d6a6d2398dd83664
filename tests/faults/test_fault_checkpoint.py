"""A failed checkpoint is counted, logged in one line and retried, never fatal (issue 9, item 9).

A full disk is made real with the process's file-size limit (RLIMIT_FSIZE, set from outside with
prlimit): the local store's writes then fail with EFBIG, as on a full volume, while the process's
output still flows through its pipe. Before, the first failed
checkpoint ended the process with two chained tracebacks.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path
from typing import Any

import pytest

from stream_fair.dev import simulate
from stream_fair.dev.broker import produce_events
from tests.faults.proc import Run, committed, consumed_all, read_all, setup
from tests.helpers import recount, wait_for

pytestmark = pytest.mark.integration


def test_a_full_disk_fails_checkpoints_without_ending_the_process(
    kafka_bootstrap: str, topic_names: Any, group_id: str, tmp_path: Path
) -> None:
    config = setup(
        kafka_bootstrap,
        topic_names,
        group_id,
        tmp_path,
        state={"checkpoint_interval": "1s"},
        log_level="INFO",
    )
    events = list(
        simulate.generate(simulate.SCENARIOS["lending"](), 600, seed=4, start_ts=time.time() - 7200)
    )
    first, second = events[: len(events) // 2], events[len(events) // 2 :]
    produce_events(kafka_bootstrap, topic_names.predictions, topic_names.outcomes, first)
    run = Run(config).start()
    try:
        exp = recount(first)
        consumed_all(run, exp.consumed["predictions"], exp.consumed["outcomes"])
        wait_for(
            lambda: committed(run) == [exp.consumed["predictions"], exp.consumed["outcomes"]],
            30,
            "a checkpoint",
        )
        _, hard = resource.prlimit(run.pid, resource.RLIMIT_FSIZE)
        resource.prlimit(run.pid, resource.RLIMIT_FSIZE, (4096, hard))  # the disk is full
        produce_events(kafka_bootstrap, topic_names.predictions, topic_names.outcomes, second)
        total = recount(events)
        read_all(run, total.consumed["predictions"], total.consumed["outcomes"])
        s = wait_for(
            lambda: ((x := run.scrape()).get("stream_fair_errors_total", kind="checkpoint") or 0) >= 2 and x,
            60,
            "two failed checkpoints counted",
        )
        assert not run.exited, run.log
        failures = [line for line in run.lines if "checkpoint failed" in line]
        assert failures and all("state error: cannot write" in line for line in failures), run.log
        assert "Traceback" not in run.log, run.log
        assert committed(run) == [exp.consumed["predictions"], exp.consumed["outcomes"]]
        stale = s.get("stream_fair_last_checkpoint_timestamp_seconds")
        resource.prlimit(run.pid, resource.RLIMIT_FSIZE, (hard, hard))  # space again: the retry succeeds
        wait_for(
            lambda: committed(run) == [total.consumed["predictions"], total.consumed["outcomes"]],
            90,
            "the retried checkpoint",
        )
        assert (run.scrape().get("stream_fair_last_checkpoint_timestamp_seconds") or 0) > (stale or 0)
        assert run.stop() == 0, run.log
    finally:
        run.kill()
