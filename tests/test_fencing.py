"""Another writer behind this replica's claim on its changelog partition (docs/state.md, "Owners,
epochs and the claim").

A replica evicted from the group (a pause longer than ``max_poll_interval_ms``) may still write a
checkpoint after the partition's new owner claimed it. Restoring, a reader ignores those records
(a lower epoch after a higher one), but log compaction keeps the newest record of each key: the
late record would replace the owner's committed value, and a restore of the compacted log would
lose it. The owner therefore rewrites the keys of records it finds behind its claim; a replica
that finds a *higher* epoch there stops counting the partition (it is the evicted one) and
commits nothing for it. Both on the real broker, with the detector's own changelog reader.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from stream_fair import app as app_module
from stream_fair.app import Detector
from stream_fair.config import Config
from stream_fair.dev import simulate
from stream_fair.dev.broker import create_topics, produce_events
from stream_fair.state.codec import SPACE_ID, decode_json, meta_key, prefix
from stream_fair.state.restore import EPOCH_HEADER, PartitionRestore
from stream_fair.state.rocks import RocksBackend
from stream_fair.transport.changelog import changelog_topic
from tests.helpers import detector_config, scrape, wait_consumed, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.transports]


def _events(n: int, seed: int) -> list[tuple[str, Any]]:
    # labels for about half of the predictions: the rest stay pending (their records are the
    # changelog keys a late writer can clobber)
    scenario = simulate.SCENARIOS["lending"](label_delay_mean_s=60.0)
    events = list(simulate.generate(scenario, n, seed=seed))
    outcomes = [e for e in events if e[0] == "outcome"]
    keep = {id(e) for e in outcomes[: len(outcomes) // 2]}
    return [e for e in events if e[0] == "prediction" or id(e) in keep]


def _changelog(cfg: Config, partition: int) -> list[tuple[int, bytes, bytes | None, int]]:
    """Every record of one changelog partition: ``(offset, key, value, epoch)``."""
    tp = TopicPartition(changelog_topic(cfg), partition)
    consumer = KafkaConsumer(bootstrap_servers=cfg.kafka.bootstrap_servers, enable_auto_commit=False)
    try:
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        end = consumer.end_offsets([tp])[tp]
        out = []
        deadline = time.monotonic() + 30
        while consumer.position(tp) < end:
            assert time.monotonic() < deadline, "the changelog could not be read to its end"
            for r in consumer.poll(timeout_ms=500).get(tp, []):
                epoch = int(dict(r.headers).get(EPOCH_HEADER, b"0"))
                out.append((r.offset, r.key, r.value, epoch))
        return out
    finally:
        consumer.close()


def _restored_ids(
    records: list[tuple[int, bytes, bytes | None, int]], path: Path, cfg: Config
) -> dict[bytes, Any]:
    """The id records a full restore of ``records`` leaves (partition 0)."""
    backend = RocksBackend(path)
    try:
        r = PartitionRestore(backend, 0, epoch=0, full=True, ttl=cfg.join.ttl, outcome_ttl=cfg.join.ttl)
        for offset, key, value, epoch in records:
            r.feed(offset, key, value, epoch)
        r.finish()
        return dict(backend.scan(prefix(SPACE_ID, 0), prefix(SPACE_ID, 1)))
    finally:
        backend.close()


def _compacted(
    records: list[tuple[int, bytes, bytes | None, int]],
) -> list[tuple[int, bytes, bytes | None, int]]:
    """What log compaction leaves: the newest record of each key, in log order."""
    newest = {key: (offset, key, value, epoch) for offset, key, value, epoch in records}
    return sorted(newest.values())


def _write(cfg: Config, key: bytes, value: bytes | None, epoch: int) -> None:
    producer = KafkaProducer(bootstrap_servers=cfg.kafka.bootstrap_servers, acks="all")
    try:
        producer.send(
            changelog_topic(cfg),
            key=key,
            value=value,
            partition=0,
            headers=[(EPOCH_HEADER, str(epoch).encode())],
        ).get(timeout=30)
    finally:
        producer.close()


def _committed(d: Detector, total: tuple[int, int]) -> None:
    """Wait until ``d`` consumed the stream and committed a checkpoint of partition 0."""
    wait_consumed(d.port, total, 60)
    wait_for(
        lambda: d.tracker is not None and d.tracker.shards[0].changelog_next is not None, 30, "a checkpoint"
    )


class _Running:
    def __init__(self, detector: Detector) -> None:
        self.detector, self.stop, self.failure = detector, threading.Event(), []  # type: list[BaseException]
        self.thread = threading.Thread(target=self._run, name="detector", daemon=True)

    def _run(self) -> None:
        try:
            self.detector.run(self.stop)
        except BaseException as exc:  # noqa: BLE001 - asserted by the test
            self.failure.append(exc)

    def __enter__(self) -> Detector:
        self.thread.start()
        wait_for(lambda: self.detector.port and scrape(self.detector.port) is not None, 30, "the detector")
        return self.detector

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join(30)
        assert not self.failure, self.failure


def _setup(
    bootstrap: str, topics: Any, group_id: str, tmp_path: Path, n: int
) -> tuple[Config, tuple[int, int]]:
    events = _events(n, seed=31)
    create_topics(bootstrap, [topics.predictions, topics.outcomes], partitions=1)
    create_topics(bootstrap, [topics.dead_letters], partitions=1)
    produce_events(bootstrap, topics.predictions, topics.outcomes, events)
    cfg = Config.model_validate(detector_config(bootstrap, topics, group_id, tmp_path / "state"))
    n_pred = sum(1 for kind, _ in events if kind == "prediction")
    return cfg, (n_pred, len(events) - n_pred)


def test_a_previous_owners_late_record_is_rewritten_so_compaction_keeps_the_committed_value(
    kafka_bootstrap: str, topic_names: Any, group_id: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app_module, "FENCE_CHECK_INTERVAL", 0.5)
    cfg, total = _setup(kafka_bootstrap, topic_names, group_id, tmp_path, 400)
    with _Running(Detector(cfg, exporter_port=0)) as d:
        _committed(d, total)
        s = d.tracker.shards[0]
        epoch = s.epoch
        pending = d.backend.scan(prefix(SPACE_ID, 0), prefix(SPACE_ID, 1), limit=1)
        assert pending, "the stream leaves predictions pending"
        key, committed = pending[0]
        # an evicted previous owner's checkpoint, written after this replica's claim: the id joined
        _write(cfg, key, None, epoch - 1)
        _write(cfg, meta_key(0), b'{"late": true}', epoch - 1)
        wait_for(lambda: d.stats.errors.get("fenced", 0) >= 1, 30, "the late records examined")
        log = _changelog(cfg, 0)
        late = max(offset for offset, k, _v, e in log if k == key and e == epoch - 1)
        wait_for(lambda: any(o > late and k == key for o, k, _v, _e in _changelog(cfg, 0)), 30, "the rewrite")
        assert 0 in d.tracker.shards and 0 not in d._fenced  # still the owner, still counting
    log = _changelog(cfg, 0)
    newest = [(v, e) for _o, k, v, e in log if k == key][-1]
    assert newest == (committed, epoch)
    # what a new replica restores from the compacted log equals what the whole log gives
    full = _restored_ids(log, tmp_path / "full", cfg)
    assert full[key] == committed
    assert _restored_ids(_compacted(log), tmp_path / "compacted", cfg) == full


def test_a_higher_epoch_behind_the_claim_fences_this_replica_and_nothing_is_committed_locally(
    kafka_bootstrap: str, topic_names: Any, group_id: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app_module, "FENCE_CHECK_INTERVAL", 3600.0)  # found by the checkpoint's own check
    cfg, total = _setup(kafka_bootstrap, topic_names, group_id, tmp_path, 400)
    with _Running(Detector(cfg, exporter_port=0)) as d:
        _committed(d, total)
        epoch = d.tracker.shards[0].epoch
        before = decode_json(d.backend.get(meta_key(0)))
        # another replica's claim (this one was evicted and does not know it yet)
        _write(cfg, meta_key(0), b'{"claim": true}', epoch + 1)
        more = _events(60, seed=32)
        produce_events(kafka_bootstrap, topic_names.predictions, topic_names.outcomes, more)
        wait_for(lambda: 0 in d._fenced, 60, "the fence found by the next checkpoint")
        assert d.stats.errors.get("fenced") == 1
        assert 0 not in d.tracker.shards  # dropped: nothing of it counted here any more
        after = decode_json(d.backend.get(meta_key(0)))
        # the checkpoint written behind the claim was never committed to the local store
        assert after["changelog_next"] == before["changelog_next"] and after["seq"] == before["seq"]
        assert d.backend.get(prefix(0, 0) + app_module._RESTORING) is not None  # a full restore next time
        text = scrape(d.port)
        assert text.get("stream_fair_errors_total", kind="fenced") == 1.0


def test_a_crashed_checkpoints_tail_is_repaired_by_the_claim_without_a_fence(
    kafka_bootstrap: str, topic_names: Any, group_id: str, tmp_path: Path
) -> None:
    """Records of a checkpoint that crashed before its meta (the same owner, the same epoch) are
    an ignored tail: the restart's claim rewrites their keys and is written after them. That is
    the protocol's normal crash window, not another writer: the claim's check starts where the
    restore stopped reading, so nothing is fenced or counted as an error."""
    cfg, total = _setup(kafka_bootstrap, topic_names, group_id, tmp_path, 300)
    with _Running(Detector(cfg, exporter_port=0)) as d:
        _committed(d, total)
        epoch = d.tracker.shards[0].epoch
        key, committed = d.backend.scan(prefix(SPACE_ID, 0), prefix(SPACE_ID, 1), limit=1)[0]
    _write(cfg, key, None, epoch)  # a checkpoint's data record whose meta never came
    with _Running(Detector(cfg, exporter_port=0)) as again:
        wait_consumed(again.port, total, 60)
        wait_for(
            lambda: 0 in again.tracker.shards and again.tracker.shards[0].epoch == epoch + 1, 30, "the claim"
        )
        assert again.stats.errors.get("fenced", 0) == 0 and not again._fenced
        assert again.backend.get(key) == committed
    newest = [(v, e) for _o, k, v, e in _changelog(cfg, 0) if k == key][-1]
    assert newest == (committed, epoch + 1)  # the claim rewrote it


def test_a_retried_checkpoint_after_its_own_failed_attempt_is_no_fence(
    kafka_bootstrap: str, topic_names: Any, group_id: str, tmp_path: Path
) -> None:
    """A checkpoint that fails after sending its data (the meta refused) is retried: the retry's
    records land after the failed attempt's, all of this replica's epoch. Those are its own, not
    another writer's: nothing is fenced and the counts are exact."""
    cfg, total = _setup(kafka_bootstrap, topic_names, group_id, tmp_path, 300)
    with _Running(Detector(cfg, exporter_port=0)) as d:
        _committed(d, total)
        writer = d._writer
        real, failed = writer.send_meta, []

        def refuse_once(*args: Any, **kwargs: Any) -> Any:
            if not failed:
                failed.append(True)
                raise RuntimeError("the broker refused the meta")
            return real(*args, **kwargs)

        writer.send_meta = refuse_once
        more = _events(80, seed=33)
        produce_events(kafka_bootstrap, topic_names.predictions, topic_names.outcomes, more)
        n_pred = sum(1 for kind, _ in more if kind == "prediction")
        wait_consumed(d.port, (total[0] + n_pred, total[1] + len(more) - n_pred), 60)
        assert failed and d.stats.errors.get("checkpoint", 0) >= 1  # the attempt failed, then the retry
        assert d.stats.errors.get("fenced", 0) == 0 and not d._fenced and 0 in d.tracker.shards
