"""The exporter's HTTP server: exporter-toolkit web config (TLS, basic auth), one-line errors.

Real TLS (a self-signed certificate made with openssl), real bcrypt hashes, real sockets.
"""

from __future__ import annotations

import base64
import json
import shutil
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import bcrypt
import pytest
import yaml

from stream_fair.errors import ConfigError
from stream_fair.exporter import ExporterServer, Health, PipelineStats, registry_for
from stream_fair.report import build_report
from stream_fair.web import load_web_config
from tests.helpers import LocalTracker as Tracker
from tests.test_exporter import CFG


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    openssl = shutil.which("openssl")
    assert openssl, "openssl is needed to make a test certificate (Debian package openssl)"
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
         "-keyout", str(d / "tls.key"), "-out", str(d / "tls.crt")],
        check=True, capture_output=True,
    )  # fmt: skip
    return d


def _write(d: Path, doc: dict[str, object]) -> Path:
    path = d / "web-config.yml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _get(url: str, ctx: ssl.SSLContext | None, auth: tuple[str, str] | None = None) -> int:
    req = urllib.request.Request(url)
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=10, context=ctx) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_tls_and_basic_auth_from_an_exporter_toolkit_web_config(cert: Path) -> None:
    hashed = bcrypt.hashpw(b"s3cret #1", bcrypt.gensalt(rounds=4)).decode().replace("$2b$", "$2y$")
    path = _write(
        cert,
        {
            "tls_server_config": {"cert_file": "tls.crt", "key_file": "tls.key"},  # relative to the file
            "basic_auth_users": {"prometheus": hashed},
            "http_server_config": {"headers": {"X-Content-Type-Options": "nosniff"}},
        },
    )
    t = Tracker(CFG)
    health = Health()
    health.ready, health.heartbeat = True, time.monotonic()
    health.heard(time.monotonic())
    reg = registry_for(lambda: (build_report(t.snapshot(), CFG), PipelineStats()))
    served = {"model": "m", "feature": "sex", "disparity": "equal_opportunity_difference"}
    server = ExporterServer(
        "127.0.0.1",
        0,
        reg,
        health,
        web=load_web_config(path),
        explain=lambda **kw: {**served, "split_ts": kw["split_ts"]},
        search=lambda: {"models": {}},
    ).start()
    ctx = ssl.create_default_context(cafile=str(cert / "tls.crt"))
    base = f"https://127.0.0.1:{server.port}"
    try:
        assert server.scheme == "https"
        assert _get(base + "/metrics", ctx) == 401
        assert _get(base + "/metrics", ctx, ("prometheus", "wrong")) == 401
        assert _get(base + "/metrics", ctx, ("nobody", "s3cret #1")) == 401
        assert _get(base + "/metrics", ctx, ("prometheus", "s3cret #1")) == 200
        assert _get(base + "/metrics", ctx, ("prometheus", "s3cret #1")) == 200  # cached grant
        assert _get(base + "/", ctx) == 401
        why = "/explain?model=m&feature=sex&disparity=equal_opportunity_difference"
        for path in (why, "/search"):  # the explanations need the same credentials as /metrics
            assert _get(base + path, ctx) == 401, path
            assert _get(base + path, ctx, ("prometheus", "s3cret #1")) == 200, path
        assert _get(base + why.replace("model=m&", ""), ctx, ("prometheus", "s3cret #1")) == 400
        assert _get(base + "/healthz", ctx) == 200 and _get(base + "/readyz", ctx) == 200  # probes
        with pytest.raises(OSError):  # plain HTTP is not served on a TLS port (reset or refused)
            urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=10)
        req = urllib.request.Request(base + "/healthz")
        with urllib.request.urlopen(req, timeout=10, context=ctx) as resp:
            assert resp.headers["X-Content-Type-Options"] == "nosniff"
    finally:
        server.stop()


