"""The exporter's HTTP plumbing: a bounded server and the exporter-toolkit web configuration.

:class:`BoundedHTTPServer` never spends a thread on a connection that has not sent its whole
request head: an accepted connection waits in one selector thread until the head (request line and
headers) has arrived, and is closed if it has not within ``read_timeout`` of its accept, so a
client that trickles a byte at a time never holds a worker. Then a fixed pool serves it with
``read_timeout`` on every socket operation: ``/healthz`` and ``/readyz`` on a thread of their own,
``/metrics`` on ``scrape_workers`` threads, everything else on ``workers`` threads, so the probes
and scrapes never wait behind slow requests (a report, an explanation, a what-if), and a probe
never waits behind a scrape. A thousand idle connections cost a thousand file descriptors, not a
thousand threads; past ``max_connections`` held ones the oldest is closed, whether it is idle or
still sending. With TLS the head can only be read after the handshake, in a worker: there every
connection is served by the ``workers`` pool, in arrival order.

:func:`load_web_config` reads the web configuration file of the Prometheus exporter-toolkit
(``--web.config.file`` of node_exporter and friends): ``tls_server_config`` (certificate, key,
optional client certificates, TLS versions) and ``basic_auth_users`` (bcrypt hashes). Written by
hand: no maintained Python package reads that format.

>>> cfg = parse_web_config({"basic_auth_users": {"prometheus": "$2b$04$" + "a" * 53}}, ".")
>>> sorted(cfg.users), cfg.tls is None
(['prometheus'], True)
"""

from __future__ import annotations

import array
import base64
import contextlib
import fcntl
import hashlib
import logging
import queue
import selectors
import socket
import ssl
import termios
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import HTTPServer
from pathlib import Path
from typing import Any

import yaml

from stream_fair.errors import ConfigError, StreamFairError

log = logging.getLogger(__name__)

KEY = "exporter.web_config_file"
ERR_WEB = "config error: " + KEY + ": {problem}: {fix} (see docs/configuration.md)"
_TLS_KEYS = {"cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version", "max_version"}
_CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "RequestClientCert": ssl.CERT_OPTIONAL,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
UNPROTECTED = frozenset({"/healthz", "/readyz"})  # kubelet probes carry no credentials
AUTH_WAIT = 2.0  # seconds a request waits for its turn at the one bcrypt check


def _error(problem: str, fix: str) -> ConfigError:
    return ConfigError(ERR_WEB.format(problem=problem, fix=fix))


