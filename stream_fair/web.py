"""The exporter's HTTP plumbing: a bounded server and the exporter-toolkit web configuration.

:class:`BoundedHTTPServer` never spends a thread on a connection that has not sent anything: an
accepted connection waits in one selector thread until it is readable (or is closed after
``read_timeout``), then a fixed pool of ``workers`` threads serves it with ``read_timeout`` on every
socket operation. A thousand idle connections cost a thousand file descriptors, not a thousand
threads; past ``max_connections`` waiting ones the oldest is closed.

:func:`load_web_config` reads the web configuration file of the Prometheus exporter-toolkit
(``--web.config.file`` of node_exporter and friends): ``tls_server_config`` (certificate, key,
optional client certificates, TLS versions) and ``basic_auth_users`` (bcrypt hashes). Written by
hand: no maintained Python package reads that format.

>>> cfg = parse_web_config({"basic_auth_users": {"prometheus": "$2b$04$" + "a" * 53}}, ".")
>>> sorted(cfg.users), cfg.tls is None
(['prometheus'], True)
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import queue
import selectors
import socket
import ssl
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from http.server import HTTPServer
from pathlib import Path
from typing import Any

import yaml

from stream_fair.errors import ConfigError

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


def _error(problem: str, fix: str) -> ConfigError:
    return ConfigError(ERR_WEB.format(problem=problem, fix=fix))


@dataclass
class WebConfig:
    """TLS context and basic-auth users from an exporter-toolkit web configuration."""

    tls: ssl.SSLContext | None = None
    users: dict[str, bytes] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    _granted: OrderedDict[tuple[str, bytes], None] = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def authorized(self, header: str | None) -> bool:
        """Whether an ``Authorization`` header names a user with the right password.

        bcrypt is slow on purpose (tens of ms); granted pairs are remembered, keyed by a SHA-256
        of the password, so each scrape does not pay it again.
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
        import bcrypt

        try:
            ok = bcrypt.checkpw(password.encode(), hashed)
        except ValueError:
            return False
        if ok:
            with self._lock:
                self._granted[key] = None
                while len(self._granted) > 64:
                    self._granted.popitem(last=False)
        return bool(ok)


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


class BoundedHTTPServer(HTTPServer):
    """An HTTP server with a fixed worker pool and a waiting room for idle connections."""

    daemon_threads = True
    request_queue_size = 256  # listen backlog: a burst of connections must not wait for SYN retries

    def __init__(
        self,
        address: tuple[str, int],
        handler: Any,
        *,
        workers: int = 4,
        max_connections: int = 512,
        read_timeout: float = 10.0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(address, handler)
        self.read_timeout = read_timeout
        self.max_connections = max_connections
        self.tls = tls
        self._ready: queue.Queue[tuple[Any, Any] | None] = queue.Queue()
        self._arrivals: queue.Queue[tuple[Any, Any]] = queue.Queue()
        self._waiting: OrderedDict[Any, tuple[Any, float]] = OrderedDict()  # socket -> (addr, deadline)
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._closing = threading.Event()
        self._threads = [threading.Thread(target=self._waiting_room, name="http-wait", daemon=True)]
        self._threads += [
            threading.Thread(target=self._work, name=f"http-{i}", daemon=True) for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    # -- accept: hand over to the waiting room, never to a new thread ----------------------
    def process_request(self, request: Any, client_address: Any) -> None:
        self._arrivals.put((request, client_address))
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def _waiting_room(self) -> None:
        while not self._closing.is_set():
            for key, _ in self._selector.select(timeout=1.0):
                sock = key.fileobj
                if sock is self._wake_r:
                    with contextlib.suppress(OSError):
                        self._wake_r.recv(4096)
                    continue
                self._selector.unregister(sock)
                addr, _ = self._waiting.pop(sock)
                self._ready.put((sock, addr))
            while not self._arrivals.empty():
                sock, addr = self._arrivals.get_nowait()
                self._waiting[sock] = (addr, time.monotonic() + self.read_timeout)
                self._selector.register(sock, selectors.EVENT_READ)
                while len(self._waiting) > self.max_connections:  # the oldest idle one goes
                    self._drop(next(iter(self._waiting)))
            now = time.monotonic()
            for sock in [s for s, (_, deadline) in self._waiting.items() if deadline <= now]:
                self._drop(sock)

    def _drop(self, sock: Any) -> None:
        self._waiting.pop(sock, None)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(sock)
        self.shutdown_request(sock)

    # -- serve: a fixed pool, a timeout on every socket operation ---------------------------
    def _work(self) -> None:
        while True:
            item = self._ready.get()
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
        for _ in self._threads[1:]:
            self._ready.put(None)
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")
        super().server_close()
        for sock in list(self._waiting):
            self._drop(sock)