def test_explain_reads_an_https_exporter_with_a_private_ca(cert: Path, tmp_path: Path) -> None:
    """Review finding: `explain` had no --cacert (report and whatif had), so against the shipped
    HTTPS exporter with a private CA it failed with CERTIFICATE_VERIFY_FAILED. Now it has, through
    the same code path; a missing --cacert file is one line for all three commands."""
    from tests.helpers import cli_env, run_cli

    hashed = bcrypt.hashpw(b"scrape pw", bcrypt.gensalt(rounds=4)).decode()
    web = tmp_path / "web.yml"
    web.write_text(
        yaml.safe_dump(
            {
                "tls_server_config": {"cert_file": str(cert / "tls.crt"), "key_file": str(cert / "tls.key")},
                "basic_auth_users": {"prometheus": hashed},
            }
        )
    )
    health = Health()
    health.heard(time.monotonic())
    reg = registry_for(lambda: (build_report(Tracker(CFG).snapshot(), CFG), PipelineStats()))
    served = {"model": "m", "feature": "sex", "disparity": "equal_opportunity_difference"}
    server = ExporterServer(
        "127.0.0.1",
        0,
        reg,
        health,
        web=load_web_config(web),
        explain=lambda **kw: {**served, "split_ts": kw["split_ts"]},
        search=lambda: {"models": {}},
    ).start()
    base = f"https://127.0.0.1:{server.port}"
    env = cli_env(STREAM_FAIR_PASSWORD="scrape pw")
    why = ("--model", "m", "--feature", "sex", "--disparity", "equal_opportunity_difference", "--json")
    ca = ("--user", "prometheus", "--cacert", str(cert / "tls.crt"))
    try:
        ok = run_cli("explain", "--url", base, *why, *ca, env=env)
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout) == {**served, "split_ts": None}
        found = run_cli("explain", "--url", base, "--search", "--json", *ca, env=env)
        assert found.returncode == 0 and json.loads(found.stdout) == {"models": {}}, found.stderr
        untrusted = run_cli("explain", "--url", base, *why, "--user", "prometheus", env=env)
        assert untrusted.returncode == 2 and untrusted.stderr.count("\n") == 1, untrusted.stderr
        assert "CERTIFICATE_VERIFY_FAILED" in untrusted.stderr and "pass --cacert" in untrusted.stderr
        denied = run_cli("explain", "--url", base, *why, "--cacert", str(cert / "tls.crt"), env=env)
        assert denied.returncode == 2 and "HTTP 401" in denied.stderr, denied.stderr
    finally:
        server.stop()
    absent = str(tmp_path / "absent-ca.crt")
    for command in (
        ("explain", "--url", base, "--search"),
        ("report", "--url", base),
        ("whatif", "--url", base, "--model", "m", "--feature", "sex"),
    ):
        out = run_cli(*command, "--cacert", absent, env=env)
        assert out.returncode == 2 and out.stderr.count("\n") == 1, (command, out.stderr)
        assert f"cannot read --cacert {absent} (No such file or directory)" in out.stderr, out.stderr


def test_server_name_checks_the_certificate_against_another_name_than_the_urls_host(
    tmp_path: Path,
) -> None:
    """The shipped certificate names the service (`stream-fair`), but a per-replica report or an
    explanation reaches each replica by its pod IP or a port-forward: the name check failed.
    `--server-name` (report, explain, whatif) checks the certificate against that name instead,
    still verifying the chain; a wrong name still fails."""
    from stream_fair.cli import parser as cli_parser
    from stream_fair.web import client_context
    from tests.helpers import cli_env, run_cli

    openssl = shutil.which("openssl")
    assert openssl
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=stream-fair",
         "-addext", "subjectAltName=DNS:stream-fair",
         "-keyout", str(tmp_path / "tls.key"), "-out", str(tmp_path / "tls.crt")],
        check=True, capture_output=True,
    )  # fmt: skip
    web = _write(tmp_path, {"tls_server_config": {"cert_file": "tls.crt", "key_file": "tls.key"}})
    health = Health()
    health.heard(time.monotonic())
    health.heartbeat = time.monotonic() + 3600  # alive for the whole test
    reg = registry_for(lambda: (build_report(Tracker(CFG).snapshot(), CFG), PipelineStats()))
    server = ExporterServer(
        "127.0.0.1", 0, reg, health, web=load_web_config(web), search=lambda: {"models": {}}
    ).start()
    base = f"https://127.0.0.1:{server.port}"
    ca = str(tmp_path / "tls.crt")
    try:
        assert _get(base + "/healthz", client_context(ca, "stream-fair")) == 200
        for ctx in (client_context(ca), client_context(ca, "another-name")):
            with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
                _get(base + "/healthz", ctx)
        env = cli_env()
        ok = run_cli(
            "explain",
            "--url",
            base,
            "--search",
            "--json",
            "--cacert",
            ca,
            "--server-name",
            "stream-fair",
            env=env,
        )
        assert ok.returncode == 0 and json.loads(ok.stdout) == {"models": {}}, ok.stderr
        mismatch = run_cli("explain", "--url", base, "--search", "--cacert", ca, env=env)
        assert mismatch.returncode == 2 and "CERTIFICATE_VERIFY_FAILED" in mismatch.stderr, mismatch.stderr
    finally:
        server.stop()
    parser = cli_parser()
    for command in (["report", "--url", base], ["whatif", "--url", base, "--model", "m", "--feature", "sex"]):
        assert parser.parse_args([*command, "--server-name", "stream-fair"]).server_name == "stream-fair"


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        ({"tls_server_config": {"cert_file": "tls.crt"}}, "needs cert_file and key_file"),
        ({"tls_server_config": {"cert_file": "nope.crt", "key_file": "tls.key"}}, "cannot load cert_file"),
        (
            {"tls_server_config": {"cert_file": "tls.crt", "key_file": "tls.key", "min_version": "SSL3"}},
            "TLS version 'SSL3' is unknown",
        ),
        (
            {"tls_server_config": {"cert_file": "tls.crt", "key_file": "tls.key", "cipher_suites": []}},
            "cipher_suites is not supported",
        ),
        (
            {
                "tls_server_config": {
                    "cert_file": "tls.crt",
                    "key_file": "tls.key",
                    "client_auth_type": "RequireAndVerifyClientCert",
                }
            },
            "needs client_ca_file",
        ),
        ({"basic_auth_users": {"u": "plaintext"}}, "basic_auth_users.u is not a bcrypt hash"),
        ({"basic_auth": {}}, "unknown or unsupported key 'basic_auth'"),
    ],
)
def test_a_bad_web_config_is_one_line_naming_the_key(
    cert: Path, doc: dict[str, object], expected: str
) -> None:
    with pytest.raises(ConfigError) as err:
        load_web_config(_write(cert, doc))
    message = str(err.value)
    assert "\n" not in message and message.startswith("config error: exporter.web_config_file: ")
    assert expected in message