@dataclass
class WebConfig:
    """TLS context and basic-auth users from an exporter-toolkit web configuration."""

    tls: ssl.SSLContext | None = None
    users: dict[str, bytes] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    _granted: OrderedDict[tuple[str, bytes], None] = field(default_factory=OrderedDict)
    _denied: OrderedDict[tuple[str, bytes], None] = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _checking: threading.Lock = field(default_factory=threading.Lock)

    def authorized(self, header: str | None) -> bool:
        """Whether an ``Authorization`` header names a user with the right password.

        bcrypt is slow on purpose (tens of ms); granted and denied pairs are remembered, keyed by
        a SHA-256 of the password, so each scrape does not pay it again. At most one bcrypt check
        runs at a time, so clients guessing passwords cost at most one core, never both; a request
        waits up to ``AUTH_WAIT`` seconds for its turn and is refused (401, not remembered) after
        that. A right password needs to win one turn: it is remembered from then on.
        """
        if not self.users:
            return True
        if not header or not header.startswith("Basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:], validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        hashed = self.users.get(user)
        if hashed is None:
            return False
        key = (user, hashlib.sha256(password.encode()).digest())
        with self._lock:
            if key in self._granted:
                return True
            if key in self._denied:
                return False
        import bcrypt

        if not self._checking.acquire(timeout=AUTH_WAIT):
            return False  # others' checks took the whole wait: refused, not remembered
        try:
            with self._lock:  # decided while this request waited its turn
                if key in self._granted or key in self._denied:
                    return key in self._granted
            ok = bcrypt.checkpw(password.encode(), hashed)
        except ValueError:
            ok = False
        finally:
            self._checking.release()
        with self._lock:
            remembered, most = (self._granted, 64) if ok else (self._denied, 1024)
            remembered[key] = None
            while len(remembered) > most:
                remembered.popitem(last=False)
        return bool(ok)


class _NamedContext(ssl.SSLContext):
    """A client context that checks the certificate against one fixed name, whatever the URL's
    host (a replica reached by its pod IP or through a port-forward, with a certificate issued for
    the service's name: Prometheus's ``tls_config.server_name``)."""

    server_name = ""

    def wrap_socket(self, sock: Any, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        kwargs["server_hostname"] = self.server_name
        return super().wrap_socket(sock, *args, **kwargs)


def client_context(cafile: str | None, server_name: str | None = None) -> ssl.SSLContext | None:
    """The TLS context of a CLI request to an exporter (``--cacert`` and ``--server-name`` of
    report, explain and whatif): the system's trust store (None), or one trusting ``cafile``; with
    ``server_name``, the certificate must name it instead of the URL's host. StreamFairError (one
    line) if the file cannot be read as PEM."""
    if cafile is None and server_name is None:
        return None
    context = ssl.create_default_context if server_name is None else _named(server_name)
    try:
        return context(cafile=cafile)
    except OSError as exc:  # ssl.SSLError (not PEM) is an OSError too
        reason = exc.strerror or getattr(exc, "reason", None) or exc
        raise StreamFairError(
            f"cannot read --cacert {cafile} ({reason}): pass the PEM file of the CA that signed the "
            "exporter's certificate"
        ) from None


def _named(server_name: str) -> Callable[..., ssl.SSLContext]:
    def make(cafile: str | None) -> ssl.SSLContext:
        context = _NamedContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the chain and the name
        context.server_name = server_name
        if cafile is None:
            context.load_default_certs()
        else:
            context.load_verify_locations(cafile=cafile)
        return context

    return make


def load_web_config(path: str | Path) -> WebConfig:
    """Read and check an exporter-toolkit web configuration file; ConfigError (one line) if bad."""
    p = Path(path)
    try:
        doc = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise _error(f"cannot read {str(p)!r} ({exc.strerror})", "fix the path or mount the file") from None
    except (yaml.YAMLError, UnicodeDecodeError):
        raise _error(f"{str(p)!r} is not valid YAML", "fix its syntax") from None
    return parse_web_config(doc or {}, p.parent)


def parse_web_config(doc: Any, base: str | Path) -> WebConfig:
    """Check the parsed file; relative paths are relative to the file's directory, as upstream."""
    if not isinstance(doc, dict):
        raise _error("the top level is not a mapping", "see the exporter-toolkit web configuration format")
    unknown = set(doc) - {"tls_server_config", "basic_auth_users", "http_server_config"}
    if unknown:
        raise _error(f"unknown or unsupported key {sorted(unknown)[0]!r}", "remove it")
    cfg = WebConfig()
    tls = doc.get("tls_server_config")
    if tls is not None:
        cfg.tls = _tls_context(tls, Path(base))
    users = doc.get("basic_auth_users") or {}
    if not isinstance(users, dict):
        raise _error("basic_auth_users is not a mapping", "write user: bcrypt-hash pairs")
    for user, hashed in users.items():
        if (
            not isinstance(hashed, str)
            or not hashed.startswith(("$2a$", "$2b$", "$2y$"))
            or len(hashed) != 60
        ):
            raise _error(
                f"basic_auth_users.{user} is not a bcrypt hash",
                "generate one with htpasswd -nBC 10 USER, or bcrypt.hashpw in Python",
            )
        # $2y$ (htpasswd) is the same algorithm as $2b$; the bcrypt package knows $2a$ and $2b$
        cfg.users[str(user)] = ("$2b$" + hashed[4:]).encode()
    server = doc.get("http_server_config") or {}
    if not isinstance(server, dict) or set(server) - {"headers"}:
        raise _error("http_server_config supports only headers", "remove the other keys")
    cfg.headers = {str(k): str(v) for k, v in (server.get("headers") or {}).items()}
    return cfg


def _tls_context(tls: Any, base: Path) -> ssl.SSLContext:
    if not isinstance(tls, dict):
        raise _error("tls_server_config is not a mapping", "set cert_file and key_file")
    unknown = set(tls) - _TLS_KEYS
    if unknown:
        raise _error(f"tls_server_config.{sorted(unknown)[0]} is not supported", "remove it")
    if not tls.get("cert_file") or not tls.get("key_file"):
        raise _error("tls_server_config needs cert_file and key_file", "set both (PEM files)")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.minimum_version = _VERSIONS[tls.get("min_version", "TLS12")]
        if "max_version" in tls:
            ctx.maximum_version = _VERSIONS[tls["max_version"]]
    except KeyError as exc:
        raise _error(
            f"TLS version {exc.args[0]!r} is unknown", f"use one of {', '.join(_VERSIONS)}"
        ) from None
    cert, key = base / str(tls["cert_file"]), base / str(tls["key_file"])
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise _error(
            f"cannot load cert_file {str(cert)!r} with key_file {str(key)!r} ({exc})",
            "point them at a PEM certificate and its key",
        ) from None
    auth = tls.get("client_auth_type", "NoClientCert")
    if auth not in _CLIENT_AUTH:
        raise _error(f"client_auth_type {auth!r} is unknown", f"use one of {', '.join(_CLIENT_AUTH)}")
    ctx.verify_mode = _CLIENT_AUTH[auth]
    if auth != "NoClientCert":
        ca = tls.get("client_ca_file")
        if not ca:
            raise _error(f"client_auth_type {auth} needs client_ca_file", "set it to the clients' CA (PEM)")
        try:
            ctx.load_verify_locations(base / str(ca))
        except (OSError, ssl.SSLError) as exc:
            raise _error(
                f"cannot load client_ca_file {str(base / str(ca))!r} ({exc})", "fix the path"
            ) from None
    return ctx


PROBE_PATHS = (b"/healthz", b"/readyz")
"""Served by a worker of their own: a liveness probe must never wait, not even behind a scrape."""
SCRAPE_PATHS = (b"/metrics",)
"""Served by workers of their own, apart from the slow requests (reports, explanations, what-ifs)."""
HEAD_LIMIT = 65536  # bytes of a request head looked at before a worker takes over (and answers 431)
_PEEK = socket.MSG_PEEK | getattr(socket, "MSG_DONTWAIT", 0)
_REPEEK = 0.1  # seconds between looks at connections whose head is still arriving


def request_path(head: bytes) -> bytes:
    """The path of a request head, without its query (empty if the request line is malformed).

    >>> request_path(b"GET /metrics?x=1 HTTP/1.1\\r\\nHost: a\\r\\n\\r\\n"), request_path(b"garbage")
    (b'/metrics', b'')
    """
    parts = head.split(b"\n", 1)[0].split(b" ")
    return parts[1].split(b"?", 1)[0] if len(parts) >= 3 else b""


def head_complete(head: bytes) -> bool:
    return b"\r\n\r\n" in head or b"\n\n" in head or len(head) >= HEAD_LIMIT


def _pending_bytes(sock: Any) -> int | None:
    """Bytes readable on ``sock`` without reading them (None where the platform cannot say)."""
    try:
        buf = array.array("i", [0])
        fcntl.ioctl(sock.fileno(), termios.FIONREAD, buf)
        return int(buf[0])
    except (OSError, ValueError, AttributeError):
        return None


class BoundedHTTPServer(HTTPServer):
    """An HTTP server with fixed worker pools and a waiting room for connections still sending."""

    daemon_threads = True
    request_queue_size = 256  # listen backlog: a burst of connections must not wait for SYN retries

    def __init__(
        self,
        address: tuple[str, int],
        handler: Any,
        *,
        workers: int = 4,
        scrape_workers: int = 2,
        max_connections: int = 512,
        read_timeout: float = 10.0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(address, handler)
        self.read_timeout = read_timeout
        self.max_connections = max_connections
        self.tls = tls
        self._ready: queue.Queue[tuple[Any, Any] | None] = queue.Queue()
        self._scrapes: queue.Queue[tuple[Any, Any] | None] = queue.Queue()
        self._probes: queue.Queue[tuple[Any, Any] | None] = queue.Queue()
        self._arrivals: queue.Queue[tuple[Any, Any]] = queue.Queue()
        # every connection held here, in accept order: socket -> (addr, deadline); those whose head
        # is still arriving are also in _partial (with the bytes last seen), the rest in the selector
        self._held: OrderedDict[Any, tuple[Any, float]] = OrderedDict()
        self._partial: dict[Any, int | None] = {}
        self._peeked = 0.0
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._closing = threading.Event()
        self._room = threading.Thread(target=self._waiting_room, name="http-wait", daemon=True)
        self._lanes = [self._ready] * workers + [self._scrapes] * scrape_workers + [self._probes]
        self._threads = [
            threading.Thread(target=self._work, args=(lane,), name=f"http-{i}", daemon=True)
            for i, lane in enumerate(self._lanes)
        ]
        for t in (self._room, *self._threads):
            t.start()

    # -- accept: hand over to the waiting room, never to a new thread ----------------------
    def process_request(self, request: Any, client_address: Any) -> None:
        self._arrivals.put((request, client_address))
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def _waiting_room(self) -> None:
        while not self._closing.is_set():
            for key, _ in self._selector.select(timeout=_REPEEK if self._partial else 1.0):
                sock = key.fileobj
                if sock is self._wake_r:
                    with contextlib.suppress(OSError):
                        self._wake_r.recv(4096)
                    continue
                self._selector.unregister(sock)
                self._offer(sock)
            while not self._arrivals.empty():
                sock, addr = self._arrivals.get_nowait()
                self._held[sock] = (addr, time.monotonic() + self.read_timeout)
                self._selector.register(sock, selectors.EVENT_READ)
                while len(self._held) > self.max_connections:  # the oldest goes, sending or idle
                    self._drop(next(iter(self._held)))
            now = time.monotonic()
            if self._partial and now - self._peeked >= _REPEEK:
                self._peeked = now
                for sock, seen in list(self._partial.items()):
                    now_pending = _pending_bytes(sock)
                    if now_pending is None or now_pending != seen:  # grew (or closed, or unknown)
                        self._offer(sock)
            while self._held:  # deadlines grow in accept order: the expired ones are at the front
                sock = next(iter(self._held))
                if self._held[sock][1] > now:
                    break
                self._drop(sock)

    def _offer(self, sock: Any) -> None:
        """Hand a readable connection to a worker once its request head is complete."""
        addr = self._held[sock][0]
        if self.tls is not None:  # the head is encrypted: read after the handshake, in a worker
            self._hand(sock, addr, self._ready)
            return
        try:
            head = sock.recv(HEAD_LIMIT, _PEEK)
        except BlockingIOError:
            head = None
        except OSError:
            self._drop(sock)
            return
        if head == b"":  # closed by the client before sending anything
            self._drop(sock)
        elif head is None or not head_complete(head):
            self._partial[sock] = _pending_bytes(sock)
        else:
            path = request_path(head)
            lane = (
                self._probes
                if path in PROBE_PATHS
                else self._scrapes
                if path in SCRAPE_PATHS
                else self._ready
            )
            self._hand(sock, addr, lane)

    def _hand(self, sock: Any, addr: Any, lane: queue.Queue[tuple[Any, Any] | None]) -> None:
        self._held.pop(sock, None)
        self._partial.pop(sock, None)
        lane.put((sock, addr))

    def _drop(self, sock: Any) -> None:
        self._held.pop(sock, None)
        self._partial.pop(sock, None)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(sock)
        self.shutdown_request(sock)

    # -- serve: fixed pools, a timeout on every socket operation ----------------------------
    def _work(self, lane: queue.Queue[tuple[Any, Any] | None]) -> None:
        while True:
            item = lane.get()
            if item is None:
                return
            sock, addr = item
            try:
                sock.settimeout(self.read_timeout)
                if self.tls is not None:
                    sock = self.tls.wrap_socket(sock, server_side=True)
                self.finish_request(sock, addr)
            except Exception as exc:  # a client that times out or fails the handshake
                log.debug("connection from %s dropped: %s", addr, exc)
            finally:
                self.shutdown_request(sock)

    def server_close(self) -> None:
        self._closing.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")
        self._room.join(timeout=5.0)  # no hand-over after the lanes' stop marks
        for lane in self._lanes:
            lane.put(None)
        super().server_close()
        for sock in list(self._held):
            self._drop(sock)