def test_a_missing_web_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="exporter.web_config_file: cannot read"):
        load_web_config(tmp_path / "absent.yml")


def test_password_guesses_cost_one_bcrypt_at_a_time_and_repeats_none(monkeypatch: pytest.MonkeyPatch) -> None:
    """Review finding: every wrong password paid a full bcrypt check, uncached and unthrottled; 32
    guessing clients kept 4 checks running on the 2 cores and slowed the consumer to a quarter.
    Now one check runs at a time (a request arriving meanwhile is refused at once) and a denied
    password is remembered like a granted one."""
    import threading

    from stream_fair.web import parse_web_config

    hashed = bcrypt.hashpw(b"right", bcrypt.gensalt(4)).decode()
    cfg = parse_web_config({"basic_auth_users": {"prometheus": hashed}}, ".")
    running, most, calls = [0], [0], [0]
    lock = threading.Lock()
    real = bcrypt.checkpw

    def counted(password: bytes, hashed: bytes) -> bool:
        with lock:
            running[0] += 1
            calls[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.05)  # a real cost-10 check takes about this long
        try:
            return bool(real(password, hashed))
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(bcrypt, "checkpw", counted)

    def header(password: str) -> str:
        return "Basic " + base64.b64encode(f"prometheus:{password}".encode()).decode()

    results: list[bool] = []
    threads = [
        threading.Thread(target=lambda i=i: results.append(cfg.authorized(header(f"guess-{i % 4}"))))
        for i in range(32)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not any(results) and len(results) == 32
    assert most[0] == 1, most[0]  # never two checks at once
    for _ in range(2):  # sequentially now: each distinct wrong password is checked once, ever
        for i in range(4):
            assert not cfg.authorized(header(f"guess-{i}"))
    assert calls[0] <= 4, calls[0]
    assert cfg.authorized(header("right")) and cfg.authorized(header("right"))
    assert calls[0] <= 5, calls[0]

    # a right password is not locked out by guesses: it waits its turn (review finding: refused
    # at once while another check ran, 0 of 40 got in under 3 guessing threads)
    fresh = parse_web_config({"basic_auth_users": {"prometheus": hashed, "alice": hashed}}, ".")
    stop = threading.Event()

    def guess() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            fresh.authorized(header(f"random-{threading.get_ident()}-{i}"))

    guessers = [threading.Thread(target=guess, daemon=True) for _ in range(3)]
    for g in guessers:
        g.start()
    try:
        time.sleep(0.2)
        got = [fresh.authorized(header("right")) for _ in range(3)]
    finally:
        stop.set()
        for g in guessers:
            g.join(10)
    assert got == [True, True, True], got
    # two right passwords at once (two Prometheus replicas): both in
    both: list[bool] = []
    alice = "Basic " + base64.b64encode(b"alice:right").decode()
    pair = [
        threading.Thread(target=lambda h=h: both.append(fresh.authorized(h)))
        for h in (alice, header("right"))
    ]
    for t in pair:
        t.start()
    for t in pair:
        t.join()
    assert both == [True, True], both
